"""The distillation loss terms as small pure functions of tensors.

Every function takes a `reduction`: "mean" averages over the selected items, "sum" returns their sum, which
the trainer divides by the item count of the whole optimizer step (all micro-batches, all ranks) so that
gradient accumulation and data parallelism give the same gradients as one large batch.
Softmaxes and reductions run in fp32 whatever the logits' dtype.
"""

import torch
import torch.nn.functional as F


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.sum() / max(per_item.numel(), 1)
    raise ValueError(f"reduction={reduction!r}; use 'mean' or 'sum'.")


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of `x` (flattened to [N, D]) where `mask` (any shape matching x[..., 0]) is true."""
    flat = x.reshape(-1, x.shape[-1])
    if mask is None:
        return flat
    return flat[mask.reshape(-1).bool()]


def soft_target_kl(student_logits, teacher_logits, temperature, mask=None, reduction="mean"):
    """KL(softmax(t/T) || softmax(s/T)) * T^2 per selected row of the last dimension (L_ce).

    `student_logits`/`teacher_logits`: [..., C]; `mask`: [...] selecting rows (e.g. non-padding tokens).
    """
    s = _fp32(_select(student_logits, mask)) / temperature
    t = _fp32(_select(teacher_logits, mask)) / temperature
    per_row = (F.softmax(t, dim=-1) * (F.log_softmax(t, dim=-1) - F.log_softmax(s, dim=-1))).sum(-1)
    return _reduce(per_row * temperature**2, reduction)


def span_soft_target_kl(student_start, student_end, teacher_start, teacher_end, temperature, mask=None,
                        reduction="mean"):
    """L_ce for extractive QA: per example, the mean of the start and end KL over sequence positions.

    Logits are [B, L]; `mask` [B, L] marks the candidate positions (context and [CLS]); the others are removed
    from both softmaxes, so padding and the question carry no probability mass.
    """
    per_example = (_position_kl(student_start, teacher_start, temperature, mask)
                   + _position_kl(student_end, teacher_end, temperature, mask)) / 2
    return _reduce(per_example, reduction)


# Added to the scaled logits of excluded positions: exp() of it is exactly 0 in fp32, yet it stays finite, so
# neither the loss nor its gradient can turn into nan (as -inf would in 0 * inf).
_EXCLUDED = -1e9


def _position_kl(student_logits, teacher_logits, temperature, mask):
    """Per-row KL(softmax(t/T) || softmax(s/T)) * T^2 for [B, L] logits, over the positions in `mask`."""
    s = _fp32(student_logits) / temperature
    t = _fp32(teacher_logits) / temperature
    if mask is not None:
        s = s.masked_fill(~mask.bool(), _EXCLUDED)
        t = t.masked_fill(~mask.bool(), _EXCLUDED)
    return (F.softmax(t, dim=-1) * (F.log_softmax(t, dim=-1) - F.log_softmax(s, dim=-1))).sum(-1) * temperature**2


def logit_mse(student_logits, teacher_logits, mask=None, reduction="mean"):
    """Squared logit difference summed over the last dimension, per selected row (L_mse)."""
    diff = _fp32(_select(student_logits, mask)) - _fp32(_select(teacher_logits, mask))
    return _reduce(diff.pow(2).sum(-1), reduction)


def hidden_cosine(student_hidden, teacher_hidden, mask=None, reduction="mean"):
    """1 - cos(h_s, h_t) per selected token of the last hidden states (L_cos)."""
    s = _fp32(_select(student_hidden, mask))
    t = _fp32(_select(teacher_hidden, mask))
    return _reduce(1.0 - F.cosine_similarity(s, t, dim=-1), reduction)


def masked_lm_loss(student_logits, labels, reduction="mean"):
    """Cross-entropy at the positions whose label is not -100 (L_mlm)."""
    per_token = F.cross_entropy(_fp32(student_logits.reshape(-1, student_logits.shape[-1])), labels.reshape(-1),
                                ignore_index=-100, reduction="none")
    return _reduce(per_token[labels.reshape(-1) != -100], reduction)


def causal_lm_loss(student_logits, labels, reduction="mean"):
    """Next-token cross-entropy: logits at t predict labels at t+1; -100 labels (padding) are ignored (L_clm)."""
    return masked_lm_loss(student_logits[..., :-1, :], labels[..., 1:], reduction)


def top1_agreement(student_logits, teacher_logits, mask=None):
    """(number of selected rows where the arg-max agrees, number of selected rows)."""
    # Arg-max first, then select: selecting first would copy both [rows, vocab] logit tensors.
    agree = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    if mask is not None:
        agree = agree[mask.bool()]
    return agree.sum(), agree.numel()
