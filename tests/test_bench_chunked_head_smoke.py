"""A tiny run of benchmarks/bench_chunked_head.py so it cannot rot: it runs each variant in its own process, prints
its figures, and the direct and fused paths give the same loss (never timings)."""

import importlib.util

import tiny


def test_bench_chunked_head_runs_and_both_paths_agree(capsys):
    path = tiny.REPO_ROOT / "benchmarks" / "bench_chunked_head.py"
    spec = importlib.util.spec_from_file_location("bench_chunked_head_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--vocabs", "300", "--hidden", "16", "--batch", "2", "--seq", "24", "--chunk", "8",
                       "--steps", "1", "--variants", "direct,fused"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("causal ", "mlm "))]
    assert [(r[0], r[2]) for r in rows] == [(task, v) for task in ("causal", "mlm")
                                            for v in ("direct", "fused")]
    assert all(float(r[3]) >= 0 for r in rows)  # peak MiB
    assert out.count("sanity: OK, same loss") == 2
