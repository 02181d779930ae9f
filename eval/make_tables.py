"""Gather results files of the eval scripts into the README's Markdown tables and a bar chart.

    python eval/make_tables.py --results out/student --teacher_results out/teacher \
        --student_name DistilBERT --teacher_name BERT-base --output_dir tables

--results / --teacher_results take results_*.json files or folders (searched recursively). Writes
`tables.md` and `scores.png` (student vs teacher per task) to --output_dir and prints the tables.

Conventions (all numbers are medians over seeds, in %, except perplexity):
- GLUE: CoLA Matthews correlation; MNLI matched/mismatched accuracy; MRPC and QQP F1/accuracy;
  STS-B Pearson/Spearman correlation; accuracy otherwise. The **Score** is a macro average: per task,
  the mean of its reported numbers (one or two), then the unweighted mean over tasks, x100. "Score" uses
  all nine tasks, "Score w/o WNLI" the other eight; a score over fewer tasks (some results missing)
  is marked with *.
- XNLI: accuracy per language; Avg is the mean over the languages shown in the row.
- SQuAD: exact match and F1 (official v1.1 normalisation).
- STS-B bi-encoder (run_sts.py): Pearson/Spearman of the cosine of mean-pooled sentence embeddings.
- NER: entity-level F1 (seqeval / conlleval) per dataset, on the test split when every model has test
  scores for that dataset, else on dev; two decimals, as the original release reported them.
- "% of teacher": student / teacher on the row's headline number (GLUE Score, XNLI Avg, SQuAD F1; for NER
  one ratio per dataset, in column order).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from distil_trainer.atomic import current_umask

# (column title, task, metric names in display order)
GLUE_COLUMNS = (
    ("CoLA (MCC)", "cola", ("matthews_correlation",)),
    ("MNLI (acc m/mm)", "mnli", ("accuracy", "accuracy_mismatched")),
    ("MRPC (F1/acc)", "mrpc", ("f1", "accuracy")),
    ("QNLI (acc)", "qnli", ("accuracy",)),
    ("QQP (F1/acc)", "qqp", ("f1", "accuracy")),
    ("RTE (acc)", "rte", ("accuracy",)),
    ("SST-2 (acc)", "sst2", ("accuracy",)),
    ("STS-B (Pearson/Spearman)", "stsb", ("pearson", "spearmanr")),
    ("WNLI (acc)", "wnli", ("accuracy",)),
)
# (task of run_ner.py's results, column title), in display order
NER_DATASETS = (("conll2003", "CoNLL-2003"), ("germeval2014", "GermEval 2014"),
                ("germeval2014-inner", "GermEval 2014 inner"))
XNLI_ORDER = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
MISSING = "-"


def find_result_files(paths):
    files = []
    for path in map(Path, paths or []):
        if path.is_dir():
            files.extend(sorted(path.rglob("results_*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No results file or folder at {path}.")
    return files


def load_results(paths):
    """{(benchmark, task): results dict} from results files; two files for one task is an error."""
    found, origin = {}, {}
    for path in find_result_files(paths):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if not {"benchmark", "task", "median"} <= set(result):
            raise ValueError(f"{path} is not a results file of the eval scripts (needs benchmark, task, median).")
        key = (result["benchmark"], result["task"])
        if key in found:
            raise ValueError(f"Two results for {key[0]} {key[1]}: {origin[key]} and {path}; pass only one.")
        found[key], origin[key] = result, path
    return found


def glue_task_values(results, task):
    """The task's numbers in display order (x100), or None when the task has no results."""
    result = results.get(("glue", task))
    if result is None:
        return None
    metrics = next(names for _, t, names in GLUE_COLUMNS if t == task)
    return [100.0 * result["median"][name] for name in metrics if name in result["median"]]


def glue_scores(results):
    """{task: mean of its numbers (x100)} for the GLUE tasks present."""
    scores = {}
    for _, task, _ in GLUE_COLUMNS:
        values = glue_task_values(results, task)
        if values:
            scores[task] = sum(values) / len(values)
    return scores


def macro(scores, tasks):
    present = [scores[t] for t in tasks if t in scores]
    if not present:
        return None, False
    return sum(present) / len(present), len(present) < len(tasks)


def fmt(value, partial=False, digits=1):
    return MISSING if value is None else f"{value:.{digits}f}" + ("*" if partial else "")


def percent_of(student, teacher):
    if student is None or teacher is None or teacher == 0:
        return MISSING
    return f"{100.0 * student / teacher:.1f}"


def append_percent_of_teacher(rows, scores):
    """Rows are [teacher, student]; add the "% of teacher" column from their headline scores."""
    rows[0].append("100.0")
    rows[1].append(percent_of(scores[1], scores[0]))


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def glue_section(models):
    """models: [(name, results)], the teacher first when given."""
    all_tasks = [t for _, t, _ in GLUE_COLUMNS]
    without_wnli = [t for t in all_tasks if t != "wnli"]
    with_teacher = len(models) == 2
    header = ["Model", "Score", "Score w/o WNLI"] + [title for title, _, _ in GLUE_COLUMNS]
    header += ["% of teacher"] if with_teacher else []
    rows, any_partial, headline = [], False, []
    for name, results in models:
        scores = glue_scores(results)
        score, partial = macro(scores, all_tasks)
        score8, partial8 = macro(scores, without_wnli)
        any_partial |= partial or partial8
        headline.append(score)
        row = [name, fmt(score, partial), fmt(score8, partial8)]
        for _, task, _ in GLUE_COLUMNS:
            values = glue_task_values(results, task)
            row.append("/".join(f"{v:.1f}" for v in values) if values else MISSING)
        rows.append(row)
    if with_teacher:
        append_percent_of_teacher(rows, headline)
    notes = ["Score: per task the mean of its numbers (MNLI m/mm, MRPC and QQP F1/acc, STS-B Pearson/Spearman), "
             "then the mean over tasks."]
    if any_partial:
        notes.append("* over the tasks with results only.")
    return "### GLUE (dev)\n\n" + table(header, rows) + "\n\n" + "\n".join(notes)


def xnli_sections(models):
    splits = sorted({task for _, results in models for (bench, task) in results if bench == "xnli"})
    sections = []
    for split in splits:
        langs = set()
        for _, results in models:
            if ("xnli", split) in results:
                langs |= {k[len("accuracy_"):] for k in results[("xnli", split)]["median"]
                          if k.startswith("accuracy_") and k != "accuracy_avg"}
        ordered = [lang for lang in XNLI_ORDER if lang in langs] + sorted(langs - set(XNLI_ORDER))
        with_teacher = len(models) == 2
        header = ["Model", "Avg"] + ordered + (["% of teacher"] if with_teacher else [])
        rows, averages = [], []
        for name, results in models:
            median = results.get(("xnli", split), {}).get("median", {})
            values = [100.0 * median[f"accuracy_{lang}"] if f"accuracy_{lang}" in median else None
                      for lang in ordered]
            shown = [v for v in values if v is not None]
            average = sum(shown) / len(shown) if shown else None
            averages.append(average)
            rows.append([name, fmt(average)] + [fmt(v) for v in values])
        if with_teacher:
            append_percent_of_teacher(rows, averages)
        sections.append(f"### XNLI ({split}, accuracy, zero-shot from English)\n\n" + table(header, rows))
    return sections


def squad_sections(models):
    versions = sorted({task for _, results in models for (bench, task) in results if bench == "squad"})
    sections = []
    for version in versions:
        with_teacher = len(models) == 2
        header = ["Model", "EM", "F1"] + (["% of teacher (F1)"] if with_teacher else [])
        rows, f1s = [], []
        for name, results in models:
            median = results.get(("squad", version), {}).get("median", {})
            f1s.append(median.get("f1"))
            rows.append([name, fmt(median.get("exact_match")), fmt(median.get("f1"))])
        if with_teacher:
            append_percent_of_teacher(rows, f1s)
        sections.append(f"### SQuAD {version} (dev)\n\n" + table(header, rows))
    return sections


def ner_split(models, task):
    """Test when every model with results for the task has test F1 (the split the papers report), else dev."""
    medians = [results[("ner", task)]["median"] for _, results in models if ("ner", task) in results]
    return "test" if all("test_f1" in m for m in medians) else "dev"


def ner_section(models):
    present = {task for _, results in models for (bench, task) in results if bench == "ner"}
    if not present:
        return []
    titles = dict(NER_DATASETS)
    tasks = [t for t, _ in NER_DATASETS if t in present] + sorted(present - set(titles))
    splits = [ner_split(models, t) for t in tasks]
    with_teacher = len(models) == 2
    header = ["Model"] + [f"{titles.get(t, t)} ({split} F1)" for t, split in zip(tasks, splits)]
    header += ["% of teacher"] if with_teacher else []
    rows, f1s = [], []
    for name, results in models:
        values = [results.get(("ner", t), {}).get("median", {}).get(f"{split}_f1") for t, split in zip(tasks, splits)]
        values = [None if v is None else 100.0 * v for v in values]
        f1s.append(values)
        rows.append([name] + [fmt(v, digits=2) for v in values])
    if with_teacher:
        rows[0].append(" / ".join("100.0" for _ in tasks))
        rows[1].append(" / ".join(percent_of(s, t) for s, t in zip(f1s[1], f1s[0])))
    return ["### NER (entity-level F1)\n\n" + table(header, rows)]


def sts_task_values(results):
    """run_sts.py's bi-encoder [Pearson, Spearman] (x100), or None when there are no results."""
    result = results.get(("sts", "stsb"))
    if result is None:
        return None
    return [100.0 * result["median"][name] for name in ("pearson", "spearmanr")]


def sts_section(models):
    values = [sts_task_values(results) for _, results in models]
    if not any(values):
        return []
    rows = [[name, MISSING if v is None else "/".join(f"{x:.1f}" for x in v)] for (name, _), v in zip(models, values)]
    return ["### STS-B bi-encoder (dev, mean-pooled cosine)\n\n"
            + table(["Model", "STS-B bi-encoder (Pearson/Spearman)"], rows)]


def perplexity_section(models):
    rows = []
    for name, results in models:
        for (bench, task), result in sorted(results.items()):
            if bench == "perplexity":
                rows.append([name, task, fmt(result["median"]["perplexity"], digits=2)])
    if not rows:
        return []
    return ["### Perplexity (lower is better)\n\n" + table(["Model", "Text", "Perplexity"], rows)]


def render_tables(student, teacher=None, student_name="Student", teacher_name="Teacher"):
    """All tables as one Markdown string; `student` / `teacher` map (benchmark, task) to results dicts."""
    models = ([(teacher_name, teacher)] if teacher else []) + [(student_name, student)]
    sections = []
    if any(bench == "glue" for _, results in models for bench, _ in results):
        sections.append(glue_section(models))
    sections += xnli_sections(models) + squad_sections(models) + ner_section(models) + sts_section(models)
    sections += perplexity_section(models)
    if not sections:
        raise ValueError("No results to tabulate: pass results_*.json files or folders holding them.")
    return "\n\n".join(sections) + "\n"


def chart_scores(results):
    """{label: headline number} for the chart: each GLUE task, SQuAD F1, NER F1, XNLI mean accuracy."""
    scores = {title.split(" (")[0]: value for title, task, _ in GLUE_COLUMNS
              for t, value in glue_scores(results).items() if t == task}
    for (bench, task), result in sorted(results.items()):
        if bench == "squad":
            scores[f"SQuAD {task} F1"] = result["median"]["f1"]
        elif bench == "ner":
            split = "test" if "test_f1" in result["median"] else "dev"
            scores[f"NER {dict(NER_DATASETS).get(task, task)} F1"] = 100.0 * result["median"][f"{split}_f1"]
        elif bench == "xnli":
            langs = [v for k, v in result["median"].items() if k.startswith("accuracy_") and k != "accuracy_avg"]
            scores[f"XNLI {task}"] = 100.0 * sum(langs) / len(langs)
    return scores


def draw_chart(path, student, teacher, student_name, teacher_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s_scores = chart_scores(student)
    t_scores = chart_scores(teacher) if teacher else {}
    labels = list(dict.fromkeys(list(t_scores) + list(s_scores)))
    if not labels:
        return None
    series = ([(teacher_name, t_scores)] if teacher else []) + [(student_name, s_scores)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4))
    for i, (name, scores) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [scores.get(label, 0.0) for label in labels], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title("Student vs teacher" if teacher else "Scores")
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def _atomic_write(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the tables from other users
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_parser():
    parser = argparse.ArgumentParser(description="Tabulate results files of the eval scripts as Markdown.")
    parser.add_argument("--results", nargs="+", required=True, help="Student results files or folders.")
    parser.add_argument("--teacher_results", nargs="*", default=None, help="Teacher results files or folders.")
    parser.add_argument("--student_name", default="Student")
    parser.add_argument("--teacher_name", default="Teacher")
    parser.add_argument("--output_dir", default=None, help="Where to write tables.md and scores.png.")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing tables.md / scores.png.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    student = load_results(args.results)
    teacher = load_results(args.teacher_results) if args.teacher_results else None
    markdown = render_tables(student, teacher, args.student_name, args.teacher_name)
    print(markdown)
    if args.output_dir:
        out = Path(args.output_dir)
        targets = [out / "tables.md", out / "scores.png"]
        existing = [str(p) for p in targets if p.exists()]
        if existing and not args.overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite or another --output_dir.")

        def write_markdown(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(markdown)

        _atomic_write(targets[0], write_markdown)
        draw_chart(targets[1], student, teacher, args.student_name, args.teacher_name)
        print(f"wrote {targets[0]} and {targets[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
