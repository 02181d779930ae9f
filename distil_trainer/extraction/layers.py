"""Which teacher layers a student keeps: an explicit list, or a named strategy.

Strategies, for a teacher with ``n`` layers and a student with ``k`` (0-based indices, always increasing):

- ``every_other``: ``0, 2, 4, ...`` -- every second layer starting at the first, i.e. ``range(0, n, 2)``;
  ``k`` is then ``ceil(n / 2)`` (a different ``k`` is an error).
- ``uniform``: ``floor(i * (n - 1) / (k - 1) + 0.5)`` for ``i = 0 .. k-1`` -- ``k`` layers evenly spread from the
  first to the last, rounding halves up. For ``n=12, k=6`` this is DistilBERT's ``0, 2, 4, 7, 9, 11``.
  ``k=1`` gives ``[0]``.
- ``first``: ``0 .. k-1``.
- ``last``: ``n-k .. n-1``.

With neither a list nor a strategy, ``uniform`` with ``k = n // 2`` is used (DistilBERT's choice for BERT-base).
"""

import math
from fractions import Fraction

STRATEGIES = ("every_other", "uniform", "first", "last")
DEFAULT_STRATEGY = "uniform"


def _uniform(n, k):
    if k == 1:
        return [0]
    # Exact rational arithmetic so ties (x.5) always round up, whatever the float error.
    return [math.floor(Fraction(i * (n - 1), k - 1) + Fraction(1, 2)) for i in range(k)]


def select_layers(num_teacher_layers, strategy=DEFAULT_STRATEGY, k=None):
    """Indices of the teacher layers to keep under `strategy` (see the module docstring for the rules).

    `k` is the number of student layers; it defaults to ``num_teacher_layers // 2`` (``ceil(n/2)`` for
    ``every_other``).
    """
    n = num_teacher_layers
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"The teacher must have at least one layer (got num_teacher_layers={n!r}).")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown layer strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if strategy == "every_other":
        chosen = list(range(0, n, 2))
        if k is not None and k != len(chosen):
            raise ValueError(
                f"Strategy 'every_other' keeps {len(chosen)} of {n} teacher layers, but num_layers={k} was asked; "
                f"drop num_layers, or use strategy 'uniform' for {k} evenly spread layers."
            )
        return chosen
    if k is None:
        k = max(1, n // 2)
    if not isinstance(k, int) or k < 1 or k > n:
        raise ValueError(
            f"num_layers must be between 1 and the teacher's {n} layers (got {k!r}); pass a value in that range."
        )
    if strategy == "uniform":
        return _uniform(n, k)
    if strategy == "first":
        return list(range(k))
    return list(range(n - k, n))  # "last"


def parse_layer_list(text):
    """'0,2,4' -> [0, 2, 4], with an error naming the bad item."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(int(item))
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers like 0,2,4 (bad item {item!r}).") from None
    return out


def check_layers(layers, num_teacher_layers):
    """Validate an explicit layer list: non-empty, integers in range, no duplicates, increasing. Returns a list."""
    n = num_teacher_layers
    layers = list(layers)
    if not layers:
        raise ValueError("The layer list is empty; give at least one teacher layer index, e.g. layers=[0, 2, 4].")
    bad_type = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    if bad_type:
        raise ValueError(f"Layer indices must be integers (got {bad_type!r}).")
    out_of_range = [x for x in layers if not 0 <= x < n]
    if out_of_range:
        raise ValueError(
            f"Layer indices {out_of_range} are out of range: the teacher has {n} layers, so valid indices are "
            f"0..{n - 1}. Pass indices in that range."
        )
    duplicates = sorted({x for x in layers if layers.count(x) > 1})
    if duplicates:
        raise ValueError(f"Layer indices {duplicates} appear more than once in {layers}; list each layer once.")
    if layers != sorted(layers):
        # Order is the student's depth order; a shuffled list is almost surely a typo, so refuse rather than guess.
        raise ValueError(
            f"Layer indices {layers} are not in increasing order; pass them sorted, e.g. {sorted(layers)}."
        )
    return layers


def resolve_layers(num_teacher_layers, layers=None, strategy=None, num_layers=None):
    """The final layer list from the user's choices (explicit list XOR strategy; num_layers must agree)."""
    if layers is not None and strategy is not None:
        raise ValueError(
            f"Give either an explicit layer list ({list(layers)}) or a strategy ({strategy!r}), not both."
        )
    if layers is not None:
        layers = check_layers(layers, num_teacher_layers)
        if num_layers is not None and num_layers != len(layers):
            raise ValueError(
                f"num_layers={num_layers} disagrees with the {len(layers)} layers listed ({layers}); "
                "drop num_layers or fix the list."
            )
        return layers
    return select_layers(num_teacher_layers, strategy or DEFAULT_STRATEGY, num_layers)
