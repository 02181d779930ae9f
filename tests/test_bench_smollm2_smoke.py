"""benchmarks/bench_smollm2.py at tiny sizes on a tiny Llama GGUF teacher, so it cannot rot: the three variants train
from one saved initial student on the same blocks, each with its own terms, and every model gets a perplexity on the
same tokens. Never timings."""

import importlib.util
import json
import math

import pytest

import tiny
import tiny_gguf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_process_state")]


def test_bench_smollm2_smoke(tmp_path):
    pytest.importorskip("gguf", reason="the benchmark's teacher is a GGUF file")
    teacher, corpus, eval_file = tiny_gguf.write_decoder_benchmark_inputs(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_smollm2_under_test",
                                                  tiny.REPO_ROOT / "benchmarks" / "bench_smollm2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--output_dir", str(tmp_path / "out"), "--teacher", str(teacher),
                         "--student_layers", "2", "--corpus", str(corpus), "--eval_file", str(eval_file)])

    rows = result["rows"]
    assert list(rows) == ["teacher", "student_init", "clm", "forward_kl", "reverse_kl"]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows.values())
    logged = {k: rows[k]["history"][-1] for k in ("clm", "forward_kl", "reverse_kl")}
    assert "loss_clm" in logged["clm"] and "loss_ce" not in logged["clm"]
    assert "loss_ce" in logged["forward_kl"] and "loss_clm" not in logged["forward_kl"]
    # Same initial student and same first batch: the first step's KL differs between the two directions only.
    first = {k: rows[k]["history"][0] for k in ("forward_kl", "reverse_kl")}
    assert first["forward_kl"]["loss_ce"] != first["reverse_kl"]["loss_ce"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["steps"] == 2 and "CLM-only" in result["markdown"]
