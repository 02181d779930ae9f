"""Other ways to cut SmolLM2-135M to bench_pruning.py's student size, probed against its best student (c): where
each starts (WikiText-2 test perplexity before healing) and, with --heal_steps, where it is after forward-KL healing
(bench_pruning's healing: same blocks, order, schedule and seed). It asks whether a better start or another healing
rate brings issue 22's target (at most 75% of the parameters, at most 1.5x the teacher's perplexity) within reach.

    python benchmarks/probe_pruned_starts.py --starts mlp,mlp_refit,depth24,hidden540 --output_dir runs/probe
    python benchmarks/probe_pruned_starts.py --starts mlp_refit --heal_steps 80 --output_dir runs/probe

Starts, each with (b)'s parameter count (20 of 30 layers; `--target_parameters`):
- ``mlp``: bench_pruning's (c): every layer, MLP width-pruned by Minitron activation importance.
- ``mlp_refit``: (c), then each layer's MLP output projection re-fitted by least squares so that the kept neurons
  reproduce the teacher's full MLP output on calibration tokens (the layer-wise reconstruction of Kwon et al. 2022,
  "A Fast Post-Training Pruning Framework for Transformers"): with G = A^T A over the teacher's MLP activations A,
  W' = W G[:, kept] (G[kept, kept] + ridge)^-1. Position 0 of every sequence is left out of G: its attention-sink
  activations are orders of magnitude larger and would decide the fit alone.
- ``depth{K}``: K layers by block influence, then the MLP width that gives the same count.
- ``hidden{H}``: every layer, hidden size H (a multiple of 9) and the matching MLP width.
Writes <output_dir>/probe.json and prints one line per start. Probes only: the library does not ship the re-fit.
"""

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_pruning  # noqa: E402
import bench_smollm2 as smol_bench  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/probe_pruned_starts")
    p.add_argument("--starts", default="mlp,mlp_refit,depth24,hidden540")
    p.add_argument("--teacher", default=None)
    p.add_argument("--corpus", default=None)
    p.add_argument("--eval_file", default=str(smol_bench.WIKITEXT2_TEST))
    p.add_argument("--eval_tokens", type=int, default=8192)
    p.add_argument("--eval_window", type=int, default=256)
    p.add_argument("--target_parameters", type=int, default=99_114_048, help="(b)'s count in bench_pruning.")
    p.add_argument("--calibration_tokens", type=int, default=4096)
    p.add_argument("--refit_tokens", type=int, default=32768)
    p.add_argument("--refit_ridge", type=float, default=1e-3, help="Times the mean of G[kept, kept]'s diagonal.")
    p.add_argument("--heal_steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=56)
    return p.parse_args(argv)


def mlp_grams(teacher, calibration, batch_size=8):
    """Per layer, G = A^T A (float64) of the teacher's MLP activations (the down projection's input), position 0 of
    every sequence and padding left out."""
    import torch

    layers, state = teacher.model.layers, {}
    grams = [None] * len(layers)

    def hook(i):
        def add(module, args):
            keep = state["mask"].clone()
            keep[:, 0] = False
            a = args[0].double()[keep]
            grams[i] = a.T @ a if grams[i] is None else grams[i] + a.T @ a
        return add

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in calibration.batches(batch_size):
                state["mask"] = batch["attention_mask"].bool()
                teacher.model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def refit_down_projections(student, teacher, kept, grams, ridge):
    """Least-squares re-fit of each student layer's down projection to the teacher's full MLP output."""
    import torch

    with torch.no_grad():
        for i, layer in enumerate(student.model.layers):
            k = torch.as_tensor(kept[i])
            gram_kk = grams[i][k][:, k]
            gram_kk = gram_kk + ridge * gram_kk.diagonal().mean() * torch.eye(len(k), dtype=gram_kk.dtype)
            w = teacher.model.layers[i].mlp.down_proj.weight.double()  # [hidden, intermediate]
            fitted = torch.linalg.solve(gram_kk, grams[i][k] @ w.T)  # [kept, hidden]
            layer.mlp.down_proj.weight.copy_(fitted.T.to(layer.mlp.down_proj.weight.dtype))


def build(start, teacher, calibration, args, grams):
    from distil_trainer.extraction import extract_student

    depth, hidden = {}, teacher.config.hidden_size
    if start.startswith("depth"):
        depth = dict(strategy="block_influence", num_layers=int(start[5:]))
    elif start.startswith("hidden"):
        hidden = int(start[6:])
    elif start not in ("mlp", "mlp_refit"):
        raise ValueError(f"Unknown start {start!r}: mlp, mlp_refit, depth<K> or hidden<H>.")
    width = bench_pruning.width_for(teacher, args.target_parameters, hidden, layers=depth.get("num_layers"))
    student, report = extract_student(teacher, calibration=calibration, hidden_size=hidden, intermediate_size=width,
                                      progress=False, return_report=True, **depth)
    if start == "mlp_refit":
        refit_down_projections(student, teacher, report.width["kept"]["neurons"], grams(), args.refit_ridge)
    return student


def main(argv=None):
    args = parse_args(argv)
    import torch

    from distil_trainer.extraction import load_calibration

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(args.seed)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer, _ = smol_bench.load_teacher_and_tokenizer(args.teacher)
    # The first blocks are the same whatever their number: calibration matches bench_pruning's.
    needed_tokens = max(args.calibration_tokens, args.refit_tokens)
    n_blocks = max(args.heal_steps * args.batch, -(-needed_tokens // args.block))
    dataset = smol_bench.training_blocks(tokenizer, args.corpus, n_blocks, args.block, args.seed)
    calibration = load_calibration(dataset, tokenizer, args.calibration_tokens, args.block)
    cached = {}

    def grams():
        if "grams" not in cached:
            cached["grams"] = mlp_grams(teacher, load_calibration(dataset, tokenizer, args.refit_tokens, args.block))
        return cached["grams"]

    ids = smol_bench.eval_ids(tokenizer, args.eval_file, args.eval_tokens)
    rows = {"teacher": {"ppl": smol_bench.perplexity(teacher, ids, args.eval_window),
                        "parameters": teacher.num_parameters()}}
    print(f"teacher: perplexity {rows['teacher']['ppl']:.2f}", flush=True)
    heal = types.SimpleNamespace(steps=args.heal_steps, batch=args.batch, seed=args.seed,
                                 learning_rate=args.learning_rate)
    for start in args.starts.split(","):
        begun = time.perf_counter()
        student = build(start, teacher, calibration, args, grams)
        row = {"parameters": student.num_parameters(), "intermediate_size": student.config.intermediate_size,
               "layers": student.config.num_hidden_layers, "ppl": smol_bench.perplexity(student, ids,
                                                                                       args.eval_window)}
        if args.heal_steps:
            weights = bench_pruning.LOSS_WEIGHTS[bench_pruning.KL]
            row["heal_seconds"], _ = smol_bench.distil(out, start, weights, student, teacher, dataset, tokenizer, heal)
            row["healed_ppl"] = smol_bench.perplexity(student, ids, args.eval_window)
        row["seconds"] = time.perf_counter() - begun
        rows[start] = row
        healed = f", after {args.heal_steps} steps {row['healed_ppl']:.2f}" if args.heal_steps else ""
        print(f"{start}: {row['layers']} layers, MLP {row['intermediate_size']}, {row['parameters']:,} parameters "
              f"({row['parameters'] / rows['teacher']['parameters']:.1%}), perplexity {row['ppl']:.2f} "
              f"({row['ppl'] / rows['teacher']['ppl']:.2f}x){healed}", flush=True)
    (out / "probe.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
