"""Fine-tune (optionally distil from a SQuAD teacher) and evaluate extractive QA on SQuAD v1.1 (v2.0 optional).

    python eval/run_squad.py --model_name_or_path distilbert-base-uncased --output_dir out/squad \
        --num_train_epochs 2 --learning_rate 3e-5 --per_device_train_batch_size 12 \
        [--teacher distilbert-base-uncased-distilled-squad --alpha_ce 0.5 --alpha_task 0.5 --temperature 2]

Long contexts are cut into windows of --max_seq_length tokens overlapping by --doc_stride; answers are
picked from the --n_best_size best start and end logits of every window, at most --max_answer_length
tokens long. With a teacher, the KL on start/end logits is restricted through a `distillation_mask`
batch column to the context tokens and the [CLS] position (question, special tokens and padding are
masked out). Writes `results_squad_<v1.1|v2.0>.json` to --output_dir.
"""

import collections
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


@dataclass
class SquadDataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "Hub dataset (default rajpurkar/squad, or rajpurkar/squad_v2 with --version_2_with_negative)."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Official SQuAD-format JSON for training."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Official SQuAD-format JSON to evaluate on."})
    train_articles: Optional[str] = field(default=None, metadata={
        "help": "Python slice of the training file's articles, e.g. 0:2 (to train and evaluate on one file)."})
    eval_articles: Optional[str] = field(default=None, metadata={"help": "Python slice of the evaluation articles."})
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2.0: questions may have no answer."})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "v2.0: predict no answer when null score exceeds the best span score by more than this."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens shared by consecutive windows of one context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates considered per window."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})


def parse_slice(text, option):
    if text is None:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or (len(parts) == 1 and parts[0] is None):
        raise ValueError(f"{option} must look like 0:2 or 5 (a Python slice of articles); got {text!r}.")
    return slice(parts[0], parts[0] + 1) if len(parts) == 1 else slice(*parts)


def read_squad_json(path, articles):
    """Flatten an official SQuAD JSON file into one row per question."""
    path = common.require_file(path, "SQuAD JSON file")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "data" not in data:
        raise ValueError(f"{path} is not in the official SQuAD layout (a top-level 'data' list of articles).")
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in data["data"][articles]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows["id"].append(qa["id"])
                rows["title"].append(article.get("title", ""))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                answers = qa.get("answers", [])
                rows["answers"].append({"text": [a["text"] for a in answers],
                                        "answer_start": [a["answer_start"] for a in answers]})
    if not rows["id"]:
        raise ValueError(f"No questions selected from {path} (articles {articles}).")
    return rows


def load_examples(data_args, need_train):
    from datasets import Dataset, load_dataset

    out = {}
    if data_args.train_file or data_args.validation_file:
        if need_train and not data_args.train_file:
            raise ValueError("--validation_file is given but --train_file is not; pass both (they may be the same "
                             "file with disjoint --train_articles / --eval_articles) or --eval_only true.")
        if not data_args.validation_file:
            raise ValueError("--train_file is given but --validation_file is not; pass the file to evaluate on.")
        if need_train:
            out["train"] = Dataset.from_dict(read_squad_json(
                data_args.train_file, parse_slice(data_args.train_articles, "--train_articles")))
        out["validation"] = Dataset.from_dict(read_squad_json(
            data_args.validation_file, parse_slice(data_args.eval_articles, "--eval_articles")))
        return out
    name = data_args.dataset_name or ("rajpurkar/squad_v2" if data_args.version_2_with_negative else "rajpurkar/squad")
    raw = load_dataset(name)
    for split in (["train"] if need_train else []) + ["validation"]:
        if split not in raw:
            raise ValueError(f"{name} has no {split!r} split (it has {list(raw)}).")
        out[split] = raw[split]
    return out


def tokenize_windows(tokenizer, examples, data_args, tokenizer_kwargs=None):
    """`tokenizer_kwargs`: extra arguments, e.g. common.token_type_kwargs' segment ids for a BERT teacher."""
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    first, second = (questions, examples["context"]) if pad_on_right else (examples["context"], questions)
    encoded = tokenizer(first, second, truncation="only_second" if pad_on_right else "only_first",
                        max_length=data_args.max_seq_length, stride=data_args.doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
                        **(tokenizer_kwargs or {}))
    return encoded, (1 if pad_on_right else 0)


def cls_position(tokenizer, input_ids):
    return input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0


def prepare_train_features(examples, tokenizer, data_args, with_mask, tokenizer_kwargs=None):
    """Windows labelled with the answer's token span, or with [CLS] when the answer is not inside the window."""
    encoded, context_index = tokenize_windows(tokenizer, examples, data_args, tokenizer_kwargs)
    sample_map = encoded.pop("overflow_to_sample_mapping")
    offsets_all = encoded.pop("offset_mapping")
    encoded["start_positions"], encoded["end_positions"] = [], []
    masks = []
    for i, offsets in enumerate(offsets_all):
        cls = cls_position(tokenizer, encoded["input_ids"][i])
        sequence_ids = encoded.sequence_ids(i)
        context = [j for j, s in enumerate(sequence_ids) if s == context_index]
        masks.append([int(s == context_index or j == cls) for j, s in enumerate(sequence_ids)])
        answers = examples["answers"][sample_map[i]]
        start, end = cls, cls
        if answers["answer_start"] and context:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            if offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
                start = next(j for j in context if offsets[j][1] > start_char)
                end = next(j for j in reversed(context) if offsets[j][0] < end_char)
        encoded["start_positions"].append(start)
        encoded["end_positions"].append(end)
    if with_mask:
        encoded["distillation_mask"] = masks
    return encoded


def prepare_eval_features(examples, tokenizer, data_args, tokenizer_kwargs=None):
    """Windows that remember their question id and, for context tokens only, their character offsets."""
    encoded, context_index = tokenize_windows(tokenizer, examples, data_args, tokenizer_kwargs)
    sample_map = encoded.pop("overflow_to_sample_mapping")
    encoded["example_id"] = []
    for i in range(len(encoded["input_ids"])):
        sequence_ids = encoded.sequence_ids(i)
        encoded["example_id"].append(examples["id"][sample_map[i]])
        encoded["offset_mapping"][i] = [o if sequence_ids[j] == context_index else None
                                        for j, o in enumerate(encoded["offset_mapping"][i])]
    return encoded


def postprocess_predictions(examples, features, start_logits, end_logits, tokenizer, data_args):
    """Best span per question over all its windows: top-n start and end logits, valid context spans only."""
    import numpy as np

    features_of = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_of[example_id].append(i)
    predictions = {}
    for example in examples:
        context = example["context"]
        best_text, best_score, null_score = "", None, None
        for i in features_of[example["id"]]:
            offsets = features[i]["offset_mapping"]
            starts, ends = start_logits[i], end_logits[i]
            cls = cls_position(tokenizer, features[i]["input_ids"])
            feature_null = starts[cls] + ends[cls]
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            top_starts = np.argsort(starts)[-1:-data_args.n_best_size - 1:-1]
            top_ends = np.argsort(ends)[-1:-data_args.n_best_size - 1:-1]
            for s in top_starts:
                for e in top_ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > data_args.max_answer_length:
                        continue
                    score = starts[s] + ends[e]
                    if best_score is None or score > best_score:
                        best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
        if data_args.version_2_with_negative and (
                best_score is None or null_score > best_score + data_args.null_score_diff_threshold):
            best_text = ""
        predictions[example["id"]] = best_text
    return predictions


def main(argv=None):
    model_args, data_args, distill_args, run_args, training_args = common.parse_args(
        (common.ModelArguments, SquadDataArguments, common.DistillArguments, common.RunArguments), argv)
    version = "v2.0" if data_args.version_2_with_negative else "v1.1"
    seeds = common.parse_seeds(run_args.seeds)
    if data_args.doc_stride >= data_args.max_seq_length:
        raise ValueError(f"--doc_stride ({data_args.doc_stride}) must be smaller than --max_seq_length "
                         f"({data_args.max_seq_length}).")
    out_path = common.results_path(training_args.output_dir, "squad", version)
    common.check_results_writable(out_path, run_args.overwrite_output_dir)

    from transformers import AutoModelForQuestionAnswering, default_data_collator, set_seed

    raw = load_examples(data_args, not run_args.eval_only)
    if "train" in raw:
        raw["train"] = common.take_first(raw["train"], run_args.max_train_samples)
    raw["validation"] = common.take_first(raw["validation"], run_args.max_eval_samples)
    tokenizer = common.load_tokenizer(model_args)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("run_squad.py needs a fast tokenizer (offset mappings); this one is not.")
    teacher = common.load_teacher(AutoModelForQuestionAnswering, model_args)
    with_mask = teacher is not None
    segments = common.token_type_kwargs(tokenizer, teacher)  # a BERT teacher tells question from context by them

    train_features = None
    if "train" in raw:
        train_features = raw["train"].map(
            prepare_train_features, batched=True, remove_columns=raw["train"].column_names,
            fn_kwargs=dict(tokenizer=tokenizer, data_args=data_args, with_mask=with_mask, tokenizer_kwargs=segments),
            desc="Train windows")
    eval_features = raw["validation"].map(
        prepare_eval_features, batched=True, remove_columns=raw["validation"].column_names,
        fn_kwargs=dict(tokenizer=tokenizer, data_args=data_args, tokenizer_kwargs=segments), desc="Eval windows")
    eval_inputs = eval_features.remove_columns(["example_id", "offset_mapping"])
    references = [{"id": ex["id"], "answers": ex["answers"]} for ex in raw["validation"]]
    metric = common.load_metric("squad")
    print(f"SQuAD {version}: {len(raw.get('train', []))} training questions ({len(train_features or [])} windows), "
          f"{len(raw['validation'])} evaluation questions ({len(eval_features)} windows)"
          + (f"; distilling from {model_args.teacher}" if teacher is not None else ""), flush=True)

    def run_one(seed):
        set_seed(seed)
        model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path,
                                                              trust_remote_code=model_args.trust_remote_code)
        common.check_same_vocabulary(model, teacher)
        args = common.training_args_for_seed(training_args, seed, teacher, distill_args, run_args.overwrite_output_dir)
        trainer = common.build_trainer(model, teacher, args, train_features, None, default_data_collator, tokenizer)
        if not run_args.eval_only:
            trainer.train()
            common.save_log_history(trainer)
            if run_args.save_models:
                trainer.save_model()
        start_logits, end_logits = trainer.predict(eval_inputs).predictions[:2]
        predictions = postprocess_predictions(raw["validation"], eval_features, start_logits, end_logits,
                                              tokenizer, data_args)
        common.write_json_atomic(Path(args.output_dir) / "predictions.json", predictions)
        return metric.compute(predictions=[{"id": k, "prediction_text": v} for k, v in predictions.items()],
                              references=references)

    per_seed, median = common.run_seeds(seeds, run_one)
    payload = common.results_payload("squad", version, model_args, distill_args, seeds, per_seed, median, "percent",
                                     num_train_examples=len(raw.get("train", [])),
                                     num_eval_examples={"validation": len(raw["validation"])})
    common.write_json_atomic(out_path, payload)
    common.print_summary(f"SQuAD {version}", median, out_path, scale=1.0)
    return payload


if __name__ == "__main__":
    main()
