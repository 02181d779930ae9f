"""L_ce, L_mse, the LM losses and the top-1 agreement from full logits: what the trainer computes where the fused
LM-head path does not apply (task heads, evaluation, FSDP / ZeRO-3, heads it cannot project, `logits_chunk_size=0`).
Each function returns {term: sum over its items in the micro-batch} and the agreement (count, items) or None."""

from . import losses
from .model_utils import LM_HEADS, QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION


def teacher_logit_sums(head, weights, args, logits_mask, student_out, teacher_out, shared_vocab, cache=None):
    """({"ce", "mse"} sums for the weighted ones, agreement) between the student's and the teacher's logits.

    `head`: the student's head kind; `logits_mask` [B, L]: the positions of the token-level terms (None is never
    passed: sequence classification ignores it); `cache`: the `CacheTraining` of a teacher-output cache, whose
    top-k outputs give L_ce only."""
    T = args.temperature
    if getattr(teacher_out, "topk_ids", None) is not None:  # an LM teacher cache's top k
        return cache.topk_sums(student_out.logits, teacher_out, T, logits_mask)
    if head == QUESTION_ANSWERING:
        return _span_sums(weights, args, logits_mask, student_out, teacher_out)
    s_logits, t_logits = student_out.logits, teacher_out.logits
    if shared_vocab is not None and head in LM_HEADS:  # one tokenizer, vocabularies padded apart
        s_logits, t_logits = s_logits[..., :shared_vocab], t_logits[..., :shared_vocab]
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"Teacher logits {tuple(t_logits.shape)} and student logits {tuple(s_logits.shape)} differ "
                         "in shape; they must match position by position.")
    mask = None if head == SEQUENCE_CLASSIFICATION else logits_mask
    sums = {}
    if "ce" in weights:
        sums["ce"] = losses.soft_target_divergence(s_logits, t_logits, T, mask=mask, reduction="sum",
                                                   divergence=args.divergence, jsd_beta=args.jsd_beta)
    if "mse" in weights:
        sums["mse"] = losses.logit_mse(s_logits, t_logits, mask=mask, reduction="sum")
    return sums, losses.top1_agreement(s_logits.detach(), t_logits, mask=mask)


def _span_sums(weights, args, mask, student_out, teacher_out):
    """Extractive QA: L_ce / L_mse of the start and end logits over the candidate positions `mask`."""
    sums = {}
    if "ce" in weights:
        sums["ce"] = losses.span_soft_target_kl(student_out.start_logits, student_out.end_logits,
                                                teacher_out.start_logits, teacher_out.end_logits, args.temperature,
                                                mask=mask, reduction="sum", divergence=args.divergence,
                                                jsd_beta=args.jsd_beta)
    if "mse" in weights:
        sums["mse"] = sum(losses.logit_mse(getattr(student_out, k).masked_fill(~mask, 0),
                                           getattr(teacher_out, k).masked_fill(~mask, 0), reduction="sum")
                          for k in ("start_logits", "end_logits")) / 2
    agree = sum(losses.top1_agreement(getattr(student_out, k).masked_fill(~mask, -1e9),
                                      getattr(teacher_out, k).masked_fill(~mask, -1e9))[0]
                for k in ("start_logits", "end_logits"))
    return sums, (agree, 2 * mask.shape[0])


def lm_loss_sums(weights, student_logits, labels):
    """{"mlm" / "clm": summed cross-entropy} of the student's own LM loss, for the weighted one."""
    sums = {}
    if "mlm" in weights:
        sums["mlm"] = losses.masked_lm_loss(student_logits, labels, reduction="sum")
    if "clm" in weights:
        sums["clm"] = losses.causal_lm_loss(student_logits, labels, reduction="sum")
    return sums
