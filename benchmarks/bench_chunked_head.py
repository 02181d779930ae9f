"""Peak memory and step time of the LM-head loss: full logits (direct) vs the fused head path (fused), on CPU.

    nice python benchmarks/bench_chunked_head.py --vocabs 49152,151936 --hidden 576 --batch 2 --seq 512 --chunk 128

What one step is: the forward and backward pass of the LM-head terms from the two models' last hidden states
(student `[batch, seq, hidden]` with gradients, teacher's without), for two LM heads `Linear(hidden, vocab)`
(random, seeded, float32). Nothing else of a model runs, so the figures are those of the loss alone.
- `causal`: L_ce (forward KL, T=2) at every position + the student's LM cross-entropy on the next token, as the
  trainer computes them for a causal-LM student with `alpha_ce` and `alpha_clm`.
  direct = both heads project every position (`[tokens x vocab]` logits of each model, as the models' forward
  returns them), then `losses.soft_target_divergence` and `F.cross_entropy`;
  fused = `fused_head.fused_head_terms` (what the trainer runs by default for LM students: each chunk's gradient
  is computed in the forward, nothing is recomputed).
- `mlm`: `restrict_ce_to_mask` with a masked-LM student: L_ce and the MLM loss only at the masked positions
  (`--mask_fraction`, 15%). direct = full logits of every position (what a masked-LM forward returns), then the
  terms at the masked positions; fused projects only the masked positions.
All variants must give the same loss (checked, printed as `sanity`).

How peak memory is measured (torch has no allocator statistics on CPU, and tracemalloc does not see its tensors):
each variant runs in a fresh subprocess with `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor over 64 KiB is its
own mmap that returns to the OS when freed and the resident set size follows the live tensors. The child runs one
warm-up step (which also allocates the gradient buffers, kept and zeroed), resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`), reads VmRSS, runs one step and reads VmHWM: the peak is VmHWM - VmRSS before
the step, i.e. what the loss computation added on top of weights, gradients and inputs. Step time: the median of
`--steps` further steps, wall-clock and process CPU time (with the default single thread, CPU time counts only
this process's own work, so it is the steadier figure on a machine shared with other jobs).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MMAP_THRESHOLD = "65536"


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_inputs(task, vocab, hidden, batch, seq, mask_fraction, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student_head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    student_hidden = torch.randn(batch, seq, hidden, generator=g).requires_grad_(True)
    teacher_hidden = torch.randn(batch, seq, hidden, generator=g)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    if task == "causal":  # every position; the logits at t are scored on the token at t + 1
        kl_mask = torch.ones(batch, seq, dtype=torch.bool)
        targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    else:  # masked LM: only the masked positions
        kl_mask = torch.rand(batch, seq, generator=g) < mask_fraction
        targets = tokens.masked_fill(~kl_mask, -100)
    return student_head, teacher_head, student_hidden, teacher_hidden, kl_mask, targets


def loss_step(variant, inputs, chunk, temperature=2.0):
    """One forward + backward of L_ce + the LM loss, averaged over their items; returns the loss value."""
    import torch
    import torch.nn.functional as F

    from distil_trainer import losses
    from distil_trainer.fused_head import TeacherRows, fused_head_terms

    student_head, teacher_head, h_s, h_t, kl_mask, targets = inputs
    if variant == "fused":  # the coefficients (1 / item count) are known before the forward, as in the trainer
        coefs = {"ce": 1.0 / kl_mask.sum().item(), "lm": 1.0 / (targets != -100).sum().item()}
        loss, _ = fused_head_terms(h_s, TeacherRows(features=h_t, head=teacher_head), student_head.weight,
                                   student_head.bias, temperature, coefs, kl_mask=kl_mask, targets=targets,
                                   chunk_size=chunk)
        loss.backward()
        return loss.item()
    s_logits = student_head(h_s)
    with torch.no_grad():
        t_logits = teacher_head(h_t)
    ce = losses.soft_target_divergence(s_logits, t_logits, temperature, mask=kl_mask, reduction="sum")
    lm = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    loss = ce / kl_mask.sum() + lm / (targets != -100).sum()
    loss.backward()
    return loss.item()


def child(spec):
    """Runs one variant in this (fresh) process and prints one JSON line."""
    import torch

    torch.set_num_threads(spec["threads"])
    inputs = build_inputs(spec["task"], spec["vocab"], spec["hidden"], spec["batch"], spec["seq"],
                          spec["mask_fraction"])
    loss_step(spec["variant"], inputs, spec["chunk"])  # warm-up; allocates the gradient buffers

    def zero_grads():
        inputs[0].weight.grad.zero_()
        inputs[2].grad.zero_()

    zero_grads()
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS")
    loss = loss_step(spec["variant"], inputs, spec["chunk"])
    peak_kib = _status_kib("VmHWM") - before
    walls, cpus = [], []
    for _ in range(spec["steps"]):
        zero_grads()
        wall, cpu = time.perf_counter(), time.process_time()
        loss_step(spec["variant"], inputs, spec["chunk"])
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    print(json.dumps({"loss": loss, "peak_mib": peak_kib / 1024, "peak_reset": reset,
                      "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}))


def run_child(spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['task']}/{spec['variant']}/vocab {spec['vocab']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", default="49152,151936")
    p.add_argument("--tasks", default="causal,mlm", help="causal and/or mlm (see the docstring)")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128, help="rows per chunk of the fused path")
    p.add_argument("--variants", default="direct,fused", help="direct and/or fused; the first is the reference of "
                                                               "the ratios")
    p.add_argument("--mask_fraction", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    tokens = args.batch * args.seq
    print(f"LM-head loss, forward+backward from hidden states: {args.batch} x {args.seq} tokens, hidden "
          f"{args.hidden}, chunk {args.chunk}, threads {args.threads}, {args.steps} timed steps (median), "
          f"load average {os.getloadavg()[0]:.2f}")
    variants = args.variants.split(",")
    print(f"{'task':<7}{'vocab':>8}{'variant':>13}{'peak MiB':>10}{'wall s':>9}{'cpu s':>8}{'loss':>12}")
    for task in args.tasks.split(","):
        for vocab in (int(v) for v in args.vocabs.split(",")):
            rows = {}
            for variant in variants:
                spec = {"task": task, "variant": variant, "vocab": vocab, "hidden": args.hidden,
                        "batch": args.batch, "seq": args.seq, "chunk": args.chunk, "steps": args.steps,
                        "threads": args.threads, "mask_fraction": args.mask_fraction}
                rows[variant] = r = run_child(spec)
                note = "" if r["peak_reset"] else "  (peak RSS could not be reset: includes the warm-up)"
                print(f"{task:<7}{vocab:>8}{variant:>13}{r['peak_mib']:>10.1f}{r['wall_s']:>9.3f}{r['cpu_s']:>8.3f}"
                      f"{r['loss']:>12.6f}{note}")
            d = rows[variants[0]]
            one_tensor = tokens * vocab * 4 / 2**20
            for name in variants[1:]:
                c = rows[name]
                same = abs(d["loss"] - c["loss"]) <= 1e-4 * max(1.0, abs(d["loss"]))
                print(f"  -> {task} vocab {vocab}: peak {variants[0]}/{name} "
                      f"{d['peak_mib'] / max(c['peak_mib'], 1e-9):.2f}x, time {name}/{variants[0]} wall "
                      f"{c['wall_s'] / d['wall_s']:.2f}x cpu {c['cpu_s'] / d['cpu_s']:.2f}x "
                      f"(one fp32 [tokens x vocab] tensor: {one_tensor:.1f} MiB); "
                      f"sanity: {'OK, same loss' if same else 'MISMATCH'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
