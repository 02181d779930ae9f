"""intermediate.py: layer maps, width projections, query/key/value hooks on BERT, DistilBERT, RoBERTa, Llama and
GPT-2, and the switch to eager attention."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from distil_trainer import intermediate


# ---- layer maps ----

def test_uniform_map_is_tinybert_s_and_ends_on_the_last_teacher_layer():
    assert intermediate.uniform_layer_map(4, 12) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}
    assert intermediate.uniform_layer_map(4, 6) == {0: 0, 1: 1, 2: 3, 3: 4, 4: 6}
    assert intermediate.uniform_layer_map(3, 3) == {0: 0, 1: 1, 2: 2, 3: 3}
    with pytest.raises(ValueError, match="at most the teacher's layers"):
        intermediate.uniform_layer_map(6, 4)


def test_given_maps_are_parsed_and_checked_against_the_models():
    assert intermediate.resolve_layer_map("2:4, 0:0,1:2", 2, 6) == {0: 0, 1: 2, 2: 4}
    assert intermediate.resolve_layer_map({1: 6}, 2, 6) == {1: 6}
    assert intermediate.resolve_layer_map(None, 2, 6) == {0: 0, 1: 3, 2: 6}
    with pytest.raises(ValueError, match="out of range: the student has layers 0..2 and the teacher 0..6"):
        intermediate.resolve_layer_map("3:6", 2, 6)
    with pytest.raises(ValueError, match="is not 'student:teacher'"):
        intermediate.parse_layer_map("0-0")
    with pytest.raises(ValueError, match="integers"):
        intermediate.parse_layer_map("a:1")
    with pytest.raises(ValueError, match="twice"):
        intermediate.parse_layer_map("1:1,1:2")
    assert intermediate.attention_layer_pairs({0: 0, 1: 2, 2: 4}) == [(0, 1), (1, 3)]


# ---- projections ----

def test_projections_exist_only_for_different_widths_and_map_each_layer():
    same = intermediate.HiddenProjections(32, 32, [0, 1, 2])
    h = torch.randn(2, 3, 32)
    assert len(list(same.parameters())) == 0 and same.project(1, h) is h
    wide = intermediate.HiddenProjections(24, 32, [0, 2])
    assert sorted(wide.maps) == ["0", "2"]
    x = torch.randn(2, 3, 24)
    layer = wide.maps["2"]
    assert torch.allclose(wide.project(2, x), x @ layer.weight.T + layer.bias)


# ---- hooks ----

def run_and_capture(model, layer, ids):
    capture = intermediate.QKVCapture(model, layer)
    with torch.no_grad(), capture.recording() as qkv:
        out = model(input_ids=ids, output_hidden_states=True)
    return dict(qkv), out.hidden_states


def linear(model, name, x):
    """x W^T + b with the weights read from the state dict by name."""
    state = model.state_dict()
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


IDS = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make,prefix,names", [
    (tiny.tiny_bert_mlm, "bert.encoder.layer.{}.attention.self", ("query", "key", "value")),
    (tiny.tiny_roberta_mlm, "roberta.encoder.layer.{}.attention.self", ("query", "key", "value")),
    (tiny.tiny_distilbert_mlm, "distilbert.transformer.layer.{}.attention", ("q_lin", "k_lin", "v_lin")),
])
def test_hooks_read_the_projections_of_the_requested_encoder_layer(make, prefix, names):
    model = make()
    layer = 2
    qkv, hidden = run_and_capture(model, layer, IDS)
    layer_input = hidden[layer - 1]  # encoder layers project their input hidden states directly
    for kind, name in zip(("query", "key", "value"), names):
        assert torch.allclose(qkv[kind], linear(model, f"{prefix.format(layer - 1)}.{name}", layer_input), atol=1e-6)


def test_hooks_on_llama_read_the_normed_input_with_grouped_kv_widths():
    model = tiny.tiny_llama_lm()  # 4 query heads, 2 key/value heads of width 8
    qkv, hidden = run_and_capture(model, 3, IDS)
    block = model.model.layers[2]
    x = block.input_layernorm(hidden[2])
    assert qkv["query"].shape[-1] == 32 and qkv["key"].shape[-1] == 16
    for kind, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        assert torch.allclose(qkv[kind], linear(model, f"model.layers.2.self_attn.{name}", x), atol=1e-6)


def test_hooks_split_gpt2_fused_projection():
    model = tiny.tiny_gpt2_lm()
    qkv, hidden = run_and_capture(model, 1, IDS)
    x = model.transformer.h[0].ln_1(hidden[0])
    state = model.state_dict()
    fused = x @ state["transformer.h.0.attn.c_attn.weight"] + state["transformer.h.0.attn.c_attn.bias"]  # Conv1D
    q, k, v = fused.split(32, dim=-1)
    assert torch.allclose(qkv["query"], q, atol=1e-6)
    assert torch.allclose(qkv["key"], k, atol=1e-6)
    assert torch.allclose(qkv["value"], v, atol=1e-6)


def test_hooks_record_nothing_outside_recording_and_keep_the_graph():
    model = tiny.tiny_bert_mlm()
    capture = intermediate.QKVCapture(model, 4)
    model(input_ids=IDS)
    assert capture.outputs == {}
    with capture.recording() as qkv:
        model(input_ids=IDS)
        assert any(m._forward_hooks for m in model.modules())
    assert set(qkv) == {"query", "key", "value"} and qkv["query"].requires_grad
    assert not any(m._forward_hooks for m in model.modules())  # hooks exist during the recording only
    model(input_ids=IDS[:1])  # a later forward (e.g. a checkpointed layer re-run) leaves the recording alone
    assert qkv["query"].shape[0] == 2


def test_hooks_name_what_they_could_not_find():
    model = tiny.tiny_bert_mlm(layers=2)
    with pytest.raises(ValueError, match="Layer 3 has no self-attention: BertForMaskedLM has layers 1..2"):
        intermediate.QKVCapture(model, 3)
    for module in model.modules():
        for name, child in list(module.named_children()):
            if name == "key":
                setattr(module, "k", child)
                delattr(module, "key")
    with pytest.raises(ValueError, match="Could not find one query, key and value projection per layer"):
        intermediate.QKVCapture(model, 1)


# ---- eager attention ----

def test_eager_attention_is_switched_on_and_refused_when_it_cannot_be():
    model = tiny.tiny_bert_mlm()
    assert model.config._attn_implementation == "sdpa"
    assert intermediate.require_eager_attention(model, "student") == "sdpa"
    assert model.config._attn_implementation == "eager"
    out = model(input_ids=IDS, output_attentions=True)
    assert len(out.attentions) == 4
    assert intermediate.require_eager_attention(model, "student") is None  # already eager

    other = tiny.tiny_bert_mlm()
    other._can_set_attn_implementation = lambda: False  # e.g. a model without the attention interface
    with pytest.raises(ValueError, match="teacher BertForMaskedLM uses 'sdpa' and could not be switched to eager"):
        intermediate.require_eager_attention(other, "teacher")
