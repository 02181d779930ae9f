"""Each loss term, as DistillationTrainer computes it on a fixed batch of tiny offline models, equals a few lines
of plain torch written here (the original DistilBERT formulas: KLDivLoss(batchmean) on selected rows, etc.)."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer

T = 2.0
ALL_ZERO = dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_clm=0.0, alpha_mse=0.0, alpha_cos=0.0, alpha_task=0.0)


def make_trainer(student, teacher, tmp_path, **weights):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, temperature=T,
                                 **{**ALL_ZERO, **weights})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    student.eval()
    return trainer


def mlm_batch(tokenizer, n=6, seed=0):
    """Real sentences with padding and a fixed set of masked positions (labels -100 elsewhere)."""
    enc = tokenizer(tiny.real_lines(n), padding=True, truncation=True, max_length=40, return_tensors="pt")
    g = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(enc["input_ids"].shape, generator=g) < 0.3) & enc["attention_mask"].bool()
    chosen[:, 0] = False
    labels = torch.where(chosen, enc["input_ids"], torch.full_like(enc["input_ids"], -100))
    input_ids = enc["input_ids"].masked_fill(chosen, tokenizer.mask_token_id)
    return {"input_ids": input_ids, "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"], "labels": labels}


@pytest.fixture(scope="module")
def bert_pair():
    return f64(tiny.tiny_bert_mlm()), f64(tiny.tiny_distilbert_mlm()), mlm_batch(tiny.bert_tokenizer())


# Float64 models: the comparisons test the formulas, not float32 rounding (KL of near-uniform
# distributions is small and loses digits to cancellation in fp32).
def f64(model):
    return model.double()


def outputs(model, batch, keys=("input_ids", "attention_mask")):
    with torch.no_grad():
        return model(**{k: batch[k] for k in keys}, output_hidden_states=True)


def kl_rows(s, t):
    """The original L_ce: KLDivLoss(batchmean) of the tempered distributions, times T^2."""
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2


def loss_of(trainer, model, batch):
    with torch.no_grad():
        return trainer.compute_loss(model, dict(batch)).item()


def test_soft_target_kl_over_non_padding_tokens(bert_pair, tmp_path):
    teacher, student, batch = bert_pair
    trainer = make_trainer(student, teacher, tmp_path, alpha_ce=1.0)
    s = outputs(student, batch).logits
    t = outputs(teacher, batch, ("input_ids", "attention_mask", "token_type_ids")).logits
    keep = batch["attention_mask"].bool()
    assert loss_of(trainer, student, batch) == pytest.approx(kl_rows(s[keep], t[keep]).item(), rel=1e-9)


def test_soft_target_kl_restricted_to_masked_tokens(bert_pair, tmp_path):
    teacher, student, batch = bert_pair
    trainer = make_trainer(student, teacher, tmp_path, alpha_ce=1.0, restrict_ce_to_mask=True)
    s = outputs(student, batch).logits
    t = outputs(teacher, batch, ("input_ids", "attention_mask", "token_type_ids")).logits
    keep = batch["labels"] != -100
    assert loss_of(trainer, student, batch) == pytest.approx(kl_rows(s[keep], t[keep]).item(), rel=1e-9)


def test_masked_lm_loss(bert_pair, tmp_path):
    teacher, student, batch = bert_pair
    trainer = make_trainer(student, teacher, tmp_path, alpha_mlm=1.0)
    s = outputs(student, batch).logits
    expected = F.cross_entropy(s.reshape(-1, s.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100)
    assert loss_of(trainer, student, batch) == pytest.approx(expected.item(), rel=1e-9)


def test_logit_mse_summed_over_vocab_averaged_over_tokens(bert_pair, tmp_path):
    teacher, student, batch = bert_pair
    trainer = make_trainer(student, teacher, tmp_path, alpha_mse=1.0)
    s = outputs(student, batch).logits
    t = outputs(teacher, batch, ("input_ids", "attention_mask", "token_type_ids")).logits
    keep = batch["attention_mask"].bool()
    expected = F.mse_loss(s[keep], t[keep], reduction="sum") / keep.sum()
    assert loss_of(trainer, student, batch) == pytest.approx(expected.item(), rel=1e-9)


def test_hidden_cosine_over_non_padding_tokens(bert_pair, tmp_path):
    teacher, student, batch = bert_pair
    trainer = make_trainer(student, teacher, tmp_path, alpha_cos=1.0)
    hs = outputs(student, batch).hidden_states[-1]
    ht = outputs(teacher, batch, ("input_ids", "attention_mask", "token_type_ids")).hidden_states[-1]
    keep = batch["attention_mask"].bool()
    expected = F.cosine_embedding_loss(hs[keep], ht[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    assert loss_of(trainer, student, batch) == pytest.approx(expected.item(), rel=1e-9)


def test_weighted_sum_of_terms(bert_pair, tmp_path):
    teacher, student, batch = bert_pair
    parts = {}
    for term in ("ce", "mlm", "cos"):
        parts[term] = loss_of(make_trainer(student, teacher, tmp_path, **{f"alpha_{term}": 1.0}), student, batch)
    triple = make_trainer(student, teacher, tmp_path, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0)
    expected = 5.0 * parts["ce"] + 2.0 * parts["mlm"] + 1.0 * parts["cos"]
    assert loss_of(triple, student, batch) == pytest.approx(expected, rel=1e-9)


def test_gpt2_causal_terms(tmp_path):
    tok = tiny.gpt2_tokenizer()
    teacher, student = f64(tiny.tiny_gpt2_lm(layers=4)), f64(tiny.tiny_gpt2_lm(layers=2, seed=9))
    enc = tok(tiny.real_lines(5), padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    s, t = outputs(student, batch).logits, outputs(teacher, batch).logits
    keep = batch["attention_mask"].bool()

    clm = F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss_of(make_trainer(student, teacher, tmp_path, alpha_clm=1.0), student, batch) == pytest.approx(
        clm.item(), rel=1e-9)
    assert loss_of(make_trainer(student, teacher, tmp_path, alpha_ce=1.0), student, batch) == pytest.approx(
        kl_rows(s[keep], t[keep]).item(), rel=1e-9)
    hs, ht = outputs(student, batch).hidden_states[-1], outputs(teacher, batch).hidden_states[-1]
    cos = (1 - F.cosine_similarity(hs[keep], ht[keep], dim=-1)).mean()
    assert loss_of(make_trainer(student, teacher, tmp_path, alpha_cos=1.0), student, batch) == pytest.approx(
        cos.item(), rel=1e-9)


def test_sequence_classification_terms(tmp_path):
    tok = tiny.bert_tokenizer()
    teacher = f64(tiny.tiny_bert_classifier(num_labels=3, layers=3, seed=11))
    student = f64(tiny.tiny_bert_classifier(num_labels=3, layers=1, seed=12))
    enc = tok(tiny.real_lines(6), padding=True, truncation=True, max_length=32, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([0, 2, 1, 1, 0, 2])}
    s, t = outputs(student, batch).logits, outputs(teacher, batch).logits
    assert loss_of(make_trainer(student, teacher, tmp_path, alpha_ce=1.0), student, batch) == pytest.approx(
        kl_rows(s, t).item(), rel=1e-9)
    task = F.cross_entropy(s, batch["labels"])
    assert loss_of(make_trainer(student, teacher, tmp_path, alpha_task=1.0), student, batch) == pytest.approx(
        task.item(), rel=1e-9)


def test_question_answering_kl_ignores_masked_positions(tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    cfg = dict(vocab_size=30522, hidden_size=32, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128)
    teacher = f64(BertForQuestionAnswering(BertConfig(num_hidden_layers=3, **cfg)).eval())
    student = f64(BertForQuestionAnswering(BertConfig(num_hidden_layers=1, **cfg)).eval())
    tok = tiny.bert_tokenizer()
    lines = tiny.real_lines(8)
    enc = tok(lines[:4], lines[4:], padding=True, truncation=True, max_length=48, return_tensors="pt")
    # Candidates: [CLS] and the second segment's tokens (the "context"), never padding or the first segment.
    context = (enc["token_type_ids"] == 1) & enc["attention_mask"].bool()
    context[:, 0] = True
    batch = {**enc, "distillation_mask": context.long(),
             "start_positions": torch.tensor([0, 3, 5, 7]), "end_positions": torch.tensor([0, 4, 9, 7])}
    s = outputs(student, batch, ("input_ids", "attention_mask", "token_type_ids"))
    t = outputs(teacher, batch, ("input_ids", "attention_mask", "token_type_ids"))

    expected = 0.0
    for i in range(4):
        keep = context[i]
        for key in ("start_logits", "end_logits"):
            expected += kl_rows(getattr(s, key)[i][keep][None], getattr(t, key)[i][keep][None]).item() / 2
    expected /= 4
    trainer = make_trainer(student, teacher, tmp_path, alpha_ce=1.0)
    assert loss_of(trainer, student, batch) == pytest.approx(expected, rel=1e-9)

    # Changing the logits' input at excluded positions only (question tokens) must not matter to the KL:
    # verify the mask is really applied by comparing with the unmasked value, which differs.
    unmasked = {k: v for k, v in batch.items() if k != "distillation_mask"}
    assert loss_of(trainer, student, unmasked) != pytest.approx(expected, rel=1e-3)


def test_half_precision_logits_are_upcast():
    from distil_trainer import losses

    torch.manual_seed(0)
    s, t = torch.randn(5, 50), torch.randn(5, 50)
    full = losses.soft_target_kl(s, t, T).item()
    half = losses.soft_target_kl(s.bfloat16(), t.bfloat16(), T)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(kl_rows(s.bfloat16().float(), t.bfloat16().float()).item(), rel=1e-5)
    assert half.item() == pytest.approx(full, rel=2e-2)


# ---- a teacher logit of -inf (a token the teacher rules out) ----

def xlogy_kl(s, t, temperature):
    """Plain-torch KL in the original's xlogy form: sum xlogy(p, p) - p * log q, with 0 * log q = 0 where p = 0."""
    p = torch.softmax(t / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    terms = torch.xlogy(p, p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))
    return terms.sum(-1) * temperature**2


def test_soft_target_kl_with_minus_inf_teacher_logit_is_finite():
    from distil_trainer import losses

    torch.manual_seed(0)
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    t[0, 2] = t[1, 0] = t[1, 5] = float("-inf")
    mask = torch.tensor([True, True, False, True])
    loss = losses.soft_target_kl(s, t, T, mask=mask, reduction="sum")
    expected = xlogy_kl(s.detach()[mask], t[mask], T).sum()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # Same value as torch's own KLDivLoss, which DistilBERT used and which also computes it with xlogy.
    assert loss.item() == pytest.approx(F.kl_div(F.log_softmax(s.detach()[mask] / T, -1), F.softmax(t[mask] / T, -1),
                                                 reduction="sum").item() * T**2, rel=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # d/ds of T^2 KL(p || softmax(s/T)) is T (softmax(s/T) - p) on selected rows, 0 on the others.
    p = torch.softmax(t / T, -1)
    expected_grad = T * (torch.softmax(s.detach() / T, -1) - p) * mask[:, None]
    torch.testing.assert_close(s.grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_soft_target_kl_minus_inf_in_both_models_adds_nothing():
    from distil_trainer import losses

    torch.manual_seed(1)
    s = torch.randn(3, 6, dtype=torch.float64)
    t = torch.randn(3, 6, dtype=torch.float64)
    s[:, 4] = t[:, 4] = float("-inf")  # e.g. a vocabulary entry both models mask out
    s.requires_grad_(True)
    loss = losses.soft_target_kl(s, t, T, reduction="mean")
    dropped = losses.soft_target_kl(s.detach()[:, [0, 1, 2, 3, 5]], t[:, [0, 1, 2, 3, 5]], T, reduction="mean")
    assert loss.item() == pytest.approx(xlogy_kl(s.detach(), t, T).mean().item(), rel=1e-12)
    assert loss.item() == pytest.approx(dropped.item(), rel=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:, 4] == 0).all()


def test_question_answering_kl_with_minus_inf_teacher_logit_is_finite():
    from distil_trainer import losses

    torch.manual_seed(2)
    ss, se = (torch.randn(3, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ts, te = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    ts[0, 3] = te[2, 1] = float("-inf")  # at a candidate position
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[:, 5:] = False
    loss = losses.span_soft_target_kl(ss, se, ts, te, T, mask=mask, reduction="sum")
    keep = slice(0, 5)
    expected = (xlogy_kl(ss.detach()[:, keep], ts[:, keep], T) + xlogy_kl(se.detach()[:, keep], te[:, keep], T)) / 2
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.sum().item(), rel=1e-12)
    loss.backward()
    assert torch.isfinite(ss.grad).all() and torch.isfinite(se.grad).all()
    assert (ss.grad[:, 5:] == 0).all()
