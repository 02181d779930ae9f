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
    """KL(softmax(t) || softmax(s)) over the last dimension, with 0 * log 0 = 0 (see `_KLRows`). A `t` that takes
    gradients (the student's, in the reverse KL) goes through autograd of the same formula."""
    if t.requires_grad:
        return _xlogy_kl(F.softmax(t, dim=-1), F.log_softmax(s, dim=-1))
    return _KLRows.apply(s, t)


def _xlogy_kl(p, log_q):
    """sum(p log p - p log q) over the last dimension, taking both terms as 0 wherever p is 0 (so a log q of -inf
    there adds nothing): the one writing of the KL that every L_ce path uses."""
    return (torch.xlogy(p, p) - torch.where(p > 0, p * log_q, 0.0)).sum(-1)


class _KLRows(torch.autograd.Function):
    """Per-row KL(softmax(t) || softmax(s)) in the xlogy form of the original's `nn.KLDivLoss`
    (`xlogy(p, p) - p * log q`), with its gradient written out: T^2 KL at s/T has gradient T (q - p).

    A teacher logit of -inf (a token the teacher rules out) adds 0, where `p * (log p - log q)` would add
    0 * -inf = nan; where the student also gives -inf, `p * log q` is 0 * -inf too, so it is taken as 0 wherever p is
    0. Autograd through those masking steps cost 4 extra passes over the [rows x vocab] tensors (a 25% slower L_ce
    than `F.kl_div`); the backward here is one: exp(log q) - p, scaled by the incoming gradient. `t` gets no
    gradient (the teacher's logits are targets).
    """

    @staticmethod
    def forward(ctx, s, t):
        log_q = F.log_softmax(s, dim=-1)
        p = F.softmax(t, dim=-1)
        rows = _xlogy_kl(p, log_q)
        ctx.save_for_backward(log_q, p)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        log_q, p = ctx.saved_tensors
        return log_q.exp().sub_(p).mul_(grad_rows.unsqueeze(-1)), None


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
    return _reduce(topk_kl_rows(s, ids, t) * temperature**2, reduction)


def topk_kl_rows(s, ids, t):
    """Per-row KL(softmax(t) || softmax(s) read at `ids`): `t` [n, k] the teacher's top-k logits, `s` [n, V] the
    student's, `ids` [n, k] where the k sit in s (already divided by T). In the xlogy form of `_kl_rows`."""
    return _xlogy_kl(F.softmax(t, dim=-1), F.log_softmax(s, dim=-1).gather(-1, ids))


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
    return _reduce(_row_distance(s, t, metric), reduction)


def _row_distance(s, t, metric):
    """Per-row distance over the last dimension: "mse" (mean of squared differences) or "cosine" (1 - cos)."""
    if metric == "mse":
        return (s - t).pow(2).mean(-1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    raise ValueError(f"metric={metric!r}; use 'mse' or 'cosine'.")


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


# ---- sentence-embedding terms (sentence-transformers' distillation); the item is a sentence ----

POOLING_MODES = ("mean", "cls", "lasttoken")
EMBEDDING_DISTANCES = ("mse", "cosine")


def sentence_pool(hidden, attention_mask=None, mode="mean", normalize=False):
    """Sentence embeddings [B, D] from token vectors [B, L, D], as sentence-transformers' Pooling/Normalize do.

    mode "mean": mean over the non-padding tokens of `attention_mask` [B, L]; "cls": the first position; "lasttoken":
    the last non-padding position (right or left padding alike). `normalize`: L2-normalised afterwards. Padding
    positions are dropped (filled with 0 before the sum), so whatever a model leaves there never reaches the result.
    """
    h = _fp32(hidden)
    batch, length = h.shape[:2]
    mask = (attention_mask.bool() if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=h.device))
    if mode == "mean":
        summed = h.masked_fill(~mask[..., None], 0.0).sum(1)
        pooled = summed / mask.sum(1, keepdim=True).to(h.dtype).clamp(min=1e-9)
    elif mode == "cls":
        pooled = h[:, 0]
    elif mode == "lasttoken":
        positions = torch.arange(1, length + 1, device=h.device)
        last = (mask.long() * positions).argmax(-1)  # the highest position with mask 1 (0 when there is none)
        pooled = h[torch.arange(batch, device=h.device), last]
    else:
        raise ValueError(f"pooling mode {mode!r}; use one of {', '.join(POOLING_MODES)}.")
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def embedding_distance(student_emb, teacher_emb, metric="mse", reduction="mean"):
    """Distance between student and teacher sentence embeddings [B, D], per sentence (L_embed).

    metric "mse": mean over D of (e_s - e_t)^2, so the mean over sentences is sentence-transformers' MSELoss
    (`F.mse_loss(student, teacher)`: the mean over all B x D entries); "cosine": 1 - cos(e_s, e_t).
    """
    s, t = _fp32(student_emb), _fp32(teacher_emb)
    if s.shape != t.shape:
        raise ValueError(f"Sentence embeddings differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}; "
                         "project the student's to the teacher's width first.")
    return _reduce(_row_distance(s, t, metric), reduction)


def _similarity_log_probs(emb, temperature):
    """Row-wise log softmax of the batch's cosine-similarity matrix / temperature, each sentence's own column out."""
    unit = F.normalize(_fp32(emb), p=2, dim=-1)
    scores = unit @ unit.t() / temperature
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return F.log_softmax(scores.masked_fill(eye, _EXCLUDED), dim=-1)


def embedding_relation_kl(student_emb, teacher_emb, temperature=0.05, reduction="mean"):
    """In-batch relational term (L_embed_relation): per sentence, KL(teacher row || student row) of the batch's
    cosine similarities divided by `temperature`, softmaxed over the other sentences of the batch.

    `student_emb` [B, D_s] / `teacher_emb` [B, D_t] (the widths may differ: only similarities are compared). A row
    is a distribution over the batch's other sentences, so the term depends on which sentences share a batch: under
    gradient accumulation or data parallelism each sentence is compared with its own micro-batch, and the trainer
    averages the rows over the whole optimizer step. A batch of one sentence gives 0.
    """
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"{student_emb.shape[0]} student and {teacher_emb.shape[0]} teacher sentence embeddings; "
                         "they must come from the same batch.")
    log_s = _similarity_log_probs(student_emb, temperature)
    log_t = _similarity_log_probs(teacher_emb, temperature)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    return _reduce(per_row, reduction)


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


_EXPM1_SAFE = 50.0  # e^50 ~ 5e21: far from fp32's overflow at e^88.7


def _log_m_over_t(r, beta):
    """log(m / p_t) = log(beta + (1 - beta) e^r) for r = log(p_s / p_t).

    Up to r = 50 it is log1p((1 - beta) expm1(r)), which keeps the digits of small differences. Beyond, it is
    logaddexp(log beta, log(1 - beta) + r): expm1 overflows in fp32 past r ~ 88, i.e. wherever the teacher gives a
    token a probability that far below the student's (a subnormal after /T), and the JSD came out -inf.
    """
    near = torch.log1p((1 - beta) * torch.expm1(r.clamp(max=_EXPM1_SAFE)))  # clamped: no inf on the other branch
    far = torch.logaddexp(torch.full_like(r, math.log(beta)), r + math.log1p(-beta))
    return torch.where(r <= _EXPM1_SAFE, near, far)


def _jsd_rows(s, t, beta):
    """beta * KL(P_t || M) + (1 - beta) * KL(P_s || M), M = beta * P_t + (1 - beta) * P_s, per row.

    Written with r = log(p_s / p_t) taken from the logit difference, (s - t) - (lse(s) - lse(t)), rather than as a
    difference of two log-softmaxes: when student and teacher are close, the latter loses most digits of r in fp32
    (its gradient was off by ~1e-5 relative), while an error in the row constant lse(s) - lse(t) cancels out of the
    gradient. log(m / p_t) comes from `_log_m_over_t`, exact for small r and finite for large r.
    """
    lse_s, lse_t = s.logsumexp(-1, keepdim=True), t.logsumexp(-1, keepdim=True)
    p_s, p_t = (s - lse_s).exp(), (t - lse_t).exp()
    teacher_zero = p_t == 0  # a token the teacher rules out: r is +inf (or nan) there, and unused
    r = ((s - t) - (lse_s - lse_t)).masked_fill(teacher_zero, 0.0)
    m_over_t = _log_m_over_t(r, beta)
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
