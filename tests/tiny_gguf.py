"""Write a tiny Llama model (and a tiny byte-level BPE tokenizer) as a GGUF file with the `gguf` package, the way
llama.cpp's convert_hf_to_gguf.py lays one out: its tensor names, the rotary permutation of q/k, the tokenizer
metadata. Transformers reads it back with its own GGUF loader, so tests exercise the real loading path in a second."""

import numpy as np
import torch

from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = ("the", "of", "and", "in", "to", "is", "was", "on", "for", "as")


def _permute(weights, n_head, n_head_kv):
    """llama.cpp's q/k permutation (interleaved rotary halves); transformers undoes it on loading."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _tokenizer_metadata():
    """A byte-level BPE vocabulary: the 256 byte symbols, merges for a few words, an end-of-text token."""
    symbols = list(bytes_to_unicode().values())
    merges, tokens = [], list(symbols)
    for word in WORDS:
        spelled = "\u0120" + word  # "Ġword": the word after a space
        current = spelled[0]
        for ch in spelled[1:]:
            merges.append(f"{current} {ch}")
            current += ch
            if current not in tokens:
                tokens.append(current)
    tokens.append("<|endoftext|>")
    types = [1] * (len(tokens) - 1) + [3]  # normal, ..., control
    return tokens, types, merges


def tiny_llama_config(tie_word_embeddings=True, layers=4):
    from transformers import LlamaConfig

    vocab = len(_tokenizer_metadata()[0])
    return LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=tie_word_embeddings, bos_token_id=vocab - 1,
                       eos_token_id=vocab - 1)


def write_tiny_llama_gguf(path, tie_word_embeddings=True, layers=4, seed=0):
    """Write a random tiny LlamaForCausalLM to `path` (F32 GGUF with tokenizer); returns the model it holds."""
    import gguf
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(tie_word_embeddings, layers)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so that a norm copied from the wrong place would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)
    tokens, types, merges = _tokenizer_metadata()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, cpp in names.items():
            weights = state[f"model.layers.{i}.{hf}.weight"]
            if cpp == "attn_q":
                weights = _permute(weights, heads, heads)
            elif cpp == "attn_k":
                weights = _permute(weights, heads, kv_heads)
            writer.add_tensor(f"blk.{i}.{cpp}.weight", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _words(n_words, seed):
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_decoder_benchmark_inputs(directory):
    """(teacher .gguf, training corpus, evaluation text) in `directory`, for the decoder benchmarks' smoke tests:
    a 4-layer tiny Llama and texts of its tokenizer's words (20 lines of 40 words; 2,000 words)."""
    teacher, corpus, eval_file = directory / "tiny.gguf", directory / "corpus.txt", directory / "eval.txt"
    write_tiny_llama_gguf(teacher, layers=4)
    corpus.write_text("\n".join(_words(40, seed) for seed in range(20)) + "\n", encoding="utf-8")
    eval_file.write_text(_words(2000, 99), encoding="utf-8")
    return teacher, corpus, eval_file
