"""Teacher and student of one tokenizer with vocabularies padded to different sizes (96 vs 128 rows here, as
Qwen2.5's 151,936 vs 152,064) are compared over the shared leading range; different tokenizers are refused with
both named."""

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distil_trainer import DistillationArguments, DistillationTrainer

WORDS = [f"w{i}" for i in range(80)]


def word_tokenizer(name, words=WORDS):
    """A real (fast) word-level tokenizer: [PAD], [UNK], then one id per word; len() = 82."""
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", name_or_path=name)


def tiny_llama(vocab_size, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Padding rows that a model would never be trained to rule out: large logits, which would dominate a
        # softmax taken over the whole padded vocabulary.
        model.lm_head.weight[82:] = 5.0
    return model


def args(tmp_path, **kw):
    weights = dict(alpha_ce=1.0, alpha_mse=0.5, alpha_mlm=0.0, alpha_cos=0.0, temperature=2.0)
    return DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{**weights, **kw})


def batch(tokenizer):
    lines = ["w1 w5 w7 w9 w11", "w3 w2 w70", "w60 w61 w62 w63 w64 w65 w66"]
    return dict(tokenizer(lines, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("student_vocab, teacher_vocab", [(96, 128), (128, 96)])
def test_terms_over_the_shared_range(student_vocab, teacher_vocab, tmp_path):
    tok = word_tokenizer("shared-tokenizer")
    student, teacher = tiny_llama(student_vocab, 0), tiny_llama(teacher_vocab, 1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), processing_class=tok,
                                  teacher_processing_class=tok)
    inputs = batch(tok)
    loss = trainer.compute_loss(student, inputs)

    # Independent: softmaxes over the first 96 entries only, averaged over the non-padding tokens.
    with torch.no_grad():
        s = student(**inputs).logits[..., :96].double()
        t = teacher(**inputs).logits[..., :96].double()
    keep = inputs["attention_mask"].bool()
    p_t = F.softmax(t / 2.0, -1)[keep]
    log_p_s = F.log_softmax(s / 2.0, -1)[keep]
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4.0
    mse = (s - t)[keep].pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx((kl + 0.5 * mse).item(), rel=1e-5)


def test_needs_the_tokenizers_to_compare(tmp_path):
    tok = word_tokenizer("shared-tokenizer")
    with pytest.raises(ValueError, match="teacher LlamaForCausalLM has 128 tokens, student "
                                         "LlamaForCausalLM has 96.*processing_class="):
        DistillationTrainer(model=tiny_llama(96, 0), teacher_model=tiny_llama(128, 1), args=args(tmp_path),
                            processing_class=tok)


def test_different_tokenizers_are_refused_naming_both(tmp_path):
    mine, theirs = word_tokenizer("student-tok"), word_tokenizer("teacher-tok", words=list(reversed(WORDS)))
    with pytest.raises(ValueError, match="different tokenizers.*'student-tok'.*'teacher-tok'"):
        DistillationTrainer(model=tiny_llama(96, 0), teacher_model=tiny_llama(128, 1), args=args(tmp_path),
                            processing_class=mine, teacher_processing_class=theirs)


def test_tokenizer_past_the_shared_range_is_refused(tmp_path):
    tok = word_tokenizer("big", words=[f"w{i}" for i in range(100)])  # 102 ids > 96 rows
    with pytest.raises(ValueError, match="ids past the smaller vocabulary.*at least 102 rows"):
        DistillationTrainer(model=tiny_llama(96, 0), teacher_model=tiny_llama(128, 1), args=args(tmp_path),
                            processing_class=tok, teacher_processing_class=tok)


def test_teacher_tokenizer_loaded_from_the_teacher_directory(tmp_path):
    """A teacher given by path brings its own tokenizer: the same one as the data's is accepted, a different one
    refused."""
    tok = word_tokenizer("shared-tokenizer")
    teacher_dir = tmp_path / "teacher"
    tiny_llama(128, 1).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    trainer = DistillationTrainer(model=tiny_llama(96, 0), teacher_model=str(teacher_dir),
                                  args=args(tmp_path / "run"), processing_class=tok)
    assert trainer._shared_vocab == 96
    other = word_tokenizer("student-tok", words=list(reversed(WORDS)))
    with pytest.raises(ValueError, match="different tokenizers"):
        DistillationTrainer(model=tiny_llama(96, 0), teacher_model=str(teacher_dir), args=args(tmp_path / "run2"),
                            processing_class=other)
