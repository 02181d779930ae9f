"""run_squad.py: windowing and span labels, n-best post-processing, the distillation mask, and end-to-end runs on
a few real SQuAD v1.1 dev articles with tiny QA models."""

import json
import re
import string
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import run_squad  # noqa: E402

DEV = tiny.SHARED_DATA / "squad" / "dev-v1.1.json"
DATA = SimpleNamespace(max_seq_length=128, doc_stride=32, n_best_size=20, max_answer_length=30,
                       version_2_with_negative=False, null_score_diff_threshold=0.0)


def norm(text):
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@pytest.fixture(scope="module")
def examples():
    from datasets import Dataset

    return Dataset.from_dict(run_squad.read_squad_json(DEV, slice(0, 1))).select(range(24))


def test_reader_flattens_official_json():
    rows = run_squad.read_squad_json(DEV, slice(None))
    assert len(rows["id"]) == 10570  # the official dev question count
    assert rows["id"][0] == "56be4db0acb8001400a502ec"
    assert rows["answers"][0]["text"][0] == "Denver Broncos"


def test_span_labels_and_postprocessing_recover_gold_answers(examples):
    """Logits peaked at the labelled start/end tokens must decode back to the gold answer text."""
    tok = tiny.bert_tokenizer()
    train = run_squad.prepare_train_features(examples[:], tok, DATA, with_mask=True)
    evalf = run_squad.prepare_eval_features(examples[:], tok, DATA)
    assert len(train["input_ids"]) == len(evalf["input_ids"]) > len(examples)  # long contexts are windowed
    n = len(train["input_ids"])
    start_logits, end_logits = np.zeros((n, 128)), np.zeros((n, 128))
    answered = set()
    for i in range(n):
        s, e = train["start_positions"][i], train["end_positions"][i]
        if s != 0:
            start_logits[i, s], end_logits[i, e] = 10.0, 10.0
            answered.add(evalf["example_id"][i])
    from datasets import Dataset

    preds = run_squad.postprocess_predictions(examples, Dataset.from_dict(dict(evalf)), start_logits, end_logits,
                                              tok, DATA)
    assert len(answered) == len(examples)
    exact = 0
    for ex in examples:
        gold, pred = ex["answers"]["text"][0], preds[ex["id"]]
        # Spans are whole tokens: an answer inside a word piece ("gold" in "golden") comes back as that word.
        assert gold in pred and len(pred) - len(gold) < 8, (ex["id"], gold, pred)
        exact += norm(pred) == norm(gold)
    assert exact >= len(examples) - 2


def test_distillation_mask_is_context_plus_cls(examples):
    tok = tiny.bert_tokenizer()
    feats = run_squad.prepare_train_features(examples[:8], tok, DATA, with_mask=True)
    for ids, types, mask in zip(feats["input_ids"], feats["token_type_ids"], feats["distillation_mask"]):
        expected = [int(j == 0 or (t == 1 and i not in (tok.sep_token_id, tok.pad_token_id)))
                    for j, (i, t) in enumerate(zip(ids, types))]
        assert mask == expected
        assert mask[0] == 1 and ids[0] == tok.cls_token_id


def test_postprocessing_respects_max_answer_length(examples):
    tok = tiny.bert_tokenizer()
    from datasets import Dataset

    evalf = run_squad.prepare_eval_features(examples[:1], tok, DATA)
    ctx = [j for j, o in enumerate(evalf["offset_mapping"][0]) if o is not None]
    n = len(evalf["input_ids"])
    start, end = np.zeros((n, 128)), np.zeros((n, 128))
    start[0, ctx[0]], end[0, ctx[0] + 40] = 10.0, 10.0  # best pair is 41 tokens long: not allowed
    end[0, ctx[0] + 2] = 5.0
    preds = run_squad.postprocess_predictions(examples.select([0]), Dataset.from_dict(dict(evalf)), start, end,
                                              tok, SimpleNamespace(**{**vars(DATA), "max_answer_length": 30}))
    offsets = evalf["offset_mapping"][0]
    assert preds[examples[0]["id"]] == examples[0]["context"][offsets[ctx[0]][0]:offsets[ctx[0] + 2][1]]


@pytest.fixture(scope="module")
def qa_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa_models")
    tiny.tiny_bert_qa().save_pretrained(root / "student")
    tiny.bert_tokenizer().save_pretrained(root / "student")
    tiny.tiny_bert_qa(layers=3, seed=9).save_pretrained(root / "teacher")
    return str(root / "student"), str(root / "teacher")


ARGS = ["--train_file", str(DEV), "--validation_file", str(DEV), "--train_articles", "0:1", "--eval_articles", "1:2",
        "--max_train_samples", "24", "--max_eval_samples", "12", "--max_seq_length", "128", "--doc_stride", "32",
        "--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--use_cpu", "true", "--logging_steps", "1"]


def test_squad_end_to_end_with_teacher(qa_models, tmp_path):
    student, teacher = qa_models
    payload = run_squad.main(["--model_name_or_path", student, "--output_dir", str(tmp_path), *ARGS,
                              "--teacher", teacher])
    saved = json.loads((tmp_path / "results_squad_v1.1.json").read_text())
    assert saved["median"] == payload["median"] and set(saved["median"]) == {"exact_match", "f1"}
    assert 0 <= saved["median"]["f1"] <= 100 and saved["num_eval_examples"] == {"validation": 12}
    preds = json.loads((tmp_path / "seed-42" / "predictions.json").read_text())
    assert len(preds) == 12
    logs = json.loads((tmp_path / "seed-42" / "log_history.json").read_text())
    assert "loss_ce" in set().union(*logs)


def test_squad_bad_inputs(qa_models, tmp_path):
    student, _ = qa_models
    with pytest.raises(FileNotFoundError, match="SQuAD JSON file at .*missing.json"):
        run_squad.main(["--model_name_or_path", student, "--output_dir", str(tmp_path / "a"),
                        "--train_file", str(tmp_path / "missing.json"), "--validation_file", str(DEV)])
    with pytest.raises(ValueError, match="--doc_stride .* must be smaller"):
        run_squad.main(["--model_name_or_path", student, "--output_dir", str(tmp_path / "b"), "--doc_stride", "400"])
    with pytest.raises(ValueError, match="--train_articles must look like"):
        run_squad.main(["--model_name_or_path", student, "--output_dir", str(tmp_path / "c"), "--train_file",
                        str(DEV), "--validation_file", str(DEV), "--train_articles", "x:y"])
