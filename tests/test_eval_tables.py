"""make_tables.py on fixed results files gives exactly the expected Markdown, and draws a chart."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import make_tables  # noqa: E402


def result(benchmark, task, median):
    return {"benchmark": benchmark, "task": task, "model": "m", "seeds": [42], "per_seed": {"42": median},
            "median": median}


TEACHER = [
    result("glue", "rte", {"accuracy": 0.72}),
    result("glue", "mrpc", {"accuracy": 0.85, "f1": 0.90}),
    result("glue", "stsb", {"pearson": 0.88, "spearmanr": 0.86}),
    result("glue", "mnli", {"accuracy": 0.84, "accuracy_mismatched": 0.86}),
    result("glue", "wnli", {"accuracy": 0.56}),
    result("xnli", "dev", {"accuracy_de": 0.70, "accuracy_en": 0.80, "accuracy_avg": 0.75}),
    result("squad", "v1.1", {"exact_match": 80.0, "f1": 88.0}),
    result("perplexity", "wiki.test", {"perplexity": 16.3, "mean_nll": 2.79}),
]
STUDENT = [
    result("glue", "rte", {"accuracy": 0.61}),
    result("glue", "mrpc", {"accuracy": 0.80, "f1": 0.86}),
    result("glue", "stsb", {"pearson": 0.84, "spearmanr": 0.82}),
    result("glue", "mnli", {"accuracy": 0.80, "accuracy_mismatched": 0.81}),
    result("glue", "wnli", {"accuracy": 0.56}),
    result("xnli", "dev", {"accuracy_de": 0.66, "accuracy_en": 0.75, "accuracy_avg": 0.705}),
    result("squad", "v1.1", {"exact_match": 77.0, "f1": 85.8}),
    result("perplexity", "wiki.test", {"perplexity": 21.1, "mean_nll": 3.05}),
]

# Macro scores by hand. Teacher: RTE 72, MRPC (90+85)/2 = 87.5, STS-B (88+86)/2 = 87, MNLI (84+86)/2 = 85,
# WNLI 56 -> all five 387.5/5 = 77.5; without WNLI 331.5/4 = 82.875. Student: 61, 83, 83, 80.5, 56 -> 363.5/5 = 72.7,
# 307.5/4 = 76.875. 72.7 / 77.5 = 93.8 %. XNLI avg 75.0 vs 70.5 -> 94.0 %; SQuAD F1 85.8 / 88 -> 97.5 %.
EXPECTED = """\
### GLUE (dev)

| Model | Score | Score w/o WNLI | CoLA (MCC) | MNLI (acc m/mm) | MRPC (F1/acc) | QNLI (acc) | QQP (F1/acc) | RTE (acc) | SST-2 (acc) | STS-B (Pearson/Spearman) | WNLI (acc) | % of teacher |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| BERT | 77.5* | 82.9* | - | 84.0/86.0 | 90.0/85.0 | - | - | 72.0 | - | 88.0/86.0 | 56.0 | 100.0 |
| DistilBERT | 72.7* | 76.9* | - | 80.0/81.0 | 86.0/80.0 | - | - | 61.0 | - | 84.0/82.0 | 56.0 | 93.8 |

Score: per task the mean of its numbers (MNLI m/mm, MRPC and QQP F1/acc, STS-B Pearson/Spearman), then the mean over tasks.
* over the tasks with results only.

### XNLI (dev, accuracy, zero-shot from English)

| Model | Avg | en | de | % of teacher |
|---|---|---|---|---|
| BERT | 75.0 | 80.0 | 70.0 | 100.0 |
| DistilBERT | 70.5 | 75.0 | 66.0 | 94.0 |

### SQuAD v1.1 (dev)

| Model | EM | F1 | % of teacher (F1) |
|---|---|---|---|
| BERT | 80.0 | 88.0 | 100.0 |
| DistilBERT | 77.0 | 85.8 | 97.5 |

### Perplexity (lower is better)

| Model | Text | Perplexity |
|---|---|---|
| BERT | wiki.test | 16.30 |
| DistilBERT | wiki.test | 21.10 |
"""


def write_results(folder, results):
    folder.mkdir(parents=True)
    for r in results:
        (folder / f"results_{r['benchmark']}_{r['task']}.json").write_text(json.dumps(r))
    return folder


def test_tables_markdown_exact(tmp_path, capsys):
    student = write_results(tmp_path / "student", STUDENT)
    teacher = write_results(tmp_path / "teacher", TEACHER)
    out = tmp_path / "tables"
    assert make_tables.main(["--results", str(student), "--teacher_results", str(teacher), "--student_name",
                             "DistilBERT", "--teacher_name", "BERT", "--output_dir", str(out)]) == 0
    assert (out / "tables.md").read_text() == EXPECTED
    png = (out / "scores.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # Readable by the other users of a shared folder (mode from the umask, not mkstemp's private 0600).
    import os
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    expected_mode = 0o666 & ~old_umask
    for name in ("tables.md", "scores.png"):
        assert (out / name).stat().st_mode & 0o777 == expected_mode, name
    # Outputs are not replaced without --overwrite.
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_tables.main(["--results", str(student), "--output_dir", str(out)])


def test_full_glue_score_without_teacher():
    tasks = {"cola": {"matthews_correlation": 0.5}, "mnli": {"accuracy": 0.8, "accuracy_mismatched": 0.8},
             "mrpc": {"f1": 0.9, "accuracy": 0.8}, "qnli": {"accuracy": 0.9}, "qqp": {"f1": 0.7, "accuracy": 0.9},
             "rte": {"accuracy": 0.6}, "sst2": {"accuracy": 0.9}, "stsb": {"pearson": 0.9, "spearmanr": 0.8},
             "wnli": {"accuracy": 0.3}}
    results = {("glue", t): result("glue", t, m) for t, m in tasks.items()}
    # Task means: 50, 80, 85, 90, 80, 60, 90, 85, 30 -> 650/9 = 72.22; without WNLI 620/8 = 77.5.
    row = make_tables.render_tables(results).splitlines()[4]
    assert row == ("| Student | 72.2 | 77.5 | 50.0 | 80.0/80.0 | 90.0/80.0 | 90.0 | 70.0/90.0 | 60.0 | 90.0 | "
                   "90.0/80.0 | 30.0 |")


def test_duplicate_and_missing_inputs(tmp_path):
    a = write_results(tmp_path / "a", STUDENT[:1])
    b = write_results(tmp_path / "b", STUDENT[:1])
    with pytest.raises(ValueError, match="Two results for glue rte"):
        make_tables.load_results([a, b])
    with pytest.raises(FileNotFoundError, match="No results file or folder"):
        make_tables.load_results([tmp_path / "nowhere"])


def test_ner_table_in_the_original_release_form():
    """German DistilBERT's published NER results: 83.49 vs 84.52 on CoNLL-2003 test, 85.23 vs 86.89 on GermEval 2014
    test. 83.49 / 84.52 = 98.78 %, 85.23 / 86.89 = 98.09 %."""
    teacher = {("ner", "conll2003"): result("ner", "conll2003", {"test_f1": 0.8452, "dev_f1": 0.88}),
               ("ner", "germeval2014"): result("ner", "germeval2014", {"test_f1": 0.8689, "dev_f1": 0.87})}
    student = {("ner", "germeval2014"): result("ner", "germeval2014", {"test_f1": 0.8523, "dev_f1": 0.86}),
               ("ner", "conll2003"): result("ner", "conll2003", {"test_f1": 0.8349, "dev_f1": 0.87})}
    markdown = make_tables.render_tables(student, teacher, "distilbert-base-german-cased",
                                         "bert-base-german-dbmdz-cased")
    assert markdown == (
        "### NER (entity-level F1)\n\n"
        "| Model | CoNLL-2003 (test F1) | GermEval 2014 (test F1) | % of teacher |\n"
        "|---|---|---|---|\n"
        "| bert-base-german-dbmdz-cased | 84.52 | 86.89 | 100.0 / 100.0 |\n"
        "| distilbert-base-german-cased | 83.49 | 85.23 | 98.8 / 98.1 |\n")
    assert make_tables.chart_scores(student) == {"NER CoNLL-2003 F1": pytest.approx(83.49),
                                                 "NER GermEval 2014 F1": pytest.approx(85.23)}


def test_ner_table_falls_back_to_dev_when_a_model_has_no_test_scores():
    teacher = {("ner", "conll2003"): result("ner", "conll2003", {"test_f1": 0.91, "dev_f1": 0.95})}
    student = {("ner", "conll2003"): result("ner", "conll2003", {"dev_f1": 0.931})}
    lines = make_tables.render_tables(student, teacher, "DistilBERT", "BERT").splitlines()
    assert lines[2] == "| Model | CoNLL-2003 (dev F1) | % of teacher |"
    assert lines[4:] == ["| BERT | 95.00 | 100.0 |", "| DistilBERT | 93.10 | 98.0 |"]
