"""On-policy and sequence-level distillation (GKD, Agarwal et al., 2024): before the loss, a batch's continuations
may be replaced by ones generated from its prompts, by the student (with probability `lmbda`) or by the teacher
(`seq_kd`).

A batch's prompts are the first `prompt_length[i]` tokens of each sequence (a `prompt_length` column of the
dataset, which `CausalLMCollator` passes through). The generated batch holds prompt + continuation, right-padded;
its loss positions are the generated tokens only: `labels` is -100 elsewhere, and `distillation_mask` marks the
positions whose next token was generated (position t's logits predict token t + 1). A micro-batch that keeps the
dataset's continuation (not drawn, with 0 < lmbda < 1 and no seq_kd) is scored the same way, on the tokens after its
prompt only, as in GKD and TRL.

Randomness is keyed by (seed, optimizer step, micro-batch, process): both the on-policy draw and the sampling use
generators seeded from that key (the sampling under `torch.random.fork_rng`, so the global RNG stream of the
rest of training is untouched), and a run resumed from a checkpoint draws and samples exactly what the
uninterrupted run did.
"""

import torch

PROMPT_LENGTH_KEY = "prompt_length"
IGNORE_INDEX = -100


def step_key(seed, step, micro_batch, process):
    """A 63-bit seed for one micro-batch of one optimizer step on one process."""
    key = seed
    for part in (step, micro_batch, process):
        key = (key * 1_000_003 + part) % (2**63 - 1)
    return key


def draw_on_policy(lmbda, key):
    """Whether this micro-batch's continuations come from the student: True with probability `lmbda`."""
    if lmbda <= 0:
        return False
    generator = torch.Generator().manual_seed(key)
    return bool(torch.rand((), generator=generator).item() < lmbda)


def _prompt_lengths(batch):
    """Each sequence's number of leading prompt tokens, checked against its length."""
    if batch.get(PROMPT_LENGTH_KEY) is None:
        raise ValueError("On-policy or sequence-level distillation (lmbda > 0 or seq_kd) needs a "
                         f"'{PROMPT_LENGTH_KEY}' column (the number of leading prompt tokens of each sequence) in the "
                         "batch; add it to the dataset and keep it (CausalLMCollator passes it through), or set "
                         "lmbda=0 and seq_kd=False.")
    lengths = batch[PROMPT_LENGTH_KEY].reshape(-1).long().tolist()
    real = batch["attention_mask"].sum(1).tolist()
    bad = [i for i, (n, r) in enumerate(zip(lengths, real)) if not 1 <= n <= r]
    if bad:
        raise ValueError(f"{PROMPT_LENGTH_KEY} must be between 1 and the sequence's length; rows {bad[:5]} are not "
                         f"({[lengths[i] for i in bad[:5]]} for lengths {[real[i] for i in bad[:5]]}).")
    return lengths


def _prompts(batch):
    """Left-padded prompts [B, P] and their attention mask, from the batch's right-padded sequences."""
    ids = batch["input_ids"]
    lengths = _prompt_lengths(batch)
    width = max(lengths)
    prompts = torch.zeros(len(lengths), width, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(prompts)
    for i, n in enumerate(lengths):
        prompts[i, width - n:] = ids[i, :n]
        mask[i, width - n:] = 1
    return prompts, mask, lengths


def continuation_only(batch):
    """A dataset micro-batch scored as a generated one is: `labels` on its continuation only (the tokens after the
    prompt) and `distillation_mask` on the positions that predict them, as GKD and TRL score only the completion."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    prompt = torch.tensor(_prompt_lengths(batch), device=ids.device)[:, None]
    ends = attention.sum(1, keepdim=True)
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    predicts_continuation = (positions >= prompt - 1) & (positions < ends - 1)  # logits at t predict token t + 1
    if batch.get("distillation_mask") is not None:
        predicts_continuation &= batch["distillation_mask"].bool()
    scored = {**batch, "distillation_mask": predicts_continuation.to(ids.dtype)}
    if batch.get("labels") is not None:  # a collator without labels (no L_clm) has none to cut
        scored["labels"] = batch["labels"].masked_fill((positions < prompt) | ~attention, IGNORE_INDEX)
    return scored


def _continuation_lengths(new_tokens, eos_ids):
    """Tokens of each generated continuation, up to and including its first end-of-sequence token."""
    lengths = []
    for row in new_tokens.tolist():
        ends = [j for j, token in enumerate(row) if token in eos_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


def generate_batch(model, batch, key, max_new_tokens, temperature, pad_id, eos_ids):
    """The batch with each sequence's continuation replaced by one `model` generates from its prompt.

    temperature > 0 samples from the model's distribution at that temperature (no top-k/top-p cut); 0 is greedy.
    """
    from transformers import GenerationConfig

    prompts, prompt_mask, prompt_lengths = _prompts(batch)
    eos_ids = set(eos_ids)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
                              pad_token_id=pad_id, eos_token_id=sorted(eos_ids) or None)
    devices = [prompts.device.index or 0] if prompts.device.type == "cuda" else []
    was_training = model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(key)  # the sampling draws from the step's key (a resume draws the same)
        model.eval()
        try:
            out = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=config)
        finally:
            model.train(was_training)
    new_tokens = out[:, prompts.shape[1]:]
    new_lengths = _continuation_lengths(new_tokens, eos_ids)
    return _assemble(batch, prompt_lengths, new_tokens, new_lengths, pad_id)


def _assemble(batch, prompt_lengths, new_tokens, new_lengths, pad_id):
    """Right-padded prompt + continuation, with labels and distillation_mask on the continuation only."""
    ids = batch["input_ids"]
    rows = len(prompt_lengths)
    width = max(p + n for p, n in zip(prompt_lengths, new_lengths))
    input_ids = torch.full((rows, width), pad_id, dtype=ids.dtype, device=ids.device)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    predicts_new = torch.zeros_like(input_ids)
    for i, (p, n) in enumerate(zip(prompt_lengths, new_lengths)):
        input_ids[i, :p] = ids[i, :p]
        input_ids[i, p:p + n] = new_tokens[i, :n]
        attention[i, :p + n] = 1
        labels[i, p:p + n] = new_tokens[i, :n]
        predicts_new[i, p - 1:p + n - 1] = 1  # logits at t predict token t + 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "distillation_mask": predicts_new, PROMPT_LENGTH_KEY: batch[PROMPT_LENGTH_KEY]}


class OnPolicyBatches:
    """Replaces the micro-batches of an optimizer step by generated ones, as `lmbda` and `seq_kd` ask."""

    def __init__(self, args, pad_id, eos_ids):
        self.lmbda, self.seq_kd, self.seed = args.lmbda, args.seq_kd, args.seed
        self.max_new_tokens, self.temperature = args.max_new_tokens, args.generation_temperature
        self.pad_id, self.eos_ids = pad_id, eos_ids
        self.generated = {"student": 0, "teacher": 0}  # micro-batches generated so far, by whom

    @property
    def active(self):
        return self.lmbda > 0 or self.seq_kd

    def __call__(self, batches, student, teacher, step, process):
        out = []
        for micro, batch in enumerate(batches):
            key = step_key(self.seed, step, micro, process)
            source = "student" if draw_on_policy(self.lmbda, key) else "teacher" if self.seq_kd else None
            if source is None:  # the dataset's continuation, scored on the same positions as a generated one
                out.append(continuation_only(batch))
                continue
            model = student if source == "student" else teacher
            out.append(generate_batch(model, batch, key, self.max_new_tokens, self.temperature, self.pad_id,
                                      self.eos_ids))
            self.generated[source] += 1
        return out


def make_on_policy(args, student, processing_class, is_causal_lm):
    """OnPolicyBatches for the trainer, or None when neither lmbda nor seq_kd asks for generation."""
    if not (args.lmbda > 0 or args.seq_kd):
        return None
    if not is_causal_lm:
        raise ValueError(f"lmbda={args.lmbda}, seq_kd={args.seq_kd}: generating continuations needs a causal-LM "
                         f"student, but the student is {type(student).__name__}; set lmbda=0 and seq_kd=False.")
    config = getattr(student, "generation_config", None) or student.config
    eos = getattr(processing_class, "eos_token_id", None)
    eos = eos if eos is not None else getattr(config, "eos_token_id", None)
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = getattr(processing_class, "pad_token_id", None)
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)  # hidden by the attention mask anyway
    return OnPolicyBatches(args, int(pad), eos_ids)
