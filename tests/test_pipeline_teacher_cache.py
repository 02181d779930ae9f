"""The recipe pipeline with --teacher_cache: the teacher runs once (cache stage), the Distil stage trains from its
outputs with no teacher forward and the same losses as the online run when the cache holds every logit in float32;
other runs with the same settings (ablation variants) reuse the one cache; other settings on that folder are
refused."""

import json
from pathlib import Path

import pytest

from test_pipeline import make_corpus, make_teacher, recipe_argv
from distil_trainer.pipeline import main
from distil_trainer.pipeline.cache_stages import training_epochs
from distil_trainer.teacher_cache import MANIFEST_FILE, load_teacher_cache

# 16 rows, batch 4, 6 steps: 4 updates per epoch, so 2 epochs and 2 masked copies in the cache. Sequential order,
# so the online run's seeded masks fall on the same batches as the cache's.
SETTINGS = dict(max_train_samples=16, max_steps=6, logging_steps=1, save_steps=100,
                train_sampling_strategy="sequential", restrict_ce_to_mask="true", student_type="distilbert")
EXACT = ["--teacher_cache_top_k", "0", "--teacher_cache_dtype", "float32"]
LOSSES = ("loss", "loss_ce", "loss_mlm", "loss_cos", "teacher_agreement")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_pipeline")
    return make_teacher(root / "bert"), make_corpus(root / "corpus.txt", n=60)


def argv(root, inputs, run, **overrides):
    teacher, corpus = inputs
    settings = {**SETTINGS, "data_cache_dir": str(root / "data"), **overrides}
    return recipe_argv(root, teacher, corpus, output_dir=str(root / run), **settings)


def logged(result):
    log = json.loads((Path(result["student_dir"]) / "training_log.json").read_text())
    return [e for e in log if "loss" in e]


def test_training_from_the_cache_equals_the_online_run(tmp_path, inputs, capsys):
    online = main(argv=argv(tmp_path, inputs, "online"))
    assert "cache teacher outputs" not in capsys.readouterr().out  # off by default: the stage list is unchanged
    cache_dir = tmp_path / "teacher_cache"
    cached = main(argv=argv(tmp_path, inputs, "cached") + ["--teacher_cache", str(cache_dir)] + EXACT)
    printed = capsys.readouterr().out
    assert "cache teacher outputs: built" in printed and "(teacher outputs from the cache)" in printed

    cache = load_teacher_cache(cache_dir)
    i = cache.identity
    assert (i["positions"], i["top_k"], i["vocab_size"], i["dtype"]) == ("masked", 30522, 30522, "float32")
    assert i["hidden_layers"] == [4] and i["masking"]["seed"] == 56 and i["masking"]["batch_size"] == 4
    assert cache.num_epochs == 2 and i["rows"] == 16
    assert cached["teacher_cache"] == str(cache_dir) and cached["teacher_cache_built"] is True

    a, b = logged(online), logged(cached)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert [y[k] for k in LOSSES] == pytest.approx([x[k] for k in LOSSES], rel=1e-5, abs=1e-6)


def test_ablation_variants_share_one_cache_and_other_settings_are_refused(tmp_path, inputs, capsys):
    cache_dir = tmp_path / "teacher_cache"
    first = argv(tmp_path, inputs, "triple") + ["--teacher_cache", str(cache_dir), "--teacher_cache_top_k", "8"]
    main(argv=first)
    assert "cache teacher outputs: built" in capsys.readouterr().out
    main(argv=first)  # the same command again: the student is trained, the cache is not even opened
    assert "cache teacher outputs: skipped: the student is trained already" in capsys.readouterr().out
    manifest = (cache_dir / MANIFEST_FILE).read_bytes()
    shards = sorted(str(p.relative_to(cache_dir)) for p in cache_dir.glob("epoch-*/shard-*"))

    # Without L_cos (its cache needs no hidden states: the one holding them serves it) and from random weights:
    # the same cache, not a second teacher pass.
    for run, extra in (("no_cos", ["--alpha_cos", "0"]), ("random_init", ["--student_init", "random"])):
        result = main(argv=argv(tmp_path, inputs, run) + ["--teacher_cache", str(cache_dir), "--teacher_cache_top_k",
                                                          "8"] + extra)
        assert result["teacher_cache_built"] is False
        printed = capsys.readouterr().out
        assert f"cache teacher outputs: reused {cache_dir}" in printed, run
        assert "(teacher outputs from the cache)" in printed
    assert (cache_dir / MANIFEST_FILE).read_bytes() == manifest
    assert sorted(str(p.relative_to(cache_dir)) for p in cache_dir.glob("epoch-*/shard-*")) == shards

    # Another k on the same folder: refused before any training, naming the field and the fix.
    with pytest.raises(SystemExit):
        main(argv=argv(tmp_path, inputs, "k16") + ["--teacher_cache", str(cache_dir), "--teacher_cache_top_k", "16"])
    err = capsys.readouterr().err
    assert "top_k" in err and "own --teacher_cache folder" in err
    assert not (tmp_path / "k16" / "student").exists()


def test_what_a_cache_cannot_train_is_refused_before_the_teacher_pass(tmp_path, inputs, capsys):
    cache_dir = tmp_path / "teacher_cache"
    with pytest.raises(SystemExit):
        main(argv=argv(tmp_path, inputs, "mse") + ["--teacher_cache", str(cache_dir), "--alpha_mse", "1"])
    assert "alpha_mse" in capsys.readouterr().err
    assert not cache_dir.exists()


@pytest.mark.parametrize("rows, batch, accumulation, world, drop_last, steps, expected", [
    (16, 4, 1, 1, False, 6, 2), (16, 4, 1, 1, False, 4, 1), (17, 4, 1, 1, False, 10, 2), (17, 4, 1, 1, True, 10, 3),
    (16, 4, 1, 2, False, 6, 3), (16, 2, 4, 1, False, 3, 2), (20, 4, 1, 3, False, 6, 3), (20, 4, 1, 3, True, 6, 6),
    (44, 4, 2, 3, True, 5, 3), (44, 4, 2, 3, False, 5, 3)])
def test_cached_epochs_are_the_trainers(tmp_path, rows, batch, accumulation, world, drop_last, steps, expected):
    """The epochs the stage caches equal those Trainer runs (its set_initial_training_values) on every rank's
    dataloader, sharded by accelerate's own BatchSamplerShard as `Accelerator.prepare` shards it."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard
    from datasets import Dataset
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from distil_trainer import DistillationArguments, DistillationTrainer
    import tiny

    args = SimpleNamespace(max_steps=steps, num_train_epochs=3.0, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, dataloader_drop_last=drop_last)
    assert training_epochs(args, rows, world) == expected
    t_args = DistillationArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, dataloader_drop_last=drop_last,
                                   report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=t_args)
    data = Dataset.from_dict({"x": list(range(rows))})
    for rank in range(world):
        batches = BatchSampler(SequentialSampler(data), batch_size=batch, drop_last=drop_last)
        shard = BatchSamplerShard(batches, num_processes=world, process_index=rank, even_batches=True)
        loader = DataLoader(data, batch_sampler=shard)
        assert trainer.set_initial_training_values(t_args, loader)[0] == expected, f"rank {rank}"


def test_a_fitted_teacher_head_has_the_saved_teachers_identity_on_every_rank(tmp_path):
    """The main process saves the fitted teacher (save_pretrained records its class in the config); the other ranks
    fit the same head without saving. Their in-memory teacher must still have the saved one's cache identity, or
    they would refuse the cache the main process built."""
    from types import SimpleNamespace

    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForMaskedLM, BertModel

    import tiny
    from distil_trainer import extraction
    from distil_trainer.data import MaskedLMCollator
    from distil_trainer.pipeline.model_stages import FitTeacherHead
    from distil_trainer.teacher_cache.identity import teacher_identity

    bare = tmp_path / "bare"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(bare)
    tok = tiny.bert_tokenizer()
    rows = Dataset.from_list([{"input_ids": tok(line)["input_ids"][:40]} for line in tiny.real_lines(40)])

    class State:
        def wait_for_everyone(self):
            pass

    def fitted(run_dir, is_main):
        torch.manual_seed(0)  # the missing head's random start, as equal as in fresh processes
        teacher, missing = extraction.load_teacher(str(bare), False)
        ctx = SimpleNamespace(
            model_args=SimpleNamespace(teacher_name=str(bare), teacher_revision=None, fit_teacher_mlm_head_steps=3,
                                       fit_teacher_mlm_head_decoder="tied"),
            training_args=SimpleNamespace(seed=5), state=State(), is_main=is_main, out=run_dir, result={},
            teacher=teacher, missing=missing, train_dataset=rows, data_dir=tmp_path,
            collator=MaskedLMCollator(tok, mlm_smoothing=0.0, seed=5))
        FitTeacherHead().run(ctx)
        return ctx.teacher

    fitted(tmp_path / "main", is_main=True)
    saved = BertForMaskedLM.from_pretrained(tmp_path / "main" / "teacher_mlm_head")
    other_rank = fitted(tmp_path / "other", is_main=False)
    assert not (tmp_path / "other" / "teacher_mlm_head").exists()
    assert teacher_identity(other_rank) == teacher_identity(saved)
