"""Gradient accumulation is exact: one optimizer step over the same 16 examples gives the same gradient with
batch 16 x accumulation 1 and with batch 4 x accumulation 4, for every loss term, although the micro-batches
hold different numbers of tokens (and masked tokens).

The gradient is read off the parameter change of one SGD step with learning rate 1 and no clipping."""

import pytest
import torch
from datasets import Dataset

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer

NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ALL_ZERO = dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_clm=0.0, alpha_mse=0.0, alpha_cos=0.0, alpha_task=0.0)


class PadCollator:
    """Pads input_ids (pad id), attention_mask (0), token_type_ids (0) and token-level labels (-100)."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0), ("labels", -100)):
            if key not in features[0]:
                continue
            if key == "labels" and not isinstance(features[0][key], list):
                batch[key] = torch.tensor([f[key] for f in features])
                continue
            batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
        return batch


def masked_examples(tokenizer, n=16, seed=0, causal=False):
    """Fixed examples of very different lengths; MLM examples carry fixed masked positions."""
    lines = tiny.real_lines(n, min_words=3)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, line in enumerate(lines):
        max_len = 6 + (i * 7) % 40  # 6..45 tokens: micro-batches differ in token counts
        ids = tokenizer(line, truncation=True, max_length=max_len)["input_ids"]
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if causal:
            row["labels"] = list(ids)
        else:
            chosen = (torch.rand(len(ids), generator=g) < 0.2).tolist()
            chosen[1] = True  # at least one masked token per example
            row["labels"] = [t if c else -100 for t, c in zip(ids, chosen)]
            row["input_ids"] = [tokenizer.mask_token_id if c else t for t, c in zip(ids, chosen)]
            row["token_type_ids"] = [0] * len(ids)
        rows.append(row)
    return Dataset.from_list(rows)


def one_step_update(make_student, teacher, dataset, collator, batch_size, accumulation, tmp_path, **weights):
    student = make_student()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = DistillationArguments(
        output_dir=str(tmp_path / f"bs{batch_size}"), report_to=[], use_cpu=True, max_steps=1, learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential", save_strategy="no",
        weight_decay=0.0, remove_unused_columns=False, **{**ALL_ZERO, **weights})
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=collator, optimizers=(optimizer, None))
    trainer.train()
    return torch.cat([(before[n] - p.detach()).flatten() for n, p in student.named_parameters()])


def assert_same_gradient(a, b):
    assert a.norm() > 0
    assert ((a - b).norm() / a.norm()).item() < 1e-5


@pytest.mark.parametrize("term", ["ce", "mlm", "mse", "cos"])
def test_masked_lm_terms(term, tmp_path):
    tok = tiny.bert_tokenizer()
    teacher = tiny.tiny_bert_mlm(**NO_DROPOUT_BERT)
    data = masked_examples(tok)
    make = lambda: tiny.tiny_distilbert_mlm(dropout=0.0, attention_dropout=0.0)  # noqa: E731
    collate = PadCollator(tok.pad_token_id)
    big = one_step_update(make, teacher, data, collate, 16, 1, tmp_path, **{f"alpha_{term}": 1.0})
    small = one_step_update(make, teacher, data, collate, 4, 4, tmp_path, **{f"alpha_{term}": 1.0})
    assert_same_gradient(big, small)


def test_restricted_ce_and_triple_loss(tmp_path):
    tok = tiny.bert_tokenizer()
    teacher = tiny.tiny_bert_mlm(**NO_DROPOUT_BERT)
    data = masked_examples(tok)
    make = lambda: tiny.tiny_distilbert_mlm(dropout=0.0, attention_dropout=0.0)  # noqa: E731
    weights = dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=True)
    big = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path, **weights)
    small = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 4, 4, tmp_path, **weights)
    assert_same_gradient(big, small)


@pytest.mark.parametrize("term", ["clm", "ce"])
def test_causal_lm_terms(term, tmp_path):
    tok = tiny.gpt2_tokenizer()
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher = tiny.tiny_gpt2_lm(**no_dropout)
    data = masked_examples(tok, causal=True)
    make = lambda: tiny.tiny_gpt2_lm(layers=2, seed=7, **no_dropout)  # noqa: E731
    collate = PadCollator(tok.pad_token_id)
    big = one_step_update(make, teacher, data, collate, 16, 1, tmp_path, **{f"alpha_{term}": 1.0})
    small = one_step_update(make, teacher, data, collate, 4, 4, tmp_path, **{f"alpha_{term}": 1.0})
    assert_same_gradient(big, small)


def test_classification_terms(tmp_path):
    tok = tiny.bert_tokenizer()
    teacher = tiny.tiny_bert_classifier(num_labels=2, layers=2, **NO_DROPOUT_BERT)
    lines = tiny.real_lines(16, min_words=3)
    rows = [{**{k: v for k, v in tok(line, truncation=True, max_length=6 + (i * 7) % 40).items()}, "labels": i % 2}
            for i, line in enumerate(lines)]
    data = Dataset.from_list(rows)
    make = lambda: tiny.tiny_bert_classifier(num_labels=2, layers=1, seed=3, **NO_DROPOUT_BERT)  # noqa: E731
    weights = dict(alpha_ce=1.0, alpha_task=1.0)
    big = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path, **weights)
    small = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 4, 4, tmp_path, **weights)
    assert_same_gradient(big, small)
