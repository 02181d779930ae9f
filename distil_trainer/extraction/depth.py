"""Which teacher layers a student keeps, chosen by measurement (see `importance` for the scores).

- ``block_influence`` (ShortGPT): drop the n - k layers with the lowest Block Influence (1 - cos between a layer's
  input and output, mean over the calibration tokens); ties go to the earlier layer. With ``iterative``, one layer at
  a time: drop the lowest, measure the remaining stack again, repeat.
- ``angular`` (Gromov et al. 2024): drop the contiguous block of n - k layers whose input and output are closest in
  angular distance arccos(cos) / pi; ties go to the earlier block.

The first and last layers are kept unless ``keep_ends=False`` (ShortGPT and Gromov et al. both find them among the
most important: the first builds the token representations, the last turns them into the output).
"""

from dataclasses import asdict, dataclass, field

from .blocks import find_blocks
from .calibration import CalibrationSet
from .importance import boundary_distances, layer_scores

MEASURED_STRATEGIES = ("block_influence", "angular")


@dataclass
class LayerChoice:
    strategy: str
    kept: list
    scores: list  # per teacher layer: 1 - cos (block_influence) or angular distance of the layer alone (angular)
    reasons: dict  # teacher layer -> why it was kept or dropped
    calibration: str
    keep_ends: bool = True
    iterative: bool = False
    block_distances: dict = field(default_factory=dict)  # angular: first layer of the block -> its distance
    rounds: list = field(default_factory=list)  # iterative: [{"scores": {layer: score}, "dropped": layer}, ...]

    def record(self):
        """A JSON-able dict (layer keys as ints in Python; JSON turns them into strings)."""
        return asdict(self)


def teacher_blocks(model):
    return find_blocks(model)[1]


def _check_count(num_layers, k, keep_ends):
    if not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ValueError(f"num_layers must be between 1 and the teacher's {num_layers} layers (got {k!r}).")
    if keep_ends and num_layers > 1 and k < 2:
        raise ValueError(f"Keeping the teacher's first and last layers needs a student of at least 2 layers (asked "
                         f"{k}); ask for more layers or pass keep_ends=False (--keep_ends false).")


def candidates(num_layers, keep_ends):
    """Layers that may be dropped."""
    return list(range(1, num_layers - 1)) if keep_ends else list(range(num_layers))


def drop_lowest(scores, k, keep_ends=True):
    """(kept layers, dropped layers in the order chosen): the len(scores) - k lowest-scoring droppable layers go."""
    n = len(scores)
    _check_count(n, k, keep_ends)
    order = sorted(candidates(n, keep_ends), key=lambda i: (scores[i], i))
    dropped = order[:n - k]
    return [i for i in range(n) if i not in dropped], dropped


def best_block(block_distances, num_layers, span, keep_ends=True):
    """First layer of the contiguous run of `span` layers with the smallest distance (among runs that spare the
    first and last layers when `keep_ends`)."""
    low = 1 if keep_ends else 0
    high = num_layers - span - (1 if keep_ends else 0)
    starts = [s for s in range(low, high + 1)]
    if not starts:
        raise ValueError(f"No run of {span} layers fits between the first and last of {num_layers} layers; ask for "
                         "more layers or pass keep_ends=False (--keep_ends false).")
    return min(starts, key=lambda s: (block_distances[s], s))


def _end_reason(layer, num_layers):
    return "kept: first layer (keep_ends)" if layer == 0 else "kept: last layer (keep_ends)"


def _is_end(layer, num_layers, keep_ends):
    return keep_ends and layer in (0, num_layers - 1)


def choose_by_block_influence(teacher, calibration, k, keep_ends=True, progress=True):
    scores = layer_scores(teacher, calibration, "block_influence", progress)
    n = len(scores)
    kept, dropped = drop_lowest(scores, k, keep_ends)
    reasons = {}
    for i in range(n):
        if i in dropped:
            reasons[i] = f"dropped: block influence {scores[i]:.4f}, among the {n - k} lowest"
        elif _is_end(i, n, keep_ends):
            reasons[i] = _end_reason(i, n)
        else:
            reasons[i] = f"kept: block influence {scores[i]:.4f}, above every dropped layer's"
    return LayerChoice("block_influence", kept, scores, reasons, calibration.describe(), keep_ends)


def choose_by_angular_distance(teacher, calibration, k, keep_ends=True, progress=True):
    n_layers = len(teacher_blocks(teacher))
    _check_count(n_layers, k, keep_ends)
    span = n_layers - k
    spans = [1] if span in (0, 1) else [1, span]
    distances = boundary_distances(teacher, calibration, spans, "angular", progress)
    blocks = distances[span] if span else []
    start = best_block(blocks, n_layers, span, keep_ends) if span else None
    dropped = set(range(start, start + span)) if span else set()
    reasons = {}
    for i in range(n_layers):
        if i in dropped:
            reasons[i] = (f"dropped: in layers {start}..{start + span - 1}, the run of {span} whose input and output "
                          f"are closest (angular distance {blocks[start]:.4f})")
        elif _is_end(i, n_layers, keep_ends):
            reasons[i] = _end_reason(i, n_layers)
        else:
            reasons[i] = "kept: outside the dropped run"
    return LayerChoice("angular", [i for i in range(n_layers) if i not in dropped], distances[1], reasons,
                       calibration.describe(), keep_ends, block_distances=dict(enumerate(blocks)))


def choose_iteratively(teacher, calibration, k, keep_ends=True, progress=True):
    """Block influence, one layer at a time: after each removal the remaining stack is measured again."""
    from .same_arch import extract_same_architecture

    n = len(teacher_blocks(teacher))
    _check_count(n, k, keep_ends)
    kept, rounds, reasons = list(range(n)), [], {}
    first_scores = None
    while True:
        model = teacher if len(kept) == n else extract_same_architecture(teacher, kept)[0]
        scores = layer_scores(model, calibration, "block_influence", progress)
        by_layer = dict(zip(kept, scores))
        first_scores = first_scores or scores
        if len(kept) == k:
            rounds.append({"scores": by_layer, "dropped": None})
            break
        droppable = [layer for layer in kept if not _is_end(layer, n, keep_ends)]
        victim = min(droppable, key=lambda layer: (by_layer[layer], layer))
        rounds.append({"scores": by_layer, "dropped": victim})
        reasons[victim] = (f"dropped in round {len(rounds)}: lowest block influence of the {len(kept)} remaining "
                           f"layers ({by_layer[victim]:.4f})")
        kept.remove(victim)
    for layer in kept:
        reasons[layer] = _end_reason(layer, n) if _is_end(layer, n, keep_ends) else (
            f"kept: never the lowest in {len(rounds) - 1} rounds (last score {rounds[-1]['scores'][layer]:.4f})")
    return LayerChoice("block_influence", kept, first_scores, dict(sorted(reasons.items())), calibration.describe(),
                       keep_ends, iterative=True, rounds=rounds)


def choose_layers(teacher, calibration, strategy, k=None, keep_ends=True, iterative=False, progress=True):
    """The :class:`LayerChoice` of `strategy` (block_influence | angular) for a student of `k` layers (default:
    half the teacher's, as the fixed strategies)."""
    if strategy not in MEASURED_STRATEGIES:
        raise ValueError(f"Unknown measured strategy {strategy!r}; choose one of {', '.join(MEASURED_STRATEGIES)}.")
    if not isinstance(calibration, CalibrationSet):
        raise ValueError(f"Strategy {strategy!r} measures the teacher on calibration text: pass calibration= (a "
                         "CalibrationSet from extraction.load_calibration; --calibration_file on the command line).")
    n = len(teacher_blocks(teacher))
    k = max(1, n // 2) if k is None else k
    if strategy == "angular":
        if iterative:
            raise ValueError("iterative applies to strategy 'block_influence' (one layer removed per round); the "
                             "angular strategy removes one contiguous run in one go. Drop --iterative.")
        return choose_by_angular_distance(teacher, calibration, k, keep_ends, progress)
    if iterative:
        return choose_iteratively(teacher, calibration, k, keep_ends, progress)
    return choose_by_block_influence(teacher, calibration, k, keep_ends, progress)
