"""The sentence-embedding terms of losses.py against plain torch written here: pooling (mean over the non-padding
tokens, CLS, last non-padding token, L2 normalisation), the per-sentence MSE / cosine distance (MSE as
sentence-transformers' MSELoss: F.mse_loss over the whole [B, D] matrix) and the in-batch relational KL."""

import pytest
import torch
import torch.nn.functional as F

from distil_trainer import losses


def batch(seed=0, b=5, length=7, d=6, left=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    lengths = [1, 3, 7, 5, 2][:b]
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, length - n:] = 1
        else:
            mask[i, :n] = 1
    hidden[mask == 0] = float("nan")  # padding content must never reach the result
    return hidden, mask


def reference_pool(hidden, mask, mode):
    rows = []
    for h, m in zip(hidden, mask):
        real = [i for i in range(len(m)) if m[i] == 1]
        if mode == "mean":
            rows.append(sum(h[i] for i in real) / len(real))
        elif mode == "cls":
            rows.append(h[0])
        else:
            rows.append(h[real[-1]])
    return torch.stack(rows)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("mode", ["mean", "lasttoken"])
def test_pooling_over_the_real_tokens(mode, left):
    hidden, mask = batch(left=left)
    got = losses.sentence_pool(hidden, mask, mode)
    assert torch.allclose(got, reference_pool(hidden, mask, mode))
    normalised = losses.sentence_pool(hidden, mask, mode, normalize=True)
    expected = reference_pool(hidden, mask, mode)
    assert torch.allclose(normalised, expected / expected.norm(dim=-1, keepdim=True))


def test_cls_pooling_takes_the_first_position():
    hidden, mask = batch()
    assert torch.allclose(losses.sentence_pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling mode 'max'"):
        losses.sentence_pool(hidden, mask, "max")


def test_pooling_gradient_never_reaches_padding():
    hidden, mask = batch()
    hidden = hidden.nan_to_num(0.0).requires_grad_(True)
    losses.sentence_pool(hidden, mask, "mean").sum().backward()
    assert (hidden.grad[mask == 0] == 0).all() and (hidden.grad[mask == 1] != 0).all()


def test_mse_is_sentence_transformers_mse_loss_and_cosine_is_one_minus_cos():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    # sentence-transformers' MSELoss: torch.nn.functional.mse_loss(student, teacher), the mean of all B x D entries.
    assert torch.allclose(losses.embedding_distance(s, t, "mse"), F.mse_loss(s, t))
    per_sentence = [((s[i] - t[i]) ** 2).sum() / 6 for i in range(4)]
    assert torch.allclose(losses.embedding_distance(s, t, "mse", reduction="sum"), sum(per_sentence))
    cos = [1 - (s[i] @ t[i]) / (s[i].norm() * t[i].norm()) for i in range(4)]
    assert torch.allclose(losses.embedding_distance(s, t, "cosine", reduction="sum"), sum(cos))
    assert torch.allclose(losses.embedding_distance(s, t, "cosine"), sum(cos) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.embedding_distance(s, t[:, :5])
    with pytest.raises(ValueError, match="metric='l1'"):
        losses.embedding_distance(s, t, "l1")


def reference_relation(s, t, temperature):
    """Per sentence i: KL(p_t || p_s) over the other sentences j != i, p = softmax_j(cos(e_i, e_j) / T)."""
    total = []
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        cs = torch.stack([F.cosine_similarity(s[i], s[j], dim=0) for j in others]) / temperature
        ct = torch.stack([F.cosine_similarity(t[i], t[j], dim=0) for j in others]) / temperature
        p_s, p_t = torch.softmax(cs, 0), torch.softmax(ct, 0)
        total.append((p_t * (p_t.log() - p_s.log())).sum())
    return torch.stack(total)


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_relation_is_the_row_kl_of_the_cosine_matrices_with_other_widths(temperature):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = losses.embedding_relation_kl(s, t, temperature, reduction="sum")
    expected = reference_relation(s, t, temperature)
    assert torch.allclose(got, expected.sum())
    assert torch.allclose(losses.embedding_relation_kl(s, t, temperature), expected.mean())
    (grad,) = torch.autograd.grad(got, s)
    (expected_grad,) = torch.autograd.grad(reference_relation(s, t, temperature).sum(), s)
    assert torch.allclose(grad, expected_grad)


def test_relation_is_zero_for_the_same_similarities_and_for_one_sentence():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert losses.embedding_relation_kl(3.0 * t, t, 0.05).abs() < 1e-12  # scale does not change cosines
    assert losses.embedding_relation_kl(t[:1], t[:1] + 1, 0.05) == 0
    with pytest.raises(ValueError, match="same batch"):
        losses.embedding_relation_kl(t, t[:3])
