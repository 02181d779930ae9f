"""L_hidden, L_attn and L_relation inside DistillationTrainer: each equals a plain-torch formula written here from
the models' own outputs, is 0 for a copy of the teacher, is exact under gradient accumulation (projections
included), and the width projections are trained, checkpointed, restored on resume and left out of the export."""

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer
from test_accumulation import PadCollator, masked_examples

ALL_ZERO = dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_clm=0.0, alpha_mse=0.0, alpha_cos=0.0, alpha_task=0.0)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def teacher_bert():
    """4 layers, width 32, 2 heads (float64: the comparisons test formulas, not fp32 rounding)."""
    return tiny.tiny_bert_mlm(layers=4, hidden=32, heads=2, **NO_DROPOUT).double()


def narrow_student(hidden=24, layers=2, seed=11):
    return tiny.tiny_bert_mlm(layers=layers, hidden=hidden, heads=2, seed=seed, **NO_DROPOUT).double()


def make_trainer(student, teacher, tmp_path, **kw):
    args = DistillationArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                                 **{**ALL_ZERO, **kw})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    student.eval()
    return trainer


@pytest.fixture(scope="module")
def batch():
    tok = tiny.bert_tokenizer()
    lines = [" ".join(line.split()[:3 + 4 * i]) for i, line in enumerate(tiny.real_lines(5))]  # 3..19 words
    enc = tok(lines, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padding present
    return dict(enc)


def loss_of(trainer, batch):
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


def run(model, batch, **kw):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], output_hidden_states=True, **kw)


# ---- each term equals its formula ----

@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_term_is_the_projected_layer_distance(batch, tmp_path, metric):
    teacher, student = teacher_bert(), narrow_student()
    trainer = make_trainer(student, teacher, tmp_path, alpha_hidden=1.0, hidden_loss=metric,
                           intermediate_layer_map="0:0,1:2,2:4")
    h_s, h_t = run(student, batch).hidden_states, run(teacher, batch).hidden_states
    proj = student.distillation_projections.maps
    total, items = 0.0, 0
    for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for s, t in ((0, 0), (1, 2), (2, 4)):
            x = h_s[s][b, :n] @ proj[str(s)].weight.T + proj[str(s)].bias  # [n, 32]
            y = h_t[t][b, :n]
            if metric == "mse":
                per_token = ((x - y) ** 2).mean(1)
            else:
                per_token = 1 - (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
            total, items = total + per_token.sum().item(), items + n
    assert loss_of(trainer, batch) == pytest.approx(total / items, rel=1e-9)


def test_attention_term_is_the_mse_of_the_eager_attention_maps(batch, tmp_path):
    teacher, student = teacher_bert(), narrow_student(hidden=32)  # same heads, same width
    trainer = make_trainer(student, teacher, tmp_path, alpha_attn=1.0)  # uniform map: 1->2, 2->4
    assert teacher.config._attn_implementation == student.config._attn_implementation == "eager"
    a_s = run(student, batch, output_attentions=True).attentions
    a_t = run(teacher, batch, output_attentions=True).attentions
    total, items = 0.0, 0
    for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for s, t in ((0, 1), (1, 3)):
            total += ((a_s[s][b, :, :n, :n] - a_t[t][b, :, :n, :n]) ** 2).mean(0).sum().item()
            items += n * n
    assert loss_of(trainer, batch) == pytest.approx(total / items, rel=1e-9)


def bert_qkv(model, hidden_states, layer):
    """Queries, keys and values of a BERT layer (1-based) from its input hidden states, written out."""
    attn = model.bert.encoder.layer[layer - 1].attention.self
    x = hidden_states[layer - 1]
    return [x @ m.weight.T + m.bias for m in (attn.query, attn.key, attn.value)]


def relation_reference(s_qkv, t_qkv, mask, heads):
    total, items = 0.0, 0
    for b, n in enumerate(mask.sum(1).tolist()):
        for xs, xt in zip(s_qkv, t_qkv):
            for x, y in zip(xs[b, :n].chunk(heads, dim=-1), xt[b, :n].chunk(heads, dim=-1)):
                log_p_s = F.log_softmax(x @ x.T / x.shape[-1] ** 0.5, -1)
                log_p_t = F.log_softmax(y @ y.T / y.shape[-1] ** 0.5, -1)
                total += F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum").item() / heads
        items += n
    return total / items


def test_relation_term_is_minilmv2_s_kl_with_other_widths_and_heads(batch, tmp_path):
    teacher = teacher_bert()  # width 32, 2 heads
    student = tiny.tiny_bert_mlm(layers=2, hidden=24, heads=3, seed=12, **NO_DROPOUT).double()
    trainer = make_trainer(student, teacher, tmp_path, alpha_relation=1.0, relation_heads=4, relation_teacher_layer=3)
    s_qkv = bert_qkv(student, run(student, batch).hidden_states, 2)
    t_qkv = bert_qkv(teacher, run(teacher, batch).hidden_states, 3)
    expected = relation_reference(s_qkv, t_qkv, batch["attention_mask"], 4)
    assert loss_of(trainer, batch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("term", [dict(alpha_hidden=1.0), dict(alpha_hidden=1.0, hidden_loss="cosine"),
                                  dict(alpha_attn=1.0), dict(alpha_relation=1.0, relation_heads=4)])
def test_each_term_is_zero_for_a_copy_of_the_teacher(batch, tmp_path, term):
    teacher = teacher_bert()
    trainer = make_trainer(copy.deepcopy(teacher), teacher, tmp_path, intermediate_layer_map="0:0,2:2,4:4", **term)
    assert loss_of(trainer, batch) == pytest.approx(0.0, abs=1e-12)


def test_terms_are_logged_and_train_on_a_causal_llama(tmp_path):
    tok = tiny.gpt2_tokenizer()
    data = masked_examples(tok, causal=True)
    teacher = tiny.tiny_llama_lm(layers=4, hidden=32, heads=4)
    student = tiny.tiny_llama_lm(layers=2, hidden=16, heads=4, seed=9)
    args = DistillationArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                                 max_steps=4, logging_steps=2, per_device_train_batch_size=4,
                                 remove_unused_columns=False, **{**ALL_ZERO, "alpha_clm": 1.0, "alpha_hidden": 1.0,
                                                                 "alpha_relation": 1.0, "relation_heads": 2})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  data_collator=PadCollator(tok.pad_token_id))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2
    for entry in logged:
        assert {"loss_clm", "loss_hidden", "loss_relation"} <= entry.keys()
        assert entry["loss_hidden"] > 0 and entry["loss_relation"] > 0
    # No hook of the trainer (query/key/value capture, width projections) is left on either model.
    assert trainer_hooks(student, teacher) == []
    # Evaluation goes through the same loss, and hands Trainer only the logits (no hidden states).
    metrics = trainer.evaluate(eval_dataset=data.select(range(4)))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert trainer_hooks(student, teacher) == []


def trainer_hooks(*models):
    """The forward hooks of distil_trainer on the models (transformers installs output-capturing hooks of its own)."""
    return [hook for model in models for module in model.modules() for hook in module._forward_hooks.values()
            if getattr(hook, "__module__", "").startswith("distil_trainer")]


# ---- exact under accumulation: one SGD step from 16 examples, batch 16 x 1 vs batch 4 x 4 ----

def one_step_update(dataset, collator, batch_size, accumulation, tmp_path, **weights):
    teacher = tiny.tiny_bert_mlm(**NO_DROPOUT)
    student = tiny.tiny_distilbert_mlm(hidden=24, dropout=0.0, attention_dropout=0.0)
    args = DistillationArguments(
        output_dir=str(tmp_path / f"bs{batch_size}"), report_to=[], use_cpu=True, max_steps=1, learning_rate=1.0,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential", save_strategy="no",
        weight_decay=0.0, remove_unused_columns=False, **{**ALL_ZERO, **weights})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=collator)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}  # projections included
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "SGD"  # the update is -lr x gradient
    return {n: before[n] - p.detach() for n, p in student.named_parameters()}


@pytest.mark.parametrize("weights", [dict(alpha_hidden=1.0), dict(alpha_hidden=1.0, hidden_loss="cosine"),
                                     dict(alpha_attn=1.0), dict(alpha_relation=1.0, relation_heads=4),
                                     dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_hidden=1.0, alpha_attn=10.0,
                                          alpha_relation=1.0)])
def test_accumulation_is_exact(tmp_path, weights):
    tok = tiny.bert_tokenizer()
    data, collate = masked_examples(tok), PadCollator(tok.pad_token_id)
    big = one_step_update(data, collate, 16, 1, tmp_path, **weights)
    small = one_step_update(data, collate, 4, 4, tmp_path, **weights)
    a = torch.cat([v.flatten() for v in big.values()])
    b = torch.cat([small[n].flatten() for n in big])
    assert a.norm() > 0
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    if "alpha_hidden" in weights:  # the projections were trained, with the same exact gradient
        moved = [n for n in big if n.startswith("distillation_projections.") and big[n].norm() > 0]
        assert moved


def test_gradient_checkpointing_gives_the_same_update_and_reentrant_is_refused(tmp_path):
    tok = tiny.bert_tokenizer()
    data, collate = masked_examples(tok, n=8), PadCollator(tok.pad_token_id)
    weights = dict(alpha_hidden=1.0, alpha_relation=1.0, relation_heads=4)
    plain = one_step_update(data, collate, 8, 1, tmp_path / "plain", **weights)
    # Layers re-run in backward: the hooks record nothing then, and the recorded tensors keep their graph.
    checkpointed = one_step_update(data, collate, 8, 1, tmp_path / "gc", activation_checkpointing=True, **weights)
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=1e-4, atol=1e-7), n
    with pytest.raises(RuntimeError, match="use_reentrant"):
        one_step_update(data, collate, 8, 1, tmp_path / "reentrant", activation_checkpointing=True,
                        activation_checkpointing_kwargs={"use_reentrant": True}, **weights)


# ---- projections: checkpoints, resume, export ----

def small_run(tmp_path, out, max_steps, **kw):
    tok = tiny.bert_tokenizer()
    torch.manual_seed(0)
    teacher = tiny.tiny_bert_mlm(**NO_DROPOUT)
    student = tiny.tiny_distilbert_mlm(hidden=24, dropout=0.0, attention_dropout=0.0)
    args = DistillationArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=max_steps,
                                 save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                 lr_scheduler_type="constant",  # the same schedule whether max_steps is 2 or 4
                                 train_sampling_strategy="sequential", remove_unused_columns=False, seed=3,
                                 **{**ALL_ZERO, "alpha_mlm": 1.0, "alpha_hidden": 1.0}, **kw)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=masked_examples(tok),
                               data_collator=PadCollator(tok.pad_token_id), processing_class=tok)


def test_projections_are_checkpointed_restored_on_resume_and_left_out_of_the_export(tmp_path):
    from transformers import AutoModelForMaskedLM
    from transformers.trainer_utils import get_last_checkpoint

    whole = small_run(tmp_path, tmp_path / "whole", 4)
    whole.train()
    with safe_open(str(tmp_path / "whole" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("distillation_projections.maps.") for k in f.keys())

    # The exported student is the plain student: no projection weights, reloads with no unexpected keys.
    whole.save_model()
    with safe_open(str(tmp_path / "whole" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("distillation_projections") for k in f.keys())
    reloaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "whole", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not hasattr(reloaded, "distillation_projections")

    # A run stopped after checkpoint-2 and resumed ends where the uninterrupted one does, projections included,
    # although the resumed trainer starts from other projection weights.
    first = small_run(tmp_path, tmp_path / "resumed", 2)
    first.train()
    resumed = small_run(tmp_path, tmp_path / "resumed", 4)
    with torch.no_grad():
        for p in resumed.model.distillation_projections.parameters():
            p.fill_(0.5)
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path / "resumed")))
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("distillation_projections.") for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_projections_start_from_the_run_seed(tmp_path):
    """Not from whatever state torch's global RNG is in when the trainer is built."""
    teacher = teacher_bert()
    torch.manual_seed(1)
    a = make_trainer(narrow_student(), teacher, tmp_path, alpha_hidden=1.0, seed=7)
    torch.manual_seed(2)
    b = make_trainer(narrow_student(), teacher, tmp_path, alpha_hidden=1.0, seed=7)
    c = make_trainer(narrow_student(), teacher, tmp_path, alpha_hidden=1.0, seed=8)
    pa, pb, pc = (t.model.distillation_projections.state_dict() for t in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["maps.1.weight"], pc["maps.1.weight"])


# ---- set-up checks and eager attention ----

def test_attention_term_switches_both_models_to_eager_once_with_a_warning(tmp_path, caplog):
    teacher, student = tiny.tiny_bert_mlm(), tiny.tiny_distilbert_mlm()
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"
    with caplog.at_level(logging.WARNING, logger="distil_trainer"):
        make_trainer(student, teacher, tmp_path, alpha_attn=1.0, intermediate_layer_map="1:2,2:4")
    warnings = [r.getMessage() for r in caplog.records if "eager attention" in r.getMessage()]
    assert len(warnings) == 2 and "student" in warnings[0] and "teacher" in warnings[1]
    assert teacher.config._attn_implementation == student.config._attn_implementation == "eager"


def test_attention_term_is_refused_when_eager_cannot_be_set(tmp_path):
    teacher = tiny.tiny_bert_mlm()
    teacher._can_set_attn_implementation = lambda: False
    with pytest.raises(ValueError, match="could not be switched to eager"):
        make_trainer(tiny.tiny_distilbert_mlm(), teacher, tmp_path, alpha_attn=1.0)


@pytest.mark.parametrize("kw,message", [
    (dict(alpha_attn=1.0), "student has 4 heads and the teacher 2"),
    (dict(alpha_relation=1.0, relation_heads=5), "relation_heads=5 does not divide the student's query width 32"),
    (dict(alpha_relation=1.0, relation_teacher_layer=9), "relation_teacher_layer=9 but the teacher has layers 1..4"),
    (dict(alpha_hidden=1.0, intermediate_layer_map="0:0,3:4"), "entry 3:4 is out of range"),
])
def test_set_up_errors_name_the_problem(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tiny.tiny_distilbert_mlm(heads=4), tiny.tiny_bert_mlm(), tmp_path, **kw)


@pytest.mark.parametrize("kw,message", [
    (dict(hidden_loss="l2"), "hidden_loss='l2'"),
    (dict(intermediate_layer_map="0-0"), "is not 'student:teacher'"),
    (dict(relation_heads=0), "relation_heads=0 must be >= 1"),
    (dict(relation_teacher_layer=0), "numbered from 1"),
    (dict(alpha_relation=-1.0), "alpha_relation=-1.0 is negative"),
])
def test_arguments_are_validated(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_arguments_accept_a_dict_layer_map_and_only_intermediate_weights(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 **{**ALL_ZERO, "alpha_relation": 1.0}, intermediate_layer_map={0: 0, 1: 3})
    assert args.intermediate_layer_map == "0:0,1:3"
    assert args.loss_weights == {"relation": 1.0}
    assert json.loads(args.to_json_string())["intermediate_layer_map"] == "0:0,1:3"


# ---- several processes: 2 CPU processes (DDP over gloo) and DeepSpeed ZeRO-3 on 2 CPU processes ----

RUN_SCRIPT = tiny.REPO_ROOT / "tests" / "intermediate_run.py"


def launch(cmd, env_extra=None):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=tiny.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def zero3_launch_config(tmp_path):
    """The shipped ZeRO-3 config with 2 processes and the Trainer's AdamW (no compiled DeepSpeed ops on CPU)."""
    ds = json.loads((tiny.REPO_ROOT / "accelerate_configs" / "deepspeed_zero3.json").read_text())
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds.update(zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False)
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    launch_yaml = (tiny.REPO_ROOT / "accelerate_configs" / "deepspeed_zero3.yaml").read_text()
    launch_yaml = launch_yaml.replace("accelerate_configs/deepspeed_zero3.json", str(tmp_path / "zero3.json"))
    (tmp_path / "zero3.yaml").write_text(launch_yaml.replace("num_processes: 8", "num_processes: 2"))
    return tmp_path / "zero3.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["ddp", "zero3"])
def test_two_processes_match_one(tmp_path, setup):
    import sys

    from transformers import AutoModelForMaskedLM

    launch([sys.executable, str(RUN_SCRIPT), str(tmp_path / "one"), "8", "--use_cpu", "true"])
    if setup == "ddp":
        config, env, extra = tiny.REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml", {"ACCELERATE_USE_CPU": "1"}, []
    else:
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
        config, env, extra = zero3_launch_config(tmp_path), {}, ["--ddp_backend", "gloo"]
    proc = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(RUN_SCRIPT),
                   str(tmp_path / "two"), "4", *extra], env)
    if setup == "zero3":
        assert "Teacher: DeepSpeed inference engine, ZeRO stage 3" in proc.stderr
    keys = ("loss", "loss_ce", "loss_mlm", "loss_hidden", "loss_attn", "loss_relation")
    one = json.loads((tmp_path / "one" / "log.json").read_text())
    two = json.loads((tmp_path / "two" / "log.json").read_text())
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-5, abs=1e-7)
    # The later losses depend on the projections' updates; the exported students are equal and plain.
    a = AutoModelForMaskedLM.from_pretrained(tmp_path / "one" / "student").state_dict()
    b = AutoModelForMaskedLM.from_pretrained(tmp_path / "two" / "student").state_dict()
    assert a.keys() == b.keys() and not any("distillation_projections" in k for k in b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
