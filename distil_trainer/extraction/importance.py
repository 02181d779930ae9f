"""How much each transformer block (or run of blocks) changes its input, measured on calibration text.

Boundary b of a model with L blocks is the hidden state entering block b (b = 0 .. L-1) or, for b = L, leaving the
last block. Forward hooks read them (a pre-hook on block 0, a hook on every block's output), so the last boundary is
the last block's own output: `output_hidden_states` gives the output of the final norm there for GPT-2 and Llama
(measured: they differ), which is not what the block did.

For a run of n blocks starting at block l, per non-padding token t with x = boundary l and y = boundary l + n:

- ``block_influence``: 1 - cos(x_t, y_t)            (ShortGPT's Block Influence, Men et al. 2024; n = 1)
- ``angular``: arccos(cos(x_t, y_t)) / pi            (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
                                                      Deeper Layers")

each averaged over all non-padding tokens of the calibration set (every token counts once). Gromov et al. read the
final token of each sequence only; the mean over all tokens uses every calibration token and also suits encoders,
whose final token is [SEP].
"""

import contextlib
import math

import torch

from ..model_utils import forward_arguments
from .blocks import find_blocks
from .calibration import DEFAULT_CALIBRATION_BATCH_SIZE

METRICS = ("block_influence", "angular")


def _first_tensor(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return args[0]
    for name in ("hidden_states", "x", "hidden_state"):
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    raise RuntimeError("Could not find the hidden states a transformer block was called with; this architecture is "
                       "not supported by the layer measurements.")


@contextlib.contextmanager
def recording_boundaries(model):
    """Within the block, each forward of `model` appends its L+1 boundary states to the yielded list (reset it
    between forwards)."""
    _, blocks = find_blocks(model)
    states = []

    def enter(module, args, kwargs):
        states.append(_first_tensor(args, kwargs).detach())

    def leave(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [blocks[0].register_forward_pre_hook(enter, with_kwargs=True)]
    handles += [block.register_forward_hook(leave) for block in blocks]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def run_body(model, batch):
    """The model's body (no LM head: not needed) on a calibration batch, on the model's device."""
    body = model.base_model
    device = next(model.parameters()).device
    accepted = forward_arguments(body)
    inputs = {k: v.to(device) for k, v in batch.items() if k in accepted}
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return body(**inputs)


def pair_distance(x, y, metric):
    """Per-position distance between two [batch, positions, width] states, in float32."""
    cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
    if metric == "block_influence":
        return 1.0 - cos
    if metric == "angular":
        return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    raise ValueError(f"Unknown layer metric {metric!r}; choose one of {', '.join(METRICS)}.")


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled)


@torch.no_grad()
def boundary_distances(model, calibration, spans, metric, progress=True,
                       batch_size=DEFAULT_CALIBRATION_BATCH_SIZE):
    """{n: [d_0 .. d_{L-n}]} for each span n in `spans`: the mean over the calibration set's non-padding tokens of
    the distance between boundaries l and l + n (one forward per batch, every span from the same pass)."""
    _, blocks = find_blocks(model)
    num_blocks = len(blocks)
    bad = [n for n in spans if not 1 <= n <= num_blocks]
    if bad:
        raise ValueError(f"Block spans {bad} do not fit a model of {num_blocks} blocks.")
    sums = {n: torch.zeros(num_blocks - n + 1, dtype=torch.float64) for n in spans}
    count = 0
    was_training = model.training
    model.eval()
    try:
        with recording_boundaries(model) as states, \
                _progress(calibration.num_batches(batch_size), f"measuring layers ({metric})", progress) as bar:
            for batch in calibration.batches(batch_size):
                states.clear()
                run_body(model, batch)
                if len(states) != num_blocks + 1:
                    raise RuntimeError(f"Expected {num_blocks + 1} block boundaries per forward, saw {len(states)}.")
                keep = batch["attention_mask"].to(states[0].device).bool()
                for n, acc in sums.items():
                    for start in range(num_blocks - n + 1):
                        acc[start] += pair_distance(states[start], states[start + n], metric)[keep].double().sum()
                count += int(keep.sum())
                bar.update(1)
    finally:
        model.train(was_training)
    return {n: (acc / count).tolist() for n, acc in sums.items()}


def layer_scores(model, calibration, metric="block_influence", progress=True):
    """One score per block: its input-output distance under `metric` (for ``block_influence``, ShortGPT's BI)."""
    return boundary_distances(model, calibration, [1], metric, progress)[1]
