"""Tiny runs of the benchmark scripts so they cannot rot. They check that each script runs and prints its figures,
plus the parts with a right answer (same first-step loss, the analytic FLOP count against torch's FlopCounterMode,
the STS-B columns); never timings."""

import importlib.util
import re
import subprocess

import pytest

import tiny

BENCHMARKS = tiny.REPO_ROOT / "benchmarks"
STSB_DEV = tiny.SHARED_DATA / "glue" / "STS-B" / "dev.tsv"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The scripts set torch's thread count and quieten loggers for their process; conftest undoes it for other tests.
pytestmark = pytest.mark.usefixtures("restore_process_state")


def numbers(line):
    return [float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", line)]


def test_bench_step_runs_and_the_two_loops_do_the_same_math(capsys):
    """Every case on tiny sizes: the trainer and the independent reference loop give the same first-step loss and
    the same updated weights, and the script prints a ratio per case (never asserted: no timings in tests)."""
    bench = load("bench_step")
    assert bench.main(["--steps", "1", "--rounds", "1", "--hidden", "32", "--vocab", "512", "--batch", "2",
                       "--seq", "16", "--teacher_layers", "2", "--student_layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "threads 1" in out
    for case in bench.CASES:
        (first,) = [line for line in out.splitlines() if line.startswith(f"[{case}] first step")]
        trainer_loss, reference_loss = numbers(first)[:2]
        assert trainer_loss == pytest.approx(reference_loss, rel=1e-5) and "same math" in first
        # 5 KL + 2 LM loss + cos of an untrained student over 512 tokens: the LM term alone is ~ 2 ln(512) ~ 12.5.
        assert 10 < reference_loss < 40
        (row,) = [line for line in out.splitlines() if line.startswith(f"| {case} |")]
        assert numbers(row)[3] > 0 and row.endswith("| yes |")


def test_bench_step_reference_is_written_without_the_library():
    """The reference loop must not call distil_trainer's losses (it could not see them get slower)."""
    import inspect

    bench = load("bench_step")
    for function in (bench.reference_loss, bench.reference_step, bench.run_reference):
        assert "distil_trainer" not in inspect.getsource(function) and "losses." not in inspect.getsource(function)


def test_bench_step_rejects_bad_sizes():
    bench = load("bench_step")
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_stsb_reader_finds_the_sentence_columns_by_header(tmp_path):
    bench = load("bench_inference")
    pairs = bench.read_stsb_pairs(STSB_DEV)
    assert len(pairs) == 1500
    assert pairs[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")
    bad = tmp_path / "dev.tsv"
    bad.write_text("index\tsentence\n0\tx\n")
    with pytest.raises(ValueError, match="sentence1/sentence2"):
        bench.read_stsb_pairs(bad)
    with pytest.raises(FileNotFoundError, match="--data"):
        bench.read_stsb_pairs(tmp_path / "missing.tsv")


def test_analytic_flops_match_an_independent_count():
    bench = load("bench_inference")
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    # Per layer: Q, K, V, output (4 h^2) and FFN (2 h f) multiply-adds per token, 2 FLOPs each; pooler h^2 once;
    # attention: L^2 h for the scores and L^2 h for the weighted values, per layer.
    h, f, layers = 32, 64, 2
    lengths = [5, 9]
    linear = sum(2 * layers * n * (4 * h * h + 2 * h * f) + 2 * h * h for n in lengths)
    attention = sum(layers * 2 * 2 * n * n * h for n in lengths)
    assert bench.analytic_flops(model, lengths) == (linear + attention, linear)


def test_bench_inference_runs_both_pairs(capsys):
    bench = load("bench_inference")
    assert bench.main(["--max_pairs", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "threads 1" in out and "2 pairs" in out
    assert "DistilBertModel 6x768" in out and "BertModel 3x384" in out
    checks = [line for line in out.splitlines() if "FlopCounterMode cross-check" in line]
    assert len(checks) == 2
    for line in checks:  # the analytic matmul count equals torch's own count
        t_counted, t_analytic, s_counted, s_analytic = numbers(line)
        assert t_counted == pytest.approx(t_analytic, rel=1e-3)
        assert s_counted == pytest.approx(s_analytic, rel=1e-3)
    ratios = [line for line in out.splitlines() if "time ratio student/teacher" in line]
    assert len(ratios) == 4  # wall and cpu for each pair
    for line in ratios:
        assert numbers(line)[1] == pytest.approx(0.5, abs=0.02)  # the FLOP ratio: half the layers, same width


def test_gpu_check_smoke_runs_on_cpu_and_writes_its_report(tmp_path, capsys):
    bench = load("gpu_check")
    assert bench.main(["--smoke", "--steps", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    written = (tmp_path / "gpu_check.txt").read_text()
    assert not list(tmp_path.glob("*.partial"))
    for expected in ("tokens/s", "MFU vs 989 TFLOP/s", "inference (encoders, bf16", "total"):
        assert expected in out and expected in written
    # An earlier result is never overwritten.
    report = bench.Report(tmp_path)
    report("second")
    report.close()
    assert (tmp_path / "gpu_check.txt").read_text() == written
    assert (tmp_path / "gpu_check.1.txt").read_text() == "second\n"


def test_gpu_check_shell_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)
