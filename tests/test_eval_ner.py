"""run_ner.py: the CoNLL-2003 and GermEval 2014 readers on the real dev files, IOB1 -> IOB2, the seqeval metric
on hand-counted entities, fine-tuning tiny models on slices, and the KL of NER distillation over labelled tokens."""

import collections
import csv
import json
import sys

import pytest
import torch

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import common  # noqa: E402
import run_ner  # noqa: E402

NER = tiny.SHARED_DATA / "ner"
CONLL_DEV = NER / "conll2003" / "eng.testa"
GERMEVAL_DEV = NER / "germeval2014" / "NER-de-dev.tsv"
FAST = ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--num_train_epochs", "1",
        "--max_train_samples", "24", "--max_eval_samples", "16", "--max_seq_length", "64", "--use_cpu", "true",
        "--logging_steps", "1"]


def tiny_bert_tagger(num_labels, layers=2, seed=11):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()


def tiny_distilbert_tagger(num_labels, seed=12):
    from transformers import DistilBertConfig, DistilBertForTokenClassification

    torch.manual_seed(seed)
    return DistilBertForTokenClassification(DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128,
        num_labels=num_labels, dropout=0.0, attention_dropout=0.0)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner_models")
    out = {}
    labels = run_ner.CONLL_LABELS
    named = dict(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    for name, model in [("bert", tiny_bert_tagger(len(labels))), ("distilbert", tiny_distilbert_tagger(len(labels))),
                        ("teacher", tiny_bert_tagger(len(labels), layers=3, seed=13))]:
        if name == "teacher":
            model.config.update(named)  # a teacher fine-tuned on CoNLL-2003 knows its tag names
        model.save_pretrained(root / name)
        tiny.bert_tokenizer().save_pretrained(root / name)
        out[name] = str(root / name)
    return out


# ---- readers ----

def test_conll_reader_counts_and_iob1_conversion():
    rows = run_ner.read_conll(CONLL_DEV)
    assert len(rows["tokens"]) == 3250 and sum(map(len, rows["tokens"])) == 51362
    assert rows["tokens"][0][:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
    assert rows["tags"][0][:3] == ["O", "O", "B-ORG"]  # IOB1 I-ORG after O became B-ORG
    # The published entity counts of CoNLL-2003 English dev: one B- tag per entity once converted to IOB2.
    begins = collections.Counter(t[2:] for tags in rows["tags"] for t in tags if t.startswith("B-"))
    assert begins == {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}
    # The conversion only renames I- to B-: every non-O position keeps its entity type.
    raw = [line.split()[-1] for line in CONLL_DEV.read_text().splitlines() if line and "-DOCSTART-" not in line]
    converted = [t for tags in rows["tags"] for t in tags]
    assert [t[2:] for t in raw] == [t[2:] for t in converted]
    # And the result is valid IOB2: an I-X only ever continues an X.
    for tags in rows["tags"]:
        assert all(tag[2:] == prev[2:] for prev, tag in zip(["O"] + tags, tags) if tag.startswith("I-"))


def test_germeval_reader_counts_outer_and_inner():
    with open(GERMEVAL_DEV, encoding="utf-8", newline="") as f:
        lines = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row and row[0] != "#"]
    outer = run_ner.read_germeval(GERMEVAL_DEV)
    inner = run_ner.read_germeval(GERMEVAL_DEV, "inner")
    assert len(outer["tokens"]) == 2200 and len(inner["tokens"]) == 2200
    assert sum(map(len, outer["tokens"])) == len(lines)
    assert outer["tokens"][0][:3] == ["Gleich", "darauf", "entwirft"]
    assert outer["tags"][0][7:9] == ["B-OTH", "I-OTH"]  # "Ecce homo"
    for rows, column in ((outer, 2), (inner, 3)):
        assert sum(t.startswith("B-") for tags in rows["tags"] for t in tags) == sum(
            row[column].startswith("B-") for row in lines)
    assert {t for tags in outer["tags"] for t in tags} <= set(run_ner.GERMEVAL_LABELS)


@pytest.mark.parametrize("iob1, iob2", [
    (["I-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]),                       # entity at sentence start
    (["I-PER", "I-PER", "B-PER", "I-PER"], ["B-PER", "I-PER", "B-PER", "I-PER"]),  # two adjacent PER entities
    (["I-LOC", "I-PER"], ["B-LOC", "B-PER"]),                                  # type change starts an entity
    (["O", "I-MISC", "O", "I-MISC"], ["O", "B-MISC", "O", "B-MISC"]),
    (["B-ORG", "I-ORG", "I-LOC"], ["B-ORG", "I-ORG", "B-LOC"]),                # already IOB2 stays, bar the change
    (["I-LOCderiv", "I-LOCderiv"], ["B-LOCderiv", "I-LOCderiv"]),
])
def test_iob1_to_iob2(iob1, iob2):
    assert run_ner.to_iob2(iob1) == iob2
    assert run_ner.to_iob2(iob2) == iob2  # IOB2 is a fixed point


# ---- metric ----

@pytest.fixture(scope="module")
def seqeval():
    return common.load_metric("seqeval")


def test_seqeval_hand_counted_entities(seqeval):
    references = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],          # PER(0-1), LOC(3)
        ["I-ORG", "I-ORG", "B-ORG", "O", "I-LOC"],      # IOB1: ORG(0-1), ORG(2), LOC(4)
        ["B-PER", "I-LOC", "O"],                        # PER(0), LOC(1): a type change splits
    ]
    predictions = [
        ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"],      # PER right; LOC(3-4) wrong end
        ["B-ORG", "I-ORG", "I-ORG", "O", "I-LOC"],      # ORG(0-2) wrong; LOC(4) right (I after O starts one)
        ["B-PER", "B-LOC", "O"],                        # both right
    ]
    out = seqeval.compute(predictions=predictions, references=references)
    # Gold: PER 2, LOC 3, ORG 2 = 7. Predicted: PER 2, LOC 3, ORG 1 = 6. Correct: PER 2, LOC 2, ORG 0 = 4.
    assert out["overall_precision"] == pytest.approx(4 / 6)
    assert out["overall_recall"] == pytest.approx(4 / 7)
    assert out["overall_f1"] == pytest.approx(2 * 4 / (6 + 7))
    assert out["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 2}
    assert out["LOC"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "number": 3})
    assert out["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 2}
    # Token accuracy compares the tags as written: 4 of 5, 3 of 5 (I-ORG != B-ORG twice), 2 of 3 equal.
    assert out["overall_accuracy"] == pytest.approx(9 / 13)


def test_seqeval_iob1_and_iob2_spellings_score_alike(seqeval):
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-MISC"]]
    iob2 = [["B-PER", "I-PER", "B-PER", "O", "B-MISC"]]
    out = seqeval.compute(predictions=iob1, references=iob2)
    assert out["overall_f1"] == 1.0 and out["PER"]["number"] == 2 and out["MISC"]["number"] == 1


def test_seqeval_sentences_do_not_merge(seqeval):
    # An entity ending one sentence and an I- tag opening the next are two entities, not one.
    out = seqeval.compute(predictions=[["O", "B-PER"], ["I-PER", "O"]], references=[["O", "B-PER"], ["B-PER", "O"]])
    assert out["PER"]["number"] == 2 and out["overall_f1"] == 1.0


def test_seqeval_edge_cases(seqeval):
    # No predicted entity: precision, recall and F1 are 0, not an error.
    out = seqeval.compute(predictions=[["O", "O"]], references=[["B-PER", "O"]])
    assert (out["overall_precision"], out["overall_recall"], out["overall_f1"]) == (0.0, 0.0, 0.0)
    # A spurious type only in the predictions is reported, with no gold entity.
    out = seqeval.compute(predictions=[["B-ORG", "O"]], references=[["O", "O"]])
    assert out["ORG"]["number"] == 0 and out["overall_precision"] == 0.0
    with pytest.raises(ValueError, match="'E-PER' is not O, B-<type> or I-<type>"):
        seqeval.compute(predictions=[["E-PER"]], references=[["O"]])
    with pytest.raises(ValueError, match="2 predicted tags but 1 gold tags"):
        seqeval.compute(predictions=[["O", "O"]], references=[["O"]])


# ---- fine-tuning and evaluation ----

def run(model, out, *extra, dataset="conll2003", data=CONLL_DEV):
    return run_ner.main(["--model_name_or_path", model, "--dataset", dataset, "--train_file", str(data),
                         "--validation_file", str(data), "--output_dir", str(out), *FAST, *extra])


def test_conll_two_seeds_median(models, tmp_path):
    payload = run(models["bert"], tmp_path, "--seeds", "1,2")
    saved = json.loads((tmp_path / "results_ner_conll2003.json").read_text())
    assert saved["benchmark"] == "ner" and saved["task"] == "conll2003" and saved["seeds"] == [1, 2]
    assert saved["num_train_examples"] == 24 and saved["num_eval_examples"] == {"dev": 16}
    assert saved["labels"] == list(run_ner.CONLL_LABELS) and saved["splits"] == ["dev"]
    f1s = [saved["per_seed"][s]["dev_f1"] for s in ("1", "2")]
    assert saved["median"]["dev_f1"] == pytest.approx(sum(f1s) / 2)
    assert {"dev_precision", "dev_recall", "dev_f1", "dev_accuracy"} <= set(saved["median"])
    assert all(0.0 <= v <= 1.0 for v in saved["median"].values())
    assert payload["teacher"] is None
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run(models["bert"], tmp_path)


def independent_word_tags(model_dir, sentences, max_length):
    """Per word, the argmax tag of its first sub-token, computed here with plain transformers calls."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    tokenizer = tiny.bert_tokenizer()
    out = []
    for words in sentences:
        tags = ["O"] * len(words)
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).tolist()
        seen = set()
        for position, word in enumerate(enc.word_ids(0)):
            if word is not None and word not in seen:
                seen.add(word)
                tags[word] = run_ner.CONLL_LABELS[ids[position]]
        out.append(tags)
    return out


def test_eval_predictions_per_word_and_truncated_words_predicted_o(models, tmp_path):
    """Scores come from each word's first sub-token; words cut off by max_seq_length are O, yet their gold
    entities still count (recall is over every gold entity)."""
    payload = run_ner.main(["--model_name_or_path", models["bert"], "--dataset", "conll2003", "--validation_file",
                            str(CONLL_DEV), "--eval_only", "true", "--output_dir", str(tmp_path),
                            "--max_eval_samples", "16", "--max_seq_length", "12", "--use_cpu", "true"])
    predicted = json.loads((tmp_path / "seed-42" / "predictions_dev.json").read_text())
    rows = run_ner.read_conll(CONLL_DEV)
    sentences, gold = rows["tokens"][:16], rows["tags"][:16]
    assert predicted == independent_word_tags(models["bert"], sentences, 12)
    assert any(len(words) > 12 for words in sentences)  # some sentences really were cut
    expected = common.load_metric("seqeval").compute(predictions=predicted, references=gold)
    assert payload["median"]["dev_f1"] == pytest.approx(expected["overall_f1"])
    assert payload["median"]["dev_recall"] == pytest.approx(expected["overall_recall"])


def test_germeval_fine_tune_outer_and_inner(tmp_path):
    root = tmp_path / "model"
    tiny_bert_tagger(len(run_ner.GERMEVAL_LABELS)).save_pretrained(root)
    tiny.bert_tokenizer().save_pretrained(root)
    outer = run(str(root), tmp_path / "outer", dataset="germeval2014", data=GERMEVAL_DEV)
    assert outer["task"] == "germeval2014" and outer["num_eval_examples"] == {"dev": 16}
    inner = run_ner.main(["--model_name_or_path", str(root), "--dataset", "germeval2014", "--germeval_tags", "inner",
                          "--test_file", str(GERMEVAL_DEV), "--eval_only", "true", "--output_dir",
                          str(tmp_path / "inner"), "--max_eval_samples", "8", "--use_cpu", "true"])
    assert inner["task"] == "germeval2014-inner" and set(inner["num_eval_examples"]) == {"test"}
    assert "test_f1" in inner["median"]


def test_ner_task_distillation_logs_both_terms(models, tmp_path):
    payload = run(models["distilbert"], tmp_path, "--teacher", models["teacher"], "--alpha_ce", "0.6",
                  "--alpha_task", "0.4", "--temperature", "2")
    distillation = payload["distillation"]
    assert (distillation["alpha_ce"], distillation["alpha_task"], distillation["temperature"]) == (0.6, 0.4, 2.0)
    logs = json.loads((tmp_path / "seed-42" / "log_history.json").read_text())
    assert {"loss_ce", "loss_task"} <= set().union(*logs)
    assert "dev_f1" in payload["median"]


def test_distillation_kl_is_over_labelled_tokens_only(models, tmp_path):
    """L_ce of an NER batch equals T^2 KL(teacher || student) averaged over the labelled (first sub-)tokens,
    computed here in plain torch; special tokens, later sub-tokens and padding are left out."""
    from datasets import Dataset
    from transformers import AutoModelForTokenClassification

    from distil_trainer import DistillationArguments, DistillationTrainer

    rows = run_ner.read_conll(CONLL_DEV)
    tokenizer = tiny.bert_tokenizer()
    label2id = {label: i for i, label in enumerate(run_ner.CONLL_LABELS)}
    features = run_ner.tokenize(Dataset.from_dict({k: v[:6] for k, v in rows.items()}), tokenizer, label2id, 64)
    batch = run_ner.TokenClassificationCollator(tokenizer, with_distillation_mask=True)(list(features))
    labelled = batch["labels"] != -100
    assert labelled.sum() < batch["attention_mask"].sum()  # the mask really excludes some real tokens

    student = AutoModelForTokenClassification.from_pretrained(models["distilbert"]).eval()
    teacher = AutoModelForTokenClassification.from_pretrained(models["teacher"]).eval()
    args = DistillationArguments(output_dir=str(tmp_path), alpha_ce=1.0, alpha_task=0.0, alpha_mlm=0.0, alpha_cos=0.0,
                                 temperature=2.0, use_cpu=True, report_to="none")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[labelled]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=torch.zeros_like(batch["input_ids"])).logits[labelled]
    p_t = torch.softmax(t / 2.0, -1)
    expected = 4.0 * (p_t * (torch.log(p_t) - torch.log_softmax(s / 2.0, -1))).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_inputs(models, tmp_path):
    with pytest.raises(ValueError, match="Unknown --dataset 'conll'"):
        run(models["bert"], tmp_path / "a", dataset="conll")
    # A GermEval file read as CoNLL-2003: its source lines give tags that CoNLL-2003 does not have.
    with pytest.raises(ValueError, match=r"not in this dataset's tag set .*check --dataset"):
        run(models["bert"], tmp_path / "b", data=GERMEVAL_DEV)
    with pytest.raises(ValueError, match="expected 4 tab-separated fields"):
        run(models["bert"], tmp_path / "c", dataset="germeval2014", data=CONLL_DEV)
    with pytest.raises(ValueError, match="--germeval_tags inner applies to --dataset germeval2014 only"):
        run(models["bert"], tmp_path / "d", "--germeval_tags", "inner")
    with pytest.raises(ValueError, match="--train_file is needed"):
        run_ner.main(["--model_name_or_path", models["bert"], "--dataset", "conll2003", "--validation_file",
                      str(CONLL_DEV), "--output_dir", str(tmp_path / "e")])
    # The German CoNLL-2003 release is Latin-1.
    latin1 = tmp_path / "deu.testa"
    latin1.write_bytes("München NE I-NC I-LOC\nliegt VVFIN I-VC O\n\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid utf-8 .*--file_encoding"):
        run_ner.read_conll(latin1)
    assert run_ner.read_conll(latin1, "latin-1") == {"tokens": [["München", "liegt"]], "tags": [["B-LOC", "O"]]}


def test_teacher_with_other_tag_order_is_refused(models, tmp_path):
    teacher = tiny_bert_tagger(len(run_ner.CONLL_LABELS), seed=14)
    order = list(reversed(run_ner.CONLL_LABELS))
    teacher.config.update(dict(id2label=dict(enumerate(order)), label2id={n: i for i, n in enumerate(order)}))
    teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="are not this dataset's .* in that order"):
        run(models["distilbert"], tmp_path / "out", "--teacher", str(tmp_path / "teacher"))


def test_hub_layout_with_class_label_tags(models, tmp_path):
    """A Hub-style dataset (tokens + ClassLabel ner_tags, train/validation/test splits) read through
    load_dataset; here a local parquet folder with the Hub's conll2003 features stands in for the Hub."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    rows = run_ner.read_conll(CONLL_DEV)
    features = Features({"tokens": Sequence(Value("string")),
                         "ner_tags": Sequence(ClassLabel(names=list(run_ner.CONLL_LABELS)))})
    ids = {label: i for i, label in enumerate(run_ner.CONLL_LABELS)}
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for split, part in (("train", slice(0, 12)), ("validation", slice(12, 20)), ("test", slice(20, 26))):
        Dataset.from_dict({"tokens": rows["tokens"][part], "ner_tags": [[ids[t] for t in tags]
                                                                        for tags in rows["tags"][part]]},
                          features=features).to_parquet(str(hub / f"{split}-00000-of-00001.parquet"))
    payload = run_ner.main(["--model_name_or_path", models["bert"], "--dataset", "conll2003", "--dataset_name",
                            str(tmp_path / "hub"), "--output_dir", str(tmp_path / "out"), *FAST])
    assert payload["num_train_examples"] == 12 and payload["num_eval_examples"] == {"dev": 8, "test": 6}
    assert {"dev_f1", "test_f1"} <= set(payload["median"])
    predicted = json.loads((tmp_path / "out" / "seed-42" / "predictions_test.json").read_text())
    assert [len(p) for p in predicted] == [len(t) for t in rows["tokens"][20:26]]


def test_hub_tags_as_plain_ids_or_strings():
    """Hub copies without ClassLabel names hold ids in the Hub label order, or the tag strings themselves."""
    from datasets import Dataset

    spec = run_ner.DATASETS["germeval2014"]
    ids = Dataset.from_dict({"tokens": [["Gleich", "Berlin", "Mitte"]], "ner_tags": [[0, 2, 2]]})  # 2 = I-LOC
    assert run_ner.hub_split(ids, "ner_tags", spec, "x")["tags"] == [["O", "B-LOC", "I-LOC"]]
    strings = Dataset.from_dict({"tokens": [["Berlin"]], "ner_tags": [["B-LOCderiv"]]})
    assert run_ner.hub_split(strings, "ner_tags", spec, "x")["tags"] == [["B-LOCderiv"]]
    with pytest.raises(ValueError, match="x has no 'nested_ner_tags' column"):
        run_ner.hub_split(strings, "nested_ner_tags", spec, "x")
