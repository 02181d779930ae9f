"""Teacher-output cache, the writing and reading half: what is stored equals a plain-torch teacher forward, MLM
copies equal the seeded collator's masks, identity mismatches and damaged files are refused, and an interrupted build
resumes to the same cache as an uninterrupted one."""

import json
import os

import datasets
import pytest
import torch

import tiny
from distil_trainer.cli import main
from distil_trainer.data.collators import MaskedLMCollator
from distil_trainer.teacher_cache import (MANIFEST_FILE, TeacherCacheDamaged, TeacherCacheMismatch,
                                          build_teacher_cache, load_teacher_cache)

B = 4  # teacher batch size in these tests


def ids_dataset(tokenizer, n=20, max_length=40, **extra):
    lines = tiny.real_lines(n)
    ids = tokenizer(lines, truncation=True, max_length=max_length)["input_ids"]
    ids = [row[:8 + (i * 5) % (max_length - 8)] for i, row in enumerate(ids)]  # varied lengths: padding in batches
    return datasets.Dataset.from_dict({"input_ids": ids, **{k: f(ids) for k, f in extra.items()}})


def pad_right(rows, pad_id):
    """Plain right padding (independent of the package's pad_batch)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def reference_topk(model, batches, k, dtype=torch.float32):
    """[(positions, topk ids, topk logits, logsumexp)] per row from a plain forward of (ids, mask, stored) batches."""
    out = []
    with torch.no_grad():
        for ids, mask, stored in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for i in range(len(ids)):
                pos = torch.nonzero(stored[i]).flatten()
                z = logits[i, pos]
                top = z.topk(k, dim=-1)
                out.append((pos.tolist(), top.indices.tolist(), top.values.to(dtype).float(), torch.logsumexp(z, -1)))
    return out


def assert_lm_rows(rows, reference):
    assert len(rows) == len(reference)
    for row, (pos, ids, vals, lse) in zip(rows, reference):
        assert row["teacher_positions"] == pos
        assert row["teacher_topk_ids"] == ids
        torch.testing.assert_close(torch.tensor(row["teacher_topk_logits"]).reshape(vals.shape), vals,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(row["teacher_logsumexp"]), lse, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def bert():
    return tiny.bert_tokenizer(), tiny.tiny_bert_mlm(layers=2)


@pytest.fixture(scope="module")
def mlm_data(bert):
    return ids_dataset(bert[0])


def collator(tok, seed=7):
    return MaskedLMCollator(tok, mlm_smoothing=0, seed=seed)


def test_mlm_copies_are_the_seeded_collator_masks_and_topk_matches_plain_forward(tmp_path, bert, mlm_data):
    tok, model = bert
    cache = build_teacher_cache(model, mlm_data, tmp_path / "c", tok, top_k=5, dtype="float32", epochs=2,
                                mlm_collator=collator(tok), batch_size=B, shard_rows=8, hidden_layers=[-1, 0],
                                verbose=False)
    assert cache.num_epochs == 2 and cache.identity["hidden_layers"] == [0, 2] and cache.identity["positions"] == "masked"
    assert cache.identity["teacher"]["num_hidden_layers"] == 2  # -1 above is this layer's hidden_states index
    masked_inputs = []
    for e in range(2):
        rows = cache.epoch(e).to_list()
        ref_collator = collator(tok)
        ref_collator.set_epoch(e)
        batches, hidden = [], []
        for b0 in range(0, len(mlm_data), B):
            got = ref_collator([{"input_ids": r} for r in mlm_data[b0:b0 + B]["input_ids"]])
            batches.append((got["input_ids"], got["attention_mask"], got["labels"] != -100))
            with torch.no_grad():
                states = model(input_ids=got["input_ids"], attention_mask=got["attention_mask"],
                               output_hidden_states=True).hidden_states
            for i in range(len(got["input_ids"])):
                n = len(mlm_data[b0 + i]["input_ids"])
                row = rows[b0 + i]
                assert row["input_ids"] == got["input_ids"][i, :n].tolist()
                assert row["labels"] == got["labels"][i, :n].tolist()
                assert row["teacher_positions"] == torch.nonzero(got["labels"][i] != -100).flatten().tolist()
                for layer in (0, 2):
                    torch.testing.assert_close(torch.tensor(row[f"teacher_hidden.{layer}"]),
                                               states[layer][i, :n].to(torch.float32), rtol=1e-5, atol=1e-5)
        assert_lm_rows(rows, reference_topk(model, batches, 5))
        masked_inputs.append([r["input_ids"] for r in rows])
    assert masked_inputs[0] != masked_inputs[1]  # one fresh masking per epoch
    train = cache.train_dataset()  # the training side's view: epoch e reads masked copy e
    train.set_epoch(1)
    assert len(train) == 20 and train[3]["input_ids"].tolist() == masked_inputs[1][3]
    stats = cache.stats
    assert stats["rows"] == 20 and stats["positions"] == sum(len(r["teacher_positions"]) for e in range(2)
                                                             for r in cache.epoch(e).to_list())
    assert 0 < stats["topk_mass_mean"] < 1 and stats["bytes"] > 0


def test_causal_lm_stores_every_token_and_respects_distillation_mask(tmp_path):
    tok, model = tiny.gpt2_tokenizer(), tiny.tiny_gpt2_lm(layers=2)
    data = ids_dataset(tok, n=10)
    cache = build_teacher_cache(model, data, tmp_path / "c", tok, top_k=4, batch_size=B, verbose=False)
    assert cache.identity["positions"] == "tokens" and cache.identity["dtype"] == "float16"
    rows = cache.epoch(0).to_list()
    assert "labels" not in rows[0]
    batches = []
    for b0 in range(0, len(data), B):
        ids, mask = pad_right(data[b0:b0 + B]["input_ids"], tok.pad_token_id)
        batches.append((ids, mask, mask.bool()))
    assert_lm_rows(rows, reference_topk(model, batches, 4, dtype=torch.float16))
    assert [r["teacher_positions"] for r in rows] == [list(range(len(r))) for r in data["input_ids"]]
    assert [r["input_ids"] for r in rows] == data["input_ids"]

    marked = data.add_column("distillation_mask", [[i % 2 for i in range(len(r))] for r in data["input_ids"]])
    rows = build_teacher_cache(model, marked, tmp_path / "m", tok, top_k=4, batch_size=B, verbose=False).epoch(0)
    assert rows["teacher_positions"] == [list(range(1, len(r), 2)) for r in data["input_ids"]]


def test_classification_stores_full_logits_and_copies_labels(tmp_path, bert):
    tok = bert[0]
    model = tiny.tiny_bert_classifier(num_labels=3)
    data = ids_dataset(tok, n=9, label=lambda ids: [i % 3 for i in range(len(ids))])
    cache = build_teacher_cache(model, data, tmp_path / "c", tok, batch_size=B, verbose=False)
    assert cache.identity["top_k"] is None and cache.identity["head"] == "sequence_classification"
    rows = cache.epoch(0)
    assert rows["label"] == data["label"]
    expected = []
    with torch.no_grad():
        for b0 in range(0, len(data), B):
            ids, mask = pad_right(data[b0:b0 + B]["input_ids"], tok.pad_token_id)
            expected.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(torch.tensor(rows["teacher_logits"]), torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.reliability(fault="teacher cache built from another teacher, tokenizer, data or top-k",
                         outcome="refused with TeacherCacheMismatch naming the field")
def test_mismatch_refused_naming_the_field(tmp_path, bert, mlm_data):
    tok, model = bert
    path = tmp_path / "c"
    build_teacher_cache(model, mlm_data, path, tok, top_k=3, mlm_collator=collator(tok), batch_size=B, verbose=False)
    assert load_teacher_cache(path, teacher=model, tokenizer=tok, data=mlm_data, top_k=3).identity["rows"] == 20
    changed = tiny.tiny_bert_mlm(layers=2)
    with torch.no_grad():
        changed.bert.embeddings.word_embeddings.weight[5, 0] += 1.0  # one weight differs
    cases = {"teacher": {"teacher": changed}, "tokenizer": {"tokenizer": tiny.roberta_tokenizer()},
             "data": {"data": mlm_data.select(range(19))}, "top_k": {"top_k": 4}, "dtype": {"dtype": "float32"}}
    for field, expected in cases.items():
        with pytest.raises(TeacherCacheMismatch, match=rf"different {field}\b"):
            load_teacher_cache(path, **expected)
    # Building over it with another setting is refused, then allowed with overwrite=True.
    with pytest.raises(TeacherCacheMismatch, match="different top_k .*overwrite=True"):
        build_teacher_cache(model, mlm_data, path, tok, top_k=4, mlm_collator=collator(tok), batch_size=B,
                            verbose=False)
    with pytest.raises(TeacherCacheMismatch, match="different masking"):
        build_teacher_cache(model, mlm_data, path, tok, top_k=3, mlm_collator=collator(tok, seed=8), batch_size=B,
                            verbose=False)
    manifest_time = os.stat(path / MANIFEST_FILE).st_mtime_ns
    again = build_teacher_cache(model, mlm_data, path, tok, top_k=3, mlm_collator=collator(tok), batch_size=B,
                                verbose=False)  # same identity: reused, not rebuilt
    assert again.identity["top_k"] == 3 and os.stat(path / MANIFEST_FILE).st_mtime_ns == manifest_time
    rebuilt = build_teacher_cache(model, mlm_data, path, tok, top_k=4, mlm_collator=collator(tok), batch_size=B,
                                  overwrite=True, verbose=False)
    assert rebuilt.identity["top_k"] == 4 and len(rebuilt.epoch(0)[0]["teacher_topk_ids"][0]) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a teacher cache"):
        build_teacher_cache(model, mlm_data, tmp_path / "other", tok, top_k=3, mlm_collator=collator(tok),
                            verbose=False)


def test_masked_lm_needs_a_seeded_collator(tmp_path, bert, mlm_data):
    tok, model = bert
    for given in (None, MaskedLMCollator(tok, mlm_smoothing=0)):
        with pytest.raises(ValueError, match="seed"):
            build_teacher_cache(model, mlm_data, tmp_path / "c", tok, mlm_collator=given, verbose=False)
    assert not (tmp_path / "c").exists()


def _arrow_file(path):
    return next(p for p in (path / "epoch-0" / "shard-00000").iterdir() if p.suffix == ".arrow")


@pytest.mark.reliability(fault="teacher cache shard file truncated, altered or deleted",
                         outcome="refused on load with TeacherCacheDamaged naming the file")
def test_damaged_files_are_detected(tmp_path, bert, mlm_data):
    tok, model = bert
    path = tmp_path / "c"
    build_teacher_cache(model, mlm_data, path, tok, top_k=3, mlm_collator=collator(tok), batch_size=B, verbose=False)
    arrow = _arrow_file(path)
    data = bytearray(arrow.read_bytes())
    st = os.stat(arrow)
    data[len(data) // 2] ^= 0xFF  # same size; with the recorded time restored, only a full hash sees it
    arrow.write_bytes(bytes(data))
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns))
    load_teacher_cache(path, verify="changed")
    with pytest.raises(TeacherCacheDamaged, match=f"shard-00000/{arrow.name} content"):
        load_teacher_cache(path, verify="full")
    os.utime(arrow)  # a write that changed its time is hashed by the default check
    with pytest.raises(TeacherCacheDamaged, match=arrow.name):
        load_teacher_cache(path)
    arrow.write_bytes(bytes(data[:-100]))  # truncated: caught by size alone
    with pytest.raises(TeacherCacheDamaged, match="truncated"):
        load_teacher_cache(path, verify="size")
    arrow.unlink()
    with pytest.raises(TeacherCacheDamaged, match="missing file"):
        load_teacher_cache(path, verify="size")
    # Building again with the same identity replaces the damaged cache.
    build_teacher_cache(model, mlm_data, path, tok, top_k=3, mlm_collator=collator(tok), batch_size=B, verbose=False)
    load_teacher_cache(path, verify="full")


class Crash(RuntimeError):
    pass


@pytest.mark.reliability(fault="teacher cache build killed mid-way", outcome="a re-run resumes after the last "
                         "complete shard; the result equals an uninterrupted build")
def test_resume_after_a_crash_equals_an_uninterrupted_build(tmp_path, bert, mlm_data):
    tok, model = bert
    settings = dict(top_k=4, epochs=2, batch_size=2, shard_rows=4, hidden_layers=[-1], verbose=False)
    calls = {"n": 0}

    def count_and_crash(module, args, kwargs):
        calls["n"] += 1
        if calls.get("crash_at") == calls["n"]:
            raise Crash("teacher died")

    hook = model.register_forward_pre_hook(count_and_crash, with_kwargs=True)
    try:
        calls["crash_at"] = 14  # batch 14 of 20: epoch 1, inside its 2nd shard (shards of 2 batches)
        with pytest.raises(Crash):
            build_teacher_cache(model, mlm_data, tmp_path / "resumed", tok, mlm_collator=collator(tok), **settings)
        assert not (tmp_path / "resumed").exists()
        progress = json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())
        assert [len(e) for e in progress["epochs"]] == [5, 1]
        with pytest.raises(FileNotFoundError, match="resume"):
            load_teacher_cache(tmp_path / "resumed")
        calls.update(n=0, crash_at=None)
        resumed = build_teacher_cache(model, mlm_data, tmp_path / "resumed", tok, mlm_collator=collator(tok),
                                      **settings)
        assert calls["n"] == 20 - 12  # only the unfinished shards ran the teacher
    finally:
        hook.remove()
    assert not (tmp_path / "resumed.partial").exists()
    whole = build_teacher_cache(model, mlm_data, tmp_path / "whole", tok, mlm_collator=collator(tok), **settings)
    for e in range(2):
        assert resumed.epoch(e).to_dict() == whole.epoch(e).to_dict()
    assert resumed.stats["positions"] == whole.stats["positions"]
    assert resumed.stats["topk_mass_mean"] == pytest.approx(whole.stats["topk_mass_mean"])


def test_cli_end_to_end_on_a_saved_teacher(tmp_path, bert, capsys):
    from distil_trainer.data import binarize

    tok, model = bert
    teacher_dir = tmp_path / "teacher"
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.real_lines(16)) + "\n")
    data = binarize(tmp_path / "data", tok, file_path=str(corpus), max_length=32, verbose=False).dataset
    args = ["cache-teacher", "--teacher", str(teacher_dir), "--data", str(tmp_path / "data"), "--output_dir",
            str(tmp_path / "cache"), "--top_k", "3", "--mlm_smoothing", "0", "--epochs", "2", "--batch_size", "8",
            "--hidden_layers", "-1", "--seed", "5"]
    assert main(args) == 0
    assert "built" in capsys.readouterr().out
    cache = load_teacher_cache(tmp_path / "cache", verify="full", teacher=model, tokenizer=tok, data=data, top_k=3,
                               head="masked_lm", epochs=2)
    assert cache.identity["masking"]["seed"] == 5 and cache.identity["hidden_layers"] == [2]
    assert len(cache.epoch(1)) == len(data)
    ref = MaskedLMCollator(tok, mlm_smoothing=0, seed=5)
    ref.set_epoch(1)
    first = ref([{"input_ids": r} for r in data[:8]["input_ids"]])
    assert cache.epoch(1)[0]["labels"] == first["labels"][0, :len(data[0]["input_ids"])].tolist()
    assert main(args) == 0 and "cache hit" in capsys.readouterr().out
    assert main(args[:-2] + ["--seed", "6"]) == 2
    err = capsys.readouterr().err
    assert "different masking" in err, err[-600:]
    assert main(args[:-2] + ["--seed", "6", "--overwrite"]) == 0


# A build in another process that stops inside its teacher pass until `release` exists.
_HOLDING_BUILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, "tests")
import datasets
import tiny
from distil_trainer.data.collators import MaskedLMCollator
from distil_trainer.teacher_cache import build, build_teacher_cache

data, out, ready, release = sys.argv[1:5]
real = build._compute_missing_shards

def held(*args, **kwargs):
    Path(ready).touch()
    while not Path(release).exists():
        time.sleep(0.05)
    return real(*args, **kwargs)

build._compute_missing_shards = held
tok = tiny.bert_tokenizer()
build_teacher_cache(tiny.tiny_bert_mlm(layers=2), datasets.load_from_disk(data), out, tok, top_k=3, batch_size=4,
                    mlm_collator=MaskedLMCollator(tok, mlm_smoothing=0, seed=7), verbose=False)
"""


@pytest.mark.reliability(fault="a second build of a teacher cache folder while another process builds it",
                         outcome="refused with a message naming the other build (pid, host, start, command); once "
                                 "that build is done, the same call reuses its cache")
def test_a_second_concurrent_build_of_one_cache_is_refused(tmp_path, bert, mlm_data):
    import re
    import subprocess
    import sys
    import time

    from distil_trainer.run_lock import OutputDirInUse

    tok, model = bert[0], tiny.tiny_bert_mlm(layers=2)  # as the other process makes it (no saved config change)
    mlm_data.save_to_disk(str(tmp_path / "data"))
    data = datasets.load_from_disk(str(tmp_path / "data"))
    out, ready, release = tmp_path / "cache", tmp_path / "ready", tmp_path / "release"
    other = subprocess.Popen([sys.executable, "-c", _HOLDING_BUILD, str(tmp_path / "data"), str(out), str(ready),
                              str(release)], cwd=tiny.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert other.poll() is None, other.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the other build never started"
            time.sleep(0.1)
        settings = dict(top_k=3, batch_size=4, verbose=False)
        with pytest.raises(OutputDirInUse, match=rf"The teacher cache '{re.escape(str(out))}' \(being built\) is in "
                                                 rf"use by run pid {other.pid} on .* since .*Wait for it to finish"):
            build_teacher_cache(model, data, out, tok, mlm_collator=collator(tok), **settings)
    finally:
        release.touch()
        _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-3000:]
    assert not (tmp_path / ".cache.build.lock").exists()  # released
    cache = build_teacher_cache(model, data, out, tok, mlm_collator=collator(tok), **settings)
    assert cache.stats["rows"] == len(data)  # the other process's cache, reused: same teacher, data and settings


def test_coverage_is_measured_at_the_training_temperature(tmp_path, bert, mlm_data, capsys):
    """stats: the teacher's mean probability inside the stored top k, at T = 1 and at the given temperature,
    against a plain float64 softmax of a forward over the cached (masked) inputs."""
    tok, model = bert
    cache = build_teacher_cache(model, mlm_data, tmp_path / "c", tok, top_k=7, batch_size=B,
                                mlm_collator=collator(tok), temperature=2.0)
    assert "mass at T      " in capsys.readouterr().out
    masses = {1.0: [], 2.0: []}
    with torch.no_grad():
        for row in cache.epoch(0).select_columns(["input_ids", "teacher_positions"]).to_list():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, row["teacher_positions"]].double()
            for T in masses:
                p = torch.softmax(logits / T, -1)
                masses[T] += p.topk(7, dim=-1).values.sum(-1).tolist()
    s = cache.stats
    assert s["topk_mass_temperature"] == 2.0
    assert s["topk_mass_mean"] == pytest.approx(sum(masses[1.0]) / len(masses[1.0]), rel=1e-4)
    assert s["topk_mass_mean_at_temperature"] == pytest.approx(sum(masses[2.0]) / len(masses[2.0]), rel=1e-4)
    assert s["topk_mass_mean_at_temperature"] < s["topk_mass_mean"]  # a flatter teacher at T = 2
