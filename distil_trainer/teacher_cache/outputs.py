"""The teacher's outputs for a batch, read from the cached tensors the collator made instead of a forward pass."""

from dataclasses import dataclass

import torch

from .. import losses
from .collator import HIDDEN_PREFIX

TEACHER_KEY_PREFIX = "teacher_"


@dataclass
class CachedTeacherOutput:
    """What `DistillationTrainer._term_sums` reads of a teacher's output. `hidden_states[i]` is None for a layer the
    cache did not store; the last entry is the highest stored layer. LM caches give `topk_ids`/`topk_logits`, and
    `logits` (dense, scattered from a top-k over the whole vocabulary) only when a term needs every logit."""

    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None


def cached_teacher_output(inputs, vocab_size=None, dense=False):
    """`CachedTeacherOutput` from a collated batch; `dense`: scatter the top-k (k = `vocab_size`) into full logits."""
    out = CachedTeacherOutput(logits=inputs.get("teacher_logits"), start_logits=inputs.get("teacher_start_logits"),
                              end_logits=inputs.get("teacher_end_logits"),
                              topk_ids=inputs.get("teacher_topk_ids"), topk_logits=inputs.get("teacher_topk_logits"))
    if dense and out.topk_ids is not None:
        full = out.topk_logits.new_zeros(*out.topk_ids.shape[:-1], vocab_size)
        out.logits = full.scatter(-1, out.topk_ids, out.topk_logits)
        out.topk_ids = out.topk_logits = None
    layers = {int(k[len(HIDDEN_PREFIX):]): v for k, v in inputs.items() if k.startswith(HIDDEN_PREFIX)}
    if layers:
        out.hidden_states = tuple(layers.get(i) for i in range(max(layers) + 1))
    return out


def topk_kl_sums(student_logits, teacher_out, temperature, mask, vocab_size=None, teacher_wider=False):
    """({"ce": summed top-k KL}, (top-1 agreements, positions)) over the positions in `mask`, over the first
    `vocab_size` vocabulary entries (None: all). `teacher_wider`: the cache spans more entries than that (a student
    head padded narrower than the teacher's); its stored ids past the range are left out of the top k, whose
    remaining logits are renormalised, as the online KL over the shared range is."""
    topk_ids, topk_logits = teacher_out.topk_ids, teacher_out.topk_logits
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        if teacher_wider:
            topk_ids, topk_logits = within_range(topk_ids, topk_logits, vocab_size)
    kl = losses.topk_soft_target_kl(student_logits, topk_ids, topk_logits, temperature, mask=mask, reduction="sum")
    return {"ce": kl}, losses.topk_agreement(student_logits.detach(), topk_ids, mask=mask)


def within_range(topk_ids, topk_logits, vocab_size):
    """The top-k restricted to ids < vocab_size: the others get logit -inf (no mass) and go last, so that the first
    id is still the top-1 in range."""
    outside = topk_ids >= vocab_size
    logits = topk_logits.masked_fill(outside, float("-inf"))
    order = torch.argsort(logits, dim=-1, descending=True, stable=True)
    ids = topk_ids.masked_fill(outside, 0)  # a valid index; its logit is -inf
    return ids.gather(-1, order), logits.gather(-1, order)


def is_teacher_key(key):
    return key.startswith(TEACHER_KEY_PREFIX)
