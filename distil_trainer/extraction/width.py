"""A narrower student sliced from a model's own weights: the most important hidden channels, attention heads (or
GQA key-value groups with their query heads) and MLP neurons are kept, the rest removed from every matrix, norm,
embedding and (tied) LM head (Minitron's width pruning; importance from `width_importance`).

Rules:
- Hidden channels are one global set (the residual stream is shared); heads, neurons and head dimensions are chosen
  per layer, the same number in every layer. Kept indices stay in their original order.
- Llama-family configs carry ``head_dim``: heads go whole and ``head_dim`` is written into the student's config, so
  it stays the teacher's whatever hidden_size becomes. Under GQA, heads go by key-value group (a group's score is
  the sum of its query heads'): num_attention_heads must be a multiple of the group size.
- BERT, RoBERTa, DistilBERT and GPT-2 derive the head size as hidden_size / num_attention_heads. Whole heads go
  first (by score); when the new head size is smaller, each kept head also keeps its most important query/key
  dimensions and value dimensions, and the query projection is multiplied by sqrt(new / old head size) so that the
  attention logits keep the teacher's 1/sqrt(old head size) scale.
- A norm over fewer hidden channels normalises with other statistics, so a student narrower in hidden_size does not
  reproduce the teacher exactly (Minitron accepts this and heals it by distillation); with every size unchanged,
  the student is the teacher, tensor for tensor.
"""

import math
import re
from dataclasses import dataclass, field

import torch

from .copying import load_into_student
from .width_importance import measure_width
from .width_layout import layout_of, sizes_of

TARGETS = ("hidden_size", "num_attention_heads", "intermediate_size")


@dataclass
class WidthPlan:
    hidden: torch.Tensor
    layers: list  # per layer: {"q", "k", "v", "attn", "ffn": LongTensor of kept indices, "heads": kept heads}
    query_scale: float = 1.0
    sizes: dict = field(default_factory=dict)  # the student's sizes (generic names, head_dim included)


def _top(scores, k):
    """Indices of the `k` largest scores (ties: the lower index), in increasing order."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def _rows(units, per_unit, size):
    """Flat indices of `per_unit[u]` (dimension indices) inside each kept unit u of width `size`."""
    return torch.cat([u * size + per_unit[i] for i, u in enumerate(units.tolist())]) if len(units) else \
        torch.zeros(0, dtype=torch.long)


def check_targets(layout, teacher_sizes, targets):
    """The student's sizes (generic names) from the requested targets, or a clear error."""
    sizes = dict(teacher_sizes)
    for name, value in targets.items():
        if value is None:
            continue
        if not isinstance(value, int) or not 1 <= value <= teacher_sizes[name]:
            raise ValueError(f"{name}={value!r}: width pruning keeps between 1 and the teacher's "
                             f"{teacher_sizes[name]}; pass a value in that range.")
        sizes[name] = value
    heads, kv_heads = sizes["num_attention_heads"], teacher_sizes["num_key_value_heads"]
    group = teacher_sizes["num_attention_heads"] // kv_heads
    if layout.explicit_head_dim:
        if heads % group:
            raise ValueError(f"num_attention_heads={heads}: the teacher shares each key-value head among {group} "
                             f"query heads (GQA), so heads go by whole groups; pass a multiple of {group}.")
        if sizes["hidden_size"] % heads:
            # The model would run (it reads head_dim), but transformers' config validation refuses it.
            below = sizes["hidden_size"] - sizes["hidden_size"] % heads
            raise ValueError(f"hidden_size={sizes['hidden_size']} is not a multiple of num_attention_heads={heads}, "
                             f"which the {layout.family} config requires (transformers checks it); pass e.g. "
                             f"hidden_size={below} or {below + heads}.")
        sizes["num_key_value_heads"] = heads // group
        return sizes
    head_dim, teacher_head_dim = sizes["hidden_size"] // heads, teacher_sizes["head_dim"]
    if sizes["hidden_size"] % heads or head_dim > teacher_head_dim:
        raise ValueError(
            f"{layout.family} sets the head size to hidden_size / num_attention_heads, which must be a whole number "
            f"no larger than the teacher's {teacher_head_dim}: hidden_size={sizes['hidden_size']} with "
            f"num_attention_heads={heads} does not fit. Pass num_attention_heads x head size = hidden_size, e.g. "
            f"hidden_size={heads * teacher_head_dim} for {heads} heads of {teacher_head_dim}.")
    sizes["head_dim"], sizes["num_key_value_heads"] = head_dim, heads
    return sizes


def _layer_plan(scores, layer, teacher_sizes, sizes):
    """Kept indices of one layer for every index kind."""
    d, new_d = teacher_sizes["head_dim"], sizes["head_dim"]
    group = teacher_sizes["num_attention_heads"] // teacher_sizes["num_key_value_heads"]
    head_scores = scores.heads[layer]
    group_scores = head_scores.view(-1, group).sum(-1)
    kv_kept = _top(group_scores, sizes["num_key_value_heads"])
    heads_kept = torch.cat([g * group + torch.arange(group) for g in kv_kept.tolist()]) if len(kv_kept) else kv_kept
    if new_d < d:  # tied head size (no GQA there): each kept head keeps its best dimensions
        qk = [_top(scores.qk_dims[layer][h], new_d) for h in heads_kept.tolist()]
        v = [_top(scores.v_dims[layer][h], new_d) for h in heads_kept.tolist()]
    else:
        qk = v = [torch.arange(d)] * len(heads_kept)
    kv_of_head = {h: pos // group for pos, h in enumerate(heads_kept.tolist())}
    v_by_kv = [v[i * group] for i in range(len(kv_kept))] if group > 1 else v
    return {"heads": heads_kept, "kv_heads": kv_kept,
            "q": _rows(heads_kept, qk, d), "k": _rows(kv_kept, qk[::group] if group > 1 else qk, d),
            "v": _rows(kv_kept, v_by_kv, d),
            "attn": _rows(heads_kept, [v_by_kv[kv_of_head[h]] for h in heads_kept.tolist()], d),
            "ffn": _top(scores.neurons[layer], sizes["intermediate_size"])}


def plan_width(scores, teacher_sizes, sizes):
    """The :class:`WidthPlan` keeping the highest-scoring units for `sizes`."""
    layers = [_layer_plan(scores, i, teacher_sizes, sizes) for i in range(len(scores.heads))]
    scale = math.sqrt(sizes["head_dim"] / teacher_sizes["head_dim"])
    return WidthPlan(hidden=_top(scores.hidden, sizes["hidden_size"]), layers=layers, query_scale=scale,
                     sizes=sizes)


def _indices(kind, plan, layer, attention_width):
    if kind == "hidden":
        return plan.hidden
    part = plan.layers[layer]
    if kind == "qkv":  # GPT-2's fused [queries | keys | values]
        return torch.cat([part["q"], attention_width + part["k"], 2 * attention_width + part["v"]])
    return part[kind]


def slice_tensor(name, tensor, layout, plan, attention_width):
    """`tensor` with the plan's kept indices along each dimension (its rule names them), query scale applied."""
    for pattern, kinds in layout.rules:
        match = re.fullmatch(pattern, name)
        if match:
            break
    else:
        return None
    if len(kinds) != tensor.dim():
        raise RuntimeError(f"Width rule for {name} names {len(kinds)} dimensions; the tensor has {tensor.dim()}.")
    layer = int(match.group("layer")) if "layer" in match.groupdict() else None
    out = tensor
    for dim, kind in enumerate(kinds):
        if kind is not None:
            out = out.index_select(dim, _indices(kind, plan, layer, attention_width).to(out.device))
    if plan.query_scale != 1.0 and ("q" in kinds or "qkv" in kinds):
        out = out.clone()
        if "q" in kinds:
            out.mul_(plan.query_scale)
        else:  # only the query part of the fused projection
            n_q = len(plan.layers[layer]["q"])
            out.narrow(kinds.index("qkv"), 0, n_q).mul_(plan.query_scale)
    return out


def narrow_config(config, layout, sizes):
    values = config.to_dict()
    for name, key in layout.config_keys.items():
        values[key] = sizes[name]
    if layout.explicit_head_dim:
        values["head_dim"] = sizes["head_dim"]  # stays the teacher's: heads go whole
    values.pop("quantization_config", None)
    return type(config).from_dict(values)


def slice_model(model, plan, layout):
    """The narrower model of the plan: a new model of the same class whose every tensor is sliced from `model`'s."""
    teacher_sizes = sizes_of(model.config, layout)
    attention_width = teacher_sizes["num_attention_heads"] * teacher_sizes["head_dim"]
    tensors, unknown = {}, []
    for name, tensor in model.state_dict().items():
        sliced = slice_tensor(name, tensor, layout, plan, attention_width)
        if sliced is None:
            unknown.append(name)
        else:
            tensors[name] = sliced
    if unknown:
        raise ValueError(f"Width pruning has no rule for these {layout.family} tensors: {unknown[:8]}; this model "
                         "class is not supported (supported: the MLM / causal-LM models of the listed families).")
    student = type(model)._from_config(narrow_config(model.config, layout, plan.sizes),
                                       attn_implementation=model.config._attn_implementation, dtype=model.dtype)
    load_into_student(student, tensors, random_keys=())
    return student.eval()


def prune_width(model, calibration, hidden_size=None, num_attention_heads=None, intermediate_size=None,
                progress=True):
    """(narrower model, record): `model` pruned to the given widths (None keeps a size) by activation importance
    measured on `calibration`. The record holds the sizes before/after and every kept index."""
    layout = layout_of(model)
    teacher_sizes = sizes_of(model.config, layout)
    sizes = check_targets(layout, teacher_sizes, {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
                                                  "num_attention_heads": num_attention_heads})
    with_dims = sizes["head_dim"] < teacher_sizes["head_dim"]
    scores = measure_width(model, layout, teacher_sizes, calibration, with_dims=with_dims, progress=progress)
    plan = plan_width(scores, teacher_sizes, sizes)
    student = slice_model(model, plan, layout)
    return student, width_record(plan, teacher_sizes, calibration, model, student, layout)


def width_record(plan, teacher_sizes, calibration, model, student, layout):
    changed = {k: [teacher_sizes[k], plan.sizes[k]] for k in (*layout.config_keys, "head_dim")}
    return {
        "method": "activation importance (Minitron): mean over each sequence's tokens, L2 over the sequences",
        "calibration": calibration.describe(),
        "sizes": changed,
        "query_scale": plan.query_scale,
        "parameters": [model.num_parameters(), student.num_parameters()],
        "kept": {"hidden": plan.hidden.tolist(),
                 "heads": {i: p["heads"].tolist() for i, p in enumerate(plan.layers)},
                 "neurons": {i: p["ffn"].tolist() for i, p in enumerate(plan.layers)}},
    }
