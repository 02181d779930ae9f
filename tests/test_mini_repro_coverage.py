"""benchmarks/mini_repro.py records each seed's teacher-cache top-k coverage (the teacher's probability inside the
cached top k, at the training temperature and at T = 1) in teacher_cache.json, prints it when the cache is built,
and states it in the tables' note."""

import importlib.util
import json

import pytest
import torch
from datasets import Dataset

import tiny
from distil_trainer.data import MaskedLMCollator
from distil_trainer.teacher_cache import build_teacher_cache

SCRIPT = tiny.REPO_ROOT / "benchmarks" / "mini_repro.py"
pytestmark = pytest.mark.usefixtures("restore_process_state")


def load_script():
    spec = importlib.util.spec_from_file_location("mini_repro_coverage_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cache_record_and_the_note_give_the_top_k_coverage(tmp_path, capsys):
    mini_repro = load_script()
    tok, teacher = tiny.bert_tokenizer(), tiny.tiny_bert_mlm(layers=1)
    rows = Dataset.from_dict({"input_ids": [tok(line)["input_ids"][:24] for line in tiny.real_lines(8)]})
    cache = build_teacher_cache(teacher, rows, tmp_path / "cache", tok, top_k=16, batch_size=4, temperature=2.0,
                                mlm_collator=MaskedLMCollator(tok, mlm_smoothing=0.0, seed=3), verbose=False)
    record = {}
    mini_repro.record_cache_use(record, 56, "triple", {"teacher_cache": str(cache.path), "teacher_cache_built": True})
    mini_repro.record_cache_use(record, 56, "no_ce", {"teacher_cache": str(cache.path), "teacher_cache_built": False})
    coverage = record["seed-56"]["topk_coverage"]
    # Recomputed here: a plain float64 softmax over every logit of a forward over the cached (masked) inputs.
    masses = {1.0: [], 2.0: []}
    with torch.no_grad():
        for row in cache.epoch(0).select_columns(["input_ids", "teacher_positions"]).to_list():
            logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0, row["teacher_positions"]].double()
            for T in masses:
                masses[T] += torch.softmax(logits / T, -1).topk(16, dim=-1).values.sum(-1).tolist()
    assert coverage["top_k"] == 16 and coverage["temperature"] == 2.0
    assert coverage["mass_t1"] == pytest.approx(sum(masses[1.0]) / len(masses[1.0]), rel=1e-4)
    assert coverage["mass_at_temperature"] == pytest.approx(sum(masses[2.0]) / len(masses[2.0]), rel=1e-4)
    printed = capsys.readouterr().out
    assert printed.count("teacher cache seed-56: its top 16 logits hold") == 1  # printed once, by the build

    (tmp_path / mini_repro.CACHE_RECORD).write_text(json.dumps(record))
    note = mini_repro.coverage_note(tmp_path)
    at_t, at_1 = 100 * coverage["mass_at_temperature"], 100 * coverage["mass_t1"]
    assert (f"Top-k coverage: at the masked positions its top 16 logits hold {at_t:.1f}% at the training temperature "
            f"T = 2, {at_1:.1f}% at T = 1 of the teacher's probability") in note
    assert mini_repro.coverage_note(tmp_path / "no_caches") == ""
