"""LM-head terms from hidden states, a chunk of positions at a time: the same sums and gradients as projecting
all positions at once (computed here directly with plain torch), and no projection of more than one chunk."""

import pytest
import torch
import torch.nn.functional as F

from distil_trainer import losses


class CountingHead(torch.nn.Linear):
    """A linear LM head that records the largest number of positions it projected at once."""

    largest = 0

    def forward(self, x):
        CountingHead.largest = max(CountingHead.largest, x.reshape(-1, x.shape[-1]).shape[0])
        return super().forward(x)


def setup(seed=0, vocab=50, width=16):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student_head, teacher_head = CountingHead(width, vocab), CountingHead(width, vocab)
    hidden_s = torch.randn(3, 7, width, generator=g)
    hidden_t = torch.randn(3, 7, width, generator=g)
    kl_mask = torch.rand(3, 7, generator=g) > 0.3
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets[torch.rand(3, 7, generator=g) > 0.6] = -100
    return student_head, teacher_head, hidden_s, hidden_t, kl_mask, targets


def direct(student_head, teacher_head, hidden_s, hidden_t, kl_mask, targets, temperature, divergence, vocab):
    """Every position projected at once, each term written out in plain torch (float64)."""
    s_full = student_head(hidden_s).double()
    s, t = s_full[..., :vocab], teacher_head(hidden_t).detach().double()[..., :vocab]
    p_t, p_s = (t / temperature).softmax(-1)[kl_mask], (s / temperature).softmax(-1)[kl_mask]
    kl = lambda p, q: (p * (p / q).log()).sum()  # noqa: E731
    ce = {"forward_kl": lambda: kl(p_t, p_s), "reverse_kl": lambda: kl(p_s, p_t),
          "jsd": lambda: 0.4 * kl(p_t, 0.4 * p_t + 0.6 * p_s) + 0.6 * kl(p_s, 0.4 * p_t + 0.6 * p_s),
          "tv": lambda: 0.5 * (p_t - p_s).abs().sum()}[divergence]() * temperature**2
    mse = (s - t)[kl_mask].pow(2).sum()
    keep = targets != -100
    lm = -s_full.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).sum()  # the whole student vocabulary
    agree = (s.argmax(-1) == t.argmax(-1))[kl_mask].sum()
    return {"ce": ce, "mse": mse, "lm": lm, "agree": agree}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_same_sums_and_gradients_as_the_direct_path(divergence, chunk_size):
    student_head, teacher_head, hidden_s, hidden_t, kl_mask, targets = setup()
    vocab = 45  # also cut to a shared vocabulary range
    weights = {"ce": 1.0, "mse": 0.3, "lm": 0.7}

    h1 = hidden_s.clone().requires_grad_(True)
    CountingHead.largest = 0
    got = losses.chunked_head_terms(h1, hidden_t, student_head, teacher_head, 2.0, kl_mask=kl_mask, targets=targets,
                                    chunk_size=chunk_size, vocab=vocab, divergence=divergence, jsd_beta=0.4,
                                    terms=("ce", "mse", "lm"))
    sum(weights[k] * got[k] for k in weights).backward()
    grads_chunked = (h1.grad.clone(), student_head.weight.grad.clone())
    assert CountingHead.largest <= chunk_size  # forward and the recomputation in backward
    student_head.zero_grad()

    h2 = hidden_s.clone().requires_grad_(True)
    expected = direct(student_head, teacher_head, h2, hidden_t, kl_mask, targets, 2.0, divergence, vocab)
    sum(weights[k] * expected[k] for k in weights).backward()
    for k in ("ce", "mse", "lm"):
        assert got[k].item() == pytest.approx(expected[k].item(), rel=1e-5, abs=1e-6), k
    assert got["agree"].item() == expected["agree"].item()
    for a, b in zip(grads_chunked, (h2.grad, student_head.weight.grad)):
        assert torch.allclose(a, b.float(), rtol=1e-5, atol=1e-6)


def test_only_used_positions_are_projected():
    student_head, teacher_head, hidden_s, hidden_t, _, _ = setup()
    kl_mask = torch.zeros(3, 7, dtype=torch.bool)
    kl_mask[0, :2] = True
    CountingHead.largest = 0
    got = losses.chunked_head_terms(hidden_s, hidden_t, student_head, teacher_head, 1.0, kl_mask=kl_mask,
                                    chunk_size=100)
    assert CountingHead.largest == 2
    s, t = student_head(hidden_s[0, :2]), teacher_head(hidden_t[0, :2])
    assert got["ce"].item() == pytest.approx(losses.soft_target_kl(s, t, 1.0, reduction="sum").item(), rel=1e-6)


def test_no_position_gives_zero_with_a_gradient():
    student_head, teacher_head, hidden_s, hidden_t, _, _ = setup()
    h = hidden_s.clone().requires_grad_(True)
    got = losses.chunked_head_terms(h, hidden_t, student_head, teacher_head, 1.0,
                                    kl_mask=torch.zeros(3, 7, dtype=torch.bool), terms=("ce", "lm"))
    assert got["ce"].item() == 0 and got["lm"].item() == 0 and got["agree"].item() == 0
    (got["ce"] + got["lm"]).backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_matches_cross_entropy_of_the_library():
    """The "lm" sum is masked_lm_loss's sum on the projected logits (targets -100 ignored)."""
    student_head, teacher_head, hidden_s, hidden_t, _, targets = setup(seed=3)
    got = losses.chunked_head_terms(hidden_s, hidden_t, student_head, teacher_head, 1.0,
                                    kl_mask=torch.zeros(3, 7, dtype=torch.bool), targets=targets, chunk_size=5,
                                    terms=("lm",))
    expected = F.cross_entropy(student_head(hidden_s).reshape(-1, 50), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")
    assert got["lm"].item() == pytest.approx(expected.item(), rel=1e-6)


# ---- in the trainer (logits_chunk_size) ----

import tiny  # noqa: E402
from distil_trainer import DistillationArguments, DistillationTrainer  # noqa: E402
from test_accumulation import PadCollator, masked_examples, one_step_update  # noqa: E402

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_trainer_gradient_matches_full_logits(divergence, tmp_path, monkeypatch):
    """One SGD step of L_ce + L_mse + L_clm: chunks of 7 positions (over 4 accumulated micro-batches) give the
    gradient of the full-logit path (one batch of 16), and the student's head never projects more than a chunk."""
    tok = tiny.gpt2_tokenizer()
    teacher = tiny.tiny_gpt2_lm(**NO_DROPOUT)
    data = masked_examples(tok, causal=True)
    make = lambda: tiny.tiny_gpt2_lm(layers=2, seed=7, **NO_DROPOUT)  # noqa: E731
    weights = dict(alpha_ce=1.0, alpha_mse=0.01, alpha_clm=0.5, divergence=divergence, jsd_beta=0.3)
    full = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path, **weights)

    largest = []
    linear = torch.nn.Linear.forward

    def counting(self, x):
        if self.out_features == 50257:  # the LM heads
            largest.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    chunked = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 4, 4, tmp_path,
                              logits_chunk_size=7, **weights)
    assert max(largest) == 7
    assert ((full - chunked).norm() / full.norm()).item() < 1e-5


def test_trainer_logs_the_same_terms(tmp_path):
    tok = tiny.gpt2_tokenizer()
    teacher = tiny.tiny_gpt2_lm(**NO_DROPOUT)
    data = masked_examples(tok, n=8, causal=True)
    logs = []
    for chunk in (None, 5):
        args = DistillationArguments(output_dir=str(tmp_path / str(chunk)), report_to=[], use_cpu=True, max_steps=1,
                                     per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
                                     alpha_ce=1.0, alpha_clm=1.0, alpha_mlm=0.0, alpha_cos=0.0,
                                     logits_chunk_size=chunk, train_sampling_strategy="sequential")
        trainer = DistillationTrainer(model=tiny.tiny_gpt2_lm(layers=2, seed=7, **NO_DROPOUT), teacher_model=teacher,
                                      args=args, train_dataset=data, data_collator=PadCollator(tok.pad_token_id))
        trainer.train()
        logs.append(next(e for e in trainer.state.log_history if "loss_ce" in e))
    for key in ("loss", "loss_ce", "loss_clm", "teacher_agreement"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5), key


def test_refused_where_it_cannot_work(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, logits_chunk_size=64)
    with pytest.raises(ValueError, match="needs a causal-LM student.*logits_chunk_size=None"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args)
    with pytest.raises(ValueError, match="logits_chunk_size=0 must be >= 1"):
        DistillationArguments(output_dir=str(tmp_path), logits_chunk_size=0)
