"""The recipes' --onnx_latency stage: teacher and student exported (fp32 and int8) and timed side by side; the
figures reach onnx_latency.json, report.md and the model card, and a second run reuses them."""

import json
from pathlib import Path

import pytest

from distil_trainer.pipeline import main
from distil_trainer.pipeline.model_card import StudentCardInfo, build_model_card
from distil_trainer.pipeline.onnx_latency import latency_table
from test_pipeline import make_corpus, make_teacher, recipe_argv


def _latency(teacher_ms, student_ms):
    """A measurement in export.measure's layout: {backend}_ms per role."""
    models = {role: {f"{backend}_ms": ms for backend, ms in zip(("pytorch", "onnx_fp32", "onnx_int8"), figures)}
              for role, figures in (("teacher", teacher_ms), ("student", student_ms))}
    return {"setup": {"how": "CPU, 1 thread(s), one batch of 8 x 64 tokens"}, "models": models}


def test_latency_table_gives_each_backend_and_the_speedups():
    lines = latency_table(_latency((40.0, 30.0, 20.0), (16.0, 12.0, 8.0)))
    assert "| PyTorch fp32 | 40.0 | 16.0 | 2.50x |" in lines
    assert "| ONNX Runtime fp32 | 30.0 | 12.0 | 2.50x |" in lines
    assert "| ONNX Runtime int8 | 20.0 | 8.0 | 2.50x |" in lines
    # The deployed student (fastest backend, int8 here) against the teacher as trained (PyTorch): 40 / 8.
    assert any("ONNX Runtime int8 against the teacher in PyTorch: 5.00x faster" in line for line in lines)
    assert latency_table(None) == []


def test_latency_table_leaves_out_a_backend_that_was_not_measured():
    lines = latency_table(_latency((40.0, 30.0, None), (16.0, 10.0, None)))
    assert not any("int8" in line for line in lines)
    assert any("ONNX Runtime fp32 against the teacher in PyTorch: 4.00x faster" in line for line in lines)


def test_card_shows_the_latency_table_and_keeps_it_in_the_metadata():
    import yaml

    latency = _latency((40.0, 30.0, 20.0), (16.0, 12.0, 8.0))
    card = str(build_model_card(StudentCardInfo(model_name="me/s", teacher_name="t", student_parameters=1,
                                                teacher_parameters=2, latency=latency)))
    assert "| ONNX Runtime int8 | 20.0 | 8.0 | 2.50x |" in card
    assert yaml.safe_load(card.split("---\n")[1])["distillation"]["latency"] == latency


@pytest.mark.slow
def test_recipe_measures_teacher_and_student_latency_in_onnx_runtime(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    teacher = make_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus.txt", n=60)
    argv = recipe_argv(tmp_path, teacher, corpus, max_steps=1, report="true", onnx_latency="true")
    result = main(argv=argv)
    out = Path(result["output_dir"])
    saved = json.loads((out / "onnx_latency.json").read_text())["latency"]
    for role in ("teacher", "student"):
        manifest = json.loads((out / "onnx" / role / "export.json").read_text())
        assert manifest["task"] == "embedding" and max(manifest["parity"]["max_abs_diff"].values()) <= 1e-4
        figures = saved["models"][role]
        assert all(figures[f"{b}_ms"] > 0 for b in ("pytorch", "onnx_fp32", "onnx_int8"))
    report = (out / "report.md").read_text()
    card = (out / "student" / "README.md").read_text()
    for text in (report, card):
        assert "| ONNX Runtime int8 |" in text and "against the teacher in PyTorch" in text
    main(argv=argv)
    assert "onnx latency: reused" in capsys.readouterr().out


def test_recipe_refuses_onnx_latency_without_the_export_packages(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    teacher = make_teacher(tmp_path / "teacher")
    argv = recipe_argv(tmp_path, teacher, make_corpus(tmp_path / "corpus.txt", n=20), max_steps=1,
                       onnx_latency="true")
    with pytest.raises(SystemExit):
        main(argv=argv)
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install" in err and "--onnx_latency" in err
    assert not (Path(tmp_path) / "run" / "student").exists()  # refused before training
