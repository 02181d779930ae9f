"""The intermediate-layer and attention terms of losses.py against formulas written here element by element
(plain Python loops over examples, heads and positions), and 0 when the student equals the teacher."""

import math

import pytest
import torch

from distil_trainer import losses


def padding_mask(lengths, width):
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long)


MASK = padding_mask([5, 3, 6], 6)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def attention_maps(batch, heads, length, seed):
    """Row-stochastic maps with garbage (nan) in the padding rows and columns, which must not matter."""
    maps = torch.softmax(randn(batch, heads, length, length, seed=seed), -1)
    for b in range(batch):
        n = int(MASK[b].sum())
        maps[b, :, n:, :] = float("nan")
        maps[b, :, :, n:] = float("nan")
    return maps


# ---- hidden states ----

def reference_hidden(s, t, mask, metric):
    values = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            if metric == "mse":
                values.append(sum((s[b, i, d] - t[b, i, d]).item() ** 2 for d in range(s.shape[2])) / s.shape[2])
            else:
                dot = sum(s[b, i, d].item() * t[b, i, d].item() for d in range(s.shape[2]))
                norms = math.sqrt(sum(x.item() ** 2 for x in s[b, i])) * math.sqrt(sum(x.item() ** 2 for x in t[b, i]))
                values.append(1 - dot / norms)
    return values


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_state_distance_matches_a_loop(metric):
    s, t = randn(3, 6, 8, seed=0), randn(3, 6, 8, seed=1)
    expected = reference_hidden(s, t, MASK, metric)
    got_sum = losses.hidden_state_distance(s, t, MASK, metric=metric, reduction="sum")
    got_mean = losses.hidden_state_distance(s, t, MASK, metric=metric, reduction="mean")
    assert got_sum.item() == pytest.approx(sum(expected), rel=1e-10)
    assert got_mean.item() == pytest.approx(sum(expected) / len(expected), rel=1e-10)
    assert len(expected) == int(MASK.sum())  # the item is a non-padding token


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_state_distance_is_zero_for_equal_states(metric):
    h = randn(3, 6, 8, seed=2)
    assert losses.hidden_state_distance(h, h.clone(), MASK, metric=metric).item() == pytest.approx(0, abs=1e-12)


def test_hidden_state_distance_runs_in_fp32_for_half_inputs_and_rejects_unknown_metrics():
    s, t = randn(2, 4, 8, seed=3), randn(2, 4, 8, seed=4)
    half = losses.hidden_state_distance(s.half(), t.half())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(losses.hidden_state_distance(s, t).item(), rel=1e-2)
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        losses.hidden_state_distance(s, t, metric="l1")


# ---- TinyBERT attention ----

def reference_attention(s, t, mask):
    values = []
    batch, heads, length, _ = s.shape
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                if mask[b, i] and mask[b, j]:
                    values.append(sum((s[b, h, i, j] - t[b, h, i, j]).item() ** 2 for h in range(heads)) / heads)
    return values


def test_attention_mse_matches_a_loop_and_ignores_padding_rows_and_columns():
    s, t = attention_maps(3, 2, 6, seed=5), attention_maps(3, 2, 6, seed=6)
    expected = reference_attention(s, t, MASK)
    assert len(expected) == sum(int(n) ** 2 for n in MASK.sum(1))  # an item is a (query, key) pair of real tokens
    got_sum = losses.attention_mse(s, t, MASK, reduction="sum")
    assert torch.isfinite(got_sum)
    assert got_sum.item() == pytest.approx(sum(expected), rel=1e-10)
    assert losses.attention_mse(s, t, MASK).item() == pytest.approx(sum(expected) / len(expected), rel=1e-10)


def test_attention_mse_gradient_stays_finite_with_nan_padding():
    s = attention_maps(3, 2, 6, seed=7).requires_grad_(True)
    losses.attention_mse(s, attention_maps(3, 2, 6, seed=8), MASK, reduction="sum").backward()
    assert torch.isfinite(s.grad).all()


def test_attention_mse_is_zero_for_equal_maps_and_rejects_other_head_counts():
    a = attention_maps(3, 2, 6, seed=9)
    assert losses.attention_mse(a, a.clone(), MASK).item() == 0
    with pytest.raises(ValueError, match="same number of heads"):
        losses.attention_mse(attention_maps(3, 2, 6, seed=1), attention_maps(3, 4, 6, seed=1)[:, :3], MASK)


# ---- MiniLMv2 relations ----

def reference_relation(s, t, heads, mask):
    """Per non-padding query: mean over relation heads of KL(teacher || student), relations softmaxed over the
    non-padding keys, each written out with math.exp."""
    def row(x, b, r, i):
        d = x.shape[2] // heads
        keys = [j for j in range(x.shape[1]) if mask[b, j]]
        scores = [sum(x[b, i, r * d + k].item() * x[b, j, r * d + k].item() for k in range(d)) / math.sqrt(d)
                  for j in keys]
        top = max(scores)
        exps = [math.exp(v - top) for v in scores]
        return [e / sum(exps) for e in exps]

    values = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            kls = []
            for r in range(heads):
                p_t, p_s = row(t, b, r, i), row(s, b, r, i)
                kls.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
            values.append(sum(kls) / heads)
    return values


def test_relation_kl_matches_a_loop_with_different_widths():
    s, t = randn(3, 6, 12, seed=10), randn(3, 6, 16, seed=11)  # student 12 wide, teacher 16: 4 heads of 3 and 4
    expected = reference_relation(s, t, 4, MASK)
    assert len(expected) == int(MASK.sum())
    assert losses.relation_kl(s, t, 4, MASK, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-9)
    assert losses.relation_kl(s, t, 4, MASK).item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)


def test_relation_kl_ignores_padding_values_and_is_zero_for_equal_inputs():
    s, t = randn(3, 6, 8, seed=12), randn(3, 6, 8, seed=13)
    before = losses.relation_kl(s, t, 2, MASK, reduction="sum")
    s2, t2 = s.clone(), t.clone()
    s2[~MASK.bool()] = 1e4  # what padding positions hold must change nothing
    t2[~MASK.bool()] = -1e4
    assert losses.relation_kl(s2, t2, 2, MASK, reduction="sum").item() == pytest.approx(before.item(), rel=1e-12)
    assert losses.relation_kl(t, t.clone(), 2, MASK).item() == pytest.approx(0, abs=1e-12)


def test_relation_kl_gradient_is_finite_and_half_inputs_run_in_fp32():
    s = randn(3, 6, 8, seed=14).requires_grad_(True)
    losses.relation_kl(s, randn(3, 6, 8, seed=15), 2, MASK, reduction="sum").backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    half = losses.relation_kl(randn(2, 4, 8, seed=16).half(), randn(2, 4, 8, seed=17).half(), 2)
    assert half.dtype == torch.float32


def test_relation_kl_names_widths_that_do_not_split_into_heads():
    with pytest.raises(ValueError, match="width of 10 cannot be split into 4 relation heads"):
        losses.relation_kl(randn(1, 3, 10, seed=0), randn(1, 3, 8, seed=0), 4)
