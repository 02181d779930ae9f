"""The LM-head terms (L_ce, L_mse, L_clm / L_mlm and the top-1 agreement) from the features an LM head projects, a
chunk of positions at a time, with each chunk's gradient taken in the forward pass: pure functions of tensors.

Per chunk: the student's logits h W^T (+ b), the teacher's logits for the same rows (its own head on its features,
or a cache's dense logits or top k), the term sums, and G = d(weighted sum) / d(student logits) by autograd on a
detached leaf (so every divergence of `losses.divergence_rows` works); then dh = G W and dW += G^T h while the
chunk's logits are still there. The backward only scales those stored gradients by grad_output: no projection is
recomputed, so a step costs the 4 vocabulary-sized matmuls of full logits (2 forward, 2 for the gradients) without
any [positions x vocab] tensor beyond one chunk, and only the positions a term reads are projected.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import _fp32, divergence_rows, topk_kl_rows

HEAD_TERMS = ("ce", "mse", "lm")
# Elements of one chunk's [rows x vocab] logits: small enough to stay in a CPU's caches (measured fastest on the
# project's CPU machine at 128-256 rows of 8,192-30,522 entries), large enough to keep an accelerator busy.
_CHUNK_ELEMENTS = {"cpu": 2**21, "accelerator": 2**26}


def auto_chunk_size(vocab_size, device_type="cpu"):
    """Rows per chunk for a vocabulary of `vocab_size`: the largest power of two whose chunk of logits holds at most
    the device's element budget, between 32 and 4,096."""
    budget = _CHUNK_ELEMENTS["cpu" if device_type == "cpu" else "accelerator"]
    rows = max(budget // max(int(vocab_size), 1), 1)
    return int(min(max(1 << (rows.bit_length() - 1), 32), 4096))


@dataclass
class TeacherRows:
    """Where the fused loss reads the teacher's logits: its LM head `head` applied to its `features` [..., D]
    (online), cached dense `logits` [..., V], or a cached top k (`topk_ids`, `topk_logits` [..., k])."""

    features: torch.Tensor | None = None
    head: object = None
    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None

    def select(self, used):
        """The same source at the flattened positions `used` ([N] bool)."""
        def pick(x):
            return None if x is None else x.reshape(-1, x.shape[-1])[used].detach()

        return TeacherRows(pick(self.features), self.head, pick(self.logits), pick(self.topk_ids),
                           pick(self.topk_logits))

    def chunk(self, piece):
        """The rows `piece` as fp32 dense logits, or as (ids, logits) of a top k."""
        if self.topk_ids is not None:
            return self.topk_ids[piece].long(), _fp32(self.topk_logits[piece])
        if self.logits is not None:
            return _fp32(self.logits[piece])
        return _fp32(self.head(self.features[piece]))  # inside an autograd.Function's forward: no graph


def _chunk_term_sums(s_full, teacher, kl, tgt, terms, temperature, vocab, divergence, jsd_beta):
    """([ce, mse, lm] sums, agreement count) of one chunk from the student's fp32 logits `s_full` [n, V_s] and the
    teacher's chunk (dense [n, V_t], a top-k pair, or None); the terms not in `terms` are 0 and not computed."""
    zero = s_full.new_zeros(())
    ce = mse = lm = zero
    agree = torch.zeros((), dtype=torch.long, device=s_full.device)
    if teacher is not None:
        s_kl = s_full[kl] if vocab is None else s_full[kl][:, :vocab]  # the teacher-student terms: the shared range
        if isinstance(teacher, tuple):  # a cached top k (its ids are within the shared range)
            ids, t_top = teacher[0][kl], teacher[1][kl]
            if "ce" in terms:
                ce = topk_kl_rows(s_kl / temperature, ids, t_top / temperature).sum() * temperature**2
            agree = (s_kl.detach().argmax(-1) == ids[:, 0]).sum()
        else:
            t_kl = teacher[kl] if vocab is None else teacher[kl][:, :vocab]
            if "ce" in terms:
                ce = divergence_rows(s_kl / temperature, t_kl / temperature, divergence, jsd_beta).sum() * temperature**2
            if "mse" in terms:
                mse = (s_kl - t_kl).pow(2).sum()
            agree = (s_kl.detach().argmax(-1) == t_kl.argmax(-1)).sum()
    if "lm" in terms:
        lm = F.cross_entropy(s_full, tgt, ignore_index=-100, reduction="sum")  # the whole student vocabulary
    return torch.stack([ce, mse, lm]), agree


class _FusedHeadLoss(torch.autograd.Function):
    """sum_k coef_k * S_k for the head terms S = (ce, mse, lm), with the gradient of each chunk taken in the
    forward (module docstring)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, coefs, teacher, kl, tgt, options):
        chunk_size, terms, temperature, vocab, divergence, jsd_beta, need = options
        # The stored gradients stay in fp32 (or the weights' wider dtype) until backward applies grad_output: unscaled,
        # fp16 loses small gradients, and scaled by a loss scale of 2^16 it overflows.
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        weight_acc = weight.detach().to(acc) if need[0] else None  # one copy, not one cast per chunk
        d_rows = torch.empty(rows.shape, dtype=acc, device=rows.device) if need[0] else None  # each row is in one chunk
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need[2] else None
        totals = torch.zeros(len(HEAD_TERMS), dtype=torch.float32, device=rows.device)
        agree = torch.zeros((), dtype=torch.long, device=rows.device)
        for start in range(0, rows.shape[0], chunk_size):
            piece = slice(start, start + chunk_size)
            h = rows[piece]
            t_chunk = None if teacher is None else teacher.chunk(piece)
            with torch.enable_grad():
                leaf = _fp32(F.linear(h, weight, bias)).detach().requires_grad_(True)
                sums, agreed = _chunk_term_sums(leaf, t_chunk, kl[piece], tgt[piece], terms, temperature, vocab,
                                                divergence, jsd_beta)
                (grad,) = torch.autograd.grad((sums * coefs.to(sums.dtype)).sum(), leaf)
            totals += sums.detach().float()
            agree += agreed
            del leaf, sums, t_chunk
            with torch.autocast(rows.device.type, enabled=False):
                if d_rows is not None:
                    d_rows[piece] = grad.to(acc) @ weight_acc
                if d_weight is not None:
                    d_weight.addmm_(grad.t().to(acc), h.to(acc))  # in place: no [vocab x width] temporary
                if d_bias is not None:
                    d_bias += grad.sum(0).to(acc)
        ctx.grads = (d_rows, d_weight, d_bias)
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = (totals * coefs.to(totals.dtype)).sum()
        ctx.mark_non_differentiable(totals, agree)
        return loss, totals, agree

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_totals, _grad_agree):
        if ctx.grads is None:
            raise RuntimeError("A second backward through the fused LM-head loss: its gradients are computed in the "
                               "forward pass and handed over by the first backward only. Run the forward again for "
                               "another backward, or set logits_chunk_size=0 (full logits) to backward twice with "
                               "retain_graph=True.")
        out = [None if grad is None else grad.mul_(grad_loss.to(grad.dtype)).to(dtype)
               for grad, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None  # once differentiable: the stored gradients are not kept past the backward
        return (*out, None, None, None, None, None)


def fused_head_terms(student_features, teacher, student_weight, student_bias, temperature, coefficients,
                     kl_mask=None, targets=None, chunk_size=256, vocab=None, divergence="forward_kl", jsd_beta=0.5):
    """The loss sum_k coefficients[k] * S_k of the LM-head terms and the sums S_k, projected a chunk at a time.

    `student_features` [..., D]: what the student's head projects (its last hidden states after the final norm, or
    a masked-LM head's transform output); `student_weight` [V, D] / `student_bias` [V] or None: its output embedding,
    given as tensors since their gradient is computed here. `teacher`: `TeacherRows` (online head or cache), or None
    (no teacher: only "lm"). `kl_mask` [...] selects the positions of L_ce, L_mse and the agreement; `targets` [...]
    the token each position's student distribution is scored on by the LM cross-entropy (-100: none). `vocab` cuts
    the teacher-student terms to the first `vocab` entries (the LM loss keeps the student's whole vocabulary).
    `coefficients` ({"ce", "mse", "lm"} -> float or 0-dim tensor, absent terms 0) must be known before the
    forward: each term's weight over its item count. Returns (loss, {"ce", "mse", "lm": detached sums as
    `losses.soft_target_divergence` / `logit_mse` / `masked_lm_loss` with reduction="sum"; "agree": the top-1
    agreement count}). The loss's backward multiplies the stored gradients by grad_output (loss scaling,
    accumulation) and may run once; a tied input embedding receives both gradients, as autograd adds them.
    """
    width = student_features.shape[-1]
    rows = student_features.reshape(-1, width)
    n, device = rows.shape[0], rows.device
    kl = kl_mask.reshape(-1).bool() if kl_mask is not None else torch.ones(n, dtype=torch.bool, device=device)
    tgt = targets.reshape(-1) if targets is not None else torch.full((n,), -100, device=device)
    if teacher is None:
        kl = torch.zeros_like(kl)
    used = kl | (tgt != -100)  # positions no term reads are never projected
    rows, kl, tgt = rows[used], kl[used], tgt[used]
    teacher = None if teacher is None else teacher.select(used)
    coefs = torch.stack([torch.as_tensor(coefficients.get(k, 0.0), dtype=torch.float32, device=device).reshape(())
                         for k in HEAD_TERMS])
    need = (rows.requires_grad, student_weight.requires_grad,
            student_bias is not None and student_bias.requires_grad)
    terms = tuple(k for k in HEAD_TERMS if k in coefficients and (k == "lm" or teacher is not None))
    options = (chunk_size, terms, temperature, vocab, divergence, jsd_beta, need)
    loss, totals, agree = _FusedHeadLoss.apply(rows, student_weight, student_bias, coefs, teacher, kl, tgt, options)
    return loss, {**{k: totals[i] for i, k in enumerate(HEAD_TERMS)}, "agree": agree}
