"""Entity-level precision, recall and F1 for sequence tagging, with the semantics of `seqeval` (default mode)
and CoNLL's conlleval script, as a local `evaluate` module: `evaluate.load("eval/metrics/seqeval")`.

An entity is a maximal run of tags of one type: it starts at B-X, at I-X after O or after a tag of another
type, and ends before O, B-, or a change of type. So IOB1 (I-X I-X B-X: two entities) and IOB2 tags, and
ill-formed IOB2 (O I-X: an entity), are read alike. Types may contain '-' after the first ('B-LOC-deriv'
has type 'LOC-deriv'); GermEval's 'B-LOCderiv' has type 'LOCderiv'. A predicted entity counts as correct
only when its type, start and end all equal a gold entity's. Sentences never merge: each is scanned alone.
Precision, recall and F1 are micro-averaged over entity types (0 when undefined); "overall_accuracy" is
token-level tag accuracy.
"""

import datasets
import evaluate

_DESCRIPTION = "Entity-level micro precision / recall / F1 (seqeval / conlleval semantics) and token accuracy."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of sentences, each a list of predicted tags ("O", "B-PER", "I-PER", ...).
    references: list of sentences, each a list of gold tags, of the same lengths.
Returns:
    {"overall_precision", "overall_recall", "overall_f1", "overall_accuracy"} in [0, 1], and for each entity
    type seen in the gold or predicted tags {type: {"precision", "recall", "f1", "number"}}, number being the
    count of gold entities of that type.
Example:
    >>> seqeval = evaluate.load("eval/metrics/seqeval")
    >>> seqeval.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])["overall_f1"]
    1.0
"""

_CITATION = "Tjong Kim Sang and De Meulder 2003, Introduction to the CoNLL-2003 Shared Task; seqeval (Nakayama 2018)."

_OUTSIDE = "O"


def split_tag(tag):
    """("B" | "I" | "O", entity type)."""
    if tag == _OUTSIDE:
        return _OUTSIDE, ""
    prefix, sep, entity_type = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not entity_type:
        raise ValueError(f"Tag {tag!r} is not O, B-<type> or I-<type>; only IOB1/IOB2 tags are supported.")
    return prefix, entity_type


def entities(tags):
    """Set of (type, start, end) entities of one sentence, end inclusive."""
    found = set()
    start, current = None, ""
    for i, tag in enumerate(list(tags) + [_OUTSIDE]):
        prefix, entity_type = split_tag(tag)
        continues = prefix == "I" and entity_type == current and start is not None
        if start is not None and not continues:
            found.add((current, start, i - 1))
            start, current = None, ""
        if prefix in ("B", "I") and start is None:
            start, current = i, entity_type
    return found


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator else 0.0


def _scores(correct, predicted, gold):
    precision, recall = _ratio(correct, predicted), _ratio(correct, gold)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return precision, recall, f1


def score_sentences(predictions, references):
    """The metric's result dict for lists of predicted and gold tag sequences."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted sentences but {len(references)} gold sentences.")
    counts = {}  # type -> [correct, predicted, gold]
    tokens = right = 0
    for n, (pred, gold) in enumerate(zip(predictions, references)):
        if len(pred) != len(gold):
            raise ValueError(f"Sentence {n}: {len(pred)} predicted tags but {len(gold)} gold tags.")
        tokens += len(gold)
        right += sum(p == g for p, g in zip(pred, gold))
        pred_entities, gold_entities = entities(pred), entities(gold)
        for entity_type, *_ in pred_entities | gold_entities:
            counts.setdefault(entity_type, [0, 0, 0])
        for entity_type, *_ in pred_entities & gold_entities:
            counts[entity_type][0] += 1
        for entity_type, *_ in pred_entities:
            counts[entity_type][1] += 1
        for entity_type, *_ in gold_entities:
            counts[entity_type][2] += 1
    result = {}
    for entity_type in sorted(counts):
        correct, predicted, gold = counts[entity_type]
        precision, recall, f1 = _scores(correct, predicted, gold)
        result[entity_type] = {"precision": precision, "recall": recall, "f1": f1, "number": gold}
    totals = [sum(c[i] for c in counts.values()) for i in range(3)]
    precision, recall, f1 = _scores(*totals)
    result.update(overall_precision=precision, overall_recall=recall, overall_f1=f1,
                  overall_accuracy=_ratio(right, tokens))
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        return score_sentences(predictions, references)
