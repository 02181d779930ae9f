"""XNLI accuracy as a local `evaluate` module: `evaluate.load("eval/metrics/xnli")`."""

import datasets
import evaluate

_DESCRIPTION = "Accuracy of 3-way NLI predictions (entailment / neutral / contradiction), as reported for XNLI."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids.
    references: gold label ids.
Returns:
    {"accuracy"} in [0, 1].
Example:
    >>> xnli = evaluate.load("eval/metrics/xnli")
    >>> xnli.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0}
"""

_CITATION = "Conneau et al. 2018, XNLI: Evaluating Cross-lingual Sentence Representations."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Xnli(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": float(correct / len(references))}
