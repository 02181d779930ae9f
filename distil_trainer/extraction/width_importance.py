"""Activation-based importance of attention heads, MLP neurons and hidden channels (Minitron: Muralidharan et al.
2024, "Compact Language Models via Pruning and Knowledge Distillation"), from one pass over calibration text.

Per calibration sequence, a unit's activation magnitude is averaged over the sequence's non-padding tokens; the
per-sequence values are then combined by their L2 norm over the batch (Minitron's best aggregation: mean over the
sequence, L2 over the batch):

- head h: the L2 norm of the head's attention output (its slice of the output projection's input);
- neuron i: |input of the MLP output projection|_i, i.e. act(gate) * up for a GLU, act(W1 x) otherwise;
- hidden channel c: |output of a norm layer|_c, summed over every LayerNorm / RMSNorm of the body (embedding norm
  included) -- Minitron's LayerNorm-activation score for the embedding channels;
- where the head size must shrink (BERT, GPT-2, DistilBERT tie it to hidden_size / heads): dimension j of head h
  scores |q_j| x |k_j| for the query/key side and |attention output_j| for the value side (our extension:
  Minitron keeps the head size; these architectures cannot).
"""

from dataclasses import dataclass

import torch

from .blocks import find_blocks
from .calibration import DEFAULT_CALIBRATION_BATCH_SIZE
from .importance import _progress, run_body


@dataclass
class WidthScores:
    hidden: torch.Tensor  # [hidden]
    heads: list  # per layer: [num_heads]
    neurons: list  # per layer: [intermediate]
    qk_dims: list | None = None  # per layer: [num_heads, head_dim]
    v_dims: list | None = None  # per layer: [num_heads, head_dim]


class _Accumulator:
    """Sum over sequences of the squared per-sequence means: sqrt of it is the L2 over the batch."""

    def __init__(self):
        self.total = None

    def add(self, per_sequence):
        squared = per_sequence.double().pow(2).sum(0)
        self.total = squared if self.total is None else self.total + squared

    def value(self):
        return self.total.sqrt().float()


def _sequence_mean(values, mask):
    """[batch, positions, ...] -> [batch, ...]: the mean over each sequence's non-padding positions."""
    weights = mask.to(values.dtype).view(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1)


def _is_norm(module, width):
    weight = getattr(module, "weight", None)
    named_like_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
    return named_like_norm and weight is not None and tuple(weight.shape) == (width,)


class _Recorder:
    """Forward hooks that accumulate every score of one model; `mask` is set before each forward."""

    def __init__(self, model, layout, sizes, with_dims):
        self.mask, self.handles = None, []
        self.num_heads, self.head_dim = sizes["num_attention_heads"], sizes["head_dim"]
        _, blocks = find_blocks(model)
        self.heads = [_Accumulator() for _ in blocks]
        self.neurons = [_Accumulator() for _ in blocks]
        self.v_dims = [_Accumulator() for _ in blocks] if with_dims else None
        self.q_dims = [_Accumulator() for _ in blocks] if with_dims else None
        self.k_dims = [_Accumulator() for _ in blocks] if with_dims else None
        self.norms = []
        for i, block in enumerate(blocks):
            self._pre(block.get_submodule(layout.attention_output), self._on_heads(i))
            self._pre(block.get_submodule(layout.mlp_output), self._on_neurons(i))
            if with_dims:
                self._add_qk_hooks(block, layout, i)
        for module in model.base_model.modules():
            if _is_norm(module, sizes["hidden_size"]):
                self.norms.append(_Accumulator())
                self.handles.append(module.register_forward_hook(self._on_norm(self.norms[-1])))

    def _pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(lambda mod, args: fn(args[0])))

    def _per_head(self, x):
        return x.float().view(*x.shape[:2], -1, self.head_dim)  # [B, S, heads, head_dim]

    def _on_heads(self, i):
        def record(x):
            heads = self._per_head(x)
            self.heads[i].add(_sequence_mean(heads.norm(dim=-1), self.mask))
            if self.v_dims is not None:
                self.v_dims[i].add(_sequence_mean(heads.abs(), self.mask))
        return record

    def _on_neurons(self, i):
        return lambda x: self.neurons[i].add(_sequence_mean(x.float().abs(), self.mask))

    def _on_norm(self, acc):
        return lambda module, args, out: acc.add(_sequence_mean(out.float().abs(), self.mask))

    def _add_qk_hooks(self, block, layout, i):
        def store(acc):
            return lambda module, args, out: acc.add(_sequence_mean(self._per_head(out).abs(), self.mask))

        if layout.fused_qkv:
            width = self.num_heads * self.head_dim

            def fused(module, args, out):
                self.q_dims[i].add(_sequence_mean(self._per_head(out[..., :width]).abs(), self.mask))
                self.k_dims[i].add(_sequence_mean(self._per_head(out[..., width:2 * width]).abs(), self.mask))
            self.handles.append(block.get_submodule(layout.fused_qkv).register_forward_hook(fused))
        else:
            self.handles.append(block.get_submodule(layout.query).register_forward_hook(store(self.q_dims[i])))
            self.handles.append(block.get_submodule(layout.key).register_forward_hook(store(self.k_dims[i])))

    def scores(self):
        hidden = torch.stack([acc.value() for acc in self.norms]).sum(0)
        dims = self.v_dims is not None
        return WidthScores(
            hidden=hidden, heads=[a.value() for a in self.heads], neurons=[a.value() for a in self.neurons],
            qk_dims=[q.value() * k.value() for q, k in zip(self.q_dims, self.k_dims)] if dims else None,
            v_dims=[a.value() for a in self.v_dims] if dims else None)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def measure_width(model, layout, sizes, calibration, with_dims=False, progress=True,
                  batch_size=DEFAULT_CALIBRATION_BATCH_SIZE):
    """:class:`WidthScores` of `model` on `calibration` (one forward per batch, no LM head)."""
    recorder = _Recorder(model, layout, sizes, with_dims)
    if not recorder.norms:
        recorder.remove()
        raise ValueError(f"{type(model).__name__} has no LayerNorm/RMSNorm of width {sizes['hidden_size']}: the "
                         "hidden channels cannot be scored.")
    was_training = model.training
    model.eval()
    try:
        with _progress(calibration.num_batches(batch_size), "measuring widths", progress) as bar:
            for batch in calibration.batches(batch_size):
                recorder.mask = batch["attention_mask"].to(next(model.parameters()).device).bool()
                run_body(model, batch)
                bar.update(1)
    finally:
        recorder.remove()
        model.train(was_training)
    return recorder.scores()
