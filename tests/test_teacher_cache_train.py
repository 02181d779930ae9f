"""Training from a teacher-output cache (`DistillationTrainer(teacher_cache=...)`): the top-k KL against plain-torch
formulas, equality with online training when the cache holds every logit (k = V, float32), exact accumulation,
2 processes, resume across cached MLM epochs, and the refusals of what a cache cannot give."""

import json
import sys

import pytest
import torch
from datasets import Dataset

import tiny
from launch import CONFIGS, accelerate_launch
from test_accumulation import ALL_ZERO, PadCollator
from distil_trainer import DistillationArguments, DistillationTrainer, losses
from distil_trainer.data import CausalLMCollator, MaskedLMCollator
from distil_trainer.teacher_cache import build_teacher_cache, load_teacher_cache

NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
RUN_SCRIPT = tiny.REPO_ROOT / "tests" / "teacher_cache_run.py"
MLM_WEIGHTS = dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=True)


# ---- the top-k KL ----

def plain_topk_kl(student, ids, topk, T):
    """sum_k p~_k log(p~_k / q_k) T^2 per row, in float64 with explicit exp/sum."""
    s, t = student.double() / T, topk.double() / T
    p = torch.exp(t - t.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    q = torch.exp(s - s.max(-1, keepdim=True).values)
    q = q / q.sum(-1, keepdim=True)
    q_k = torch.gather(q, -1, ids)
    return (p * torch.log(p / q_k)).sum(-1) * T**2


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_topk_kl_is_the_renormalised_formula_and_the_dense_kl_at_k_equal_v(T):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    top = teacher.topk(7, dim=-1)
    got = losses.topk_soft_target_kl(student, top.indices, top.values, T, mask=mask, reduction="sum")
    expected = plain_topk_kl(student, top.indices, top.values, T)[mask].sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    mean = losses.topk_soft_target_kl(student, top.indices, top.values, T, mask=mask)
    assert mean.item() == pytest.approx(expected.item() / int(mask.sum()), rel=1e-5)
    # k = V: the dense KL(softmax(t/T) || softmax(s/T)) T^2, whatever the order of the stored ids.
    order = torch.randperm(40, generator=g).expand(2, 5, 40)
    full = losses.topk_soft_target_kl(student, order, teacher.gather(-1, order), T, mask=mask, reduction="sum")
    p = torch.softmax(teacher.double() / T, -1)
    dense = (p * (torch.log_softmax(teacher.double() / T, -1) - torch.log_softmax(student.double() / T, -1))).sum(-1)
    assert full.item() == pytest.approx((dense * T**2)[mask].sum().item(), rel=1e-5)
    # A teacher -inf logit among the stored ones adds 0, not nan.
    values = top.values.clone()
    values[..., -1] = float("-inf")
    assert torch.isfinite(losses.topk_soft_target_kl(student, top.indices, values, T, mask=mask))


def test_topk_agreement_is_the_student_argmax_against_the_teacher_top1():
    student = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])
    ids = torch.tensor([[[1, 0], [1, 2], [2, 1]]])
    agree, n = losses.topk_agreement(student, ids, mask=torch.tensor([[True, True, False]]))
    assert (agree.item(), n) == (1, 2)


# ---- caches built with build_teacher_cache (k = V, float32: every logit, exactly) ----

def token_rows(tok, n, max_lengths=(6, 45), with_labels=None):
    lines = tiny.real_lines(n, min_words=3)
    low, high = max_lengths
    rows = []
    for i, line in enumerate(lines):
        enc = tok(line, truncation=True, max_length=low + (i * 7) % (high - low))
        row = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels is not None:
            row.update(token_type_ids=enc["token_type_ids"], labels=i % with_labels)
        rows.append(row)
    return Dataset.from_list(rows)


def mlm_teacher():
    return tiny.tiny_bert_mlm(**NO_DROPOUT_BERT)


def mlm_student():
    return tiny.tiny_distilbert_mlm(dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def mlm_cache(tmp_path_factory):
    """16 rows, 2 masked epochs, every logit at the masked positions, the last hidden layer."""
    tok = tiny.bert_tokenizer()
    collator = MaskedLMCollator(tok, mlm_smoothing=0.0, seed=11)
    return build_teacher_cache(mlm_teacher(), token_rows(tok, 16), tmp_path_factory.mktemp("mlm") / "cache", tok,
                               top_k=None, dtype="float32", hidden_layers=[-1], epochs=2, mlm_collator=collator,
                               batch_size=4, verbose=False)


@pytest.fixture(scope="module")
def mlm_top8_cache(tmp_path_factory):
    tok = tiny.bert_tokenizer()
    collator = MaskedLMCollator(tok, mlm_smoothing=0.0, seed=11)
    return build_teacher_cache(mlm_teacher(), token_rows(tok, 8), tmp_path_factory.mktemp("mlm8") / "cache", tok,
                               top_k=8, dtype="float16", epochs=1, mlm_collator=collator, batch_size=4, verbose=False)


def train(out, student, steps=2, batch=8, accumulation=1, lr=0.1, **kw):
    """(parameter update, logged losses, trainer) of `steps` SGD steps (no clipping, constant rate)."""
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    weights = {k: kw.pop(k) for k in list(kw) if k.startswith("alpha_") or k in (
        "restrict_ce_to_mask", "temperature", "divergence", "logits_chunk_size")}
    args = DistillationArguments(
        output_dir=str(out), report_to=[], use_cpu=True, max_steps=steps, learning_rate=lr, logging_steps=1,
        lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential", save_strategy="no",
        weight_decay=0.0, remove_unused_columns=False, warmup_steps=0, **{**ALL_ZERO, **weights})
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    trainer = DistillationTrainer(model=student, args=args, optimizers=(optimizer, None), **kw)
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return before - after, logs, trainer


def assert_same_training(a, b, keys):
    (update_a, logs_a, _), (update_b, logs_b, _) = a, b
    assert update_a.norm() > 0 and len(logs_a) == len(logs_b) > 0
    assert ((update_a - update_b).norm() / update_a.norm()).item() < 1e-5
    for x, y in zip(logs_a, logs_b):
        assert [y[k] for k in keys] == pytest.approx([x[k] for k in keys], rel=1e-5, abs=1e-6)


def online_rows(cache, epoch=0):
    """The rows the teacher saw (masked input_ids, labels), for the online reference run."""
    rows = cache.epoch(epoch)
    columns = [c for c in ("input_ids", "labels", "token_type_ids") if c in rows.column_names]
    data = {c: rows[c] for c in columns}
    return Dataset.from_dict({**data, "attention_mask": [[1] * len(ids) for ids in data["input_ids"]]})


def test_masked_lm_from_the_cache_equals_online(mlm_cache, tmp_path):
    tok = tiny.bert_tokenizer()
    online = train(tmp_path / "online", mlm_student(), teacher_model=mlm_teacher(), train_dataset=online_rows(mlm_cache),
                   data_collator=PadCollator(tok.pad_token_id), **MLM_WEIGHTS)
    cached = train(tmp_path / "cached", mlm_student(), teacher_cache=mlm_cache, processing_class=tok, **MLM_WEIGHTS)
    assert cached[2].teacher is None
    assert_same_training(online, cached, ("loss", "loss_ce", "loss_mlm", "loss_cos", "teacher_agreement"))


def test_causal_lm_from_the_cache_equals_online(tmp_path):
    tok = tiny.gpt2_tokenizer()
    data = token_rows(tok, 8, max_lengths=(4, 12))
    teacher = tiny.tiny_gpt2_lm(**NO_DROPOUT_GPT2)
    cache = build_teacher_cache(teacher, data, tmp_path / "cache", tok, top_k=None, dtype="float32", verbose=False)
    assert cache.identity["positions"] == "tokens"
    make = lambda: tiny.tiny_gpt2_lm(layers=2, seed=7, **NO_DROPOUT_GPT2)  # noqa: E731
    weights = dict(alpha_ce=1.0, alpha_clm=1.0, temperature=2.0)
    online = train(tmp_path / "online", make(), steps=2, batch=4, teacher_model=teacher, train_dataset=data,
                   data_collator=CausalLMCollator(tok), **weights)
    cached = train(tmp_path / "cached", make(), steps=2, batch=4, teacher_cache=str(cache.path), processing_class=tok,
                   **weights)
    assert_same_training(online, cached, ("loss", "loss_ce", "loss_clm", "teacher_agreement"))


def test_sequence_classification_from_the_cache_equals_online(tmp_path):
    tok = tiny.bert_tokenizer()
    data = token_rows(tok, 16, with_labels=3)
    teacher = tiny.tiny_bert_classifier(num_labels=3, **NO_DROPOUT_BERT)
    cache = build_teacher_cache(teacher, data, tmp_path / "cache", tok, dtype="float32", verbose=False)
    make = lambda: tiny.tiny_bert_classifier(num_labels=3, layers=1, seed=3, **NO_DROPOUT_BERT)  # noqa: E731
    weights = dict(alpha_ce=1.0, alpha_mse=0.5, alpha_task=1.0, temperature=3.0)
    online = train(tmp_path / "online", make(), teacher_model=teacher, train_dataset=data,
                   data_collator=PadCollator(tok.pad_token_id), **weights)
    cached = train(tmp_path / "cached", make(), teacher_cache=cache, processing_class=tok, **weights)
    assert_same_training(online, cached, ("loss", "loss_ce", "loss_mse", "loss_task"))


def test_accumulation_from_the_cache_is_exact(mlm_cache, tmp_path):
    tok = tiny.bert_tokenizer()
    big = train(tmp_path / "big", mlm_student(), steps=1, batch=8, lr=1.0, teacher_cache=mlm_cache,
                processing_class=tok, **MLM_WEIGHTS)
    small = train(tmp_path / "small", mlm_student(), steps=1, batch=2, accumulation=4, lr=1.0,
                  teacher_cache=mlm_cache, processing_class=tok, **MLM_WEIGHTS)
    assert_same_training(big, small, ("loss",))


def test_a_top_k_cache_trains_the_renormalised_kl(mlm_top8_cache, tmp_path, caplog):
    # The tiny random teacher spreads its probability over 30522 tokens: its top 8 hold far less than half of it.
    mass = mlm_top8_cache.stats["topk_mass_mean"]
    assert 0 < mass < 0.5
    with caplog.at_level("WARNING", logger="distil_trainer"):
        _, logs, _ = train(tmp_path / "k8", mlm_student(), steps=1, teacher_cache=mlm_top8_cache,
                           processing_class=tiny.bert_tokenizer(), alpha_ce=1.0, alpha_mlm=1.0,
                           restrict_ce_to_mask=True)
    assert logs[0]["loss_ce"] > 0 and 0 <= logs[0]["teacher_agreement"] <= 1
    assert f"top 8 logits hold on average only {100 * mass:.0f}%" in caplog.text



def test_the_student_head_projects_only_the_masked_rows(mlm_top8_cache, tmp_path, monkeypatch):
    """From a top-k cache, a masked-LM student's head runs on the masked rows only (the fused head path: L_ce and
    L_mlm read nothing else), and the training equals the one on full logits (logits_chunk_size=0)."""
    import torch.nn.functional as F

    tok = tiny.bert_tokenizer()
    student = mlm_student()
    vocab, projected = student.config.vocab_size, []
    linear = F.linear

    def counting(x, weight, bias=None):
        if weight.shape[0] == vocab:
            projected.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, weight, bias)

    weights = dict(alpha_ce=5.0, alpha_mlm=2.0, restrict_ce_to_mask=True)  # the top-8 cache holds no hidden states
    monkeypatch.setattr(F, "linear", counting)
    rows = train(tmp_path / "rows", student, steps=1, teacher_cache=mlm_top8_cache, processing_class=tok, **weights)
    monkeypatch.undo()
    assert rows[2]._chunk_size is not None
    masked = sum(sum(label != -100 for label in labels) for labels in mlm_top8_cache.epoch(0)["labels"])
    assert sum(projected) == masked and max(projected) <= rows[2]._chunk_size  # the masked rows, in chunks
    every_token = train(tmp_path / "all", mlm_student(), steps=1, teacher_cache=mlm_top8_cache,
                        processing_class=tok, logits_chunk_size=0, **weights)
    assert every_token[2]._chunk_size is None
    assert_same_training(every_token, rows, ("loss", "loss_ce", "loss_mlm", "teacher_agreement"))


def resume_trainer(cache, out, max_steps):
    args = DistillationArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=max_steps, save_steps=6,
                                 per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                                 train_sampling_strategy="sequential", seed=3, warmup_steps=0,
                                 **{**ALL_ZERO, **MLM_WEIGHTS})
    return DistillationTrainer(model=mlm_student(), teacher_cache=cache, args=args,
                               processing_class=tiny.bert_tokenizer())


def test_resume_in_the_second_epoch_reads_its_masked_copy(mlm_cache, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    assert mlm_cache.epoch(0)["input_ids"] != mlm_cache.epoch(1)["input_ids"]  # the copies are masked apart
    whole = resume_trainer(mlm_cache, tmp_path / "whole", 8)  # 16 rows, batch 4: steps 5-8 are epoch 2
    whole.train()
    first = resume_trainer(mlm_cache, tmp_path / "resumed", 6)
    first.train()
    resumed = resume_trainer(mlm_cache, tmp_path / "resumed", 8)
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path / "resumed")))
    assert resumed.train_dataset.epoch == 1
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_two_processes_match_one(mlm_cache, tmp_path):
    from transformers import AutoModelForMaskedLM

    import subprocess
    import os

    one = subprocess.run([sys.executable, str(RUN_SCRIPT), str(mlm_cache.path), str(tmp_path / "one"), "8",
                          "--use_cpu", "true"], cwd=tiny.REPO_ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-4000:]
    two = accelerate_launch(CONFIGS / "cpu_2proc.yaml", RUN_SCRIPT, mlm_cache.path, tmp_path / "two", 4,
                            env={"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-6000:]
    keys = ("loss", "loss_ce", "loss_mlm", "loss_cos", "teacher_agreement")
    a = json.loads((tmp_path / "one" / "log.json").read_text())
    b = json.loads((tmp_path / "two" / "log.json").read_text())
    assert len(a) == len(b) == 3  # 3 steps of 8 rows over 16: the third reads the second masked copy
    for x, y in zip(a, b):
        assert [y[k] for k in keys] == pytest.approx([x[k] for k in keys], rel=1e-5, abs=1e-7)
    sa = AutoModelForMaskedLM.from_pretrained(tmp_path / "one" / "student").state_dict()
    sb = AutoModelForMaskedLM.from_pretrained(tmp_path / "two" / "student").state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k


# ---- refusals, raised before any compute ----

REFUSALS = [
    (dict(alpha_hidden=1.0), "intermediate-layer terms"),
    (dict(alpha_attn=1.0), "intermediate-layer terms"),
    (dict(alpha_relation=1.0), "intermediate-layer terms"),
    (dict(lmbda=0.5), "on-policy"),
    (dict(restrict_ce_to_mask=False), "restrict_ce_to_mask=True"),
]


def refusal_args(tmp_path, **kw):
    return DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 **{**ALL_ZERO, **MLM_WEIGHTS, **kw})


@pytest.mark.parametrize("kw,message", REFUSALS)
def test_refusals_name_the_problem(mlm_cache, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=mlm_student(), teacher_cache=mlm_cache, args=refusal_args(tmp_path, **kw),
                            processing_class=tiny.bert_tokenizer())


@pytest.mark.parametrize("kw,message", [(dict(alpha_mse=1.0), "alpha_mse=1.0 need all 30522 teacher logits"),
                                        (dict(divergence="jsd"), "divergence='jsd' need all"),
                                        (dict(alpha_cos=1.0), "alpha_cos=1.0 compares the teacher's last hidden")])
def test_top_k_cache_refusals(mlm_top8_cache, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=mlm_student(), teacher_cache=mlm_top8_cache,
                            args=refusal_args(tmp_path, **{"alpha_cos": 0.0, **kw}),
                            processing_class=tiny.bert_tokenizer())


def test_other_set_up_refusals(mlm_cache, tmp_path):
    args = refusal_args(tmp_path)
    with pytest.raises(ValueError, match="tokenizer .processing_class. differs"):
        DistillationTrainer(model=mlm_student(), teacher_cache=mlm_cache, args=args,
                            processing_class=tiny.roberta_tokenizer())
    with pytest.raises(ValueError, match="cached teacher states are 32 wide and the student's 16"):
        DistillationTrainer(model=tiny.tiny_bert_mlm(layers=2, hidden=16), teacher_cache=mlm_cache, args=args,
                            processing_class=tiny.bert_tokenizer())
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(model=mlm_student(), teacher_model=mlm_teacher(), teacher_cache=mlm_cache, args=args)
    gpt2_args = refusal_args(tmp_path, alpha_mlm=0.0, alpha_clm=1.0, alpha_cos=0.0)
    with pytest.raises(ValueError, match="holds masked_lm outputs but the student GPT2LMHeadModel is causal_lm"):
        DistillationTrainer(model=tiny.tiny_gpt2_lm(), teacher_cache=mlm_cache, args=gpt2_args)
    # More epochs than masked copies: refused when training starts (the epoch count is known then), before a step.
    trainer = DistillationTrainer(model=mlm_student(), teacher_cache=mlm_cache, processing_class=tiny.bert_tokenizer(),
                                  args=refusal_args(tmp_path, num_train_epochs=3, save_strategy="no"))
    with pytest.raises(ValueError, match="trains 3 epochs but the MLM teacher cache holds 2"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_group_by_length_reads_the_cached_lengths(mlm_cache):
    dataset = load_teacher_cache(mlm_cache.path).train_dataset()
    assert dataset.lengths == [len(r) for r in mlm_cache.epoch(0)["input_ids"]]
