"""The fused LM-head terms (`fused_head`): the same sums and gradients as projecting all positions at once
(computed here directly with plain torch), no projection of more than one chunk, nothing projected in the backward,
the teacher's logits from its head or from a cache (dense or top k); and in the trainer, the default path for LM
students in training, equal to full logits (`logits_chunk_size=0`)."""

import pytest
import torch
import torch.nn.functional as F

from distil_trainer import losses
from distil_trainer.fused_head import TeacherRows, auto_chunk_size, fused_head_terms


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


def online(head, hidden):
    return TeacherRows(features=hidden, head=head)


def test_only_used_positions_are_projected():
    student_head, teacher_head, hidden_s, hidden_t, _, _ = setup()
    kl_mask = torch.zeros(3, 7, dtype=torch.bool)
    kl_mask[0, :2] = True
    CountingHead.largest = 0
    _, got = fused_head_terms(hidden_s, online(teacher_head, hidden_t), student_head.weight, student_head.bias, 1.0,
                              {"ce": 1.0}, kl_mask=kl_mask, chunk_size=100)
    assert CountingHead.largest == 2  # the teacher's head; the student's weight is applied with F.linear
    s, t = student_head(hidden_s[0, :2]), teacher_head(hidden_t[0, :2])
    assert got["ce"].item() == pytest.approx(losses.soft_target_kl(s, t, 1.0, reduction="sum").item(), rel=1e-6)


def test_lm_sum_is_the_cross_entropy_of_the_library():
    """The "lm" sum is masked_lm_loss's sum on the projected logits (targets -100 ignored)."""
    student_head, _, hidden_s, _, _, targets = setup(seed=3)
    _, got = fused_head_terms(hidden_s, None, student_head.weight, student_head.bias, 1.0, {"lm": 1.0},
                              targets=targets, chunk_size=5)
    expected = F.cross_entropy(student_head(hidden_s).reshape(-1, 50), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")
    assert got["lm"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_auto_chunk_size_fits_the_device_budget():
    assert auto_chunk_size(8192) == 256 and auto_chunk_size(30522) == 64 and auto_chunk_size(151936) == 32
    assert auto_chunk_size(8192, "cuda") == 4096 and auto_chunk_size(151936, "cuda") == 256
    for vocab in (1000, 8192, 50257, 262144):
        rows = auto_chunk_size(vocab)
        assert rows & (rows - 1) == 0 and (rows == 32 or rows * vocab <= 2**21)


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
    loss, sums = fused_head_terms(h1, online(teacher_head, hidden_t), student_head.weight, student_head.bias, 2.0,
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


@pytest.mark.parametrize("source", ["dense", "topk"])
def test_fused_reads_a_cached_teacher(source):
    """The teacher's logits from a cache: dense [.., V] logits equal the online head's; a top k gives the top-k KL of
    `losses.topk_soft_target_kl` (renormalised over the k), with the gradient of that function on full logits."""
    student_head, teacher_head, hidden_s, hidden_t, kl_mask, targets = setup(seed=4)
    t_logits = teacher_head(hidden_t).detach()
    topk = t_logits.topk(6, dim=-1)
    teacher = (TeacherRows(logits=t_logits) if source == "dense"
               else TeacherRows(topk_ids=topk.indices, topk_logits=topk.values))
    h1 = hidden_s.clone().requires_grad_(True)
    loss, sums = fused_head_terms(h1, teacher, student_head.weight, student_head.bias, 2.0, {"ce": 0.8, "lm": 0.3},
                                  kl_mask=kl_mask, targets=targets, chunk_size=4)
    loss.backward()
    h2 = hidden_s.clone().requires_grad_(True)
    s_logits = student_head(h2).double()
    if source == "dense":
        ce = losses.soft_target_kl(s_logits, t_logits.double(), 2.0, mask=kl_mask, reduction="sum")
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1))[kl_mask].sum()
    else:
        ce = losses.topk_soft_target_kl(s_logits, topk.indices, topk.values.double(), 2.0, mask=kl_mask,
                                        reduction="sum")
        agree = (s_logits.argmax(-1) == topk.indices[..., 0])[kl_mask].sum()
    lm = F.cross_entropy(s_logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction="sum")
    (0.8 * ce + 0.3 * lm).backward()
    assert sums["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert sums["agree"].item() == agree.item()
    assert torch.allclose(h1.grad, h2.grad.float(), rtol=1e-5, atol=1e-6)


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

    loss, _ = fused_head_terms(hidden(), online(teacher_head, teacher_hidden), embedding, None, 1.5,
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
    loss, sums = fused_head_terms(h, None, student_head.weight, student_head.bias, 1.0, {"lm": 1.0},
                                  targets=torch.full_like(targets, -100), kl_mask=torch.zeros(3, 7).bool())
    loss.backward()
    assert loss.item() == 0 and sums["agree"].item() == 0 and torch.equal(h.grad, torch.zeros_like(h))
    loss, sums = fused_head_terms(hidden_s, None, student_head.weight, student_head.bias, 1.0,
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
    full = one_step_update(make, teacher, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path, logits_chunk_size=0,
                           **weights)

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
    for chunk in (0, 5):
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


def test_fused_is_the_default_in_training_and_full_logits_evaluate(tmp_path, monkeypatch):
    """logits_chunk_size=None: in training, the heads project chunks of the auto size (only the positions a term
    reads); evaluation and logits_chunk_size=0 project every position at once."""
    tok, teacher, make, data, lm_weight = causal_case()
    vocab = teacher.config.vocab_size

    def projected(chunk, train=True):
        args = DistillationArguments(output_dir=str(tmp_path / str(chunk)), report_to=[], use_cpu=True, max_steps=1,
                                     per_device_train_batch_size=8, save_strategy="no", alpha_ce=1.0, alpha_cos=0.0,
                                     alpha_mlm=0.0, logits_chunk_size=chunk, **lm_weight)
        trainer = DistillationTrainer(model=make(), teacher_model=teacher, args=args, train_dataset=data.select(range(8)),
                                      data_collator=PadCollator(tok.pad_token_id))
        calls = LinearCalls(monkeypatch)
        trainer.train() if train else trainer.evaluate(eval_dataset=data.select(range(8)))
        monkeypatch.undo()
        return trainer, [n for _, n, v in calls.calls if v == vocab]

    trainer, rows = projected(None)
    assert trainer._chunk_size == auto_chunk_size(vocab) and rows and max(rows) <= trainer._chunk_size
    _, rows = projected(None, train=False)
    assert max(rows) == 8 * max(len(x) for x in data.select(range(8))["input_ids"])  # [batch x length] at once
    trainer, rows = projected(0)
    assert trainer._chunk_size is None and max(rows) > auto_chunk_size(vocab)


def test_default_falls_back_to_full_logits_where_the_path_cannot_apply(tmp_path, caplog):
    """A head that rescales its logits: the default computes the terms from full logits (and says why); an explicit
    logits_chunk_size is refused (test_refused_where_it_cannot_work)."""
    softcapped = tiny.tiny_gpt2_lm()
    softcapped.config.final_logit_softcapping = 30.0
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, alpha_mlm=0.0, alpha_clm=1.0,
                                 alpha_cos=0.0)
    with caplog.at_level("INFO", logger="distil_trainer.chunked_head"):
        trainer = DistillationTrainer(model=tiny.tiny_gpt2_lm(layers=2), teacher_model=softcapped, args=args)
    assert trainer._chunk_size is None and "transforms its LM head's output" in caplog.text
    classifier = DistillationTrainer(model=tiny.tiny_bert_classifier(), teacher_model=tiny.tiny_bert_classifier(),
                                     args=DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                                alpha_mlm=0.0, alpha_cos=0.0))
    assert classifier._chunk_size is None


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
    with pytest.raises(ValueError, match="needs a causal-LM or masked-LM student.*logits_chunk_size=0"):
        DistillationTrainer(model=tiny.tiny_bert_classifier(), teacher_model=tiny.tiny_bert_classifier(), args=args)
    softcapped = tiny.tiny_gpt2_lm()
    softcapped.config.final_logit_softcapping = 30.0
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, logits_chunk_size=64,
                                 alpha_mlm=0.0, alpha_clm=1.0, alpha_cos=0.0)
    with pytest.raises(ValueError, match="teacher GPT2LMHeadModel transforms its LM head's output"):
        DistillationTrainer(model=tiny.tiny_gpt2_lm(layers=2), teacher_model=softcapped, args=args)
    with pytest.raises(ValueError, match="logits_chunk_size=-1 must be >= 1 rows per chunk, 0 for full logits"):
        DistillationArguments(output_dir=str(tmp_path), logits_chunk_size=-1)


@pytest.mark.parametrize("loss_scale", [2.0**15, 2.0**16])
def test_fused_fp16_gradients_are_kept_in_fp32_until_scaled(loss_scale):
    """fp16 weights and hidden states with a loss scale (DeepSpeed fp16): the coefficient of a large step makes each
    unscaled gradient tiny, below fp16's normal range. They are stored in fp32 and cast only after backward applied
    grad_output, so the scaled gradients match float64 to fp16 precision (none flushed to zero, none overflowed)."""
    g = torch.Generator().manual_seed(7)
    rows, vocab, width = 512, 128, 32
    hidden = (torch.randn(rows, width, generator=g) * 2).half().requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=g) * 0.5).half().requires_grad_(True)
    teacher_hidden = torch.randn(rows, width, generator=g).half()
    teacher_head = torch.nn.Linear(width, vocab).half()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    coefs = {"ce": 5.0 / 524288, "lm": 2.0 / 524288}  # weight / the item count of a 524k-token optimizer step
    loss, _ = fused_head_terms(hidden, online(teacher_head, teacher_hidden), weight, None, 2.0, coefs,
                               targets=targets, chunk_size=100)
    loss.backward(torch.tensor(loss_scale))
    # float64 from the fp16 logits on (the logits themselves are a product in the weights' dtype, as in the model)
    s = (hidden.detach() @ weight.detach().t()).double().requires_grad_(True)
    t = teacher_head.double()(teacher_hidden.double()).detach()
    p_t = (t / 2.0).softmax(-1)
    ce = (p_t * (p_t.log() - (s / 2.0).log_softmax(-1))).sum() * 4.0
    lm = F.cross_entropy(s, targets, reduction="sum")
    ((coefs["ce"] * ce + coefs["lm"] * lm) * loss_scale).backward()
    want_h, want_w = s.grad @ weight.detach().double(), s.grad.t() @ hidden.detach().double()
    for got, want in ((hidden.grad, want_h), (weight.grad, want_w)):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert ((got.double() - want).abs() <= 2e-3 * want.abs() + 1e-5 * want.abs().max()).all()


def test_fused_second_backward_says_what_happened():
    student_head, teacher_head, hidden_s, hidden_t, kl_mask, targets = setup(seed=3)
    h = hidden_s.clone().requires_grad_(True)
    loss, _ = fused_head_terms(h, online(teacher_head, hidden_t), student_head.weight, student_head.bias, 2.0,
                               {"ce": 1.0}, kl_mask=kl_mask, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the fused LM-head loss"):
        loss.backward()


def test_a_bare_teacher_with_the_fused_default(tmp_path):
    """A teacher with no head (BertModel) gives only hidden states, which L_cos reads; the fused default must not
    ask it for head features. Same update as the full-logit path with the same body behind an MLM head."""
    tok, headed, make, data, _ = masked_case()
    weights = dict(alpha_cos=1.0, alpha_mlm=0.5)
    bare = one_step_update(make, headed.bert, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path / "bare",
                           **weights)
    full = one_step_update(make, headed, data, PadCollator(tok.pad_token_id), 16, 1, tmp_path / "full",
                           logits_chunk_size=0, **weights)
    assert bare.norm() > 0 and ((full - bare).norm() / full.norm()).item() < 1e-5
