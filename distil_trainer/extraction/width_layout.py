"""Where each architecture keeps its widths: which modules the width measurements read, and how every tensor is
sliced when hidden channels, attention heads and MLP neurons are removed.

A slicing rule maps a tensor name (full match) to one index kind per dimension:

- ``hidden``: the kept hidden channels (embeddings, norms, every matrix's hidden side, the LM head);
- ``q`` / ``k`` / ``v``: the kept rows of the query / key / value projections (whole heads, or whole key-value
  groups with their query heads under GQA; with their kept dimensions where the head size shrinks);
- ``attn``: the inputs of the attention output projection (the kept heads' value dimensions);
- ``qkv``: GPT-2's fused c_attn output: [queries | keys | values], each sliced as q / k / v;
- ``ffn``: the kept MLP neurons (a GLU's gate and up rows and the down projection's columns together);
- None: left whole (vocabulary, positions, token types).

GPT-2's Conv1D weights are stored [in, out], the transpose of nn.Linear: its rules say so by their order.
"""

from dataclasses import dataclass

L = r"(?P<layer>\d+)"


@dataclass(frozen=True)
class WidthLayout:
    family: str
    # Generic size name -> the config attribute that holds it.
    config_keys: dict
    # Llama-style configs carry head_dim, so heads can go without touching the head size; BERT/GPT-2/DistilBERT
    # derive it as hidden_size / num_attention_heads.
    explicit_head_dim: bool
    # Module names inside one block: the attention output projection (its input is the heads' outputs), the query
    # and key projections (or GPT-2's fused one), the MLP's output projection (its input is the neurons).
    attention_output: str
    query: str | None
    key: str | None
    fused_qkv: str | None
    mlp_output: str
    rules: tuple  # (regex, kinds per dimension)


LLAMA = WidthLayout(
    family="llama",
    config_keys={"hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
                 "intermediate_size": "intermediate_size", "num_key_value_heads": "num_key_value_heads"},
    explicit_head_dim=True,
    attention_output="self_attn.o_proj", query="self_attn.q_proj", key="self_attn.k_proj", fused_qkv=None,
    mlp_output="mlp.down_proj",
    rules=(
        (r"model\.embed_tokens\.weight", (None, "hidden")),
        (r"lm_head\.weight", (None, "hidden")),
        (r"model\.norm\.weight", ("hidden",)),
        (rf"model\.layers\.{L}\.(input_layernorm|post_attention_layernorm)\.weight", ("hidden",)),
        (rf"model\.layers\.{L}\.self_attn\.q_proj\.weight", ("q", "hidden")),
        (rf"model\.layers\.{L}\.self_attn\.q_proj\.bias", ("q",)),
        (rf"model\.layers\.{L}\.self_attn\.k_proj\.weight", ("k", "hidden")),
        (rf"model\.layers\.{L}\.self_attn\.k_proj\.bias", ("k",)),
        (rf"model\.layers\.{L}\.self_attn\.v_proj\.weight", ("v", "hidden")),
        (rf"model\.layers\.{L}\.self_attn\.v_proj\.bias", ("v",)),
        (rf"model\.layers\.{L}\.self_attn\.o_proj\.weight", ("hidden", "attn")),
        (rf"model\.layers\.{L}\.self_attn\.o_proj\.bias", ("hidden",)),
        (rf"model\.layers\.{L}\.self_attn\.(q_norm|k_norm)\.weight", (None,)),  # per head dimension (Qwen3)
        (rf"model\.layers\.{L}\.mlp\.(gate_proj|up_proj)\.weight", ("ffn", "hidden")),
        (rf"model\.layers\.{L}\.mlp\.(gate_proj|up_proj)\.bias", ("ffn",)),
        (rf"model\.layers\.{L}\.mlp\.down_proj\.weight", ("hidden", "ffn")),
        (rf"model\.layers\.{L}\.mlp\.down_proj\.bias", ("hidden",)),
    ),
)

_BERT_BODY = r"(bert|roberta)"
BERT = WidthLayout(
    family="bert",
    config_keys={"hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
                 "intermediate_size": "intermediate_size"},
    explicit_head_dim=False,
    attention_output="attention.output.dense", query="attention.self.query", key="attention.self.key",
    fused_qkv=None, mlp_output="output.dense",
    rules=(
        (rf"{_BERT_BODY}\.embeddings\.(word|position|token_type)_embeddings\.weight", (None, "hidden")),
        (rf"{_BERT_BODY}\.embeddings\.LayerNorm\.(weight|bias)", ("hidden",)),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.self\.query\.weight", ("q", "hidden")),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.self\.query\.bias", ("q",)),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.self\.key\.weight", ("k", "hidden")),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.self\.key\.bias", ("k",)),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.self\.value\.weight", ("v", "hidden")),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.self\.value\.bias", ("v",)),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.attention\.output\.dense\.weight", ("hidden", "attn")),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.(attention\.output\.dense\.bias|attention\.output\.LayerNorm\.weight"
         r"|attention\.output\.LayerNorm\.bias)", ("hidden",)),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.intermediate\.dense\.weight", ("ffn", "hidden")),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.intermediate\.dense\.bias", ("ffn",)),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.output\.dense\.weight", ("hidden", "ffn")),
        (rf"{_BERT_BODY}\.encoder\.layer\.{L}\.output\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", ("hidden",)),
        (rf"{_BERT_BODY}\.pooler\.dense\.weight", ("hidden", "hidden")),
        (rf"{_BERT_BODY}\.pooler\.dense\.bias", ("hidden",)),
        # BERT's MLM head (cls.predictions) and RoBERTa's (lm_head): transform, norm, tied decoder, vocabulary bias.
        (r"cls\.predictions\.transform\.dense\.weight|lm_head\.dense\.weight", ("hidden", "hidden")),
        (r"cls\.predictions\.transform\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)"
         r"|lm_head\.(dense\.bias|layer_norm\.weight|layer_norm\.bias)", ("hidden",)),
        (r"cls\.predictions\.decoder\.weight|lm_head\.decoder\.weight", (None, "hidden")),
        (r"cls\.predictions\.(bias|decoder\.bias)|lm_head\.(bias|decoder\.bias)", (None,)),
    ),
)

DISTILBERT = WidthLayout(
    family="distilbert",
    config_keys={"hidden_size": "dim", "num_attention_heads": "n_heads", "intermediate_size": "hidden_dim"},
    explicit_head_dim=False,
    attention_output="attention.out_lin", query="attention.q_lin", key="attention.k_lin", fused_qkv=None,
    mlp_output="ffn.lin2",
    rules=(
        (r"distilbert\.embeddings\.(word|position)_embeddings\.weight", (None, "hidden")),
        (r"distilbert\.embeddings\.LayerNorm\.(weight|bias)", ("hidden",)),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.q_lin\.weight", ("q", "hidden")),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.q_lin\.bias", ("q",)),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.k_lin\.weight", ("k", "hidden")),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.k_lin\.bias", ("k",)),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.v_lin\.weight", ("v", "hidden")),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.v_lin\.bias", ("v",)),
        (rf"distilbert\.transformer\.layer\.{L}\.attention\.out_lin\.weight", ("hidden", "attn")),
        (rf"distilbert\.transformer\.layer\.{L}\.(attention\.out_lin\.bias|sa_layer_norm\.weight|sa_layer_norm\.bias"
         r"|ffn\.lin2\.bias|output_layer_norm\.weight|output_layer_norm\.bias)", ("hidden",)),
        (rf"distilbert\.transformer\.layer\.{L}\.ffn\.lin1\.weight", ("ffn", "hidden")),
        (rf"distilbert\.transformer\.layer\.{L}\.ffn\.lin1\.bias", ("ffn",)),
        (rf"distilbert\.transformer\.layer\.{L}\.ffn\.lin2\.weight", ("hidden", "ffn")),
        (r"vocab_transform\.weight", ("hidden", "hidden")),
        (r"vocab_transform\.bias|vocab_layer_norm\.(weight|bias)", ("hidden",)),
        (r"vocab_projector\.weight", (None, "hidden")),
        (r"vocab_projector\.bias", (None,)),
    ),
)

GPT2 = WidthLayout(
    family="gpt2",
    config_keys={"hidden_size": "n_embd", "num_attention_heads": "n_head", "intermediate_size": "n_inner"},
    explicit_head_dim=False,
    attention_output="attn.c_proj", query=None, key=None, fused_qkv="attn.c_attn", mlp_output="mlp.c_proj",
    rules=(
        (r"transformer\.(wte|wpe)\.weight", (None, "hidden")),
        (rf"transformer\.h\.{L}\.(ln_1|ln_2)\.(weight|bias)", ("hidden",)),
        (r"transformer\.ln_f\.(weight|bias)", ("hidden",)),
        (rf"transformer\.h\.{L}\.attn\.c_attn\.weight", ("hidden", "qkv")),  # Conv1D: [in, out]
        (rf"transformer\.h\.{L}\.attn\.c_attn\.bias", ("qkv",)),
        (rf"transformer\.h\.{L}\.attn\.c_proj\.weight", ("attn", "hidden")),
        (rf"transformer\.h\.{L}\.(attn\.c_proj|mlp\.c_proj)\.bias", ("hidden",)),
        (rf"transformer\.h\.{L}\.mlp\.c_fc\.weight", ("hidden", "ffn")),
        (rf"transformer\.h\.{L}\.mlp\.c_fc\.bias", ("ffn",)),
        (rf"transformer\.h\.{L}\.mlp\.c_proj\.weight", ("ffn", "hidden")),
        (r"lm_head\.weight", (None, "hidden")),
    ),
)

LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "bert": BERT, "roberta": BERT,
           "distilbert": DISTILBERT, "gpt2": GPT2}


def layout_of(model):
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise ValueError(f"Width pruning does not know the tensors of model type {model_type!r}; supported: "
                         f"{', '.join(sorted(LAYOUTS))}. Choose the student's layers only (no hidden_size, "
                         "num_attention_heads or intermediate_size), or train a student of that width from scratch.")
    return LAYOUTS[model_type]


def sizes_of(config, layout):
    """{generic size name: value} of a config, with GPT-2's n_inner = None read as 4 x n_embd."""
    values = {name: getattr(config, key) for name, key in layout.config_keys.items()}
    if values.get("intermediate_size") is None:
        values["intermediate_size"] = 4 * values["hidden_size"]
    if "num_key_value_heads" in values and values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    values["head_dim"] = (getattr(config, "head_dim", None) if layout.explicit_head_dim else None) or (
        values["hidden_size"] // values["num_attention_heads"])
    return values
