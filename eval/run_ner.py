"""Fine-tune (optionally with task distillation from a fine-tuned teacher) and evaluate named-entity recognition
on CoNLL-2003 (English or German) or GermEval 2014, with entity-level precision / recall / F1.

    python eval/run_ner.py --model_name_or_path distilbert-base-german-cased --dataset germeval2014 \
        --train_file NER-de-train.tsv --validation_file NER-de-dev.tsv --test_file NER-de-test.tsv \
        --output_dir out/ner/germeval --seeds 42,43,44,45,46 --num_train_epochs 3 --learning_rate 5e-5

Data: local files in the original release layouts, or the Hub (`eriktks/conll2003`, `GermanEval/germeval_14`)
when no file is given.
- CoNLL-2003 (`eng.train` / `eng.testa` / `eng.testb`, German `deu.*`): one token per line, its NER tag in the
  last column, blank lines between sentences, `-DOCSTART-` lines between documents. The tags are IOB1
  (I-X inside and at the start of an entity, B-X only where an entity directly follows another of its type)
  and are converted to IOB2 for training and scoring. The German release is Latin-1: pass --file_encoding latin-1.
- GermEval 2014 (`NER-de-{train,dev,test}.tsv`): `#` source lines, then `index token outer inner` per line;
  the outer (top-level) entities by default, --germeval_tags inner for the embedded ones.

Each word is labelled on its first sub-token (the others get -100 and no loss). Scores are taken per word
over whole sentences: a word cut off by --max_seq_length (or with no sub-token) is predicted O, so every gold
entity counts. With --teacher the KL on soft targets is taken over the labelled tokens only (a
`distillation_mask` batch column). Writes `results_ner_<dataset>.json` with, per evaluated split (dev, test),
`<split>_precision`, `_recall`, `_f1`, `_accuracy` and `_f1_<TYPE>`, each the median over seeds.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def bio_labels(types):
    return ("O",) + tuple(f"{prefix}-{t}" for t in types for prefix in ("B", "I"))


# Label-id order of the Hub releases, so their fine-tuned heads and ours agree.
CONLL_LABELS = bio_labels(("PER", "ORG", "LOC", "MISC"))
GERMEVAL_LABELS = bio_labels(tuple(f"{t}{kind}" for t in ("LOC", "ORG", "OTH", "PER")
                                   for kind in ("", "deriv", "part")))


@dataclass(frozen=True)
class NerDataset:
    labels: tuple
    hub_name: str
    read: str  # "conll" or "germeval": the local file layout


DATASETS = {
    "conll2003": NerDataset(CONLL_LABELS, "eriktks/conll2003", "conll"),
    "germeval2014": NerDataset(GERMEVAL_LABELS, "GermanEval/germeval_14", "germeval"),
}
SPLITS = {"train": "train", "dev": "validation", "test": "test"}  # our split -> Hub split
DOCSTART = "-DOCSTART-"
# Their tokenizers mark a word start with a leading space, which pre-split words lack unless added.
BYTE_LEVEL_BPE_MODELS = ("bart", "bloom", "deberta", "gpt2", "longformer", "roberta")


@dataclass
class NerDataArguments:
    dataset: str = field(metadata={"help": f"Tag set and file layout: one of {', '.join(DATASETS)}."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training file in the dataset's layout."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Dev file, scored as split 'dev'."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Test file, scored as split 'test'."})
    germeval_tags: str = field(default="outer", metadata={
        "help": "GermEval 2014: 'outer' (top-level entities, the usual score) or 'inner' (embedded entities)."})
    file_encoding: str = field(default="utf-8", metadata={
        "help": "Encoding of the local files (the German CoNLL-2003 release is latin-1)."})
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "Hub dataset when no file is given (default: eriktks/conll2003 or GermanEval/germeval_14)."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration."})
    max_seq_length: int = field(default=128, metadata={"help": "Sub-tokens per sentence (longer ones are cut)."})


# ---- tags ----

def to_iob2(tags):
    """IOB1 (or IOB2) -> IOB2: an I-X that does not continue an entity of type X starts one (B-X)."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def check_tags(sentences, labels, source):
    known = set(labels)
    for n, tags in enumerate(sentences):
        unknown = sorted(set(tags) - known)
        if unknown:
            raise ValueError(f"{source}, sentence {n + 1}: tags {unknown} are not in this dataset's tag set "
                             f"{list(labels)}; check --dataset (and --germeval_tags).")


# ---- readers of the release layouts ----

def read_lines(path, encoding):
    path = common.require_file(path, "NER data file")
    try:
        with open(path, encoding=encoding) as f:
            return path, f.read().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid {encoding} ({err.reason} at byte {err.start}); pass --file_encoding "
                         "(the German CoNLL-2003 files are latin-1).") from None


def read_conll(path, encoding="utf-8"):
    """CoNLL-2003 layout -> {"tokens", "tags"} per sentence, tags converted from IOB1 to IOB2."""
    path, lines = read_lines(path, encoding)
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(lines + [""], 1):
        fields = line.split()
        if fields and fields[0] == DOCSTART:
            fields = []  # a document boundary, never a sentence
        if not fields:
            if tokens:
                sentences.append((tokens, to_iob2(tags)))
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}, line {n}: expected a token and its tags separated by spaces, got {line!r}.")
        tokens.append(fields[0])
        tags.append(fields[-1])
    return {"tokens": [s[0] for s in sentences], "tags": [s[1] for s in sentences]}


def read_germeval(path, which="outer", encoding="utf-8"):
    """GermEval 2014 layout -> {"tokens", "tags"} per sentence (outer or inner tags)."""
    column = {"outer": 2, "inner": 3}[which]
    path, lines = read_lines(path, encoding)
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(lines + [""], 1):
        if line.startswith("#"):
            continue  # the sentence's source URL and date; token lines start with their index
        if not line.strip():
            if tokens:
                sentences.append((tokens, to_iob2(tags)))
            tokens, tags = [], []
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            raise ValueError(f"{path}, line {n}: expected 4 tab-separated fields (index, token, outer tag, inner "
                             f"tag), found {len(fields)}.")
        tokens.append(fields[1])
        tags.append(fields[column])
    return {"tokens": [s[0] for s in sentences], "tags": [s[1] for s in sentences]}


def read_file(path, spec, data_args):
    if spec.read == "conll":
        rows = read_conll(path, data_args.file_encoding)
    else:
        rows = read_germeval(path, data_args.germeval_tags, data_args.file_encoding)
    if not rows["tokens"]:
        raise ValueError(f"{path} holds no sentences; is it a {data_args.dataset} file?")
    check_tags(rows["tags"], spec.labels, path)
    return rows


def load_local(data_args, spec, need_train):
    from datasets import Dataset

    files = {"train": data_args.train_file, "dev": data_args.validation_file, "test": data_args.test_file}
    if need_train and not files["train"]:
        raise ValueError("--train_file is needed to fine-tune; pass it or --eval_only true.")
    if not (files["dev"] or files["test"]):
        raise ValueError("Give --validation_file and/or --test_file to evaluate on.")
    return {split: Dataset.from_dict(read_file(path, spec, data_args)) for split, path in files.items()
            if path and (split != "train" or need_train)}


def load_hub(data_args, spec, need_train):
    from datasets import load_dataset

    name = data_args.dataset_name or spec.hub_name
    raw = load_dataset(name, data_args.dataset_config)
    tag_column = "nested_ner_tags" if data_args.germeval_tags == "inner" else "ner_tags"
    splits = [s for s in SPLITS if (s != "train" or need_train) and SPLITS[s] in raw]
    if need_train and "train" not in splits:
        raise ValueError(f"{name} has no 'train' split (it has {list(raw)}).")
    if not set(splits) - {"train"}:
        raise ValueError(f"{name} has neither a 'validation' nor a 'test' split (it has {list(raw)}).")
    return {split: hub_split(raw[SPLITS[split]], tag_column, spec, f"{name} {SPLITS[split]}") for split in splits}


def hub_split(dataset, tag_column, spec, source):
    from datasets import Dataset

    for column in ("tokens", tag_column):
        if column not in dataset.column_names:
            raise ValueError(f"{source} has no {column!r} column (it has {dataset.column_names}).")
    names = getattr(dataset.features[tag_column].feature, "names", None)
    rows = list(dataset[tag_column])
    if names is None and any(isinstance(t, int) for row in rows[:1] for t in row):
        names = spec.labels  # integer tags with no names: the dataset's Hub label order (CONLL_LABELS, ...)
    tags = [to_iob2([names[t] for t in row] if names else row) for row in rows]
    check_tags(tags, spec.labels, source)
    return Dataset.from_dict({"tokens": list(dataset["tokens"]), "tags": tags})


# ---- features ----

def load_word_tokenizer(model_args):
    """The tokenizer, fast (for word ids); byte-level BPE models get a space before each word, as in running text."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    if config.model_type in BYTE_LEVEL_BPE_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                                  add_prefix_space=True,
                                                  trust_remote_code=model_args.trust_remote_code)
    else:
        tokenizer = common.load_tokenizer(model_args)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("run_ner.py needs a fast tokenizer (word ids of sub-tokens); this one is not.")
    return tokenizer


def encode_sentences(batch, tokenizer, label2id, max_length, tokenizer_kwargs=None):
    """Sub-tokens of pre-split sentences; each word's label on its first sub-token, -100 elsewhere.
    `word_index` lists, per labelled position in order, which word it is (to map predictions back).
    `tokenizer_kwargs`: extra arguments, e.g. common.token_type_kwargs' segment ids for a BERT teacher."""
    encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length,
                        **(tokenizer_kwargs or {}))
    encoded["labels"], encoded["word_index"] = [], []
    for i, tags in enumerate(batch["tags"]):
        labels, words, previous = [], [], None
        for word in encoded.word_ids(i):
            first = word is not None and word != previous
            labels.append(label2id[tags[word]] if first else -100)
            if first:
                words.append(word)
            previous = word
        encoded["labels"].append(labels)
        encoded["word_index"].append(words)
    return encoded


def tokenize(dataset, tokenizer, label2id, max_length, tokenizer_kwargs=None):
    encoded = dataset.map(encode_sentences, batched=True, remove_columns=dataset.column_names, desc="Tokenizing",
                          fn_kwargs=dict(tokenizer=tokenizer, label2id=label2id, max_length=max_length,
                                         tokenizer_kwargs=tokenizer_kwargs))
    cut = sum(len(words) < len(tokens) for words, tokens in zip(encoded["word_index"], dataset["tokens"]))
    if cut:
        print(f"{cut} of {len(dataset)} sentences have words past --max_seq_length {max_length} (or with no "
              "sub-token); those words are not trained on and are predicted O.", flush=True)
    return encoded


class TokenClassificationCollator:
    """Pads like DataCollatorForTokenClassification; for distillation also sends `distillation_mask`, the labelled
    tokens, so the KL is taken where the task loss is (not on special tokens or later sub-tokens)."""

    def __init__(self, tokenizer, with_distillation_mask):
        from transformers import DataCollatorForTokenClassification

        self.pad = DataCollatorForTokenClassification(tokenizer)
        self.with_distillation_mask = with_distillation_mask

    def __call__(self, features):
        batch = self.pad([{k: v for k, v in f.items() if k != "word_index"} for f in features])
        if self.with_distillation_mask:
            batch["distillation_mask"] = (batch["labels"] != -100).long()
        return batch


# ---- predictions and scores ----

def word_predictions(logits, label_ids, word_index, sentence_tags, id2label):
    """Per sentence, a predicted tag for every word: its first sub-token's argmax, O for words never seen."""
    predictions = []
    for i, tags in enumerate(sentence_tags):
        labelled = label_ids[i] != -100
        ids = logits[i][labelled].argmax(-1)
        if len(ids) != len(word_index[i]):
            raise RuntimeError(f"Sentence {i}: {len(ids)} labelled positions for {len(word_index[i])} words.")
        words = ["O"] * len(tags)
        for word, label in zip(word_index[i], ids):
            words[word] = id2label[int(label)]
        predictions.append(words)
    return predictions


def split_scores(result, split):
    """The metric's result as flat floats: `<split>_f1`, ..., and `<split>_f1_<TYPE>` per entity type."""
    scores = {f"{split}_{k[len('overall_'):]}": v for k, v in result.items() if k.startswith("overall_")}
    scores.update({f"{split}_f1_{t}": v["f1"] for t, v in result.items() if isinstance(v, dict)})
    return scores


def check_teacher_labels(teacher, labels):
    """A teacher whose head orders the tags differently would be matched class by class to the wrong tags."""
    if teacher is None:
        return
    names = [teacher.config.id2label.get(i) for i in range(len(labels))]
    if names != list(labels) and not all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        raise ValueError(f"Teacher {teacher.name_or_path} labels {names} are not this dataset's {list(labels)} in "
                         "that order; give a teacher fine-tuned with run_ner.py on the same --dataset.")


def task_name(data_args):
    return data_args.dataset + ("-inner" if data_args.germeval_tags == "inner" else "")


def check_data_args(data_args):
    if data_args.dataset not in DATASETS:
        raise ValueError(f"Unknown --dataset {data_args.dataset!r}; choose one of {', '.join(DATASETS)}.")
    if data_args.germeval_tags not in ("outer", "inner"):
        raise ValueError(f"--germeval_tags must be outer or inner; got {data_args.germeval_tags!r}.")
    if data_args.germeval_tags == "inner" and data_args.dataset != "germeval2014":
        raise ValueError("--germeval_tags inner applies to --dataset germeval2014 only.")
    return DATASETS[data_args.dataset]


def main(argv=None):
    model_args, data_args, distill_args, run_args, training_args = common.parse_args(
        (common.ModelArguments, NerDataArguments, common.DistillArguments, common.RunArguments), argv)
    spec = check_data_args(data_args)
    task = task_name(data_args)
    seeds = common.parse_seeds(run_args.seeds)
    out_path = common.results_path(training_args.output_dir, "ner", task)
    common.check_results_writable(out_path, run_args.overwrite_output_dir)

    from transformers import AutoModelForTokenClassification, set_seed

    need_train = not run_args.eval_only
    local = data_args.train_file or data_args.validation_file or data_args.test_file
    raw = load_local(data_args, spec, need_train) if local else load_hub(data_args, spec, need_train)
    for split in raw:
        raw[split] = common.take_first(raw[split], run_args.max_train_samples if split == "train"
                                       else run_args.max_eval_samples)
    eval_splits = [s for s in raw if s != "train"]

    labels = spec.labels
    label2id = {label: i for i, label in enumerate(labels)}
    common.check_head_size(model_args.model_name_or_path, "ForTokenClassification", len(labels), model_args)
    teacher = common.load_teacher(AutoModelForTokenClassification, model_args, len(labels))
    check_teacher_labels(teacher, labels)
    tokenizer = load_word_tokenizer(model_args)
    segments = common.token_type_kwargs(tokenizer, teacher)  # all 0 for one sentence, but sent as BERT expects
    encoded = {split: tokenize(ds, tokenizer, label2id, data_args.max_seq_length, segments)
               for split, ds in raw.items()}
    collator = TokenClassificationCollator(tokenizer, with_distillation_mask=teacher is not None)
    metric = common.load_metric("seqeval")
    print(f"NER {task}: {len(raw.get('train', []))} training sentences, "
          + ", ".join(f"{len(raw[s])} {s}" for s in eval_splits)
          + (f"; distilling from {model_args.teacher}" if teacher is not None else ""), flush=True)

    def evaluate_split(trainer, split):
        output = trainer.predict(encoded[split].remove_columns(["word_index"]))
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        predictions = word_predictions(logits, output.label_ids, encoded[split]["word_index"], raw[split]["tags"],
                                       labels)
        common.write_json_atomic(Path(trainer.args.output_dir) / f"predictions_{split}.json", predictions)
        return split_scores(metric.compute(predictions=predictions, references=raw[split]["tags"]), split)

    def run_one(seed):
        set_seed(seed)
        model = AutoModelForTokenClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id=label2id, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            trust_remote_code=model_args.trust_remote_code)
        common.check_same_vocabulary(model, teacher)
        args = common.training_args_for_seed(training_args, seed, teacher, distill_args, run_args.overwrite_output_dir)
        train = encoded["train"].remove_columns(["word_index"]) if "train" in encoded else None
        trainer = common.build_trainer(model, teacher, args, train, None, collator, tokenizer)
        if need_train:
            trainer.train()
            common.save_log_history(trainer)
            if run_args.save_models:
                trainer.save_model()
        scores = {}
        for split in eval_splits:
            scores.update(evaluate_split(trainer, split))
        return scores

    per_seed, median = common.run_seeds(seeds, run_one)
    payload = common.results_payload("ner", task, model_args, distill_args, seeds, per_seed, median, "fraction",
                                     labels=list(labels), splits=eval_splits,
                                     num_train_examples=len(raw.get("train", [])),
                                     num_eval_examples={s: len(raw[s]) for s in eval_splits})
    common.write_json_atomic(out_path, payload)
    common.print_summary(f"NER {task}", {k: v for k, v in median.items() if "_f1_" not in k}, out_path)
    return payload


if __name__ == "__main__":
    main()
