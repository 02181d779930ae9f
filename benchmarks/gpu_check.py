"""GPU check: BERT-base -> DistilBERT distillation steps in bf16 at sequence length 512 with DistillationTrainer,
then teacher vs student inference throughput. Run through `benchmarks/gpu_check.sh` (which installs carried wheels
and bounds the run to 8 minutes); `--smoke` runs tiny sizes, on CPU too.

    bash benchmarks/gpu_check.sh                 # one CUDA GPU, about 2 minutes
    python benchmarks/gpu_check.py --smoke       # tiny sizes, any device

Training: teacher BertForMaskedLM with BERT-base's shape (random weights, cast to bf16: it is frozen), student
DistilBertForMaskedLM extracted from teacher layers 0,2,4,7,9,11 (fp32 master weights, bf16 autocast via
`bf16=True`), DistilBERT triple loss (alpha_ce 5, alpha_mlm 2, alpha_cos 1, T 2), fused AdamW. The data are random
token ids with 15% of positions masked, pre-built in memory (no `datasets` needed). Step time: a TrainerCallback
with `torch.cuda.synchronize()` at on_step_begin / on_step_end (forward, backward, clip, optimizer step), median.

MFU = FLOPs per token x tokens/s / peak. FLOPs per token (training with an inference-only teacher):
    6 x N_student + 2 x N_teacher                          (parameter FLOPs; forward 2N, backward 4N)
  + 12 x L x h x layers_student + 4 x L x h x layers_teacher  (attention scores QK^T and weighted V, L = seq length)
where N counts parameters that take part in matmuls: all but the position and token-type embeddings (the word
embedding is counted once, as the tied MLM decoder). Peak: H200 dense bf16 989 TFLOP/s (`--peak_tflops`).
Both MFU figures (without and with the attention term) are printed.

Inference: the encoders alone (BertModel vs DistilBertModel), bf16, batch 64 x 512 tokens, inference_mode.

Output goes to stdout and, when $OUT is set (or --out is given), to $OUT/gpu_check.txt (written line by line to
gpu_check.txt.partial, renamed at the end, so a run cut short still leaves its figures).
"""

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VOCAB, CLS, SEP, MASK = 30522, 101, 102, 103  # bert-base-uncased ids
H200_BF16_DENSE_TFLOPS = 989.0
STUDENT_LAYERS = [0, 2, 4, 7, 9, 11]
FULL = dict(layers=12, hidden=768, heads=12, ffn=3072, seq=512, batch=32, warmup=5, steps=30,
            infer_batch=64, infer_warmup=3, infer_iters=20)
SMOKE = dict(layers=4, hidden=64, heads=2, ffn=256, seq=32, batch=4, warmup=1, steps=3,
             infer_batch=4, infer_warmup=1, infer_iters=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                   help="tiny sizes (also via GPU_CHECK_SMOKE=1); runs on CPU")
    for key, value in FULL.items():
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({SMOKE[key]} with --smoke)")
    p.add_argument("--peak_tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="dense bf16 peak of the GPU used for MFU (H200 SXM: 989)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT when set)")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) < (0 if key.endswith("warmup") else 1):
            p.error(f"--{key} must be positive")
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"])
    student_layers = STUDENT_LAYERS if args.layers == 12 else list(range(0, args.layers, 2))
    args.student_layers = student_layers
    return args


class Report:
    """Prints each line and appends it to <out>/gpu_check.txt.partial; `close` renames it to gpu_check.txt."""

    def __init__(self, out_dir):
        self.final = self.partial = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.final = out_dir / "gpu_check.txt"
            if self.final.exists():  # never overwrite an earlier result: number the new one
                n = 1
                while (out_dir / f"gpu_check.{n}.txt").exists():
                    n += 1
                self.final = out_dir / f"gpu_check.{n}.txt"
            self.partial = self.final.with_name(self.final.name + ".partial")
            self.partial.write_text("")

    def __call__(self, line=""):
        print(line, flush=True)
        if self.partial is not None:
            with open(self.partial, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def close(self):
        if self.partial is not None:
            os.replace(self.partial, self.final)
            print(f"wrote {self.final}")


# ---- models and data ----

def build_models(args, device):
    from transformers import BertConfig, BertForMaskedLM

    from distil_trainer.extraction import extract_student

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.ffn,
                        max_position_embeddings=max(512, args.seq))
    teacher = BertForMaskedLM(config).eval()
    student = extract_student(teacher, layers=args.student_layers, student_type="distilbert")
    teacher = teacher.to(device=device, dtype=torch.bfloat16)  # frozen: no fp32 master copy needed
    return teacher, student.to(device)


def random_batches(batch, seq, n=4, seed=0):
    """`n` MLM batches of random ids: [CLS] ... [SEP], 15% of inner positions masked (label = original id)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1000, VOCAB, (batch, seq), generator=g)
        ids[:, 0], ids[:, -1] = CLS, SEP
        masked = torch.rand(batch, seq, generator=g) < 0.15
        masked[:, 0] = masked[:, -1] = False
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        batches.append({"input_ids": ids.masked_fill(masked, MASK), "attention_mask": torch.ones_like(ids),
                        "labels": labels})
    return batches


def matmul_params(model):
    """Parameters that enter matmuls: all but position / token-type embeddings (lookups only)."""
    skip = ("position_embeddings", "token_type_embeddings")
    return sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in skip))


# ---- training ----

def synced_step_timer(device):
    from transformers import TrainerCallback

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(now())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(now())

    return StepTimer()


def train_check(args, teacher, student, device, report):
    from transformers.trainer_callback import PrinterCallback

    from distil_trainer import DistillationArguments, DistillationTrainer

    batches = random_batches(args.batch, args.seq)
    total = args.warmup + args.steps
    timer = synced_step_timer(device)
    with tempfile.TemporaryDirectory() as tmp:
        targs = DistillationArguments(
            output_dir=tmp, max_steps=total, per_device_train_batch_size=1, learning_rate=5e-5,
            bf16=True, use_cpu=device.type != "cuda", optim="adamw_torch_fused", lr_scheduler_type="constant",
            alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, train_sampling_strategy="sequential",
            dataloader_num_workers=0, logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=targs,
                                      train_dataset=[batches[i % len(batches)] for i in range(total)],
                                      data_collator=lambda features: features[0], callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
    step_s = statistics.median(e - b for b, e in list(zip(timer.begins, timer.ends))[args.warmup:])
    tokens_per_s = args.batch * args.seq / step_s

    n_s, n_t = matmul_params(student), matmul_params(teacher)
    s_layers, t_layers = len(args.student_layers), args.layers
    param_flops = 6 * n_s + 2 * n_t
    attn_flops = 12 * args.seq * args.hidden * s_layers + 4 * args.seq * args.hidden * t_layers
    peak = args.peak_tflops * 1e12
    report(f"train: teacher BertForMaskedLM {t_layers}x{args.hidden} bf16 ({n_t / 1e6:.1f}M matmul params), "
           f"student DistilBertForMaskedLM {s_layers}x{args.hidden} fp32+bf16 autocast ({n_s / 1e6:.1f}M)")
    report(f"train: batch {args.batch} x seq {args.seq}, {args.steps} timed steps after {args.warmup} warm-up; "
           f"final loss {result.training_loss:.3f}")
    report(f"train: median {step_s * 1000:.1f} ms/step, {tokens_per_s:,.0f} tokens/s")
    report(f"train: FLOPs/token = 6*N_s + 2*N_t = {param_flops / 1e9:.3f} G; + attention 12*L*h*l_s + 4*L*h*l_t "
           f"= {(param_flops + attn_flops) / 1e9:.3f} G")
    report(f"train: MFU vs {args.peak_tflops:g} TFLOP/s bf16 dense: {100 * param_flops * tokens_per_s / peak:.3g}% "
           f"(params only), {100 * (param_flops + attn_flops) * tokens_per_s / peak:.3g}% (with attention)")
    if device.type == "cuda":
        report(f"train: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


# ---- inference ----

def throughput(model, ids, mask, warmup, iters, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            model(input_ids=ids, attention_mask=mask)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(input_ids=ids, attention_mask=mask)
        sync()
    return iters * ids.numel() / (time.perf_counter() - start)


def inference_check(args, teacher, student, device, report):
    t_enc = teacher.bert.eval()
    s_enc = copy.deepcopy(student.distilbert).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, VOCAB, (args.infer_batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    rates = {}
    # Alternate the two, twice each, and keep each one's better figure.
    for name, model in (("teacher", t_enc), ("student", s_enc), ("teacher", t_enc), ("student", s_enc)):
        rate = throughput(model, ids, mask, args.infer_warmup, args.infer_iters, device)
        rates[name] = max(rates.get(name, 0.0), rate)
    report(f"inference (encoders, bf16, batch {args.infer_batch} x seq {args.seq}): teacher "
           f"{rates['teacher']:,.0f} tokens/s, student {rates['student']:,.0f} tokens/s, "
           f"student/teacher x{rates['student'] / rates['teacher']:.2f} "
           f"(layer ratio x{args.layers / len(args.student_layers):.2f})")


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("distil_trainer").setLevel(logging.ERROR)
    report = Report(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        if args.smoke:  # one thread: OpenMP barriers on a shared CPU make tiny runs slow, not more telling
            torch.set_num_threads(1)
        name = f"CPU ({torch.get_num_threads()} threads)"
    report(f"gpu_check{' --smoke' if args.smoke else ''}: {name}, torch {torch.__version__}, "
           f"transformers {__import__('transformers').__version__}")
    if device.type != "cuda" and not args.smoke:
        report("warning: no CUDA device; the figures below are CPU figures, and MFU against a GPU peak is meaningless")
    start = time.perf_counter()
    teacher, student = build_models(args, device)
    report(f"built models in {time.perf_counter() - start:.1f} s")
    train_check(args, teacher, student, device, report)
    inference_check(args, teacher, student, device, report)
    report(f"total {time.perf_counter() - start:.1f} s")
    report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
