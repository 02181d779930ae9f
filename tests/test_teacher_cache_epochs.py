"""Epochs of masked-LM training, from a teacher cache and online: an MLM cache with fewer masked copies than the run's
epochs is refused before the first step, and each epoch's masks reach the DataLoader's worker processes (fresh
workers per epoch) or the run is refused (persistent workers, which would repeat epoch 0's masks)."""

import pytest
import torch
from datasets import Dataset

import tiny
from test_accumulation import ALL_ZERO
from distil_trainer import DistillationArguments, DistillationTrainer
from distil_trainer.data import MaskedLMCollator
from distil_trainer.teacher_cache import build_teacher_cache

ROWS, BATCH = 8, 4  # 2 batches per epoch
NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def token_rows(tok, n=ROWS):
    ids = [tok(line, truncation=True, max_length=10 + 3 * i)["input_ids"]
           for i, line in enumerate(tiny.real_lines(n, min_words=6))]
    return Dataset.from_dict({"input_ids": ids})


def mlm_cache(path, epochs):
    tok = tiny.bert_tokenizer()
    return build_teacher_cache(tiny.tiny_bert_mlm(layers=1, **NO_DROPOUT_BERT), token_rows(tok), path, tok, top_k=4,
                               epochs=epochs, mlm_collator=MaskedLMCollator(tok, mlm_smoothing=0.0, seed=5),
                               batch_size=BATCH, verbose=False)


def arguments(out, **kw):
    return DistillationArguments(output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=BATCH,
                                 train_sampling_strategy="sequential", save_strategy="no", learning_rate=1e-3,
                                 **{**ALL_ZERO, "alpha_ce": 1.0, "alpha_mlm": 1.0, "restrict_ce_to_mask": True, **kw})


class RecordingTrainer(DistillationTrainer):
    """Keeps (input_ids, labels) of every training batch, in order, as the worker processes collated them."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.batches.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
        return super().compute_loss(model, inputs, *args, **kwargs)


def recorded(out, **kw):
    trainer = RecordingTrainer(model=tiny.tiny_distilbert_mlm(layers=1), **kw)
    trainer.batches = []
    trainer.train()
    return trainer.batches


# ---- (a) more epochs than masked copies ----

@pytest.mark.reliability(fault="an MLM teacher cache with fewer masked copies than the run's epochs (e.g. one copy, "
                               "3 epochs)",
                         outcome="refused when training starts, before the first step, with the copies, the epochs "
                                 "and the fixes (--epochs N, fewer epochs or max_steps)")
@pytest.mark.parametrize("copies, kw, message", [
    (1, dict(num_train_epochs=3), r"trains 3 epochs but the MLM teacher cache holds 1 masked copy .*--epochs 3.*"
                                  r"at most 1 epoch\b"),
    (1, dict(max_steps=3), r"trains 2 epochs .* holds 1 masked copy .*max_steps <= 2 at 2 updates per epoch"),
    (2, dict(num_train_epochs=3), r"trains 3 epochs .* holds 2 masked copies .*--epochs 3.*at most 2 epochs")],
    ids=["1copy-3epochs", "1copy-max_steps", "2copies-3epochs"])
def test_more_epochs_than_masked_copies_is_refused_before_a_step(tmp_path, copies, kw, message):
    cache = mlm_cache(tmp_path / "cache", copies)
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(layers=1), teacher_cache=cache,
                                  processing_class=tiny.bert_tokenizer(), args=arguments(tmp_path / "run", **kw))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0


def test_as_many_epochs_as_copies_train_and_a_causal_cache_serves_every_epoch(tmp_path):
    one = mlm_cache(tmp_path / "mlm", 1)
    run = DistillationTrainer(model=tiny.tiny_distilbert_mlm(layers=1), teacher_cache=one,
                              processing_class=tiny.bert_tokenizer(), args=arguments(tmp_path / "a", max_steps=2))
    run.train()
    assert run.state.global_step == 2
    tok = tiny.gpt2_tokenizer()
    clm = build_teacher_cache(tiny.tiny_gpt2_lm(layers=1), token_rows(tok), tmp_path / "clm", tok, top_k=4,
                              verbose=False)
    args = arguments(tmp_path / "b", num_train_epochs=3, alpha_mlm=0.0, alpha_clm=1.0, restrict_ce_to_mask=False)
    run = DistillationTrainer(model=tiny.tiny_gpt2_lm(layers=1), teacher_cache=clm, processing_class=tok, args=args)
    run.train()  # the same inputs every epoch: its one copy is read three times
    assert run.state.global_step == 3 * ROWS // BATCH


# ---- (b) the epoch in DataLoader worker processes ----

def online_masks(rows, epochs, seed):
    """(input_ids, labels) of each batch of each epoch, the seeded collator at that epoch in this process."""
    collator, out = MaskedLMCollator(tiny.bert_tokenizer(), mlm_smoothing=0.0, seed=seed), []
    for epoch in range(epochs):
        collator.set_epoch(epoch)
        for b0 in range(0, ROWS, BATCH):
            batch = collator([{"input_ids": ids} for ids in rows["input_ids"][b0:b0 + BATCH]])
            out.append((batch["input_ids"], batch["labels"]))
    return out


def online_run(out, workers, persistent, seed=9):
    tok = tiny.bert_tokenizer()
    rows = token_rows(tok)
    args = arguments(out, num_train_epochs=2, alpha_ce=0.0, restrict_ce_to_mask=False,
                     dataloader_num_workers=workers, dataloader_persistent_workers=persistent)
    return rows, dict(teacher_model=tiny.tiny_bert_mlm(layers=1), args=args, train_dataset=rows,
                      data_collator=MaskedLMCollator(tok, mlm_smoothing=0.0, seed=seed))


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for (ids, labels), (ref_ids, ref_labels) in zip(got, expected):
        assert torch.equal(ids, ref_ids) and torch.equal(labels, ref_labels)


def test_worker_processes_mask_each_epoch_afresh(tmp_path):
    """Trainer calls on_epoch_begin (set_epoch) before it creates the epoch's iterator, so fresh worker processes
    collate epoch e with the collator at epoch e: each epoch's masks differ, as in-process collation gives them."""
    rows, kw = online_run(tmp_path / "online", workers=2, persistent=False)
    got = recorded(tmp_path / "online", **kw)
    expected = online_masks(rows, epochs=2, seed=9)
    assert_batches_equal(got, expected)
    assert not torch.equal(got[0][1], got[2][1])  # batch 0 of epoch 1 is masked apart from batch 0 of epoch 0


def test_worker_processes_read_each_epochs_masked_copy_of_the_cache(tmp_path):
    cache = mlm_cache(tmp_path / "cache", 2)
    got = recorded(tmp_path / "run", teacher_cache=cache, processing_class=tiny.bert_tokenizer(),
                   args=arguments(tmp_path / "run", num_train_epochs=2, dataloader_num_workers=2,
                                  dataloader_persistent_workers=False))
    copies = [cache.epoch(e)["input_ids"] for e in range(2)]
    assert copies[0] != copies[1]
    for i, (ids, _) in enumerate(got):  # batch i: epoch i // 2, rows of batch i % 2
        epoch, b0 = divmod(i, ROWS // BATCH)
        for row, stored in zip(ids, copies[epoch][b0 * BATCH:(b0 + 1) * BATCH]):
            assert row[:len(stored)].tolist() == stored


@pytest.mark.reliability(fault="dataloader_persistent_workers with a seeded MLM collator or an MLM teacher cache "
                               "(the workers never see set_epoch)",
                         outcome="refused before training with the fix (persistent_workers=False); with the check "
                                 "bypassed every epoch would reuse epoch 0's masks")
def test_persistent_workers_are_refused_as_they_would_repeat_epoch_0(tmp_path, monkeypatch):
    message = r"dataloader_persistent_workers=True with dataloader_num_workers=2: MaskedLMCollator depends on the epoch"
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(layers=1), **online_run(tmp_path / "p", 2, True)[1])
    cache = mlm_cache(tmp_path / "cache", 2)
    with pytest.raises(ValueError, match="CachedEpochsDataset depends on the epoch"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(layers=1), teacher_cache=cache,
                            processing_class=tiny.bert_tokenizer(),
                            args=arguments(tmp_path / "c", num_train_epochs=2, dataloader_num_workers=2,
                                           dataloader_persistent_workers=True))
    # Unseeded masking does not read the epoch (each worker's RNG moves on): allowed.
    rows, kw = online_run(tmp_path / "u", 2, True)
    kw["data_collator"] = MaskedLMCollator(tiny.bert_tokenizer(), mlm_smoothing=0.0)
    DistillationTrainer(model=tiny.tiny_distilbert_mlm(layers=1), **kw)

    # Why: with the check bypassed, the persistent workers collate epoch 1 with their epoch-0 collator.
    from distil_trainer import distillation_trainer
    monkeypatch.setattr(distillation_trainer, "check_epoch_reaches_workers", lambda *a: None)
    rows, kw = online_run(tmp_path / "bypassed", 2, True)
    got = recorded(tmp_path / "bypassed", **kw)
    epoch_0 = online_masks(rows, epochs=1, seed=9)
    assert_batches_equal(got, epoch_0 + epoch_0)
