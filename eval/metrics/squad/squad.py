"""SQuAD exact match and F1 as a local `evaluate` module: `evaluate.load("eval/metrics/squad")`.

Follows the official v1.1 evaluation script: answers are normalised (lowercase, punctuation removed,
articles a/an/the removed, whitespace collapsed), each prediction is scored against every gold answer
and the best score is kept; both numbers are percentages (0-100). A question with no gold answer
(SQuAD v2.0 style) is scored 100 only for an empty prediction.
"""

import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = "SQuAD v1.1 exact match and token-level F1 (official normalisation, max over gold answers)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
Returns:
    {"exact_match", "f1"}, both percentages.
Example:
    >>> squad = evaluate.load("eval/metrics/squad")
    >>> squad.compute(predictions=[{"prediction_text": "1976", "id": "56e10a3be3433e1400422b22"}],
    ...               references=[{"answers": {"answer_start": [97], "text": ["1976"]}, "id": "56e10a3be3433e1400422b22"}])
    {'exact_match': 100.0, 'f1': 100.0}
"""

_CITATION = "Rajpurkar et al. 2016, SQuAD: 100,000+ Questions for Machine Comprehension of Text."

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction, gold):
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # Only an empty answer matches an empty answer.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(score_fn, prediction, golds):
    golds = list(golds) or [""]
    return max(score_fn(prediction, gold) for gold in golds)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                "references": {
                    "id": datasets.Value("string"),
                    "answers": datasets.features.Sequence(
                        {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
                },
            }),
        )

    def _compute(self, predictions, references):
        predicted = {p["id"]: p["prediction_text"] for p in predictions}
        missing = [r["id"] for r in references if r["id"] not in predicted]
        if missing:
            raise ValueError(f"{len(missing)} questions have no prediction (first: {missing[0]!r}).")
        exact = f1 = 0.0
        for ref in references:
            golds = ref["answers"]["text"]
            exact += best_over_golds(exact_match_score, predicted[ref["id"]], golds)
            f1 += best_over_golds(f1_score, predicted[ref["id"]], golds)
        n = len(references)
        return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1 / n}
