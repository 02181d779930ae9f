"""The local `evaluate` metric modules against independent computations (scikit-learn, scipy, hand-checked
SQuAD normalisation) and the published examples of the Hub's metric cards."""

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import evaluate

METRICS = Path(__file__).resolve().parents[1] / "eval" / "metrics"


def load(name, config=None):
    return evaluate.load(str(METRICS / name), config)


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 2, 200), rng.integers(0, 2, 200)


def test_glue_cola_is_matthews(labels):
    preds, refs = labels
    out = load("glue", "cola").compute(predictions=preds, references=refs)
    assert out == {"matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds))}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_glue_f1_and_accuracy(labels, task):
    preds, refs = labels
    out = load("glue", task).compute(predictions=preds, references=refs)
    assert out["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert out["f1"] == pytest.approx(f1_score(refs, preds))


@pytest.mark.parametrize("task", ["sst2", "rte", "wnli", "qnli", "mnli"])
def test_glue_accuracy_tasks(labels, task):
    preds, refs = labels
    assert load("glue", task).compute(predictions=preds, references=refs) == {
        "accuracy": pytest.approx(accuracy_score(refs, preds))}


def test_glue_stsb_correlations():
    rng = np.random.default_rng(1)
    refs = rng.uniform(0, 5, 100)
    preds = refs + rng.normal(0, 1, 100)
    out = load("glue", "stsb").compute(predictions=preds, references=refs)
    assert out["pearson"] == pytest.approx(pearsonr(preds, refs)[0], abs=1e-5)
    assert out["spearmanr"] == pytest.approx(spearmanr(preds, refs)[0], abs=1e-5)


def test_glue_metric_card_examples():
    # Examples from the Hub's glue metric card.
    assert load("glue", "mrpc").compute(predictions=[0, 1], references=[0, 1]) == {"accuracy": 1.0, "f1": 1.0}
    out = load("glue", "stsb").compute(predictions=[0.0, 1.0], references=[0.0, 1.0])
    assert out["pearson"] == pytest.approx(1.0) and out["spearmanr"] == pytest.approx(1.0)
    assert load("glue", "cola").compute(predictions=[0, 1], references=[0, 1]) == {"matthews_correlation": 1.0}


def test_glue_unknown_task_is_refused():
    with pytest.raises(KeyError, match="Unknown GLUE task 'mnli_x'"):
        load("glue", "mnli_x")


def test_xnli_accuracy(labels):
    preds, refs = labels
    assert load("xnli").compute(predictions=preds, references=refs) == {
        "accuracy": pytest.approx(accuracy_score(refs, preds))}


def test_squad_metric_card_example():
    predictions = [{"prediction_text": "1976", "id": "56e10a3be3433e1400422b22"}]
    references = [{"answers": {"answer_start": [97], "text": ["1976"]}, "id": "56e10a3be3433e1400422b22"}]
    assert load("squad").compute(predictions=predictions, references=references) == {"exact_match": 100.0,
                                                                                      "f1": 100.0}


# (prediction, gold answers, expected EM, expected F1), worked out by hand.
SQUAD_CASES = [
    ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0),           # article and case removed
    ("Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),          # punctuation removed
    ("an  apple   pie", ["apple pie"], 1.0, 1.0),               # article 'an', whitespace collapsed
    ("Broncos", ["Denver Broncos"], 0.0, 2 * 1 * 0.5 / 1.5),    # precision 1, recall 1/2
    ("the city of Paris", ["Paris", "city of Paris"], 1.0, 1.0),  # max over gold answers
    ("theatre", ["the atre"], 0.0, 0.0),                         # 'the' inside a word is kept
    ("red blue", ["blue green red"], 0.0, 2 * 1.0 * (2 / 3) / (1.0 + 2 / 3)),
]


@pytest.mark.parametrize("prediction,golds,em,f1", SQUAD_CASES)
def test_squad_normalisation_cases(prediction, golds, em, f1):
    out = load("squad").compute(predictions=[{"id": "q", "prediction_text": prediction}],
                                references=[{"id": "q", "answers": {"text": golds, "answer_start": [0] * len(golds)}}])
    assert out["exact_match"] == pytest.approx(100 * em)
    assert out["f1"] == pytest.approx(100 * f1)


def test_squad_averages_over_questions():
    preds = [{"id": "a", "prediction_text": "x y"}, {"id": "b", "prediction_text": "wrong"}]
    refs = [{"id": "a", "answers": {"text": ["x y"], "answer_start": [0]}},
            {"id": "b", "answers": {"text": ["right"], "answer_start": [0]}}]
    assert load("squad").compute(predictions=preds, references=refs) == {"exact_match": 50.0, "f1": 50.0}


def test_squad_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="no prediction"):
        load("squad").compute(predictions=[{"id": "a", "prediction_text": "x"}],
                              references=[{"id": "b", "answers": {"text": ["x"], "answer_start": [0]}}])


def test_metric_modules_keep_one_import_per_line():
    # evaluate's offline import checker reads import lines one by one.
    for path in METRICS.glob("*/*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"^import\s", line):
                assert "," not in line, f"{path}: {line}"
