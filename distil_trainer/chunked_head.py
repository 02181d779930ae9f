"""`logits_chunk_size` in training: the LM-head terms from the features the heads project, a chunk at a time.

Each model's forward runs with its LM head (output embedding) passed through (`features_only`), so the forward's
`logits` are the [..., D] features the head would project and no [tokens x vocab] tensor is built, for causal and
masked LMs alike (a masked-LM head's transform, dense + norm, still runs: it is not vocabulary-sized). The loss then
projects only the positions a term reads with `losses.fused_head_terms`, which computes each chunk's gradient in
the forward pass. The item counts of the optimizer step are known before the forward, so the per-term
coefficients (weight / count) are too.
"""

import contextlib

import torch

from . import losses
from .model_utils import CAUSAL_LM, head_kind, unwrap


def _passing_through(head):
    """A forward for `head` that returns its input. The head still projects zero rows, so its weight and bias stay
    on the forward's graph at no cost: DDP (which by default looks for parameters the forward left unused) then
    expects their gradients, which the loss gives them later."""
    project = type(head).forward

    def forward(features):
        return features + project(head, features.reshape(-1, features.shape[-1])[:0]).sum().to(features.dtype)

    return forward


@contextlib.contextmanager
def features_only(model):
    """While active, `model`'s output embedding returns its input, so the forward's `logits` are the head's
    features. The instance attribute shadows the class's forward (a hook, e.g. accelerate's, is put back after)."""
    head = unwrap(model).get_output_embeddings()
    hooked = head.__dict__.get("forward")
    head.forward = _passing_through(head)
    try:
        yield
    finally:
        if hooked is None:
            del head.forward
        else:
            head.forward = hooked


def head_features(model, output):
    """The features `model`'s LM head projects, from a forward run under `features_only`."""
    head = unwrap(model).get_output_embeddings()
    features = output.logits
    if features.shape[-1] != head.weight.shape[1]:
        raise ValueError(f"logits_chunk_size: {type(unwrap(model)).__name__}'s forward returned logits of width "
                         f"{features.shape[-1]} with its LM head passed through, not the head's input width "
                         f"{head.weight.shape[1]}: its forward does not project with get_output_embeddings(). "
                         "Set logits_chunk_size=None.")
    return features


def head_loss(student, teacher, student_out, teacher_out, labels, kl_mask, coefficients, args, shared_vocab):
    """(loss, {"ce", "mse", "clm"/"mlm": detached sums}, agreement or None) of the weighted LM-head terms.

    `coefficients`: {term: weight x scale / item count of the step} for the terms to compute ("ce", "mse",
    "clm" or "mlm"); `kl_mask` selects the positions of L_ce/L_mse; `labels` those of the LM loss (shifted by one
    for a causal LM: the logits at t are scored on the token at t + 1).
    """
    lm_term = "clm" if head_kind(student) == CAUSAL_LM else "mlm"
    targets = None
    if lm_term in coefficients:
        targets = labels
        if lm_term == "clm":
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    has_teacher = teacher_out is not None and ("ce" in coefficients or "mse" in coefficients)
    if not has_teacher:
        kl_mask = torch.zeros_like(kl_mask)
    head = unwrap(student).get_output_embeddings()
    coefs = {("lm" if k == lm_term else k): c for k, c in coefficients.items()}
    loss, sums = losses.fused_head_terms(
        head_features(student, student_out), head_features(teacher, teacher_out) if has_teacher else None,
        head.weight, head.bias, unwrap(teacher).get_output_embeddings() if has_teacher else None,
        args.temperature, coefs, kl_mask=kl_mask, targets=targets, chunk_size=args.logits_chunk_size,
        vocab=shared_vocab, divergence=args.divergence, jsd_beta=args.jsd_beta)
    named = {k: sums["lm" if k == lm_term else k] for k in coefficients}
    agreement = (sums["agree"], kl_mask.sum()) if has_teacher else None
    return loss, named, agreement
