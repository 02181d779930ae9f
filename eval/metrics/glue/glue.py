"""GLUE metrics as a local `evaluate` module; the config name is the task.

cola: Matthews correlation; sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, ax: accuracy;
mrpc, qqp: accuracy and F1 of the positive class; stsb: Pearson and Spearman correlation.
Load it with `evaluate.load("eval/metrics/glue", "mrpc")` (works with HF_EVALUATE_OFFLINE=1).
"""

import datasets
import evaluate
from scipy.stats import pearsonr
from scipy.stats import spearmanr
from sklearn.metrics import f1_score
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = "GLUE dev-set metrics: MCC (CoLA), accuracy, F1 + accuracy (MRPC, QQP), Pearson + Spearman (STS-B)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (ints), or scores (floats) for stsb.
    references: gold labels (ints), or gold scores (floats) for stsb.
Returns:
    cola: {"matthews_correlation"}; mrpc, qqp: {"accuracy", "f1"}; stsb: {"pearson", "spearmanr"};
    every other task: {"accuracy"}. Values lie in [0, 1] (correlations in [-1, 1]).
Example:
    >>> glue = evaluate.load("eval/metrics/glue", "mrpc")
    >>> glue.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

_CITATION = "Wang et al. 2019, GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding."

TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "ax")


def _accuracy(predictions, references):
    return float(sum(int(p == r) for p, r in zip(predictions, references)) / len(references))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"Unknown GLUE task {self.config_name!r}; choose one of {list(TASKS)}.")
        value_type = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(value_type),
                                        "references": datasets.Value(value_type)}),
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        if self.config_name in ("mrpc", "qqp"):
            return {"accuracy": _accuracy(predictions, references), "f1": float(f1_score(references, predictions))}
        return {"accuracy": _accuracy(predictions, references)}
