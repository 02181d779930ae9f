"""Seconds per optimizer step of `DistillationTrainer` against an independent hand-written PyTorch loop.

    python benchmarks/bench_step.py                       # every case, the issue's sizes (about 10 minutes)
    python benchmarks/bench_step.py --cases mlm,clm --steps 5 --rounds 2

The reference loop is written here in plain torch with the original research code's exact math and calls nothing
of `distil_trainer` (so it sees the project's loss code get slower): `F.kl_div(F.log_softmax(s / T),
F.softmax(t / T), reduction="batchmean") * T^2` over the rows L_ce reads, `F.cross_entropy` for the LM loss,
`1 - F.cosine_similarity` of the last hidden states over non-padding tokens, `clip_grad_norm_` and the same AdamW.
The student's LM head projects every position, as a model's forward does.

Cases (tiny models, random weights, the student extracted from the teacher's layers; real WikiText-2 text with
ids folded into a `--vocab` vocabulary; batch `--batch` x `--seq` tokens, padded; T = 2, DistilBERT's weights
alpha_ce 5, alpha_lm 2, alpha_cos 1):
  mlm           BERT 6 layers -> DistilBERT 3 layers, L_ce at every non-padding token, the trainer's defaults
  mlm_restrict  the same with L_ce at the masked positions only (`restrict_ce_to_mask`), in both loops
  clm           GPT-2 6 layers -> GPT-2 3 layers, L_clm in place of L_mlm, the trainer's defaults
  clm_full      the clm case with the trainer on full logits (`logits_chunk_size=0`): the unfused path
  mlm_full      the mlm case with the trainer on full logits

Each case alternates trainer and reference `--rounds` times in one process (1 warm-up step and `--steps` timed
steps each), on one thread, and reports the median per-step process CPU time (steady on a shared machine) and
wall time; the trainer's step is timed from `on_step_begin` to `on_step_end`. Before timing, one step of each from
the same weights must give the same loss and the same updated weights (no dropout). `--memory` also runs each side
of each case alone in a child process and reports its peak resident memory (`ru_maxrss`) over a few steps.
"""

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEMPERATURE, ALPHA_CE, ALPHA_LM, ALPHA_COS = 2.0, 5.0, 2.0, 1.0
# DistillationArguments' defaults (DistilBERT's optimisation), used by both loops.
LR, BETAS, EPS, MAX_GRAD_NORM = 5e-4, (0.9, 0.98), 1e-6, 5.0
CASES = {  # name: (family, restrict_ce_to_mask, trainer overrides)
    "mlm": ("bert", False, {}),
    "mlm_restrict": ("bert", True, {}),
    "clm": ("gpt2", False, {}),
    "mlm_full": ("bert", False, {"logits_chunk_size": 0}),
    "clm_full": ("gpt2", False, {"logits_chunk_size": 0}),
}
DISTINCT_BATCHES = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="mlm,mlm_restrict,clm,mlm_full,clm_full",
                   help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="alternations of trainer and reference per case")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--teacher_layers", type=int, default=6)
    p.add_argument("--student_layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--memory", action="store_true", help="also measure each side's peak memory in a child process")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # "case:side": one side alone, for --memory
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "hidden", "teacher_layers", "student_layers", "vocab", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.student_layers > args.teacher_layers:
        p.error("--student_layers must be at most --teacher_layers")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    return args


# ---- models and data ----

def build_models(family, args):
    """(teacher, student): a random teacher (seed 0, no dropout) and the student extracted from its layers."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from distil_trainer.extraction import extract_student

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    if family == "bert":
        config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.teacher_layers,
                            num_attention_heads=heads, intermediate_size=4 * args.hidden, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, max_position_embeddings=512)
        teacher, student_type = BertForMaskedLM(config).eval(), "distilbert"
    else:
        config = GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.teacher_layers, n_head=heads,
                            n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        teacher, student_type = GPT2LMHeadModel(config).eval(), "same"
    layers = sorted({round(i * (args.teacher_layers - 1) / max(args.student_layers - 1, 1))
                     for i in range(args.student_layers)})
    student = extract_student(teacher, layers=layers, student_type=student_type)
    return teacher, student


def build_batches(family, args, n=DISTINCT_BATCHES):
    """`n` fixed batches of real text padded to --seq, ids >= --vocab folded to an in-vocabulary id; MLM batches
    masked once with a fixed seed (80/10/10 of 15%), CLM labels are the ids (-100 on padding)."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    tok = tiny.bert_tokenizer() if family == "bert" else tiny.gpt2_tokenizer()
    lines = tiny.real_lines(args.batch * n, min_words=4)
    if len(lines) < args.batch * n:
        sys.exit(f"Only {len(lines)} WikiText lines found under {tiny.SHARED_DATA}; need {args.batch * n}.")
    g = torch.Generator().manual_seed(1234)
    unk = tok.unk_token_id if tok.unk_token_id is not None and tok.unk_token_id < args.vocab else 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = []
    for i in range(n):
        rows = [tok(line, truncation=True, max_length=args.seq)["input_ids"] for line in lines[i::n][:args.batch]]
        ids = torch.full((args.batch, args.seq), pad % args.vocab)
        attention = torch.zeros(args.batch, args.seq, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)], attention[r, :len(row)] = torch.tensor(row), 1
        ids[ids >= args.vocab] = unk
        batch = {"input_ids": ids, "attention_mask": attention}
        if family == "bert":
            specials = torch.isin(ids, torch.tensor(tok.all_special_ids))  # [CLS], [SEP] are never masked
            chosen = (torch.rand(ids.shape, generator=g) < 0.15) & attention.bool() & ~specials
            if not chosen.any():  # tiny batches: at least one masked token, or the MLM averages are over nothing
                chosen[0, 1] = True
            labels = ids.masked_fill(~chosen, -100)
            roll = torch.rand(ids.shape, generator=g)
            masked = ids.masked_fill(chosen & (roll < 0.8), tok.mask_token_id)
            random = torch.randint(0, args.vocab, ids.shape, generator=g)
            batch["input_ids"] = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random, masked)
            batch["labels"] = labels
            batch["token_type_ids"] = torch.zeros_like(ids)
        else:
            batch["labels"] = ids.masked_fill(attention == 0, -100)
        batches.append(batch)
    return batches


# ---- the reference loop: plain torch, nothing of distil_trainer ----

def reference_loss(student, teacher, batch, family, restrict):
    keep = batch["attention_mask"].bool()
    s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        teacher_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        t_out = teacher(**teacher_inputs, output_hidden_states=True)
    rows = (batch["labels"] != -100) if restrict else keep
    s_rows, t_rows = s_out.logits[rows], t_out.logits[rows]
    ce = F.kl_div(F.log_softmax(s_rows / TEMPERATURE, dim=-1), F.softmax(t_rows / TEMPERATURE, dim=-1),
                  reduction="batchmean") * TEMPERATURE ** 2
    if family == "bert":
        lm = F.cross_entropy(s_out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    else:
        lm = F.cross_entropy(s_out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    cos = (1 - F.cosine_similarity(s_out.hidden_states[-1][keep], t_out.hidden_states[-1][keep], dim=-1)).mean()
    return ALPHA_CE * ce + ALPHA_LM * lm + ALPHA_COS * cos


def reference_optimizer(student):
    return torch.optim.AdamW(student.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)


def reference_step(student, teacher, optimizer, batch, family, restrict):
    loss = reference_loss(student, teacher, batch, family, restrict)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def run_reference(student, teacher, batches, family, restrict, warmup, steps):
    student.train()
    optimizer = reference_optimizer(student)
    times = []
    for i in range(warmup + steps):
        start = clocks()
        reference_step(student, teacher, optimizer, batches[i % len(batches)], family, restrict)
        if i >= warmup:
            times.append(elapsed(start, clocks()))
    return times


# ---- the trainer ----

def clocks():
    return time.perf_counter(), time.process_time()


def elapsed(start, end):
    return end[0] - start[0], end[1] - start[1]


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(clocks())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(clocks())

    return StepTimer()


def make_trainer(student, teacher, batches, max_steps, out_dir, family, restrict, overrides, callbacks=()):
    from transformers.trainer_callback import PrinterCallback

    from distil_trainer import DistillationArguments, DistillationTrainer

    lm_weight = {"alpha_mlm": ALPHA_LM} if family == "bert" else {"alpha_mlm": 0.0, "alpha_clm": ALPHA_LM}
    args = DistillationArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=1, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch_fused", temperature=TEMPERATURE, alpha_ce=ALPHA_CE, alpha_cos=ALPHA_COS,
        restrict_ce_to_mask=restrict, train_sampling_strategy="sequential", logging_steps=10**9, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, **lm_weight, **overrides)
    dataset = [batches[i % len(batches)] for i in range(max_steps)]  # one pre-built batch per step, as is
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=lambda features: features[0], callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_trainer(student, teacher, batches, warmup, steps, out_dir, family, restrict, overrides):
    timer = step_timer()
    make_trainer(student, teacher, batches, warmup + steps, out_dir, family, restrict, overrides, [timer]).train()
    return [elapsed(b, e) for b, e in zip(timer.begins, timer.ends)][warmup:]


def first_step_check(student, teacher, batches, out_dir, family, restrict, overrides):
    """(trainer loss, reference loss, max |weight difference| / max |update|) after one step from equal weights."""
    student_t, student_r = copy.deepcopy(student), copy.deepcopy(student)
    trainer = make_trainer(student_t, teacher, batches, 1, out_dir, family, restrict, overrides)
    recorded = []
    compute_loss = trainer.compute_loss

    def recording(*a, **kw):
        loss = compute_loss(*a, **kw)
        recorded.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    student_r.train()
    ref = float(reference_step(student_r, teacher, reference_optimizer(student_r), batches[0], family, restrict))
    diff = max((a - b).abs().max().item() for a, b in zip(student_t.parameters(), student_r.parameters()))
    update = max((a - b).abs().max().item() for a, b in zip(student.parameters(), student_r.parameters()))
    return recorded[0], ref, diff / max(update, 1e-30)


# ---- one case ----

def median(xs, clock):
    return statistics.median(x[clock] for x in xs)


def run_case(name, args, tmp):
    family, restrict, overrides = CASES[name]
    teacher, student = build_models(family, args)
    batches = build_batches(family, args)
    trainer_loss, ref_loss, diff = first_step_check(student, teacher, batches, tmp, family, restrict, overrides)
    rel = abs(trainer_loss - ref_loss) / max(abs(ref_loss), 1e-12)
    same = rel < 1e-4 and diff < 1e-2
    print(f"[{name}] first step: trainer loss {trainer_loss:.6f}, reference {ref_loss:.6f} (rel diff {rel:.1e}); "
          f"max |weight diff| {diff:.1e} of the max update -> {'same math' if same else 'MISMATCH'}")
    trainer_times, reference_times = [], []
    for r in range(args.rounds):
        for side in (("trainer", "reference") if r % 2 == 0 else ("reference", "trainer")):
            if side == "trainer":
                trainer_times += run_trainer(student, teacher, batches, 1, args.steps, tmp, family, restrict,
                                             overrides)
            else:
                reference_times += run_reference(student, teacher, batches, family, restrict, 1, args.steps)
    result = {"case": name, "same_math": same}
    for clock, label in ((1, "cpu"), (0, "wall")):
        t, m = median(trainer_times, clock), median(reference_times, clock)
        result[label] = {"trainer_s": t, "reference_s": m, "ratio": t / m}
    print(f"[{name}] median s/step over {len(reference_times)} steps per side: trainer {result['cpu']['trainer_s']:.4f}"
          f" / reference {result['cpu']['reference_s']:.4f} CPU -> ratio {result['cpu']['ratio']:.3f}; wall ratio "
          f"{result['wall']['ratio']:.3f}")
    return result


def child_peak_memory(name, side, args):
    """Peak resident memory (MiB) of a child process running `side` of case `name` alone for a few steps."""
    cmd = [sys.executable, __file__, "--_child", f"{name}:{side}", "--steps", "3", "--hidden", str(args.hidden),
           "--teacher_layers", str(args.teacher_layers), "--student_layers", str(args.student_layers),
           "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def run_child(spec, args):
    name, side = spec.split(":")
    family, restrict, overrides = CASES[name]
    teacher, student = build_models(family, args)
    batches = build_batches(family, args)
    with tempfile.TemporaryDirectory() as tmp:
        if side == "trainer":
            run_trainer(student, teacher, batches, 1, args.steps, tmp, family, restrict, overrides)
        else:
            run_reference(student, teacher, batches, family, restrict, 1, args.steps)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None):
    import logging

    args = parse_args(argv)
    torch.set_num_threads(1)  # one thread: CPU time is then this process's own work, steady on a shared machine
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("distil_trainer").setLevel(logging.ERROR)
    if args._child:
        run_child(args._child, args)
        return 0
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; teacher {args.teacher_layers} x "
          f"{args.hidden} -> student {args.student_layers} x {args.hidden}, vocabulary {args.vocab}, batch "
          f"{args.batch} x {args.seq}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            result = run_case(name, args, tmp)
            if args.memory:
                result["peak_mib"] = {side: child_peak_memory(name, side, args) for side in ("trainer", "reference")}
                print(f"[{name}] peak memory: trainer {result['peak_mib']['trainer']:.0f} MiB, reference "
                      f"{result['peak_mib']['reference']:.0f} MiB")
            results.append(result)
    print("\n| case | trainer s/step (CPU) | reference s/step (CPU) | ratio (CPU) | ratio (wall) | same math |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['case']} | {r['cpu']['trainer_s']:.4f} | {r['cpu']['reference_s']:.4f} | "
              f"**{r['cpu']['ratio']:.3f}** | {r['wall']['ratio']:.3f} | {'yes' if r['same_math'] else 'NO'} |")
    return 0 if all(r["same_math"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
