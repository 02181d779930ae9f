"""Cross-lingual transfer on XNLI: fine-tune on English, evaluate zero-shot on every other language.

    python eval/run_xnli.py --model_name_or_path distilbert-base-multilingual-cased --output_dir out/xnli \
        --eval_languages en,fr,es,de,el,bg,ru,tr,ar,vi,th,zh,hi,sw,ur --num_train_epochs 2 --learning_rate 5e-5

Data: the Hub (`facebook/xnli`, English train split, each language's validation or test split) or
local TSVs in the XTREME layout (`--data_dir` holding `dev-{lang}.tsv` / `test-{lang}.tsv`: no header,
`premise<TAB>hypothesis<TAB>label`, label entailment / neutral / contradiction) with `--train_file`
in the same layout. Writes `results_xnli_<split>.json` (accuracy per language and their mean).
"""

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LABELS = ("entailment", "neutral", "contradiction")  # facebook/xnli's label-id order
XNLI_LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")


@dataclass
class XnliDataArguments:
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "Folder of XTREME-layout TSVs (dev-{lang}.tsv, test-{lang}.tsv); default: the Hub."})
    train_file: Optional[str] = field(default=None, metadata={
        "help": "Training TSV in the same layout (needed with --data_dir unless --eval_only)."})
    dataset_name: str = field(default="facebook/xnli", metadata={"help": "Hub dataset when --data_dir is not given."})
    train_language: str = field(default="en", metadata={"help": "Language of the Hub training split."})
    eval_languages: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated languages to evaluate; default: every dev/test file found (Hub: all 15)."})
    eval_split: str = field(default="dev", metadata={"help": "dev or test."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate sentence pairs to this many tokens."})


def read_xnli_tsv(path):
    """Rows of `premise hypothesis label` with the label mapped to its id; unknown labels are an error."""
    path = common.require_file(path, "XNLI TSV")
    premises, hypotheses, labels = [], [], []
    ids = {label: i for i, label in enumerate(LABELS)}
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) != 3:
                raise ValueError(f"{path}, line {n}: expected 3 tab-separated fields (premise, hypothesis, label), "
                                 f"found {len(row)}.")
            if row[2] not in ids:
                raise ValueError(f"{path}, line {n}: label {row[2]!r} is not an XNLI label {list(LABELS)}.")
            premises.append(row[0])
            hypotheses.append(row[1])
            labels.append(ids[row[2]])
    return {"premise": premises, "hypothesis": hypotheses, "label": labels}


def split_languages(text):
    return [lang.strip() for lang in text.split(",") if lang.strip()] if text else []


def load_local(data_args, need_train):
    from datasets import Dataset

    if data_args.eval_split not in ("dev", "test"):
        raise ValueError(f"--eval_split must be dev or test; got {data_args.eval_split!r}.")
    data_dir = Path(data_args.data_dir)
    languages = split_languages(data_args.eval_languages) or sorted(
        p.stem.split("-", 1)[1] for p in data_dir.glob(f"{data_args.eval_split}-*.tsv"))
    if not languages:
        raise FileNotFoundError(f"No {data_args.eval_split}-<lang>.tsv files in {data_dir}.")
    out = {}
    if need_train:
        if not data_args.train_file:
            raise ValueError("--data_dir needs --train_file (an English TSV in the same layout) to fine-tune, "
                             "or pass --eval_only true.")
        out["train"] = Dataset.from_dict(read_xnli_tsv(data_args.train_file))
    for lang in languages:
        out[lang] = Dataset.from_dict(read_xnli_tsv(data_dir / f"{data_args.eval_split}-{lang}.tsv"))
    return out


def load_hub(data_args, need_train):
    from datasets import load_dataset

    split = {"dev": "validation", "test": "test"}.get(data_args.eval_split)
    if split is None:
        raise ValueError(f"--eval_split must be dev or test; got {data_args.eval_split!r}.")
    languages = split_languages(data_args.eval_languages) or list(XNLI_LANGUAGES)
    unknown = [lang for lang in languages + [data_args.train_language] if lang not in XNLI_LANGUAGES]
    if unknown:
        raise ValueError(f"Unknown XNLI languages {unknown}; valid: {', '.join(XNLI_LANGUAGES)}.")
    out = {}
    if need_train:
        out["train"] = load_dataset(data_args.dataset_name, data_args.train_language, split="train")
    for lang in languages:
        out[lang] = load_dataset(data_args.dataset_name, lang, split=split)
    names = getattr(next(iter(out.values())).features["label"], "names", None)
    if names is not None and tuple(names) != LABELS:
        raise ValueError(f"{data_args.dataset_name} labels {names} are not XNLI's {list(LABELS)}.")
    return out


def tokenize(dataset, tokenizer, max_length, tokenizer_kwargs=None):
    """`tokenizer_kwargs`: extra arguments, e.g. common.token_type_kwargs' segment ids for a BERT teacher."""
    def encode(batch):
        encoded = tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=max_length,
                            **(tokenizer_kwargs or {}))
        encoded["labels"] = batch["label"]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def main(argv=None):
    model_args, data_args, distill_args, run_args, training_args = common.parse_args(
        (common.ModelArguments, XnliDataArguments, common.DistillArguments, common.RunArguments), argv)
    seeds = common.parse_seeds(run_args.seeds)
    out_path = common.results_path(training_args.output_dir, "xnli", data_args.eval_split)
    common.check_results_writable(out_path, run_args.overwrite_output_dir)

    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

    need_train = not run_args.eval_only
    raw = load_local(data_args, need_train) if data_args.data_dir else load_hub(data_args, need_train)
    languages = [name for name in raw if name != "train"]
    for name in raw:
        limit = run_args.max_train_samples if name == "train" else run_args.max_eval_samples
        raw[name] = common.take_first(raw[name], limit)

    num_labels = len(LABELS)
    common.check_head_size(model_args.model_name_or_path, "ForSequenceClassification", num_labels, model_args)
    teacher = common.load_teacher(AutoModelForSequenceClassification, model_args, num_labels)
    tokenizer = common.load_tokenizer(model_args)
    segments = common.token_type_kwargs(tokenizer, teacher)
    encoded = {name: tokenize(ds, tokenizer, data_args.max_seq_length, segments) for name, ds in raw.items()}
    compute_metrics = common.classification_metrics(common.load_metric("xnli"))
    print(f"XNLI: {len(raw.get('train', []))} training examples; evaluating on "
          + ", ".join(f"{lang} ({len(raw[lang])})" for lang in languages), flush=True)

    def run_one(seed):
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=num_labels, id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)},
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, trust_remote_code=model_args.trust_remote_code)
        args = common.training_args_for_seed(training_args, seed, teacher, distill_args, run_args.overwrite_output_dir)
        trainer = common.build_trainer(model, teacher, args, encoded.get("train"), encoded[languages[0]],
                                       DataCollatorWithPadding(tokenizer), tokenizer, compute_metrics)
        if need_train:
            trainer.train()
            common.save_log_history(trainer)
            if run_args.save_models:
                trainer.save_model()
        scores = {f"accuracy_{lang}": trainer.evaluate(encoded[lang], metric_key_prefix="eval")["eval_accuracy"]
                  for lang in languages}
        scores["accuracy_avg"] = sum(scores.values()) / len(scores)
        return scores

    per_seed, median = common.run_seeds(seeds, run_one)
    payload = common.results_payload("xnli", data_args.eval_split, model_args, distill_args, seeds, per_seed, median,
                                     "fraction", languages=languages, num_train_examples=len(raw.get("train", [])),
                                     num_eval_examples={lang: len(raw[lang]) for lang in languages})
    common.write_json_atomic(out_path, payload)
    common.print_summary("XNLI accuracy", median, out_path)
    return payload


if __name__ == "__main__":
    main()
