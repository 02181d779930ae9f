"""MLM (DistilBERT/XLM masking) and CLM collators, and length grouping through the Trainer's sampler."""

import math

import numpy as np
import pytest
import torch

import tiny
from distil_trainer.data import CausalLMCollator, MaskedLMCollator, binarize

BERT_SPECIAL = {0, 100, 101, 102, 103}


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    d = tmp_path_factory.mktemp("coll")
    (d / "wiki.txt").write_text("\n".join(tiny.real_lines(200)) + "\n", encoding="utf-8")
    ds = binarize(d / "data", tiny.bert_tokenizer(), file_path=d / "wiki.txt", max_length=64, verbose=False).dataset
    rows = [list(r) for r in ds["input_ids"]]
    counts = np.zeros(30522, dtype=np.int64)
    for r in rows:
        np.add.at(counts, r, 1)
    return ds, rows, counts


def padded(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_masking_invariants_and_80_10_10(wiki):
    _, rows, counts = wiki
    collate = MaskedLMCollator(tiny.bert_tokenizer(), counts)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    actions = np.zeros(3, dtype=np.int64)
    for _ in range(300):
        batch_rows = [rows[i] for i in rng.choice(len(rows), size=int(rng.integers(1, 9)), replace=False)]
        out = collate([{"input_ids": r, "length": len(r)} for r in batch_rows])
        ids, mask = padded(batch_rows)
        assert torch.equal(out["attention_mask"], mask)
        chosen = out["labels"] != -100
        assert int(chosen.sum()) == math.ceil(0.15 * int(mask.sum()))  # exact count per batch
        assert torch.equal(out["labels"][chosen], ids[chosen])
        assert not bool((mask == 0)[chosen].any())
        assert not any(int(t) in BERT_SPECIAL for t in ids[chosen])
        assert torch.equal(out["input_ids"][~chosen], ids[~chosen])  # nothing else changes
        new = out["input_ids"][chosen]
        is_mask, is_keep = new == 103, new == ids[chosen]
        is_rand = ~is_mask & ~is_keep
        assert not any(int(t) in BERT_SPECIAL for t in new[is_rand])
        actions += [int(is_mask.sum()), int(is_keep.sum()), int(is_rand.sum())]
    n = actions.sum()
    # a random draw equal to the original token counts as "keep": shift of ~0.1/30000, negligible
    for observed, p in zip(actions, (0.8, 0.1, 0.1)):
        assert abs(observed - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (actions, n)


@pytest.mark.parametrize("smoothing", [0.7, 0.0])
def test_selection_rate_follows_count_power(smoothing):
    a, b, c = 2000, 2001, 2002  # three ordinary tokens with counts 1, 8, 50
    counts = np.full(30522, 1000, dtype=np.int64)
    counts[[a, b, c]] = [1, 8, 50]
    collate = MaskedLMCollator(tiny.bert_tokenizer(), counts, mlm_mask_prop=0.01, mlm_smoothing=smoothing)
    gen = torch.Generator().manual_seed(1)
    base = torch.tensor([a] * 20 + [b] * 40 + [c] * 38)
    picked = {a: 0, b: 0, c: 0}
    batches = 2000
    for _ in range(batches):
        rows = [[101] + base[torch.randperm(len(base), generator=gen)].tolist() + [102] for _ in range(10)]
        out = collate([{"input_ids": r} for r in rows])
        labels = out["labels"][out["labels"] != -100]
        assert len(labels) == math.ceil(0.01 * 1000)
        for t in picked:
            picked[t] += int((labels == t).sum())
    rate = {t: picked[t] / (n * 10 * batches) for t, n in ((a, 20), (b, 40), (c, 38))}
    # independent expectation: selection rate per occurrence proportional to count ** -smoothing
    for t, cnt in ((b, 8), (c, 50)):
        expected = (cnt / 1) ** smoothing
        assert rate[a] / rate[t] == pytest.approx(expected, rel=0.15), (rate, smoothing)


def test_fewer_candidates_than_target_and_all_special():
    tok = tiny.bert_tokenizer()
    collate = MaskedLMCollator(tok, mlm_smoothing=0.0, mlm_mask_prop=1.0)
    out = collate([{"input_ids": [101, 2000, 102]}, {"input_ids": [101, 102]}])
    assert (out["labels"] != -100).sum() == 1 and out["labels"][0, 1] == 2000
    out = collate([{"input_ids": [101, 102]}])
    assert bool((out["labels"] == -100).all())


def test_reseeding_reproduces_and_batches_differ(wiki):
    _, rows, counts = wiki
    collate = MaskedLMCollator(tiny.bert_tokenizer(), counts)
    feats = [{"input_ids": r} for r in rows[:8]]
    torch.manual_seed(3)
    first, second = collate(feats), collate(feats)
    torch.manual_seed(3)
    again = collate(feats)
    assert torch.equal(first["labels"], again["labels"]) and torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["labels"], second["labels"])


@pytest.mark.reliability(fault="bad masking proportions, no mask token", outcome="clear error naming the value")
def test_validation_errors(wiki):
    _, _, counts = wiki
    tok = tiny.bert_tokenizer()
    with pytest.raises(ValueError, match="sum to 1"):
        MaskedLMCollator(tok, counts, word_mask=0.8, word_keep=0.1, word_rand=0.2)
    with pytest.raises(ValueError, match="mlm_mask_prop"):
        MaskedLMCollator(tok, counts, mlm_mask_prop=0.0)
    with pytest.raises(ValueError, match=r"word_mask must be in \[0, 1\]"):
        MaskedLMCollator(tok, counts, word_mask=1.2, word_keep=-0.2, word_rand=0.0)
    with pytest.raises(ValueError, match="mlm_smoothing"):
        MaskedLMCollator(tok, counts, mlm_smoothing=-0.1)
    with pytest.raises(ValueError, match="needs token_counts"):
        MaskedLMCollator(tok)
    with pytest.raises(ValueError, match="no mask token"):
        MaskedLMCollator(tiny.gpt2_tokenizer(), mlm_smoothing=0.0)
    with pytest.raises(ValueError, match="only 1000"):
        MaskedLMCollator(tok, counts[:1000])
    with pytest.raises(ValueError, match="outside"):
        MaskedLMCollator(tok, counts)([{"input_ids": [101, 40000, 102]}])


def test_clm_labels_keep_eos_and_ignore_padding():
    tok = tiny.gpt2_tokenizer()
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    rows = [[eos, 11, 12, 13, eos], [eos, 21, eos]]
    out = CausalLMCollator(tok)([{"input_ids": r, "length": len(r)} for r in rows])
    assert out["input_ids"].tolist() == [[eos, 11, 12, 13, eos], [eos, 21, eos, eos, eos]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [[eos, 11, 12, 13, eos], [eos, 21, eos, -100, -100]]


def test_group_by_length_uses_stored_column(wiki, tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    ds, _, counts = wiki
    # Shift the stored lengths: if the sampler re-measured input_ids it could not see these values.
    marked = ds.map(lambda b: {"length": [n + 1000 for n in b["length"]]}, batched=True)
    args = TrainingArguments(output_dir=str(tmp_path), train_sampling_strategy="group_by_length",
                             length_column_name="length", remove_unused_columns=False, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny.tiny_bert_mlm(), args=args, train_dataset=marked,
                      data_collator=MaskedLMCollator(tiny.bert_tokenizer(), counts))
    sampler = trainer._get_train_sampler(marked)
    assert isinstance(sampler, LengthGroupedSampler)
    assert list(sampler.lengths) == [n + 1000 for n in ds["length"]]
    batch = next(iter(trainer.get_train_dataloader()))  # the collator ignores the `length` column
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
