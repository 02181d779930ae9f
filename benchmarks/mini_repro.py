"""A mini-scale reproduction of the DistilBERT paper's GLUE table and its loss ablation, on 2 CPU cores.

    python benchmarks/mini_repro.py                          # full size: about 75 minutes on 2 quiet CPU cores (estimate)
    python benchmarks/mini_repro.py --smoke --output_dir /tmp/mr   # tiny sizes, under a minute

Stages, all in this one process:
1. Distil a 3-layer student (teacher layers 0,2,4) from the real all-MiniLM-L6-v2 on the demo corpus (Wikipedia
   lead sections) with the recipe pipeline (`recipes/configs/demo.yaml` + overrides), once per variant, at the
   same compute (steps, batch, data): the triple loss, then without L_ce, without L_cos, without L_mlm, and the
   triple loss from randomly initialised weights (`--student_init random`; its random position embeddings are
   trained, not frozen). The teacher's MLM head (the checkpoint ships without one) is fitted once, by the first
   variant, and every other variant loads that fitted teacher; the script checks its body is the shipped MiniLM's.
2. Fine-tune the teacher (MiniLM body + a new classification head) and each student on CoLA, MRPC, RTE, SST-2 and
   STS-B with eval/run_glue.py: the same fixed training subset per task (a seeded random sample, written under
   <output_dir>/glue_data), the full dev sets (or their first --glue_eval_samples rows), fixed seeds.
3. Write <output_dir>/tables.md (and print it): the GLUE table in the paper's layout with "% of teacher", and the
   ablation table (macro-score change from the triple-loss student, next to the paper's figures).

Re-running the same command reuses every finished variant and GLUE result; other sizes on the same --output_dir are
refused (pass --overwrite to start that folder afresh). Numbers at this scale are far noisier than the paper's
(one seed by default, 600 training examples per task): differences of a few points are within seed noise.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")  # every input is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

DEMO_CONFIG = REPO / "recipes" / "configs" / "demo.yaml"
DEFAULT_GLUE_DIR = REPO.parent / "shared" / "data" / "glue"
SETTINGS_FILE = "settings.json"

# (key, row label, ablation label, the paper's variation on the GLUE macro-score, pipeline overrides)
VARIANTS = (
    ("triple", "3L student, triple loss", None, None, []),
    ("no_ce", "3L student, w/o L_ce", "∅ - L_cos - L_mlm (no L_ce)", -2.96, ["--alpha_ce", "0"]),
    ("no_cos", "3L student, w/o L_cos", "L_ce - ∅ - L_mlm (no L_cos)", -1.46, ["--alpha_cos", "0"]),
    ("no_mlm", "3L student, w/o L_mlm", "L_ce - L_cos - ∅ (no L_mlm)", -0.31, ["--alpha_mlm", "0"]),
    ("random_init", "3L student, random init", "Triple loss + random weights initialisation", -3.69,
     ["--student_init", "random", "--freeze_pos_embs", "false"]),
)
TEACHER_KEY, TEACHER_LABEL = "teacher", "all-MiniLM-L6-v2 (teacher, 6L)"
# task -> (folder in GLUE's release, column title); columns in the paper's order.
TASKS = {"cola": ("CoLA", "CoLA (MCC)"), "mrpc": ("MRPC", "MRPC (F1/acc)"), "rte": ("RTE", "RTE (acc)"),
         "sst2": ("SST-2", "SST-2 (acc)"), "stsb": ("STS-B", "STS-B (Pearson/Spearman)")}
BATCH = 16  # distillation batch (demo.yaml)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/mini_repro")
    p.add_argument("--distil_steps", type=int, default=100, help="Distillation steps per variant (batch 16 x 128).")
    p.add_argument("--head_fit_steps", type=int, default=100, help="Steps fitting the teacher's MLM head (once).")
    p.add_argument("--glue_train_samples", type=int, default=600, help="Training examples per GLUE task.")
    p.add_argument("--glue_eval_samples", type=int, default=None, help="First N dev examples (default: all).")
    p.add_argument("--glue_epochs", type=float, default=3.0)
    p.add_argument("--glue_lr", type=float, default=1e-4)
    p.add_argument("--glue_batch", type=int, default=16)
    p.add_argument("--seeds", default="42", help="Fine-tuning seeds (median reported), e.g. 42,43,44.")
    p.add_argument("--tasks", default="cola,mrpc,rte,sst2,stsb")
    p.add_argument("--glue_dir", default=str(DEFAULT_GLUE_DIR), help="GLUE TSV folders (CoLA/, MRPC/, ...).")
    p.add_argument("--smoke", action="store_true", help="Tiny sizes (a test runs this): 2 distil steps, 16 "
                                                        "training examples, SST-2 only, a short corpus.")
    p.add_argument("--overwrite", action="store_true", help="Delete an earlier run of other sizes in --output_dir.")
    return p


def resolve_sizes(args):
    """The sizes of this run; --smoke replaces the defaults (explicit flags still win)."""
    if args.smoke:
        given = {a.split("=")[0] for a in sys.argv[1:]} if args._argv is None else {
            a.split("=")[0] for a in args._argv}
        smoke = dict(distil_steps=2, head_fit_steps=2, glue_train_samples=16, glue_eval_samples=32, glue_epochs=1.0,
                     tasks="sst2", glue_batch=8)
        for key, value in smoke.items():
            if f"--{key}" not in given:
                setattr(args, key, value)
    tasks = [t.strip().lower().replace("-", "") for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown {unknown or 'empty list'}; choose from {', '.join(TASKS)}.")
    for name in ("distil_steps", "head_fit_steps", "glue_train_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    glue_dir = Path(args.glue_dir)
    missing = [TASKS[t][0] for t in tasks if not (glue_dir / TASKS[t][0] / "train.tsv").is_file()]
    if missing:
        raise FileNotFoundError(f"No GLUE train.tsv for {missing} under {glue_dir}; pass --glue_dir (folders "
                                "CoLA/, MRPC/, RTE/, SST-2/, STS-B/ of GLUE's release) or fewer --tasks.")
    return dict(distil_steps=args.distil_steps, head_fit_steps=args.head_fit_steps,
                distil_train_sequences=args.distil_steps * (4 if args.smoke else BATCH),
                glue_train_samples=args.glue_train_samples, glue_eval_samples=args.glue_eval_samples,
                glue_epochs=args.glue_epochs, glue_lr=args.glue_lr, glue_batch=args.glue_batch,
                seeds=args.seeds, tasks=tasks, smoke=args.smoke)


def claim_output_dir(out, sizes, overwrite):
    """One folder holds one set of sizes: a rerun with the same ones resumes, other ones are refused."""
    settings = out / SETTINGS_FILE
    if settings.exists():
        previous = json.loads(settings.read_text())
        if previous != sizes:
            if not overwrite:
                changed = sorted(k for k in set(previous) | set(sizes) if previous.get(k) != sizes.get(k))
                raise FileExistsError(f"{out} holds a run with other sizes ({', '.join(changed)} differ); pass "
                                      "--overwrite to delete it, or another --output_dir.")
            for child in ("distil", "glue", "glue_data", "data", "demo_corpus.txt", "tables.md", "timings.json",
                          SETTINGS_FILE):
                target = out / child
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a mini_repro run (no {SETTINGS_FILE}); choose another "
                              "--output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(settings, json.dumps(sizes, indent=2, sort_keys=True) + "\n")


def _write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- 1. distillation


def variant_argv(name, overrides, out, sizes, teacher, tokenizer, corpus, fit_steps):
    argv = ["--teacher_name", str(teacher), "--tokenizer_name", str(tokenizer), "--file_path", str(corpus),
            "--data_cache_dir", str(out / "data"), "--output_dir", str(out / "distil" / name),
            "--fit_teacher_mlm_head_steps", str(fit_steps), "--max_steps", str(sizes["distil_steps"]),
            "--max_train_samples", str(sizes["distil_train_sequences"]), "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", str(max(1, sizes["distil_steps"] // 20)),
            "--card_model_name", f"all-MiniLM-L6-v2-3layer-{name}", "--disable_tqdm", "false"]
    if sizes["smoke"]:
        argv += ["--per_device_train_batch_size", "4", "--max_length", "32", "--report", "false"]
    return argv + overrides


def check_shared_teacher(head_dir, shipped_dir, fit_steps):
    """The fitted teacher the other variants load: the shipped MiniLM body, tensor for tensor, plus the head."""
    import torch
    from transformers import BertForMaskedLM, BertModel

    marker = json.loads((head_dir / "fitted_mlm_head.json").read_text())
    if marker["steps"] != fit_steps:
        raise RuntimeError(f"{head_dir} holds a head fitted for {marker['steps']} steps, not {fit_steps}.")
    fitted = BertForMaskedLM.from_pretrained(head_dir).bert.state_dict()
    shipped = BertModel.from_pretrained(shipped_dir).state_dict()
    compared = [k for k in shipped if k in fitted]
    different = [k for k in compared if not torch.equal(fitted[k], shipped[k])]
    if different or len(compared) < len(fitted):
        raise RuntimeError(f"the fitted teacher in {head_dir} is not the shipped MiniLM body: {different[:3]}")
    return len(compared)


def distil_all(out, sizes, timings):
    from distil_trainer.pipeline.demo_inputs import demo_corpus, demo_teacher_dir
    from distil_trainer.pipeline import TEACHER_HEAD_DIR, main as run_recipe

    shipped = demo_teacher_dir()
    corpus = demo_corpus(out / "demo_corpus.txt", max_articles=300 if sizes["smoke"] else None)
    students = {}
    head_dir = None
    for i, (name, label, _, _, overrides) in enumerate(VARIANTS):
        print(f"\n===== distil {i + 1}/{len(VARIANTS)}: {label} =====", flush=True)
        start = time.perf_counter()
        if head_dir is None:  # the first variant fits the teacher's MLM head (cached in its output folder)
            argv = variant_argv(name, overrides, out, sizes, shipped, shipped, corpus, sizes["head_fit_steps"])
        else:
            argv = variant_argv(name, overrides, out, sizes, head_dir, shipped, corpus, 0)
        result = run_recipe(default_config=str(DEMO_CONFIG), argv=argv)
        timings[f"distil {name}" + (" (incl. teacher head fit)" if head_dir is None else "")] = \
            time.perf_counter() - start
        if head_dir is None:
            head_dir = Path(result["output_dir"]) / TEACHER_HEAD_DIR
            n = check_shared_teacher(head_dir, shipped, sizes["head_fit_steps"])
            print(f"teacher check: {head_dir} has the shipped all-MiniLM-L6-v2 body ({n} tensors equal) and a head "
                  f"fitted for {sizes['head_fit_steps']} steps; the other variants load it (no refit)", flush=True)
        students[name] = Path(result["student_dir"])
    return shipped, students


# ---------------------------------------------------------------- 2. GLUE


def write_glue_subsets(glue_dir, out, sizes):
    """Per task: a fixed random sample of the training rows (seed 0, kept in file order) and the dev file."""
    subsets = {}
    for task in sizes["tasks"]:
        folder = TASKS[task][0]
        target = out / "glue_data" / folder
        if not (target / "train.tsv").exists():
            from run_glue import TASKS as GLUE_TASKS

            lines = (Path(glue_dir) / folder / "train.tsv").read_bytes().split(b"\n")
            if lines and lines[-1] == b"":
                lines = lines[:-1]
            header, rows = (lines[:1], lines[1:]) if GLUE_TASKS[task].tsv_header else ([], lines)
            n = min(sizes["glue_train_samples"], len(rows))
            keep = sorted(random.Random(0).sample(range(len(rows)), n))
            tmp = out / "glue_data" / f".{folder}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "train.tsv").write_bytes(b"\n".join(header + [rows[i] for i in keep]) + b"\n")
            shutil.copyfile(Path(glue_dir) / folder / "dev.tsv", tmp / "dev.tsv")
            os.replace(tmp, target)
        subsets[task] = target
    return subsets


def finetune_all(models, subsets, out, sizes, timings):
    import run_glue

    for key, path in models.items():
        start = time.perf_counter()
        for task, data_dir in subsets.items():
            task_out = out / "glue" / key / task
            if (task_out / f"results_glue_{task}.json").exists():
                print(f"GLUE {task} / {key}: reusing {task_out}", flush=True)
                continue
            print(f"\n===== GLUE {task} / {key} =====", flush=True)
            argv = ["--model_name_or_path", str(path), "--task_name", task, "--data_dir", str(data_dir),
                    "--output_dir", str(task_out), "--seeds", sizes["seeds"], "--num_train_epochs",
                    str(sizes["glue_epochs"]), "--learning_rate", str(sizes["glue_lr"]), "--warmup_steps", "0.1",
                    "--per_device_train_batch_size", str(sizes["glue_batch"]), "--per_device_eval_batch_size", "64",
                    "--max_seq_length", "64" if sizes["smoke"] else "128", "--disable_tqdm", "true", "--logging_steps", "50"]
            if sizes["glue_eval_samples"]:
                argv += ["--max_eval_samples", str(sizes["glue_eval_samples"])]
            run_glue.main(argv)
        timings[f"GLUE {key}"] = time.perf_counter() - start


# ---------------------------------------------------------------- 3. tables


def render_tables(out, sizes):
    import make_tables as mt

    tasks = [t for t in TASKS if t in sizes["tasks"]]
    rows, macros = [], {}
    labels = [(TEACHER_KEY, TEACHER_LABEL)] + [(k, label) for k, label, *_ in VARIANTS]
    for key, label in labels:
        results = mt.load_results([out / "glue" / key])
        score, _ = mt.macro(mt.glue_scores(results), tasks)
        macros[key] = score
        cells = []
        for task in tasks:
            values = mt.glue_task_values(results, task)
            cells.append("/".join(f"{v:.1f}" for v in values) if values else mt.MISSING)
        rows.append([label, mt.fmt(score)] + cells + [mt.percent_of(score, macros[TEACHER_KEY])])
    header = ["Model", "Score"] + [TASKS[t][1] for t in tasks] + ["% of teacher"]
    ablation = []
    for key, _, ablation_label, paper, _ in VARIANTS:
        if ablation_label is None:
            continue
        change = macros[key] - macros["triple"] if None not in (macros[key], macros["triple"]) else None
        ablation.append([ablation_label, mt.MISSING if change is None else f"{change:+.2f}", f"{paper:+.2f}"])
    seeds = sizes["seeds"].split(",")
    note = (f"Dev scores x100, median over seeds {sizes['seeds']}; Score = mean over the {len(tasks)} tasks of each "
            "task's mean metric. Students: 3 layers of all-MiniLM-L6-v2 (0,2,4), each distilled for "
            f"{sizes['distil_steps']} steps x {BATCH if not sizes['smoke'] else 4} sequences on Wikipedia lead "
            f"sections; GLUE: {sizes['glue_train_samples']} training examples per task (fixed random subset), "
            f"{sizes['glue_epochs']:g} epochs, lr {sizes['glue_lr']:g}, "
            + (f"first {sizes['glue_eval_samples']} dev examples." if sizes["glue_eval_samples"] else "full dev sets.")
            + (" One seed: differences of a few points are within run-to-run noise." if len(seeds) == 1 else ""))
    return ("## GLUE dev (mini-scale reproduction)\n\n" + mt.table(header, rows) + "\n\n" + note + "\n\n"
            "## Ablation (variation on the GLUE macro-score, relative to the triple-loss student)\n\n"
            + mt.table(["Ablation", "Variation on GLUE macro-score", "Paper (DistilBERT)"], ablation) + "\n\n"
            "Same steps, batch and data for every variant; the random-init student also trains its position "
            "embeddings (frozen copies of the teacher's otherwise).\n")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = None if argv is None else list(argv)
    sizes = resolve_sizes(args)
    out = Path(args.output_dir).resolve()
    claim_output_dir(out, sizes, args.overwrite)
    print("mini_repro sizes: " + json.dumps(sizes), flush=True)
    timings, start = {}, time.perf_counter()

    shipped, students = distil_all(out, sizes, timings)
    subsets = write_glue_subsets(args.glue_dir, out, sizes)
    finetune_all({TEACHER_KEY: shipped, **students}, subsets, out, sizes, timings)
    markdown = render_tables(out, sizes)
    _write_atomic(out / "tables.md", markdown)
    timings["total"] = time.perf_counter() - start

    print("\n" + markdown)
    print(f"wrote {out / 'tables.md'}")
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    print("wall time per stage:")
    for name, seconds in timings.items():
        print(f"  {name:<45s} {seconds / 60:6.1f} min")
    _write_atomic(out / "timings.json", json.dumps(timings, indent=2) + "\n")
    return {"tables": out / "tables.md", "markdown": markdown, "timings": timings, "sizes": sizes}


if __name__ == "__main__":
    main()
