"""LM-head terms from hidden states, a chunk of positions at a time: the same sums and gradients as projecting
all positions at once (computed here directly with plain torch), and no projection of more than one chunk.
`chunked_head_terms` recomputes each chunk in the backward (activation checkpointing); `fused_head_terms` (what
the trainer runs) computes each chunk's gradient in the forward and projects nothing in the backward."""

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


# ---- fused_head_terms: each chunk's gradient in the forward ----

class LinearCalls:
    """Records (phase, rows, out features) of every F.linear call (nn.Linear's forward goes through it too)."""

    def __init__(self, monkeypatch):
        self.calls, self.phase = [], "forward"
        original = F.linear

        def counting(x, weight, bias=None):
            self.calls.append((self.phase, x.reshape(-1, x.shape[-1]).shape[0], weight.shape[0]))
            return original(x, weight, bias)

        monkeypatch.setattr(F, "linear", counting)

    def rows(self, phase, out_features):
        return [n for p, n, v in self.calls if p == phase and v == out_features]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("chunk_size,bias", [(1, True), (4, False), (1000, True)])
def test_fused_same_loss_and_gradients_as_the_direct_path(divergence, chunk_size, bias, monkeypatch):
    student_head, teacher_head, hidden_s, hidden_t, kl_mask, targets = setup()
    if not bias:
        student_head.bias = None
    vocab, coefs = 45, {"ce": 0.8, "mse": 0.03, "lm": 0.7}  # a shared vocabulary range; T = 2 below
    calls = LinearCalls(monkeypatch)
    h1 = hidden_s.clone().requires_grad_(True)
    loss, sums = losses.fused_head_terms(h1, hidden_t, student_head.weight, student_head.bias, teacher_head, 2.0,
                                         coefs, kl_mask=kl_mask, targets=targets, chunk_size=chunk_size, vocab=vocab,
                                         divergence=divergence, jsd_beta=0.4)
    calls.phase = "backward"
    (3 * loss).backward()  # the stored gradients are scaled by grad_output
    assert max(calls.rows("forward", 50)) <= chunk_size
    assert sum(calls.rows("forward", 50)) == 2 * (kl_mask | (targets != -100)).sum()  # used positions, both heads
    assert calls.rows("backward", 50) == []  # nothing is projected again
    got = [h1.grad.clone(), student_head.weight.grad.clone()] + ([student_head.bias.grad.clone()] if bias else [])
    student_head.zero_grad()

    h2 = hidden_s.clone().requires_grad_(True)
    expected = direct(student_head, teacher_head, h2, hidden_t, kl_mask, targets, 2.0, divergence, vocab)
    expected_loss = sum(coefs[k] * expected[k] for k in coefs)
    (3 * expected_loss).backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for k in coefs:
        assert not sums[k].requires_grad
        assert sums[k].item() == pytest.approx(expected[k].item(), rel=1e-5, abs=1e-6), k
    assert sums["agree"].item() == expected["agree"].item()
    want = [h2.grad, student_head.weight.grad] + ([student_head.bias.grad] if bias else [])
    for a, b in zip(got, want):
        assert torch.allclose(a, b.float(), rtol=1e-5, atol=1e-6)


def test_fused_tied_embedding_gets_both_gradients():
    """The head's weight is also the input embedding: its gradient is the sum of both uses, as in the direct path."""
    g = torch.Generator().manual_seed(5)
    embedding = torch.nn.Parameter(torch.randn(40, 8, generator=g))
    mix, teacher_head = torch.randn(8, 8, generator=g), torch.nn.Linear(8, 40)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    teacher_hidden = torch.randn(2, 9, 8, generator=g)

    def hidden():  # a stand-in for the body: embedding lookup, then a nonlinearity
        return torch.tanh(embedding[ids] @ mix)

    loss, _ = losses.fused_head_terms(hidden(), teacher_hidden, embedding, None, teacher_head, 1.5,
                                      {"ce": 1.0, "lm": 0.5}, targets=targets, chunk_size=5)
    loss.backward()
    fused_grad, embedding.grad = embedding.grad.clone(), None
    s_logits, t_logits = (hidden() @ embedding.t()).double(), teacher_head(teacher_hidden).detach().double()
    p_t = (t_logits / 1.5).softmax(-1)
    ce = (p_t * (p_t.log() - (s_logits / 1.5).log_softmax(-1))).sum() * 1.5**2
    lm = -s_logits.log_softmax(-1).gather(-1, targets[..., None]).sum()
    (ce + 0.5 * lm).backward()
    assert torch.allclose(fused_grad, embedding.grad.float(), rtol=1e-5, atol=1e-6)


def test_fused_without_teacher_and_without_positions():
    student_head, _, hidden_s, _, _, targets = setup(seed=2)
    h = hidden_s.clone().requires_grad_(True)
    loss, sums = losses.fused_head_terms(h, None, student_head.weight, student_head.bias, None, 1.0, {"lm": 1.0},
                                         targets=torch.full_like(targets, -100), kl_mask=torch.zeros(3, 7).bool())
    loss.backward()
    assert loss.item() == 0 and sums["agree"].item() == 0 and torch.equal(h.grad, torch.zeros_like(h))
    loss, sums = losses.fused_head_terms(hidden_s, None, student_head.weight, student_head.bias, None, 1.0,
                                         {"lm": 1.0}, targets=targets, kl_mask=torch.zeros(3, 7).bool(), chunk_size=4)
    expected = F.cross_entropy(student_head(hidden_s).reshape(-1, 50), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and sums["lm"].item() == loss.item()


# ---- in the trainer (logits_chunk_size) ----

import tiny  # noqa: E402
from distil_trainer import DistillationArguments, DistillationTrainer  # noqa: E402
from test_accumulation import NO_DROPOUT_BERT, PadCollator, masked_examples, one_step_update  # noqa: E402

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
NO_DROPOUT_DISTILBERT = dict(dropout=0.0, attention_dropout=0.0)


def causal_case(untied=False):
    tok = tiny.gpt2_tokenizer()
    if untied:  # Llama with its own lm_head (GPT-2 ties it to the input embedding)
        teacher = tiny.tiny_llama_lm(tie_word_embeddings=False)
        make = lambda: tiny.tiny_llama_lm(layers=2, seed=7, tie_word_embeddings=False)  # noqa: E731
    else:
        teacher = tiny.tiny_gpt2_lm(**NO_DROPOUT)
        make = lambda: tiny.tiny_gpt2_lm(layers=2, seed=7, **NO_DROPOUT)  # noqa: E731
    return tok, teacher, make, masked_examples(tok, causal=True), dict(alpha_clm=0.5)


def masked_case():
    tok = tiny.bert_tokenizer()
    make = lambda: tiny.tiny_distilbert_mlm(**NO_DROPOUT_DISTILBERT)  # noqa: E731
    return tok, tiny.tiny_bert_mlm(**NO_DROPOUT_BERT), make, masked_examples(tok), dict(alpha_mlm=0.5,
                                                                                           restrict_ce_to_mask=True)


@pytest.mark.parametrize("case,divergence", [("tied", "forward_kl"), ("tied", "reverse_kl"), ("tied", "jsd"),
                                             ("tied", "tv"), ("untied", "forward_kl"), ("mlm", "jsd")])
def test_trainer_gradient_matches_full_logits(case, divergence, tmp_path, monkeypatch):
    """One SGD step of L_ce (T=2) + L_mse + L_clm (or L_mlm): chunks of 7 positions over 4 accumulated
    micro-batches give the gradient of the full-logit path (one batch of 16); the heads never project more than a
    chunk, only the positions a term reads, and nothing in the backward."""
    tok, teacher, make, data, lm_weight = masked_case() if case == "mlm" else causal_case(case == "untied")
    weights = dict(alpha_ce=1.0, alpha_mse=0.01, temperature=2.0, divergence=divergence, jsd_beta=0.3, **lm_weight)
    full = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path, **weights)

    calls = LinearCalls(monkeypatch)
    chunked = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 4, 4, tmp_path / "chunked",
                              logits_chunk_size=7, **weights)
    vocab = teacher.config.vocab_size
    projected = [n for _, n, v in calls.calls if v == vocab]
    assert max(projected) == 7
    if case == "mlm":  # restrict_ce_to_mask: only the masked (labelled) positions, by both heads
        assert sum(projected) == 2 * sum(sum(t != -100 for t in row) for row in data["labels"])
    assert ((full - chunked).norm() / full.norm()).item() < 1e-5


@pytest.mark.parametrize("case", ["causal", "mlm"])
def test_trainer_logs_the_same_terms(case, tmp_path):
    tok, teacher, make, data, lm_weight = masked_case() if case == "mlm" else causal_case()
    data = data.select(range(8))
    logs = []
    for chunk in (None, 5):
        args = DistillationArguments(output_dir=str(tmp_path / str(chunk)), report_to=[], use_cpu=True, max_steps=1,
                                     per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
                                     save_strategy="no", alpha_ce=1.0, alpha_cos=0.0,
                                     **{"alpha_clm": 0.0, "alpha_mlm": 0.0, **lm_weight},
                                     logits_chunk_size=chunk, train_sampling_strategy="sequential")
        trainer = DistillationTrainer(model=make(), teacher_model=teacher, args=args, train_dataset=data,
                                      data_collator=PadCollator(tok.pad_token_id))
        trainer.train()
        logs.append(next(e for e in trainer.state.log_history if "loss_ce" in e))
    lm = "loss_mlm" if case == "mlm" else "loss_clm"
    for key in ("loss", "loss_ce", lm, "teacher_agreement"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5), key


def test_trainer_skips_a_nonfinite_chunked_step(tmp_path):
    """A teacher whose logits are NaN makes L_ce non-finite: the step is flagged and skipped as on the direct path."""
    tok, teacher, make, data, _ = causal_case()
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("nan")  # tied: the teacher's embedding too, so every logit is NaN
    student = make()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, save_strategy="no",
                                 per_device_train_batch_size=4, alpha_ce=1.0, alpha_clm=0.5, alpha_mlm=0.0,
                                 alpha_cos=0.0, logits_chunk_size=5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data.select(range(4)),
                                  data_collator=PadCollator(tok.pad_token_id))
    trainer.train()
    assert trainer.nonfinite_steps == 1 and trainer.nonfinite_terms == {"ce": 1}
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_refused_where_it_cannot_work(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, logits_chunk_size=64,
                                 alpha_mlm=0.0, alpha_mse=1.0, alpha_ce=0.0, alpha_cos=0.0)
    with pytest.raises(ValueError, match="needs a causal-LM or masked-LM student.*logits_chunk_size=None"):
        DistillationTrainer(model=tiny.tiny_bert_classifier(), teacher_model=tiny.tiny_bert_classifier(), args=args)
    softcapped = tiny.tiny_gpt2_lm()
    softcapped.config.final_logit_softcapping = 30.0
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, logits_chunk_size=64,
                                 alpha_mlm=0.0, alpha_clm=1.0, alpha_cos=0.0)
    with pytest.raises(ValueError, match="teacher GPT2LMHeadModel transforms its LM head's output"):
        DistillationTrainer(model=tiny.tiny_gpt2_lm(layers=2), teacher_model=softcapped, args=args)
    with pytest.raises(ValueError, match="logits_chunk_size=0 must be >= 1"):
        DistillationArguments(output_dir=str(tmp_path), logits_chunk_size=0)
