"""The distillation loss terms as small pure functions of tensors.

Every function takes a `reduction`: "mean" averages over the selected items, "sum" returns their sum, which
the trainer divides by the item count of the whole optimizer step (all micro-batches, all ranks) so that
gradient accumulation and data parallelism give the same gradients as one large batch.
Softmaxes and reductions run in fp32 whatever the logits' dtype.
"""

import math

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
    return _reduce(_kl_rows(s, t) * temperature**2, reduction)


def _kl_rows(s, t):
    """KL(softmax(t) || softmax(s)) over the last dimension, with 0 * log 0 = 0.

    In the xlogy form of the original's `nn.KLDivLoss` (`xlogy(p, p) - p * log q`), a teacher logit of -inf (a
    token the teacher rules out) adds 0; written as `p * (log p - log q)` it would add 0 * -inf = nan. Where the
    student also gives -inf, `p * log q` is 0 * -inf too, so it is taken as 0 wherever p is 0.
    """
    p = F.softmax(t, dim=-1)
    cross = (p * F.log_softmax(s, dim=-1)).masked_fill(p == 0, 0.0)
    return (torch.xlogy(p, p) - cross).sum(-1)


def topk_soft_target_kl(student_logits, topk_ids, topk_logits, temperature, mask=None, reduction="mean"):
    """L_ce from a teacher's stored top-k logits: KL(p~ || q) * T^2 over the k stored tokens, per selected row.

    p~ = softmax(topk_logits / T) renormalised over the k stored tokens; q = softmax(student_logits / T) over the
    student's whole last dimension, read at `topk_ids`. So sum_k p~ (log p~ - log q) * T^2, in the xlogy form of
    `soft_target_kl`. With k = the whole vocabulary it is `soft_target_kl`. The mass the teacher puts outside its
    top k is left out rather than kept as one remainder bucket: at T != 1 that bucket's mass needs logsumexp(z/T)
    over all logits, which the stored logsumexp of z (T = 1) cannot give.

    `student_logits`: [..., V]; `topk_ids` (long) / `topk_logits`: [..., k]; `mask`: [...] selecting rows.
    """
    s = _fp32(_select(student_logits, mask)) / temperature
    ids = _select(topk_ids, mask).long()
    t = _fp32(_select(topk_logits, mask)) / temperature
    p = F.softmax(t, dim=-1)
    log_q = F.log_softmax(s, dim=-1).gather(-1, ids)
    cross = (p * log_q).masked_fill(p == 0, 0.0)
    return _reduce((torch.xlogy(p, p) - cross).sum(-1) * temperature**2, reduction)


def topk_agreement(student_logits, topk_ids, mask=None):
    """(number of selected rows where the student's arg-max is the teacher's top-1 stored token, number of rows)."""
    agree = student_logits.argmax(-1) == topk_ids[..., 0]
    if mask is not None:
        agree = agree[mask.bool()]
    return agree.sum(), agree.numel()


def span_soft_target_kl(student_start, student_end, teacher_start, teacher_end, temperature, mask=None,
                        reduction="mean", divergence="forward_kl", jsd_beta=0.5):
    """L_ce for extractive QA: per example, the mean of the start and end KL over sequence positions.

    Logits are [B, L]; `mask` [B, L] marks the candidate positions (context and [CLS]); the others are removed
    from both softmaxes, so padding and the question carry no probability mass. `divergence`/`jsd_beta` choose
    another divergence than the KL (see `divergence_rows`).
    """
    per_example = (_position_kl(student_start, teacher_start, temperature, mask, divergence, jsd_beta)
                   + _position_kl(student_end, teacher_end, temperature, mask, divergence, jsd_beta)) / 2
    return _reduce(per_example, reduction)


# Set as the scaled logits of excluded positions: exp() of it is exactly 0 in fp32, and it stays finite, so a row
# that excludes every position still gives a finite (zero) KL instead of the nan of a softmax over all -inf.
_EXCLUDED = -1e9


def _position_kl(student_logits, teacher_logits, temperature, mask, divergence="forward_kl", jsd_beta=0.5):
    """Per-row KL(softmax(t/T) || softmax(s/T)) * T^2 (or another divergence) for [B, L] logits, over the
    positions in `mask`."""
    s = _fp32(student_logits) / temperature
    t = _fp32(teacher_logits) / temperature
    if mask is not None:
        s = s.masked_fill(~mask.bool(), _EXCLUDED)
        t = t.masked_fill(~mask.bool(), _EXCLUDED)
    return divergence_rows(s, t, divergence, jsd_beta) * temperature**2


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


# ---- intermediate-layer and attention terms (TinyBERT, MiniLM/MiniLMv2) ----

def hidden_state_distance(student_hidden, teacher_hidden, mask=None, metric="mse", reduction="mean"):
    """Distance between a student layer's hidden states and its mapped teacher layer's, per selected token (L_hidden).

    `student_hidden` must already be at the teacher's width (projected when the widths differ); both are [..., D],
    `mask` [...] selects the tokens (non-padding). metric "mse": mean over D of (h_s - h_t)^2 (TinyBERT's MSE, taken
    per token); "cosine": 1 - cos(h_s, h_t).
    """
    s = _fp32(_select(student_hidden, mask))
    t = _fp32(_select(teacher_hidden, mask))
    if metric == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif metric == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"metric={metric!r}; use 'mse' or 'cosine'.")
    return _reduce(per_token, reduction)


def attention_mse(student_attn, teacher_attn, mask=None, reduction="mean"):
    """TinyBERT's attention loss for one mapped layer: squared difference of the attention maps (L_attn).

    `student_attn`/`teacher_attn`: [B, H, L, L] attention weights (same head count); `mask` [B, L] marks non-padding
    positions. An item is one (query, key) pair of non-padding positions; its value is the mean over heads of
    (a_s - a_t)^2. Padding rows and columns are dropped, not multiplied by 0, so whatever a model leaves there
    (even nan) never reaches the loss.
    """
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"Attention maps differ in shape: student {tuple(student_attn.shape)}, teacher "
                         f"{tuple(teacher_attn.shape)}; alpha_attn needs the same number of heads and positions.")
    # [B, L, L, H]: the pairs are selected before any arithmetic, so padding never reaches a gradient either.
    s, t = student_attn.permute(0, 2, 3, 1), teacher_attn.permute(0, 2, 3, 1)
    if mask is not None:
        mask = mask.bool()
        pairs = mask[:, :, None] & mask[:, None, :]
        s, t = s[pairs], t[pairs]
    per_pair = (_fp32(s) - _fp32(t)).pow(2).mean(-1)
    return _reduce(per_pair.reshape(-1), reduction)


def _relation_log_probs(x, num_heads, key_mask):
    """log softmax(x_r x_r^T / sqrt(d_r)) per relation head r, over the non-padding keys: [B, R, L, L]."""
    batch, length, width = x.shape
    if width % num_heads:
        raise ValueError(f"A width of {width} cannot be split into {num_heads} relation heads; choose "
                         "relation_heads dividing the query/key/value widths of both teacher and student.")
    d = width // num_heads
    heads = _fp32(x).reshape(batch, length, num_heads, d).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / d**0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], _EXCLUDED)
    return F.log_softmax(scores, dim=-1)


def relation_kl(student_x, teacher_x, num_heads, mask=None, reduction="mean"):
    """MiniLMv2's self-attention relation loss for one relation type (query-query, key-key or value-value).

    `student_x`/`teacher_x`: [B, L, D_s] / [B, L, D_t] outputs of the same kind of projection (widths may differ);
    each is split into `num_heads` relation heads and turned into relations softmax(x_r x_r^T / sqrt(d_r)) over the
    non-padding keys of `mask` [B, L]. An item is one non-padding query position; its value is the mean over
    relation heads of KL(teacher row || student row).
    """
    log_s = _relation_log_probs(student_x, num_heads, mask)
    log_t = _relation_log_probs(teacher_x, num_heads, mask)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)  # [B, L]
    if mask is not None:
        per_row = per_row[mask.bool()]
    return _reduce(per_row.reshape(-1), reduction)


# ---- divergences for L_ce beside the forward KL (reverse KL, generalised JSD, total variation) ----

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")


def divergence_rows(s, t, divergence="forward_kl", jsd_beta=0.5):
    """Per-row divergence between softmax(t) (teacher) and softmax(s) (student) over the last dimension.

    forward_kl: KL(P_t || P_s); reverse_kl: KL(P_s || P_t); tv: 0.5 * sum |P_t - P_s|;
    jsd: GKD's generalised Jensen-Shannon divergence, in TRL's convention (`jsd_beta` weighs the teacher):
    beta * KL(P_t || M) + (1 - beta) * KL(P_s || M) with M = beta * P_t + (1 - beta) * P_s. As in TRL,
    beta = 0 gives the forward KL and beta = 1 the reverse KL (the formula itself would give 0 at both ends).
    """
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0):
        return _kl_rows(s, t)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1):
        return _kl_rows(t, s)
    if divergence == "tv":
        return 0.5 * (F.softmax(t, dim=-1) - F.softmax(s, dim=-1)).abs().sum(-1)
    if divergence == "jsd":
        if not 0 < jsd_beta < 1:
            raise ValueError(f"jsd_beta={jsd_beta} must be in [0, 1].")
        return _jsd_rows(s, t, jsd_beta)
    raise ValueError(f"divergence={divergence!r}; use one of {', '.join(DIVERGENCES)}.")


def _jsd_rows(s, t, beta):
    """beta * KL(P_t || M) + (1 - beta) * KL(P_s || M), M = beta * P_t + (1 - beta) * P_s, per row.

    Written with r = log(p_s / p_t) taken from the logit difference, (s - t) - (lse(s) - lse(t)), rather than as a
    difference of two log-softmaxes: when student and teacher are close, the latter loses most digits of r in fp32
    (its gradient was off by ~1e-5 relative), while an error in the row constant lse(s) - lse(t) cancels out of the
    gradient. log(m / p_t) = log1p((1 - beta) * expm1(r)) keeps the small differences exact too.
    """
    lse_s, lse_t = s.logsumexp(-1, keepdim=True), t.logsumexp(-1, keepdim=True)
    p_s, p_t = (s - lse_s).exp(), (t - lse_t).exp()
    teacher_zero = p_t == 0  # a token the teacher rules out: r is +inf (or nan) there, and unused
    r = ((s - t) - (lse_s - lse_t)).masked_fill(teacher_zero, 0.0)
    m_over_t = torch.log1p((1 - beta) * torch.expm1(r))  # log(m / p_t)
    kl_t = -(p_t * m_over_t.masked_fill(teacher_zero, 0.0)).sum(-1)
    s_over_m = torch.where(teacher_zero, -math.log1p(-beta), r - m_over_t)  # log(p_s / m); m = (1-beta) p_s there
    kl_s = (p_s * s_over_m.masked_fill(p_s == 0, 0.0)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def soft_target_divergence(student_logits, teacher_logits, temperature, mask=None, reduction="mean",
                           divergence="forward_kl", jsd_beta=0.5):
    """L_ce with a chosen divergence: divergence(softmax(t/T), softmax(s/T)) * T^2 per selected row.

    With divergence="forward_kl" this is `soft_target_kl`. The T^2 factor is applied to every divergence, so the
    gradient scale stays comparable across temperatures as for the KL (Hinton et al., 2015).
    """
    s = _fp32(_select(student_logits, mask)) / temperature
    t = _fp32(_select(teacher_logits, mask)) / temperature
    return _reduce(divergence_rows(s, t, divergence, jsd_beta) * temperature**2, reduction)


# ---- LM-head terms from hidden states, a chunk of positions at a time ----

def chunked_head_terms(student_hidden, teacher_hidden, student_head, teacher_head, temperature, kl_mask=None,
                       targets=None, chunk_size=1024, vocab=None, divergence="forward_kl", jsd_beta=0.5,
                       terms=("ce",)):
    """Sums of the LM-head terms over positions, projecting hidden states to the vocabulary one chunk at a time.

    `student_hidden`/`teacher_hidden`: [..., D] last hidden states (after the final norm); `student_head` /
    `teacher_head`: callables mapping [n, D] to [n, V] logits (the models' `lm_head`); `kl_mask` [...] selects the
    positions of L_ce, L_mse and the agreement; `targets` [...] holds the token each position's student
    distribution is scored on for the LM cross-entropy (-100: none). `vocab` cuts both logits to their first
    `vocab` entries for the teacher-student terms (the LM cross-entropy keeps the student's whole vocabulary). Returns {"ce", "mse", "lm": sums as in soft_target_divergence / logit_mse / masked_lm_loss
    with reduction="sum", for the names in `terms`; "agree": the top-1 agreement count}.

    Each chunk runs under activation checkpointing: its logits are recomputed in the backward pass instead of
    kept, so no [positions x vocab] tensor of either model exists beyond one chunk. Values and gradients are
    those of the direct path (tested to 1e-5).
    """
    from torch.utils.checkpoint import checkpoint

    width = student_hidden.shape[-1]
    s_rows, t_rows = student_hidden.reshape(-1, width), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n = s_rows.shape[0]
    kl = kl_mask.reshape(-1).bool() if kl_mask is not None else torch.ones(n, dtype=torch.bool, device=s_rows.device)
    tgt = targets.reshape(-1) if targets is not None else torch.full((n,), -100, device=s_rows.device)
    used = kl | (tgt != -100)  # positions no term reads are never projected
    s_rows, t_rows, kl, tgt = s_rows[used], t_rows[used], kl[used], tgt[used]

    def chunk_sums(s_chunk, t_chunk, kl_chunk, tgt_chunk):
        s_full = _fp32(student_head(s_chunk))
        with torch.no_grad():
            t_logits = _fp32(teacher_head(t_chunk))
        s_logits = s_full  # the teacher-student terms compare the shared range; the LM loss keeps all of it
        if vocab is not None:
            s_logits, t_logits = s_full[..., :vocab], t_logits[..., :vocab]
        zero = s_full.sum() * 0  # keeps each sum on the graph (and its dtype) when a chunk has no such row
        out = []
        if "ce" in terms:
            rows = divergence_rows(s_logits[kl_chunk] / temperature, t_logits[kl_chunk] / temperature, divergence,
                                   jsd_beta)
            out.append(rows.sum() * temperature**2 + zero)
        if "mse" in terms:
            out.append((s_logits[kl_chunk] - t_logits[kl_chunk]).pow(2).sum() + zero)
        if "lm" in terms:
            out.append(F.cross_entropy(s_full, tgt_chunk, ignore_index=-100, reduction="sum") + zero)
        agree = (s_logits.detach().argmax(-1) == t_logits.argmax(-1))[kl_chunk].sum()
        return torch.stack(out) if out else zero.reshape(1), agree

    totals, agree = None, 0
    for start in range(0, s_rows.shape[0], chunk_size):
        piece = slice(start, start + chunk_size)
        sums, agreed = checkpoint(chunk_sums, s_rows[piece], t_rows[piece], kl[piece], tgt[piece],
                                  use_reentrant=False)
        totals = sums if totals is None else totals + sums
        agree = agree + agreed
    if totals is None:  # no position at all
        totals = (s_rows.sum() * 0).repeat(max(len(terms), 1))
    names = [t for t in ("ce", "mse", "lm") if t in terms]
    result = {name: totals[i] for i, name in enumerate(names)}
    result["agree"] = torch.as_tensor(agree, device=s_rows.device)
    return result


# ---- the same terms with each chunk's gradient computed in the forward pass (no recomputation) ----

HEAD_TERMS = ("ce", "mse", "lm")


def _chunk_term_sums(s_full, t_logits, kl, tgt, terms, temperature, vocab, divergence, jsd_beta):
    """[ce, mse, lm] sums of one chunk from its fp32 logits (student `s_full` [n, V_s], teacher `t_logits` [n, V_t]
    or None); the terms not in `terms` are 0 and not computed."""
    zero = s_full.new_zeros(())
    ce = mse = lm = zero
    if "ce" in terms or "mse" in terms:
        s_kl, t_kl = s_full[kl], t_logits[kl]
        if vocab is not None:  # the teacher-student terms compare the shared range
            s_kl, t_kl = s_kl[:, :vocab], t_kl[:, :vocab]
        if "ce" in terms:
            ce = divergence_rows(s_kl / temperature, t_kl / temperature, divergence, jsd_beta).sum() * temperature**2
        if "mse" in terms:
            mse = (s_kl - t_kl).pow(2).sum()
    if "lm" in terms:
        lm = F.cross_entropy(s_full, tgt, ignore_index=-100, reduction="sum")  # the whole student vocabulary
    return torch.stack([ce, mse, lm])


class _FusedHeadLoss(torch.autograd.Function):
    """sum_k coef_k * S_k for the head terms S = (ce, mse, lm), with the gradient of each chunk taken in the forward.

    Per chunk: student logits h W^T (+ b), teacher logits under no_grad, the term sums, and G = d(weighted sum) /
    d(student logits) by autograd on a detached leaf (so every divergence of `divergence_rows` works); then dh = G W
    and dW += G^T h (db += sum G) while the chunk's logits are still there. Backward only scales those stored
    gradients by grad_output: no projection is recomputed, so a step costs the direct path's ~4 vocabulary-sized
    matmuls (2 forward, 2 for the gradients) without holding any [positions x vocab] tensor beyond one chunk.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, coefs, t_rows, teacher_head, kl, tgt, options):
        chunk_size, terms, temperature, vocab, divergence, jsd_beta, need = options
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        d_rows = torch.empty_like(rows) if need[0] else None  # every row is written: each is in one chunk
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need[2] else None
        totals = torch.zeros(len(HEAD_TERMS), dtype=torch.float32, device=rows.device)
        agree = torch.zeros((), dtype=torch.long, device=rows.device)
        for start in range(0, rows.shape[0], chunk_size):
            piece = slice(start, start + chunk_size)
            h, kl_c, tgt_c = rows[piece], kl[piece], tgt[piece]
            t_logits = None if teacher_head is None else _fp32(teacher_head(t_rows[piece]))  # no_grad here
            with torch.enable_grad():
                leaf = _fp32(F.linear(h, weight, bias)).detach().requires_grad_(True)
                sums = _chunk_term_sums(leaf, t_logits, kl_c, tgt_c, terms, temperature, vocab, divergence, jsd_beta)
                (grad,) = torch.autograd.grad((sums * coefs.to(sums.dtype)).sum(), leaf)
            totals += sums.detach().float()
            if t_logits is not None:
                agree += (leaf[:, :vocab].detach().argmax(-1) == t_logits[:, :vocab].argmax(-1))[kl_c].sum()
            del leaf, sums, t_logits
            with torch.autocast(rows.device.type, enabled=False):  # the gradients in the weights' own dtypes
                if d_rows is not None:
                    d_rows[piece] = (grad.to(weight.dtype) @ weight).to(rows.dtype)
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
        out = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            out.append(None if grad is None else grad.mul_(grad_loss.to(grad.dtype)).to(dtype))
        ctx.grads = None  # once differentiable: the stored gradients are not kept past the backward
        return (*out, None, None, None, None, None, None)


def fused_head_terms(student_hidden, teacher_hidden, student_weight, student_bias, teacher_head, temperature,
                     coefficients, kl_mask=None, targets=None, chunk_size=1024, vocab=None, divergence="forward_kl",
                     jsd_beta=0.5):
    """The loss sum_k coefficients[k] * S_k of the LM-head terms, projected one chunk of positions at a time with
    each chunk's gradient computed in the forward pass (see `_FusedHeadLoss`), and the sums S_k for logging.

    Arguments as in `chunked_head_terms`, except that the student's head is given as its `student_weight`
    [V, D] / `student_bias` [V] (or None), since its gradient is computed here, and `coefficients` ({"ce", "mse",
    "lm"} -> float or 0-dim tensor; absent terms are 0) must be known before the forward: the loss weight over
    the term's item count. `teacher_head` None: no teacher (only "lm"; `teacher_hidden` is not read).
    Returns (loss, {"ce", "mse", "lm": detached sums; "agree": top-1 agreement count}).
    The loss's value and gradients equal those of `sum_k coefficients[k] * chunked_head_terms(...)[k]`; its
    backward multiplies the stored gradients by the incoming grad_output (loss scaling, accumulation) and may run
    once. A tied input embedding receives both gradients, as autograd adds them on the shared weight.
    """
    width = student_hidden.shape[-1]
    rows = student_hidden.reshape(-1, width)
    t_rows = rows if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n, device = rows.shape[0], rows.device
    kl = kl_mask.reshape(-1).bool() if kl_mask is not None else torch.ones(n, dtype=torch.bool, device=device)
    tgt = targets.reshape(-1) if targets is not None else torch.full((n,), -100, device=device)
    used = kl | (tgt != -100)  # positions no term reads are never projected
    rows, t_rows, kl, tgt = rows[used], t_rows[used].detach(), kl[used], tgt[used]
    coefs = torch.stack([torch.as_tensor(coefficients.get(k, 0.0), dtype=torch.float32, device=device).reshape(())
                         for k in HEAD_TERMS])
    need = (rows.requires_grad, student_weight.requires_grad,
            student_bias is not None and student_bias.requires_grad)
    terms = tuple(k for k in HEAD_TERMS if k in coefficients and (k == "lm" or teacher_head is not None))
    options = (chunk_size, terms, temperature, vocab, divergence, jsd_beta, need)
    loss, totals, agree = _FusedHeadLoss.apply(rows, student_weight, student_bias, coefs, t_rows, teacher_head, kl,
                                               tgt, options)
    return loss, {**{k: totals[i] for i, k in enumerate(HEAD_TERMS)}, "agree": agree}
