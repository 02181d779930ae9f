"""Trainer overhead: seconds per optimizer step of `DistillationTrainer` vs a minimal hand-written PyTorch loop.

    python benchmarks/bench_step.py --steps 20 --rounds 5 --hidden 128 --batch 8 --seq 128

Both sides do the same math on the same models and the same pre-built, pre-masked batches (real WikiText-2 lines,
bert-base-uncased vocabulary): teacher forward under no_grad, student forward + backward, the DistilBERT triple loss
(5 * KL(teacher||student) * T^2 + 2 * MLM + 1 * (1 - cos) of the last hidden states, T=2), gradient clipping at
the Trainer's default max_grad_norm 1.0, and AdamW with the Trainer's default hyper-parameters (fused, lr 5e-5,
betas 0.9/0.999, eps 1e-8, no weight decay) at a constant learning rate. The two alternate in one process,
`--rounds` times, each round running 1 warm-up step and then `--steps` timed steps per side, so that machine
noise hits both.

How the Trainer step is timed: a `TrainerCallback` records `time.perf_counter()` at `on_step_begin` and
`on_step_end`. That window holds forward, backward, clipping, the optimizer and scheduler steps and zero_grad,
and excludes `train()` setup (optimizer and dataloader creation) and the fetch of the next batch. Because the
DistillationTrainer also does per-step work before `on_step_begin` (`get_batch_samples` counts the items of the
step) and after `on_step_end` (the log/save/evaluate check), the script also reports the interval from one
`on_step_begin` to the next, which holds everything the Trainer does per step; the manual loop's equivalent is
the same as its step time (its batches are already in a list). Headline: the in-step ratio; target <= 1.10 on CPU.
Each figure is given twice: wall-clock, and CPU time of the process (`time.process_time`). With the default single
thread, CPU time counts only this process's own work, so it is the steadier figure on a machine shared with other
jobs; on a quiet machine the two agree.

`--manual_loss plain` (default) writes the loss in plain torch (`F.kl_div` etc.), so the ratio includes both the
Trainer's plumbing and the cost of `distil_trainer.losses`' implementation plus the per-step teacher-agreement
statistic the trainer logs; `--manual_loss library` calls `distil_trainer.losses` in the manual loop too, leaving
the plumbing (and the agreement statistic) alone in the ratio.

Sanity check first: from identical weights and with the same dropout seed, one step of each gives the same loss and
the same updated student weights.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEMPERATURE, ALPHA_CE, ALPHA_MLM, ALPHA_COS = 2.0, 5.0, 2.0, 1.0
# The Trainer's defaults (transformers 5, torch >= 2.8: optim="adamw_torch_fused").
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-5, (0.9, 0.999), 1e-8, 0.0, 1.0
DISTINCT_BATCHES = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side per round")
    p.add_argument("--rounds", type=int, default=5, help="alternations of Trainer and manual loop")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of teacher and student")
    p.add_argument("--teacher_layers", type=int, default=4, help="teacher depth; the student takes every other layer")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (padded/truncated)")
    p.add_argument("--manual_loss", choices=sorted(LOSS_FUNCTIONS), default="plain",
                   help="the manual loop's loss: 'plain' torch lines (default) or distil_trainer.losses' functions")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 by default because on a shared machine OpenMP barriers across "
                        "busy cores turn milliseconds into seconds")
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "hidden", "teacher_layers", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.teacher_layers < 2:
        p.error("--teacher_layers must be >= 2 (the student keeps every other layer)")
    return args


# ---- models and data ----

def build_models(hidden, teacher_layers):
    """BERT MLM teacher (random, seed 0) and the DistilBERT student extracted from its even layers."""
    from transformers import BertConfig, BertForMaskedLM

    from distil_trainer.extraction import extract_student

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=teacher_layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512)
    teacher = BertForMaskedLM(config).eval()
    student = extract_student(teacher, layers=list(range(0, teacher_layers, 2)), student_type="distilbert")
    return teacher, student


def build_batches(batch, seq, n=DISTINCT_BATCHES):
    """`n` fixed batches of real text, padded to `seq`, masked once with a fixed seed."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny
    from transformers import DataCollatorForLanguageModeling

    tok = tiny.bert_tokenizer()
    lines = tiny.real_lines(batch * n, min_words=4)
    if len(lines) < batch * n:
        sys.exit(f"Only {len(lines)} WikiText lines found under {tiny.SHARED_DATA}; need {batch * n}.")
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    torch.manual_seed(1234)
    batches = []
    for i in range(n):
        enc = tok(lines[i * batch:(i + 1) * batch], padding="max_length", truncation=True, max_length=seq)
        features = [{k: enc[k][j] for k in ("input_ids", "token_type_ids", "attention_mask")} for j in range(batch)]
        batches.append(dict(collate(features)))
    return batches


# ---- clocks ----

def clocks():
    """(wall clock, CPU time of this process). With one thread the CPU time is the work this process did,
    unaffected by time slices lost to other processes on a shared machine; wall time is what a user waits."""
    return time.perf_counter(), time.process_time()


def elapsed(start, end):
    return end[0] - start[0], end[1] - start[1]


# ---- the hand-written loop ----

def manual_loss(student, teacher, batch):
    """The triple loss in a few lines of plain torch (token means over non-padding positions)."""
    keep = batch["attention_mask"].bool()
    s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                        output_hidden_states=True)
    s_logits, t_logits = s_out.logits[keep], t_out.logits[keep]
    ce = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1), F.log_softmax(t_logits / TEMPERATURE, -1),
                  log_target=True, reduction="batchmean") * TEMPERATURE ** 2
    mlm = F.cross_entropy(s_out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    cos = (1 - F.cosine_similarity(s_out.hidden_states[-1][keep], t_out.hidden_states[-1][keep], dim=-1)).mean()
    return ALPHA_CE * ce + ALPHA_MLM * mlm + ALPHA_COS * cos


def library_loss(student, teacher, batch):
    """The same loss through distil_trainer.losses (isolates the Trainer's plumbing from the loss code)."""
    from distil_trainer import losses

    keep = batch["attention_mask"].bool()
    s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                        output_hidden_states=True)
    ce = losses.soft_target_kl(s_out.logits, t_out.logits, TEMPERATURE, mask=keep)
    mlm = losses.masked_lm_loss(s_out.logits, batch["labels"])
    cos = losses.hidden_cosine(s_out.hidden_states[-1], t_out.hidden_states[-1], mask=keep)
    return ALPHA_CE * ce + ALPHA_MLM * mlm + ALPHA_COS * cos


LOSS_FUNCTIONS = {"plain": manual_loss, "library": library_loss}
loss_fn = manual_loss  # set by --manual_loss


def manual_optimizer(student):
    return torch.optim.AdamW(student.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             fused=True)


def manual_step(student, teacher, optimizer, batch):
    loss = loss_fn(student, teacher, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def run_manual(student, teacher, batches, warmup, steps):
    """(wall s, CPU s) of each of `steps` timed steps after `warmup` untimed ones.

    A fresh optimizer per call, as each train() call of the Trainer side creates one."""
    student.train()
    optimizer = manual_optimizer(student)
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        start = clocks()
        manual_step(student, teacher, optimizer, batch)
        if i >= warmup:
            times.append(elapsed(start, clocks()))
    return times


# ---- the Trainer ----

def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """(wall, process CPU) clocks at each on_step_begin / on_step_end."""

        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(clocks())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(clocks())

    return StepTimer()


def make_trainer(student, teacher, batches, max_steps, out_dir, callbacks=()):
    from distil_trainer import DistillationArguments, DistillationTrainer

    args = DistillationArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=1, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant", optim="adamw_torch_fused",
        temperature=TEMPERATURE, alpha_ce=ALPHA_CE, alpha_mlm=ALPHA_MLM, alpha_cos=ALPHA_COS,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=10**9,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
    )
    # The dataset is the list of pre-built batches; one "example" per step, handed over as is.
    dataset = [batches[i % len(batches)] for i in range(max_steps)]
    from transformers.trainer_callback import PrinterCallback

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=lambda features: features[0], callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # it would print the end-of-train metrics; timing is ours
    return trainer


def run_trainer(student, teacher, batches, warmup, steps, out_dir):
    """(in-step, begin-to-begin) (wall s, CPU s) pairs of the timed steps of one train() call."""
    timer = step_timer()
    trainer = make_trainer(student, teacher, batches, warmup + steps, out_dir, [timer])
    trainer.train()
    in_step = [elapsed(b, e) for b, e in zip(timer.begins, timer.ends)][warmup:]
    begin_to_begin = [elapsed(b1, b2) for b1, b2 in zip(timer.begins, timer.begins[1:])][warmup:]
    return in_step, begin_to_begin


# ---- sanity: same loss, same update ----

def first_step_check(student, teacher, batches, out_dir):
    """(trainer loss, manual loss, max |weight difference| after one step, trainer optimizer description)."""
    seed = 4321
    student_t, student_m = copy.deepcopy(student), copy.deepcopy(student)

    from transformers import TrainerCallback

    class SeedDropout(TrainerCallback):  # the same dropout masks as the manual step below
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(seed)

    trainer = make_trainer(student_t, teacher, batches, 1, out_dir, [SeedDropout()])
    losses = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})  # the Trainer sets it per parameter group
    settings = [f"{k}={opt.defaults[k]}" for k in ("lr", "betas", "eps", "fused") if k in opt.defaults]
    opt_desc = f"{type(opt).__name__}({', '.join(settings)}, weight_decay={decays})"

    student_m.train()
    torch.manual_seed(seed)
    manual_loss_value = float(manual_step(student_m, teacher, manual_optimizer(student_m), batches[0]))
    # Weight differences relative to the size of the update itself (about lr per weight for Adam's first step).
    diff = max((a - b).abs().max().item() for a, b in zip(student_t.parameters(), student_m.parameters()))
    update = max((a - b).abs().max().item() for a, b in zip(student.parameters(), student_m.parameters()))
    return losses[0], manual_loss_value, diff / max(update, 1e-30), opt_desc


def median_ms(xs):
    """Median in ms; of wall times when given (wall, CPU) pairs."""
    return 1000 * statistics.median(x[0] if isinstance(x, tuple) else x for x in xs)


def main(argv=None):
    import logging

    args = parse_args(argv)
    if args.threads < 1:
        sys.exit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    global loss_fn
    loss_fn = LOSS_FUNCTIONS[args.manual_loss]
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("distil_trainer").setLevel(logging.ERROR)

    teacher, student = build_models(args.hidden, args.teacher_layers)
    batches = build_batches(args.batch, args.seq)
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, manual loss: {args.manual_loss}")
    print(f"teacher BertForMaskedLM {args.teacher_layers}x{args.hidden} ({n_t / 1e6:.1f}M params) -> student "
          f"DistilBertForMaskedLM {student.config.n_layers}x{args.hidden} ({n_s / 1e6:.1f}M params); "
          f"batch {args.batch} x seq {args.seq}, {DISTINCT_BATCHES} distinct pre-masked batches")

    with tempfile.TemporaryDirectory() as tmp:
        trainer_loss, manual_loss_value, diff, opt_desc = first_step_check(student, teacher, batches, tmp)
        rel = abs(trainer_loss - manual_loss_value) / max(abs(manual_loss_value), 1e-12)
        print(f"first-step loss: trainer {trainer_loss:.6f}  manual {manual_loss_value:.6f}  (rel diff {rel:.1e}); "
              f"max |weight diff| after the step {diff:.1e} of the max update; trainer optimizer {opt_desc}")
        print("sanity: " + ("OK, same math" if rel < 1e-4 and diff < 1e-2 else "MISMATCH, the two loops differ"))

        warmup = 1
        trainer_in, trainer_b2b, manual = [], [], []
        for r in range(args.rounds):
            # Alternate which side goes first, so slow drifts of the machine do not favour one.
            order = ("trainer", "manual") if r % 2 == 0 else ("manual", "trainer")
            for side in order:
                if side == "trainer":
                    in_step, b2b = run_trainer(student, teacher, batches, warmup, args.steps, tmp)
                    trainer_in += in_step
                    trainer_b2b += b2b
                else:
                    times = run_manual(student, teacher, batches, warmup, args.steps)
                    manual += times
            print(f"round {r + 1}/{args.rounds}: trainer {median_ms(trainer_in[-args.steps:]):.1f} ms/step, "
                  f"manual {median_ms(manual[-args.steps:]):.1f} ms/step (wall)")

    print(f"median s/step over {len(manual)} steps per side:")
    for k, clock in enumerate(("wall", "cpu")):
        t_in, t_b2b, m = (median_ms([x[k] for x in xs]) for xs in (trainer_in, trainer_b2b, manual))
        print(f"  {clock}: trainer {t_in / 1000:.4f} (in-step), {t_b2b / 1000:.4f} (step-to-step); "
              f"manual {m / 1000:.4f}")
        print(f"  ratio trainer/manual ({clock}, in-step): {t_in / m:.3f}  (target <= 1.10)")
        print(f"  ratio trainer/manual ({clock}, step-to-step, incl. batch fetch and log checks): {t_b2b / m:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
