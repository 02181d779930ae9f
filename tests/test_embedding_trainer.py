"""L_embed and L_embed_relation inside DistillationTrainer: each equals a plain-torch formula written here from the
models' own hidden states, pooled the teacher's way (mean by default; a sentence-transformers folder's CLS / last
token / Normalize); exact under gradient accumulation and on 2 processes; the width projection is trained,
checkpointed and left out of the export, and its PCA initialisation spans the teacher's top principal directions;
a teacher cache is refused."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer
from launch import CONFIGS, accelerate_launch
from test_accumulation import PadCollator, masked_examples
from test_intermediate_trainer import (ALL_ZERO, NO_DROPOUT, batch, loss_of, narrow_student, run,  # noqa: F401
                                      trainer_hooks)

REPO = tiny.REPO_ROOT


def teacher_bert():
    return tiny.tiny_bert_mlm(layers=4, hidden=32, heads=2, **NO_DROPOUT).double()


def make_trainer(student, teacher, tmp_path, dataset=None, **kw):
    args = DistillationArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                                 **{**ALL_ZERO, **kw})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tiny.bert_tokenizer())
    student.eval()
    return trainer


def mean_pooled(hidden, mask):
    """Per sentence, the mean of its real (mask 1) token vectors, written as a loop."""
    return torch.stack([hidden[b, :n].mean(0) for b, n in enumerate(mask.sum(1).tolist())])


def st_teacher_folder(tmp_path, pooling, normalize):
    """A tiny BERT saved as a sentence-transformers folder with the given pooling (legacy keys) and Normalize."""
    folder = tmp_path / f"st-{pooling}-{normalize}"
    teacher_bert().save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_lasttoken": pooling == "lasttoken"}))
    return folder


# ---- each term equals its formula ----

@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_embed_term_is_the_distance_of_mean_pooled_embeddings_through_the_projection(batch, tmp_path, metric):
    teacher, student = teacher_bert(), narrow_student()
    trainer = make_trainer(student, teacher, tmp_path, alpha_embed=1.0, embed_loss=metric)
    mask = batch["attention_mask"]
    proj = student.distillation_projections.maps["embed"]
    s = mean_pooled(run(student, batch).hidden_states[-1], mask) @ proj.weight.T + proj.bias
    t = mean_pooled(run(teacher, batch).hidden_states[-1], mask)
    if metric == "mse":
        expected = F.mse_loss(s, t).item()  # sentence-transformers' MSELoss
    else:
        expected = (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean().item()
    assert loss_of(trainer, batch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("pooling", ["cls", "lasttoken"])
def test_pooling_and_normalisation_follow_a_sentence_transformers_teacher(batch, tmp_path, pooling):
    from transformers import AutoModelForMaskedLM

    teacher = AutoModelForMaskedLM.from_pretrained(st_teacher_folder(tmp_path, pooling, True)).double()
    student = tiny.tiny_bert_mlm(layers=2, hidden=32, heads=2, seed=11, **NO_DROPOUT).double()  # same width
    trainer = make_trainer(student, teacher, tmp_path, alpha_embed=1.0, embed_loss="mse",
                           alpha_embed_relation=0.5, embed_relation_temperature=0.2)
    assert not hasattr(student, "distillation_projections")  # same width: nothing to learn
    ends = (batch["attention_mask"].sum(1) - 1).tolist()

    def pooled(model):
        h = run(model, batch).hidden_states[-1]
        rows = [h[b, 0] if pooling == "cls" else h[b, end] for b, end in enumerate(ends)]
        return torch.stack([r / r.norm() for r in rows])

    s, t = pooled(student), pooled(teacher)
    embed = ((s - t) ** 2).mean().item()
    relation = 0.0
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        p_s = torch.softmax(torch.stack([s[i] @ s[j] for j in others]) / 0.2, 0)
        p_t = torch.softmax(torch.stack([t[i] @ t[j] for j in others]) / 0.2, 0)
        relation += (p_t * (p_t / p_s).log()).sum().item() / len(s)
    assert loss_of(trainer, batch) == pytest.approx(embed + 0.5 * relation, rel=1e-9)
    # An explicit embed_pooling / embed_normalize wins over the folder.
    over = make_trainer(student, teacher, tmp_path, alpha_embed=1.0, embed_pooling="mean", embed_normalize=False)
    t_mean = mean_pooled(run(teacher, batch).hidden_states[-1], batch["attention_mask"])
    s_mean = mean_pooled(run(student, batch).hidden_states[-1], batch["attention_mask"])
    assert loss_of(over, batch) == pytest.approx(F.mse_loss(s_mean, t_mean).item(), rel=1e-9)


def test_zero_for_a_copy_of_the_teacher_and_logged(batch, tmp_path):
    import copy

    teacher = teacher_bert()
    trainer = make_trainer(copy.deepcopy(teacher), teacher, tmp_path, alpha_embed=1.0, alpha_embed_relation=1.0)
    assert loss_of(trainer, batch) == pytest.approx(0.0, abs=1e-12)


def test_teacher_cache_and_unsupported_pooling_are_refused(tmp_path):
    student = narrow_student()
    args = DistillationArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True,
                                 **{**ALL_ZERO, "alpha_embed": 1.0})
    with pytest.raises(ValueError, match="alpha_embed=1.0: the sentence-embedding terms cannot be trained from a "
                                         "teacher cache"):
        DistillationTrainer(model=student, teacher_cache=str(tmp_path / "cache"), args=args)
    from transformers import AutoModelForMaskedLM

    folder = st_teacher_folder(tmp_path, "mean", False)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    teacher = AutoModelForMaskedLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"pools with \['max'\].*embed_pooling"):
        DistillationTrainer(model=narrow_student().float(), teacher_model=teacher, args=args)
    with pytest.raises(ValueError, match="embed_loss='l1'"):
        DistillationArguments(output_dir=str(tmp_path / "o"), alpha_embed=1.0, embed_loss="l1")


# ---- exact under accumulation: one SGD step from 16 examples ----

def one_step_update(batch_size, accumulation, tmp_path, dtype=torch.float32, **weights):
    tok = tiny.bert_tokenizer()
    teacher = tiny.tiny_bert_mlm(**NO_DROPOUT).to(dtype)
    student = tiny.tiny_bert_mlm(layers=2, hidden=24, seed=11, **NO_DROPOUT).to(dtype)
    args = DistillationArguments(
        output_dir=str(tmp_path / f"bs{batch_size}"), report_to=[], use_cpu=True, max_steps=1, learning_rate=1.0,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential", save_strategy="no",
        weight_decay=0.0, remove_unused_columns=False, **{**ALL_ZERO, **weights})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=masked_examples(tok),
                                  data_collator=PadCollator(tok.pad_token_id))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}  # the projection included
    trainer.train()
    return torch.cat([(before[n] - p.detach()).flatten() for n, p in student.named_parameters()]), teacher, before


@pytest.mark.parametrize("weights", [dict(alpha_embed=1.0), dict(alpha_embed=1.0, embed_loss="cosine"),
                                     dict(alpha_embed=1.0, alpha_cos=0.0, alpha_mlm=1.0, embed_pooling="cls")])
def test_accumulation_is_exact(tmp_path, weights):
    big, _, _ = one_step_update(16, 1, tmp_path, **weights)
    small, _, _ = one_step_update(4, 4, tmp_path, **weights)
    assert big.norm() > 0 and ((big - small).norm() / big.norm()).item() < 1e-5


def test_relation_term_accumulates_each_micro_batch_s_rows_over_the_step(tmp_path):
    """With 4 x 4, each sentence's row is over its own micro-batch; the step's gradient is that of the sum of the 16
    rows / 16, computed here with plain torch from the initial weights."""
    from transformers import BertForMaskedLM

    small, teacher, before = one_step_update(4, 4, tmp_path, dtype=torch.float64, alpha_embed_relation=1.0,
                                             embed_relation_temperature=0.1)
    student = tiny.tiny_bert_mlm(layers=2, hidden=24, seed=11, **NO_DROPOUT).double()
    assert isinstance(student, BertForMaskedLM)
    student.load_state_dict({k: v for k, v in before.items()}, strict=False)
    tok = tiny.bert_tokenizer()
    data = masked_examples(tok)
    collate = PadCollator(tok.pad_token_id)
    total = 0.0
    for start in range(0, 16, 4):
        b = collate([data[i] for i in range(start, start + 4)])
        out = lambda m: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],  # noqa: E731
                          output_hidden_states=True).hidden_states[-1]
        s = mean_pooled(out(student), b["attention_mask"])
        with torch.no_grad():
            t = mean_pooled(out(teacher), b["attention_mask"])
        for i in range(4):
            others = [j for j in range(4) if j != i]
            cos = lambda e: torch.stack([F.cosine_similarity(e[i], e[j], 0) for j in others]) / 0.1  # noqa: E731
            p_t = torch.softmax(cos(t), 0)
            total = total + (p_t * (p_t.log() - torch.log_softmax(cos(s), 0))).sum()
    (total / 16).backward()
    expected = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                          for _, p in student.named_parameters()])
    assert expected.norm() > 0 and ((small - expected).norm() / expected.norm()).item() < 1e-9


# ---- the projection: PCA initialisation, checkpoints, export ----

def test_pca_initialisation_spans_the_teacher_s_top_principal_directions(tmp_path):
    tok = tiny.bert_tokenizer()
    data = masked_examples(tok, n=40)
    teacher = teacher_bert()
    trainer = make_trainer(narrow_student(hidden=8), teacher, tmp_path, dataset=data, alpha_embed=1.0,
                           embed_projection_init="pca", embed_pca_samples=30)
    linear = trainer.model.distillation_projections.maps["embed"]
    # The teacher's mean-pooled embeddings of the first 30 sentences, each alone (no padding), and their covariance.
    with torch.no_grad():
        rows = [teacher(input_ids=torch.tensor([data[i]["input_ids"]]), output_hidden_states=True).hidden_states[-1]
                [0].mean(0) for i in range(30)]
    x = torch.stack(rows)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean)
    top = torch.linalg.eigvalsh(cov).flip(0)[:8]
    w = linear.weight.detach()  # [32, 8]
    assert torch.allclose(linear.bias.detach(), mean, atol=1e-6)
    assert torch.allclose(w.T @ w, torch.eye(8, dtype=w.dtype), atol=1e-6)  # orthonormal directions
    assert torch.allclose(torch.diag(w.T @ cov @ w), top, rtol=1e-5)  # ... the top 8, in order
    with pytest.raises(ValueError, match="raise embed_pca_samples to at least 8"):
        make_trainer(narrow_student(hidden=8), teacher, tmp_path, dataset=data, alpha_embed=1.0,
                     embed_projection_init="pca", embed_pca_samples=5)


def test_projection_is_checkpointed_and_left_out_of_the_export(tmp_path):
    from transformers import AutoModelForMaskedLM

    tok = tiny.bert_tokenizer()
    args = DistillationArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=2,
                                 save_steps=2, per_device_train_batch_size=4, remove_unused_columns=False,
                                 **{**ALL_ZERO, "alpha_embed": 1.0, "alpha_hidden": 1.0})
    student = tiny.tiny_bert_mlm(layers=2, hidden=24, seed=11, **NO_DROPOUT)
    trainer = DistillationTrainer(model=student, teacher_model=tiny.tiny_bert_mlm(**NO_DROPOUT), args=args,
                                  train_dataset=masked_examples(tok), data_collator=PadCollator(tok.pad_token_id))
    before = student.distillation_projections.maps["embed"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, student.distillation_projections.maps["embed"].weight)  # trained
    assert trainer_hooks(student) == []  # the embedding hook lives around the trainer's forwards only
    with safe_open(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # The embedding map joins the hidden-state maps in the one projection module.
    assert "distillation_projections.maps.embed.weight" in keys and "distillation_projections.maps.0.weight" in keys
    trainer.save_model()
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("distillation_projections") for k in f.keys())
    _, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]


# ---- 2 processes (DDP over gloo, batch 4 each) = 1 process with batch 4 x accumulation 2 ----

@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Both see the micro-batches [0..3] and [4..7] of each step of 8, so even the relational term (a row per
    sentence over its own micro-batch) is the same; the projection's gradient goes through DDP's all-reduce."""
    import subprocess

    script = REPO / "tests" / "embedding_run.py"
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4", "--use_cpu", "true",
                          "--gradient_accumulation_steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(CONFIGS / "cpu_2proc.yaml", script, tmp_path / "two", "4", env={"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    log_one, log_two = (json.loads((tmp_path / d / "log.json").read_text()) for d in ("one", "two"))
    assert len(log_one) == len(log_two) == 3
    for a, b in zip(log_one, log_two):
        for key in ("loss", "loss_embed", "loss_embed_relation"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    from safetensors.torch import load_file

    w_one = load_file(tmp_path / "one" / "student" / "model.safetensors")
    w_two = load_file(tmp_path / "two" / "student" / "model.safetensors")
    assert w_one.keys() == w_two.keys() and not any("distillation_projections" in k for k in w_one)
    for name in w_one:
        assert torch.allclose(w_one[name], w_two[name], atol=1e-5), name
    p_one, p_two = (json.loads((tmp_path / d / "projection.json").read_text()) for d in ("one", "two"))
    for name in p_one:
        assert torch.allclose(torch.tensor(p_one[name]), torch.tensor(p_two[name]), atol=1e-5), name
