"""benchmarks/bench_export.py at tiny size so it cannot rot: it runs, prints its tables, and the parts with a right
answer hold (ONNX Runtime fp32 gives PyTorch's STS-B Spearman; the speed-up columns are the ratios of the ms
columns). Never timings."""

import importlib.util
import re

import pytest

import tiny

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
pytestmark = pytest.mark.usefixtures("restore_process_state")  # the script sets torch's threads and log levels

STSB_DEV = tiny.SHARED_DATA / "glue" / "STS-B" / "dev.tsv"


def load():
    path = tiny.REPO_ROOT / "benchmarks" / "bench_export.py"
    spec = importlib.util.spec_from_file_location("bench_export_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(out, start, end):
    return out.split(start, 1)[1].split(end, 1)[0]


def row(text, prefix):
    (line,) = [x for x in text.splitlines() if re.match(rf"\s+{prefix}\s+[-+\d]", x)]  # the table's row
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+(?:e[-+]\d+)?", line)]


def ratio_of_printed(numerator, denominator, ratio, half_unit=0.005):
    """Whether `ratio` (printed to 2 decimals) can be numerator / denominator, each printed to 2 decimals."""
    low = (numerator - half_unit) / (denominator + half_unit) - half_unit
    high = (numerator + half_unit) / max(denominator - half_unit, 1e-9) + half_unit
    return low <= ratio <= high


def test_bench_export_runs_on_a_tiny_teacher(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    import torch

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    # A wide initialisation, so that the layer the student drops changes its outputs.
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128, initializer_range=0.3)).save_pretrained(teacher)
    tiny.bert_tokenizer().save_pretrained(teacher)

    bench = load()
    args = ["--teacher", str(teacher), "--layers", "0", "--data", str(STSB_DEV), "--max_pairs", "24",
            "--batch_size", "2", "--seq", "16", "--rounds", "2", "--warmup", "1", "--exporter", "torchscript",
            "--output_dir", str(tmp_path / "onnx")]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "onnx" / "student" / "model.int8.onnx").is_file()
    assert "student layers 0" in out
    parity = [float(x) for x in re.findall(r"max abs (\S+?)(?:,|$)", out.split("parity")[1].splitlines()[0])]
    assert len(parity) == 2 and max(parity) < 1e-4
    for role in ("teacher", "student"):
        for clock in ("wall ms", "process CPU ms"):
            pytorch_ms, fp32_ms, int8_ms, fp32_up, int8_up = row(section(out, clock, "speed-up ("), role)
            assert ratio_of_printed(pytorch_ms, fp32_ms, fp32_up)
            assert ratio_of_printed(pytorch_ms, int8_ms, int8_up)
        spearman_pt, spearman_fp32, spearman_int8, change = row(section(out, "STS-B dev", "sentence embeddings"),
                                                                 role)
        assert spearman_fp32 == pytest.approx(spearman_pt, abs=1e-3)
        assert change == pytest.approx(spearman_int8 - spearman_fp32, abs=2e-4)
    assert "student vs teacher speed-up (process CPU): PyTorch x" in out
    assert "mean cosine" in out.split("int8 vs fp32 graph")[1]


def test_bench_export_rejects_bad_sizes():
    bench = load()
    for bad in (["--rounds", "0"], ["--max_pairs", "1"], ["--seq", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
