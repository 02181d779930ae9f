"""The fused LM-head path of training: how each model's forward hands over its LM head's features instead of
logits, whether the path applies, and the weighted head terms from those features (`fused_head`).

It is the default for masked- and causal-LM students in training (`logits_chunk_size=None`: a chunk size chosen from
the vocabulary): each model's forward runs with its output embedding passed through (`features_only`), so no
[tokens x vocab] tensor is built, and the loss projects only the positions a term reads, a chunk at a time, with the
teacher's logits from its own head or from a teacher-output cache. Full logits stay for evaluation, task heads,
FSDP / DeepSpeed ZeRO-3 (which hold only a shard of each head outside the forward), heads that rescale their logits,
and `logits_chunk_size=0`.
"""

import contextlib
import logging

import torch

from .checks import check_chunked_head
from .fused_head import TeacherRows, auto_chunk_size, fused_head_terms
from .model_utils import CAUSAL_LM, LM_HEADS, head_kind, unwrap, vocab_size

logger = logging.getLogger(__name__)
_HEAD_TERMS = ("ce", "mse", "mlm", "clm")


def training_chunk_size(student, teacher, args, sharded, device_type):
    """Rows per chunk of the fused LM-head loss in training, or None for full logits.

    `teacher`: the teacher model, or None when its outputs come from a cache; `sharded`: FSDP or ZeRO-3 (the heads
    are shards outside the forward). An explicit `logits_chunk_size` where the path cannot apply is refused; the
    default (None) falls back to full logits there, saying why."""
    setting = args.logits_chunk_size
    if setting == 0 or not any(t in args.loss_weights for t in _HEAD_TERMS):
        return None
    if setting is None and head_kind(student) not in LM_HEADS:
        return None
    try:
        if sharded:
            raise ValueError("FSDP and DeepSpeed ZeRO-3 hold only a shard of each LM head outside the models' "
                             "forward; use DDP or ZeRO-1/2, or set logits_chunk_size=0.")
        check_chunked_head(student, student if teacher is None else teacher, args)
    except ValueError as err:
        if setting is not None:
            raise
        logger.info("LM-head terms from full logits: %s", err)
        return None
    return setting or auto_chunk_size(vocab_size(student), device_type)


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
                         "Set logits_chunk_size=0 (full logits).")
    return features


def head_loss(student, student_out, teacher_rows, labels, kl_mask, coefficients, args, shared_vocab, chunk_size):
    """(loss, {"ce", "mse", "clm"/"mlm": detached sums}, agreement or None) of the weighted LM-head terms.

    `teacher_rows`: the teacher's `TeacherRows` (its head on its features, or a cache's logits), or None when no
    teacher term is weighted; `coefficients`: {term: weight x scale / item count of the step} for the terms to
    compute ("ce", "mse", "clm" or "mlm"); `kl_mask` selects the positions of L_ce/L_mse (none without teacher rows);
    `labels` those of the LM loss (shifted by one for a causal LM: the logits at t are scored on the token at t + 1).
    """
    lm_term = "clm" if head_kind(student) == CAUSAL_LM else "mlm"
    targets = None
    if lm_term in coefficients:
        targets = labels
        if lm_term == "clm":
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    head = unwrap(student).get_output_embeddings()
    coefs = {("lm" if k == lm_term else k): c for k, c in coefficients.items()}
    loss, sums = fused_head_terms(head_features(student, student_out), teacher_rows, head.weight, head.bias,
                                  args.temperature, coefs, kl_mask=kl_mask, targets=targets, chunk_size=chunk_size,
                                  vocab=shared_vocab, divergence=args.divergence, jsd_beta=args.jsd_beta)
    named = {k: sums["lm" if k == lm_term else k] for k in coefficients}
    agreement = (sums["agree"], kl_mask.sum()) if teacher_rows is not None else None
    return loss, named, agreement


def online_teacher_rows(teacher, teacher_out):
    """The teacher's `TeacherRows` from a forward run under `features_only`: its own head on its features."""
    return TeacherRows(features=head_features(teacher, teacher_out), head=unwrap(teacher).get_output_embeddings())
