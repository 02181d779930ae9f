"""What every evaluation script shares: command-line dataclasses, model / tokenizer / teacher loading,
the Trainer or DistillationTrainer set-up, the seed loop with its median, and the results file.

Each task script (run_glue.py, run_squad.py, run_xnli.py, run_perplexity.py) adds only its data
reading and post-processing. Scripts import this module as `common` (their own folder is on
sys.path when run as `python eval/run_glue.py ...`).
"""

import dataclasses
import datetime
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

METRICS_DIR = Path(__file__).resolve().parent / "metrics"

# Defaults for an evaluation run that differ from TrainingArguments' own (users can still override them).
EVAL_TRAINING_DEFAULTS = ["--save_strategy", "no", "--report_to", "none", "--eval_strategy", "no"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Student (or model to evaluate): Hub name or local directory."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    teacher: Optional[str] = field(
        default=None, metadata={"help": "Fine-tuned teacher for task distillation (Hub name or local directory)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a task head whose size differs from the task's."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


@dataclass
class DistillArguments:
    """Loss weights of task distillation; used only when --teacher is given."""

    alpha_ce: float = field(default=0.5, metadata={"help": "Weight of KL(teacher || student) on soft targets."})
    alpha_task: float = field(default=0.5, metadata={"help": "Weight of the student's own supervised task loss."})
    alpha_mse: float = field(default=0.0, metadata={
        "help": "Weight of the squared teacher-student logit difference; the soft-target term for a regression "
                "task (STS-B), where --alpha_ce must be 0."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the soft targets."})


@dataclass
class RunArguments:
    seeds: str = field(default="42", metadata={"help": "Comma-separated seeds, e.g. 42,43,44,45,46; the median "
                                                       "over seeds is reported per metric."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    eval_only: bool = field(default=False, metadata={"help": "Evaluate the model as it is, without fine-tuning."})
    save_models: bool = field(default=False, metadata={"help": "Save each seed's fine-tuned model."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results file."})


def parse_args(dataclass_types, argv=None):
    """Parse `argv` into the given dataclasses followed by transformers' TrainingArguments."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((*dataclass_types, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=EVAL_TRAINING_DEFAULTS + argv)


def parse_seeds(text):
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 42,43,44; got {text!r}.") from None
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 42.")
    return seeds


def results_path(output_dir, benchmark, task):
    return Path(output_dir) / f"results_{benchmark}_{task}.json"


def check_results_writable(path, overwrite):
    """Fail before any training if a results file would be silently replaced."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite_output_dir true to replace it "
                              "or choose another --output_dir.")


def require_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected the {what} at {path}, but there is no such file.")
    return path


def load_tokenizer(model_args):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    return AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)


def check_head_size(model_name_or_path, head_suffix, num_labels, model_args):
    """A checkpoint that already has a task head of another size would fail deep inside from_pretrained."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    has_head = any(arch.endswith(head_suffix) for arch in (config.architectures or []))
    if has_head and config.num_labels != num_labels and not model_args.ignore_mismatched_sizes:
        raise ValueError(f"{model_name_or_path} has a {config.num_labels}-label head but this task has {num_labels} "
                         "labels; start from a model without a task head or pass --ignore_mismatched_sizes true.")


def load_teacher(model_class, model_args, num_labels=None):
    """Load the fine-tuned teacher once (shared by all seeds) and check it fits the task."""
    if not model_args.teacher:
        return None
    teacher = model_class.from_pretrained(model_args.teacher, trust_remote_code=model_args.trust_remote_code)
    if num_labels is not None and teacher.config.num_labels != num_labels:
        raise ValueError(f"Teacher {model_args.teacher} predicts {teacher.config.num_labels} labels but the student "
                         f"is trained on {num_labels}; give a teacher fine-tuned on the same task.")
    return teacher.eval()


def check_same_vocabulary(student, teacher):
    """Token-level KL compares the two models position by position: they must tokenize alike."""
    if teacher is not None and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"Student vocabulary ({student.config.vocab_size}) and teacher vocabulary "
                         f"({teacher.config.vocab_size}) differ; token-level distillation needs a shared tokenizer.")


def teacher_reads_segments(teacher):
    """Whether the teacher reads token_type_ids (BERT does; DistilBERT, RoBERTa and GPT-2 do not)."""
    from distil_trainer.model_utils import uses_token_type_ids

    return uses_token_type_ids(teacher)


def token_type_kwargs(tokenizer, teacher):
    """Extra tokenizer keyword arguments so that a teacher which reads segment ids gets them: {} or
    {"return_token_type_ids": True}.

    Why the student's tokenizer asked for segment ids, not the teacher's tokenizer: both models must read the
    same token ids (same vocabulary), and the student's tokenizer is what the student is evaluated with on its own.
    A DistilBERT tokenizer leaves token_type_ids out only because DistilBERT has no segment embeddings; its pair
    template still marks the second sequence, so asked for them it gives what BERT's tokenizer gives. Without
    them a BERT teacher would see both sentences of every pair (question and context in SQuAD) as segment 0.
    """
    if not teacher_reads_segments(teacher):
        return {}
    pair = tokenizer("a", "b", return_token_type_ids=True)["token_type_ids"]
    if not any(pair):
        raise ValueError(f"The teacher ({type(teacher).__name__}) reads token_type_ids, but the tokenizer "
                         f"{type(tokenizer).__name__} puts both sequences of a pair in segment 0. Pass the "
                         "teacher's tokenizer with --tokenizer_name.")
    return {"return_token_type_ids": True}


def training_args_for_seed(training_args, seed, teacher, distill_args, overwrite):
    """Per-seed copy of the user's TrainingArguments (own output folder, own seed); DistillationArguments
    with the distillation weights when a teacher is given."""
    output_dir = os.path.join(training_args.output_dir or "eval_output", f"seed-{seed}")
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    values.update(output_dir=output_dir, seed=seed, data_seed=seed)
    if teacher is None:
        return type(training_args)(**values)
    DistillationArguments, _ = import_distillation()
    # Task distillation: soft targets + the task loss only (the pre-training terms default to DistilBERT's weights).
    return DistillationArguments(**values, alpha_ce=distill_args.alpha_ce, alpha_task=distill_args.alpha_task,
                                 alpha_mse=distill_args.alpha_mse, temperature=distill_args.temperature,
                                 alpha_mlm=0.0, alpha_clm=0.0, alpha_cos=0.0, overwrite_output_dir=overwrite)


def import_distillation():
    try:
        from distil_trainer import DistillationArguments, DistillationTrainer
    except ImportError as err:
        raise ImportError("Task distillation (--teacher) needs the distil_trainer package: run "
                          "`pip install -e .` from the repository root.") from err
    return DistillationArguments, DistillationTrainer


def build_trainer(model, teacher, args, train_dataset, eval_dataset, data_collator, tokenizer, compute_metrics=None):
    """A plain Trainer for fine-tuning, a DistillationTrainer when a teacher is given."""
    kwargs = dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  data_collator=data_collator, processing_class=tokenizer, compute_metrics=compute_metrics)
    if teacher is None:
        from transformers import Trainer

        return Trainer(**kwargs)
    _, DistillationTrainer = import_distillation()
    return DistillationTrainer(teacher_model=teacher, **kwargs)


def save_log_history(trainer):
    """Keep the training logs (per-term losses with a teacher) next to the seed's outputs."""
    write_json_atomic(Path(trainer.args.output_dir) / "log_history.json", trainer.state.log_history)


def median_over_seeds(per_seed):
    """Median of each metric over seeds (DistilBERT reported the median of 5 runs)."""
    names = sorted({name for scores in per_seed.values() for name in scores})
    return {name: float(statistics.median(scores[name] for scores in per_seed.values() if name in scores))
            for name in names}


def run_seeds(seeds, run_one: Callable[[int], dict]):
    """Run `run_one(seed) -> {metric: value}` for every seed; return (per_seed, median)."""
    per_seed = {}
    for i, seed in enumerate(seeds, 1):
        print(f"=== seed {seed} ({i}/{len(seeds)}) ===", flush=True)
        scores = {name: float(value) for name, value in run_one(seed).items()}
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()), flush=True)
        per_seed[str(seed)] = scores
    return per_seed, median_over_seeds(per_seed)


def results_payload(benchmark, task, model_args, distill_args, seeds, per_seed, median, metric_scale, **extra):
    distillation = None
    if model_args.teacher:
        distillation = dataclasses.asdict(distill_args)
    return {"benchmark": benchmark, "task": task, "model": model_args.model_name_or_path,
            "teacher": model_args.teacher, "distillation": distillation, "seeds": list(seeds),
            "per_seed": per_seed, "median": median, "metric_scale": metric_scale, **extra,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json_atomic(path, payload):
    """Write to a temporary file in the same folder, then rename, so a kept file is never half-written."""
    from distil_trainer.atomic import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    return path


def print_summary(title, median, path, scale=100.0):
    print(f"\n{title} (median over seeds):")
    for name, value in median.items():
        print(f"  {name:>28s}: {value * scale:.2f}")
    print(f"results written to {path}", flush=True)


def take_first(dataset, n):
    """The first `n` rows (all of them when n is None)."""
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise ValueError(f"Sample limits must be positive; got {n}.")
    return dataset.select(range(n))


def load_metric(name, config_name=None):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), config_name)


def classification_metrics(metric, regression=False):
    """`compute_metrics` for Trainer: argmax of the logits (or the single regression output, [N, 1] or [N]) vs the
    labels."""
    import numpy as np

    def compute_metrics(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = logits.reshape(len(logits)) if regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predictions, references=eval_pred.label_ids)

    return compute_metrics
