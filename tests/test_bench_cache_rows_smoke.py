"""benchmarks/bench_cache_rows.py on a tiny cache, so it cannot rot: both ways run on the same batches and give the
same loss. Never timings or their ratio."""

import importlib.util

import pytest

import tiny
from distil_trainer.data import MaskedLMCollator
from distil_trainer.teacher_cache import build_teacher_cache
from test_teacher_cache_train import mlm_student, mlm_teacher, token_rows

pytestmark = pytest.mark.usefixtures("restore_process_state")


def test_bench_cache_rows_smoke(tmp_path, capsys):
    tok = tiny.bert_tokenizer()
    collator = MaskedLMCollator(tok, mlm_smoothing=0.0, seed=11)
    cache = build_teacher_cache(mlm_teacher(), token_rows(tok, 8), tmp_path / "cache", tok, top_k=8,
                                dtype="float16", hidden_layers=[-1], mlm_collator=collator, batch_size=4,
                                verbose=False)
    mlm_student().save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    spec = importlib.util.spec_from_file_location("bench_cache_rows_under_test",
                                                  tiny.REPO_ROOT / "benchmarks" / "bench_cache_rows.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--teacher_cache", str(cache.path), "--student", str(tmp_path / "student"),
                         "--batches", "2", "--rounds", "1", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert result["loss_rel_diff"] < 1e-5  # dropout is seeded alike; the head terms read no other row
    assert "ratio every token / masked rows:" in out and "batches 2 x 1 rounds" in out
