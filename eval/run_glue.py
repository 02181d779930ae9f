"""Fine-tune (optionally with task distillation from a fine-tuned teacher) and evaluate on a GLUE task.

    python eval/run_glue.py --model_name_or_path distilbert-base-uncased --task_name rte \
        --output_dir out/glue/rte --seeds 42,43,44,45,46 --num_train_epochs 3 --learning_rate 2e-5

Data: the Hub (`nyu-mll/glue`) or, with --data_dir, the TSVs of GLUE's original release
(train.tsv, dev.tsv; MNLI: dev_matched.tsv and dev_mismatched.tsv). Writes
`results_glue_<task>.json` (per-seed scores and their median) to --output_dir.
"""

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


@dataclass(frozen=True)
class GlueTask:
    text_columns: tuple            # input column names (Hub names; local TSVs are renamed to these)
    label_names: Optional[tuple]   # class names in label-id order; None for regression (STS-B)
    tsv_header: bool               # whether the released TSV has a header row
    tsv_columns: dict              # our column name -> TSV header name (or position when no header)
    tsv_labels: Optional[tuple]    # label strings of the TSV in label-id order
    eval_splits: dict              # our split name -> (Hub split, TSV file name)


_DEV = {"dev": ("validation", "dev.tsv")}
_BINARY = ("0", "1")
TASKS = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), False, {"sentence": 3, "label": 1}, _BINARY, _DEV),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), True, {"sentence": "sentence", "label": "label"},
                     _BINARY, _DEV),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), True,
                     {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}, _BINARY, _DEV),
    "stsb": GlueTask(("sentence1", "sentence2"), None, True,
                     {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, None, _DEV),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), True,
                    {"question1": "question1", "question2": "question2", "label": "is_duplicate"}, _BINARY, _DEV),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), True,
                     {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                     ("entailment", "neutral", "contradiction"),
                     {"matched": ("validation_matched", "dev_matched.tsv"),
                      "mismatched": ("validation_mismatched", "dev_mismatched.tsv")}),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), True,
                     {"question": "question", "sentence": "sentence", "label": "label"},
                     ("entailment", "not_entailment"), _DEV),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), True,
                    {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
                    ("entailment", "not_entailment"), _DEV),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), True,
                     {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, _BINARY, _DEV),
}


@dataclass
class GlueDataArguments:
    task_name: str = field(metadata={"help": f"GLUE task: one of {', '.join(TASKS)}."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder with GLUE's released TSVs for this task "
                                                                    "(e.g. glue_data/RTE); default: the Hub."})
    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "Hub dataset when --data_dir is not given."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate (pairs of) sentences to this many tokens."})


def get_task(name):
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}.")
    return key, TASKS[key]


def read_tsv(path, task_name, task):
    """Read one released GLUE TSV into {column: values}, with labels mapped to ids (floats for STS-B)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.tsv_header:
        header, rows = rows[0], rows[1:]
        missing = [name for name in task.tsv_columns.values() if name not in header]
        if missing:
            raise ValueError(f"{path} has columns {header}, not the {missing} that GLUE {task_name} files have; "
                             "is --data_dir the folder of this task?")
        positions = {ours: header.index(theirs) for ours, theirs in task.tsv_columns.items()}
    else:
        positions = dict(task.tsv_columns)
    width = max(positions.values()) + 1
    columns = {name: [] for name in positions}
    skipped = 0
    for row in rows:
        if len(row) < width:
            skipped += 1  # a few released rows (QQP, MNLI) are truncated
            continue
        for name, pos in positions.items():
            columns[name].append(row[pos])
    if skipped:
        print(f"{path}: skipped {skipped} rows with fewer than {width} fields")
    columns["label"] = labels_to_ids(columns["label"], path, task_name, task)
    return columns


def labels_to_ids(values, path, task_name, task):
    if task.tsv_labels is None:
        try:
            return [float(v) for v in values]
        except ValueError as err:
            raise ValueError(f"{path}: {task_name} expects numeric scores in its label column ({err}).") from None
    ids = {label: i for i, label in enumerate(task.tsv_labels)}
    unknown = sorted(set(values) - set(ids))
    if unknown:
        raise ValueError(f"{path} has labels {unknown[:5]} that GLUE {task_name} does not use (expected "
                         f"{list(task.tsv_labels)}); check --task_name and --data_dir.")
    return [ids[v] for v in values]


def load_local(data_dir, task_name, task, need_train):
    from datasets import Dataset

    files = {"train": "train.tsv"} if need_train else {}
    files.update({split: tsv for split, (_, tsv) in task.eval_splits.items()})
    paths = {split: common.require_file(Path(data_dir) / name, f"GLUE {task_name} {split} split")
             for split, name in files.items()}
    return {split: Dataset.from_dict(read_tsv(path, task_name, task)) for split, path in paths.items()}


def load_hub(dataset_name, task_name, task, need_train):
    from datasets import load_dataset

    raw = load_dataset(dataset_name, task_name)
    splits = ({"train": "train"} if need_train else {}) | {s: hub for s, (hub, _) in task.eval_splits.items()}
    out = {}
    for ours, theirs in splits.items():
        if theirs not in raw:
            raise ValueError(f"{dataset_name}/{task_name} has no {theirs!r} split (it has {list(raw)}).")
        out[ours] = raw[theirs]
    names = getattr(out[next(iter(out))].features["label"], "names", None)
    if task.label_names is not None and names is not None and tuple(names) != task.label_names:
        raise ValueError(f"{dataset_name}/{task_name} labels {names} do not match GLUE {task_name}'s "
                         f"{list(task.label_names)}.")
    return out


def tokenize(dataset, tokenizer, task, max_length, tokenizer_kwargs=None):
    """`tokenizer_kwargs`: extra arguments, e.g. common.token_type_kwargs' segment ids for a BERT teacher."""
    def encode(batch):
        texts = [batch[c] for c in task.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, **(tokenizer_kwargs or {}))
        encoded["labels"] = batch["label"]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def main(argv=None):
    model_args, data_args, distill_args, run_args, training_args = common.parse_args(
        (common.ModelArguments, GlueDataArguments, common.DistillArguments, common.RunArguments), argv)
    task_name, task = get_task(data_args.task_name)
    seeds = common.parse_seeds(run_args.seeds)
    out_path = common.results_path(training_args.output_dir, "glue", task_name)
    common.check_results_writable(out_path, run_args.overwrite_output_dir)

    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

    if data_args.data_dir:
        raw = load_local(data_args.data_dir, task_name, task, not run_args.eval_only)
    else:
        raw = load_hub(data_args.dataset_name, task_name, task, not run_args.eval_only)
    if "train" in raw:
        raw["train"] = common.take_first(raw["train"], run_args.max_train_samples)
    eval_names = list(task.eval_splits)
    for name in eval_names:
        raw[name] = common.take_first(raw[name], run_args.max_eval_samples)

    regression = task.label_names is None
    num_labels = 1 if regression else len(task.label_names)
    common.check_head_size(model_args.model_name_or_path, "ForSequenceClassification", num_labels, model_args)
    teacher = common.load_teacher(AutoModelForSequenceClassification, model_args, num_labels)
    tokenizer = common.load_tokenizer(model_args)
    segments = common.token_type_kwargs(tokenizer, teacher)
    encoded = {split: tokenize(ds, tokenizer, task, data_args.max_seq_length, segments) for split, ds in raw.items()}
    compute_metrics = common.classification_metrics(common.load_metric("glue", task_name), regression)
    label_maps = {}
    if not regression:
        label_maps = dict(id2label=dict(enumerate(task.label_names)),
                          label2id={name: i for i, name in enumerate(task.label_names)})
    print(f"GLUE {task_name}: {len(raw.get('train', []))} training examples, "
          + ", ".join(f"{len(raw[s])} {s}" for s in eval_names)
          + (f"; distilling from {model_args.teacher}" if teacher is not None else ""), flush=True)

    def run_one(seed):
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=num_labels, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            trust_remote_code=model_args.trust_remote_code, **label_maps)
        args = common.training_args_for_seed(training_args, seed, teacher, distill_args, run_args.overwrite_output_dir)
        trainer = common.build_trainer(model, teacher, args, encoded.get("train"), encoded[eval_names[0]],
                                       DataCollatorWithPadding(tokenizer), tokenizer, compute_metrics)
        if not run_args.eval_only:
            trainer.train()
            common.save_log_history(trainer)
            if run_args.save_models:
                trainer.save_model()
        scores = {}
        for i, split in enumerate(eval_names):
            metrics = trainer.evaluate(encoded[split], metric_key_prefix="eval")
            suffix = "" if i == 0 else f"_{split}"
            scores.update({k[len("eval_"):] + suffix: v for k, v in metrics.items()
                           if k[len("eval_"):] in METRIC_NAMES})
        return scores

    per_seed, median = common.run_seeds(seeds, run_one)
    payload = common.results_payload("glue", task_name, model_args, distill_args, seeds, per_seed, median, "fraction",
                                     num_train_examples=len(raw.get("train", [])),
                                     num_eval_examples={s: len(raw[s]) for s in eval_names})
    common.write_json_atomic(out_path, payload)
    common.print_summary(f"GLUE {task_name}", median, out_path)
    return payload


METRIC_NAMES = ("matthews_correlation", "accuracy", "f1", "pearson", "spearmanr")

if __name__ == "__main__":
    main()
