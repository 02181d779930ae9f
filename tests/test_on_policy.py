"""On-policy (GKD's lmbda) and sequence-level distillation: continuations generated from the batch's prompts by
the student or the teacher, the loss taken on the generated tokens only, and draws keyed by the step so a resumed
run is the uninterrupted one. Checked against generation and losses written out here in plain torch."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

import tiny_gguf
from distil_trainer import DistillationArguments, DistillationTrainer
from distil_trainer.data import CausalLMCollator
from distil_trainer.on_policy import draw_on_policy, generate_batch, step_key

ALL_ZERO = dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_clm=0.0, alpha_mse=0.0)


def tiny_llama(seed):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_gguf.tiny_llama_config(layers=2)).eval()


def right_padded_batch():
    """3 sequences of lengths 6, 4, 5 (pad 0), prompts of 3, 2 and 4 tokens."""
    rows = [[5, 70, 200, 3, 99, 41], [260, 8, 41, 17], [11, 12, 13, 14, 15]]
    ids = torch.zeros(3, 6, dtype=torch.long)
    attention = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attention[i, :len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100),
            "prompt_length": torch.tensor([3, 2, 4])}


def greedy(model, prompt, steps, eos=None):
    """Greedy continuation of one unpadded prompt, one full forward per token."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        seq.append(token)
        if token == eos:
            break
    return seq[len(prompt):]


def test_draws_are_keyed_by_step_and_have_the_asked_rate():
    assert draw_on_policy(0.5, step_key(1, 7, 0, 0)) == draw_on_policy(0.5, step_key(1, 7, 0, 0))
    keys = [step_key(3, step, micro, 0) for step in range(500) for micro in range(4)]
    assert not any(draw_on_policy(0.0, k) for k in keys) and all(draw_on_policy(1.0, k) for k in keys)
    rate = sum(draw_on_policy(0.3, k) for k in keys) / len(keys)
    assert 0.26 < rate < 0.34
    assert len({step_key(3, s, m, p) for s in range(50) for m in range(4) for p in range(3)}) == 600


@pytest.mark.parametrize("stop_early", [False, True])
def test_generated_batch_is_prompt_plus_greedy_continuation(stop_early):
    model, batch = tiny_llama(0), right_padded_batch()
    prompts = [batch["input_ids"][i, :n].tolist() for i, n in enumerate(batch["prompt_length"].tolist())]
    eos = greedy(model, prompts[0], 5)[2] if stop_early else None  # row 0 then stops by its 3rd token
    out = generate_batch(model, batch, key=1, max_new_tokens=5, temperature=0.0, pad_id=0,
                         eos_ids=[] if eos is None else [eos])
    for i, prompt in enumerate(prompts):
        cont = greedy(model, prompt, 5, eos)
        n, p = len(cont), len(prompt)
        assert out["input_ids"][i, :p + n].tolist() == prompt + cont
        assert out["attention_mask"][i].tolist() == [1] * (p + n) + [0] * (out["input_ids"].shape[1] - p - n)
        # Loss positions: labels on the generated tokens only; the KL where the next token is a generated one.
        assert out["labels"][i].tolist() == [-100] * p + cont + [-100] * (out["input_ids"].shape[1] - p - n)
        assert torch.nonzero(out["distillation_mask"][i]).flatten().tolist() == list(range(p - 1, p + n - 1))
    if stop_early:  # row 0 stopped at its end-of-sequence token, before max_new_tokens
        assert out["attention_mask"][0].sum() < 3 + 5


def test_sampling_is_keyed_and_leaves_the_global_rng_alone():
    model, batch = tiny_llama(0), right_padded_batch()
    state = torch.get_rng_state()
    a = generate_batch(model, batch, key=11, max_new_tokens=8, temperature=1.0, pad_id=0, eos_ids=[])
    b = generate_batch(model, batch, key=11, max_new_tokens=8, temperature=1.0, pad_id=0, eos_ids=[])
    c = generate_batch(model, batch, key=12, max_new_tokens=8, temperature=1.0, pad_id=0, eos_ids=[])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])


def make_trainer(tmp_path, student, teacher, **kw):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, temperature=1.0,
                                 **{**ALL_ZERO, "alpha_ce": 1.0, **kw})
    return DistillationTrainer(model=student, teacher_model=teacher, args=args)


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_trainer_distils_on_the_generated_tokens(tmp_path, source):
    """lmbda=1: the student's continuations; seq_kd (lmbda=0): the teacher's. L_ce is the KL at the positions
    that predict a generated token, averaged over them."""
    student, teacher = tiny_llama(0), tiny_llama(1)
    on_policy = dict(lmbda=1.0) if source == "student" else dict(seq_kd=True)
    trainer = make_trainer(tmp_path, student, teacher, generation_temperature=0.0, max_new_tokens=4, **on_policy)
    batch = right_padded_batch()
    (new,), _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    generator = student if source == "student" else teacher
    student.train()
    loss = trainer.compute_loss(student, new)

    kls = []
    for i, p in enumerate(batch["prompt_length"].tolist()):
        prompt = batch["input_ids"][i, :p].tolist()
        seq = prompt + greedy(generator, prompt, 4)
        assert new["input_ids"][i, :len(seq)].tolist() == seq
        with torch.no_grad():
            log_s = student(torch.tensor([seq])).logits[0].double().log_softmax(-1)
            log_t = teacher(torch.tensor([seq])).logits[0].double().log_softmax(-1)
        for t in range(p - 1, len(seq) - 1):
            kls.append((log_t[t].exp() * (log_t[t] - log_s[t])).sum())
    assert loss.item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-5)
    assert trainer._on_policy.generated[source] == 1


def test_a_batch_not_drawn_is_scored_on_its_continuation_only(tmp_path):
    """0 < lmbda < 1: a micro-batch that keeps the dataset's continuation is scored like a generated one, L_ce and
    L_clm on the tokens after the prompt only (as GKD and TRL), never on the prompt."""
    student, teacher = tiny_llama(0), tiny_llama(1)
    trainer = make_trainer(tmp_path, student, teacher, lmbda=0.5, alpha_clm=1.0, seed=0)
    step = next(s for s in range(100) if not draw_on_policy(0.5, step_key(0, s, 0, 0)))
    trainer.state.global_step = step
    batch = right_padded_batch()
    (kept,), _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert torch.equal(kept["input_ids"], batch["input_ids"]) and trainer._on_policy.generated["student"] == 0
    student.train()
    loss = trainer.compute_loss(student, kept)

    kls, nlls = [], []
    for i, p in enumerate(batch["prompt_length"].tolist()):
        seq = batch["input_ids"][i, :int(batch["attention_mask"][i].sum())].tolist()
        with torch.no_grad():
            log_s = student(torch.tensor([seq])).logits[0].double().log_softmax(-1)
            log_t = teacher(torch.tensor([seq])).logits[0].double().log_softmax(-1)
        for t in range(p - 1, len(seq) - 1):  # positions whose next token is in the continuation
            kls.append((log_t[t].exp() * (log_t[t] - log_s[t])).sum())
            nlls.append(-log_s[t, seq[t + 1]])
    expected = torch.stack(kls).mean() + torch.stack(nlls).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_off_by_default_and_refused_without_prompts(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1)
    assert make_trainer(tmp_path, student, teacher)._on_policy is None
    trainer = make_trainer(tmp_path, student, teacher, lmbda=1.0)
    batch = right_padded_batch()
    del batch["prompt_length"]
    with pytest.raises(ValueError, match="needs a 'prompt_length' column"):
        trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lmbda=1.5 is a probability"):
        DistillationArguments(output_dir=str(tmp_path), lmbda=1.5)


def run(out, max_steps):
    texts = [[5, 70, 200, 3, 99, 41, 7], [260, 8, 41, 17, 30], [11, 12, 13, 14, 15, 16], [9, 8, 7, 6]] * 4
    data = Dataset.from_list([{"input_ids": t, "attention_mask": [1] * len(t), "prompt_length": 2 + i % 3}
                              for i, t in enumerate(texts)])
    weights = {**ALL_ZERO, "alpha_ce": 1.0, "alpha_clm": 1.0}
    args = DistillationArguments(output_dir=str(out), report_to=[], use_cpu=True, **weights, lmbda=0.5,
                                 generation_temperature=1.0, max_new_tokens=4,
                                 max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 learning_rate=1e-2, lr_scheduler_type="constant", save_steps=2, logging_steps=1,
                                 seed=3, disable_tqdm=True)
    collator = CausalLMCollator(SimpleNamespace(pad_token_id=0, eos_token_id=None))
    return DistillationTrainer(model=tiny_llama(0).train(), teacher_model=tiny_llama(1), args=args,
                               train_dataset=data, data_collator=collator)


def test_a_resumed_run_draws_and_samples_what_the_whole_run_did(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    whole = run(tmp_path / "whole", 4)
    whole.train()
    assert whole._on_policy.generated["student"] > 0  # some micro-batches were generated by the student ...
    assert whole._on_policy.generated["student"] < 8  # ... and some kept the dataset's continuation
    first = run(tmp_path / "resumed", 2)
    first.train()
    resumed = run(tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path / "resumed")))
    assert (first._on_policy.generated["student"] + resumed._on_policy.generated["student"]
            == whole._on_policy.generated["student"])
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-6)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_continuation_only_without_labels_marks_the_continuation():
    """A micro-batch with no labels (a collator for L_ce alone) still gets the continuation's positions: prompt 2 of
    4 real tokens, right padding to 5 -> positions 1 and 2 predict tokens 2 and 3."""
    from distil_trainer.on_policy import continuation_only

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "prompt_length": torch.tensor([2])}
    scored = continuation_only(batch)
    assert "labels" not in scored
    assert scored["distillation_mask"].tolist() == [[0, 1, 1, 0, 0]]
