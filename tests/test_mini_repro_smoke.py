"""benchmarks/mini_repro.py --smoke end to end: five distilled variants sharing one fitted teacher head, GLUE
fine-tuning of the teacher and every student, and the two tables with the expected rows."""

import importlib.util
import json

import pytest

import tiny

SCRIPT = tiny.REPO_ROOT / "benchmarks" / "mini_repro.py"
GLUE = tiny.SHARED_DATA / "glue"


def load_script():
    spec = importlib.util.spec_from_file_location("mini_repro_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The scripts set torch's thread count and quieten loggers for their process; conftest undoes it for other tests.
pytestmark = pytest.mark.usefixtures("restore_process_state")


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"GLUE SST-2 TSVs not found in {GLUE}")
def test_smoke_run_writes_both_tables(tmp_path, capsys):
    mini_repro = load_script()
    out = tmp_path / "mini"
    result = mini_repro.main(["--smoke", "--output_dir", str(out), "--glue_dir", str(GLUE)])

    markdown = (out / "tables.md").read_text()
    assert markdown == result["markdown"] and markdown in capsys.readouterr().out
    glue_part, ablation_part = markdown.split("## Ablation")
    lines = [line for line in glue_part.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Model | Score | SST-2 (acc) | % of teacher |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[1:]}
    expected = [mini_repro.TEACHER_LABEL] + [label for _, label, *_ in mini_repro.VARIANTS]
    assert list(rows) == expected
    assert rows[mini_repro.TEACHER_LABEL][-1] == "100.0 |"

    # Each cell is that model's SST-2 dev accuracy from its results file; % of teacher is their ratio.
    def accuracy(key):
        results = json.loads((out / "glue" / key / "sst2" / "results_glue_sst2.json").read_text())
        assert results["num_train_examples"] == 16 and results["num_eval_examples"] == {"dev": 32}
        return 100.0 * results["median"]["accuracy"]

    teacher = accuracy("teacher")
    for (key, label, *_), in zip(mini_repro.VARIANTS):
        score, task_cell, percent = rows[label]
        assert float(score) == pytest.approx(accuracy(key), abs=0.051) == float(task_cell)
        assert float(percent.rstrip(" |")) == pytest.approx(100.0 * accuracy(key) / teacher, abs=0.051)

    ablation = [line for line in ablation_part.splitlines() if line.startswith("| ")][1:]
    assert len(ablation) == 4
    triple = accuracy("triple")
    for line, key in zip(ablation, ("no_ce", "no_cos", "no_mlm", "random_init")):
        change = float(line.split(" | ")[1])
        assert change == pytest.approx(accuracy(key) - triple, abs=0.006)

    # One teacher head, fitted once and loaded by the other variants; the random-init student really is random.
    assert (out / "distil" / "triple" / "teacher_mlm_head" / "fitted_mlm_head.json").exists()
    for key in ("no_ce", "no_cos", "no_mlm", "random_init"):
        assert not (out / "distil" / key / "teacher_mlm_head").exists()
        config = json.loads((out / "distil" / key / "student" / "config.json").read_text())
        assert config["distillation"]["teacher"].endswith("teacher_mlm_head")
    assert json.loads((out / "distil" / "random_init" / "student_init" / "config.json").read_text())[
        "distillation"]["student_init"] == "random"
    assert set(result["timings"]) >= {"total", "GLUE teacher"}

    # The same command again reuses everything; other sizes on the same folder are refused.
    with pytest.raises(FileExistsError, match="other sizes"):
        mini_repro.main(["--smoke", "--output_dir", str(out), "--glue_dir", str(GLUE), "--distil_steps", "3"])
