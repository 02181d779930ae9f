"""Does matching intermediate layers help a narrower student? The triple loss alone against the triple loss plus
TinyBERT's hidden-state term and MiniLMv2's relations, at equal steps, on the demo corpus, scored like the demo.

    python benchmarks/bench_intermediate.py --output_dir runs/bench_intermediate          # about 30 min, 2 CPU cores
    python benchmarks/bench_intermediate.py --smoke --output_dir /tmp/bi                  # tiny sizes, a few minutes

Method (settings in recipes/configs/minilm-l4-h312.yaml):
1. Corpus: the demo's Wikipedia lead sections; the last `heldout_lines` lines are kept out of training (held-out
   fidelity), the first `max_train_samples` sequences of the rest are binarized with the teacher's tokenizer.
2. Teacher: the real all-MiniLM-L6-v2 with its MLM head fitted on that corpus, body frozen (as the demo does;
   cached in <output_dir>/teacher).
3. Student: the teacher's config made narrower and shallower (4 layers x 312, 12 heads), randomly initialised
   once with a fixed seed and saved, so every variant starts from the same weights.
4. Variants, same steps, batch, data order, masking and seed: `triple` = 5 L_ce + 2 L_mlm (L_cos needs equal
   widths: none of it here) and `intermediate` = the same plus alpha_hidden L_hidden and alpha_relation L_relation.
5. Scores, the demo's (distil_trainer.pipeline.student_scores): STS-B dev Spearman of mean-pooled embeddings, and
   on held-out text MLM top-1 agreement with the teacher, masked-token loss and accuracy (the demo's cosines to the
   teacher need the teacher's width: not for this student). The teacher and the untrained student are scored
   beside the two variants.
Writes <output_dir>/results.md (and prints it) and <output_dir>/results.json.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")  # every input is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "recipes" / "configs" / "minilm-l4-h312.yaml"
STSB_DEV = REPO.parent / "shared" / "data" / "glue" / "STS-B" / "dev.tsv"
VARIANTS = ("triple", "intermediate")
LABELS = {"teacher": "all-MiniLM-L6-v2 (teacher, 6L x 384)", "student_init": "4L x 312 student, untrained",
          "triple": "4L x 312, triple loss (5 L_ce + 2 L_mlm)",
          "intermediate": "4L x 312, triple + L_hidden + L_relation"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/bench_intermediate")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--steps", type=int, default=None, help="Distillation steps per variant (default: the config's).")
    p.add_argument("--seed", type=int, default=None, help="Seed of the student's initialisation, data order, masking "
                                                          "and head fit (default: the config's).")
    p.add_argument("--stsb_file", default=str(STSB_DEV) if STSB_DEV.is_file() else None)
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: 2 steps, 64 sequences of 32 tokens.")
    return p.parse_args(argv)


def load_config(path, smoke, steps, seed):
    import yaml

    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if steps is not None:
        config["training"]["max_steps"] = steps
    if seed is not None:
        config["training"]["seed"] = seed
    if smoke:
        config.update(max_train_samples=64, max_length=32, heldout_lines=16, fit_teacher_mlm_head_steps=2)
        config["training"].update(max_steps=2, per_device_train_batch_size=4, logging_steps=1)
    return config


def prepare_data(out, config, teacher_dir=None, corpus=None):
    """(train dataset, held-out file, tokenizer, token counts): the demo corpus (or `corpus`, one sequence per line)
    split into training/held-out, tokenized with the demo teacher's tokenizer (or `teacher_dir`'s)."""
    from transformers import AutoTokenizer

    from distil_trainer.data.binarize import binarize
    from distil_trainer.data.token_counts import compute_token_counts
    from distil_trainer.pipeline.demo_inputs import demo_corpus, demo_teacher_dir

    corpus = Path(corpus) if corpus else demo_corpus(out / "demo_corpus.txt")
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = config["heldout_lines"]
    train_file, heldout_file = out / "train.txt", out / "heldout.txt"
    for path, part in ((train_file, lines[:-held]), (heldout_file, lines[-held:])):
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("\n".join(part) + "\n", encoding="utf-8")
            os.replace(tmp, path)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir or demo_teacher_dir())
    result = binarize(out / "data", tokenizer, file_path=str(train_file), max_length=config["max_length"],
                      verbose=False)
    counts = compute_token_counts(out / "data", vocab_size=len(tokenizer)).counts
    dataset = result.dataset.select(range(min(config["max_train_samples"], len(result.dataset))))
    return dataset, heldout_file, tokenizer, counts


def collator_for(tokenizer, counts, config, seed):
    from distil_trainer.data import MaskedLMCollator

    return MaskedLMCollator(tokenizer, token_counts=counts, mlm_smoothing=config["mlm_smoothing"], seed=seed)


def fitted_teacher(out, dataset, collator, config, teacher_dir=None):
    """The demo teacher (or the BERT in `teacher_dir`) with its MLM head fitted on `dataset`, body frozen."""
    from transformers import BertForMaskedLM

    from distil_trainer.pipeline.demo_inputs import demo_teacher_dir
    from distil_trainer.pipeline.teacher_head import fit_mlm_head

    teacher = BertForMaskedLM.from_pretrained(teacher_dir or demo_teacher_dir()).eval()
    steps = config["fit_teacher_mlm_head_steps"]
    identity = {"teacher": str(teacher_dir or "all-MiniLM-L6-v2"), "steps": steps, "sequences": len(dataset),
                "max_length": config["max_length"], "fit": "fit_mlm_head defaults (the demo's)"}
    teacher, _ = fit_mlm_head(teacher, dataset, collator, out / "teacher", steps, identity,
                              seed=config["training"]["seed"])
    return teacher


def initial_student(out, teacher, config):
    """The narrow student, randomly initialised once (seeded) and saved: every variant starts from it."""
    import torch
    from transformers import BertForMaskedLM

    path = out / "student_init"
    if not (path / "config.json").exists():
        student_config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), **config["student"]})
        torch.manual_seed(config["training"]["seed"])
        BertForMaskedLM(student_config).save_pretrained(path)
    return path


def distil(out, name, teacher, init_dir, dataset, collator, tokenizer, config):
    """Train one variant from the initial student; returns (student dir, seconds, log history)."""
    from transformers import BertForMaskedLM

    from distil_trainer import DistillationArguments, DistillationTrainer

    run_dir = out / name
    if (run_dir / "student" / "config.json").exists():
        log = json.loads((run_dir / "log.json").read_text())
        return run_dir / "student", log["seconds"], log["history"]
    weights = dict(config["intermediate"]) if name == "intermediate" else {}
    args = DistillationArguments(output_dir=str(run_dir), overwrite_output_dir=True, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, **config["training"], **weights)
    student = BertForMaskedLM.from_pretrained(init_dir)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=collator, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(run_dir / "student"))
    history = [e for e in trainer.state.log_history if "loss" in e]
    (run_dir / "log.json").write_text(json.dumps({"seconds": seconds, "history": history}, indent=2))
    return run_dir / "student", seconds, history


def masked_figures(model, teacher, rows, collator, batch_size=32):
    """Held-out masked-token figures of `model`: top-1 agreement with the teacher's MLM prediction, loss and
    accuracy at the positions the run's masking picks (a copy of the collator at epoch 0: the same masks for every
    model). The demo's held-out cosines to the teacher need the teacher's width, so a narrower student has none."""
    import copy

    import torch

    from distil_trainer.pipeline.student_scores import mlm_logits_at

    collator = copy.copy(collator)
    collator.set_epoch(0)
    agree = correct = masked = 0
    loss = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collator(rows[start:start + batch_size])
            where = batch["labels"] != -100
            targets = batch["labels"][where]
            logits = {}
            for key, m in (("model", model), ("teacher", teacher)):
                hidden = m.base_model.eval()(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).last_hidden_state
                logits[key] = mlm_logits_at(m, hidden[where]).float()
            agree += int((logits["model"].argmax(-1) == logits["teacher"].argmax(-1)).sum())
            correct += int((logits["model"].argmax(-1) == targets).sum())
            loss += torch.nn.functional.cross_entropy(logits["model"], targets, reduction="sum").item()
            masked += len(targets)
    return {"top1_agreement": agree / masked, "mlm_loss": loss / masked, "mlm_accuracy": correct / masked,
            "masked_positions": masked}


def score_all(teacher, init_dir, students, tokenizer, collator, heldout_file, config, stsb_file):
    """{model key: scores} of teacher, untrained student and each variant: the demo's STS-B Spearman and its
    held-out masked-token figures."""
    from transformers import BertForMaskedLM

    from distil_trainer.pipeline.student_scores import load_stsb, read_heldout, stsb_spearman

    rows = read_heldout(heldout_file, tokenizer, config["max_length"])
    stsb, source, why = load_stsb(stsb_file)
    models = {"teacher": teacher, "student_init": BertForMaskedLM.from_pretrained(init_dir).eval()}
    models.update({name: BertForMaskedLM.from_pretrained(path).eval() for name, path in students.items()})
    scores = {}
    for key, model in models.items():
        scores[key] = masked_figures(model, teacher, rows, collator)
        if stsb:
            scores[key]["stsb_spearman"] = stsb_spearman(model, tokenizer, stsb, config["max_length"])
    notes = {"stsb_source": source, "stsb_unavailable": why, "stsb_pairs": len(stsb["score"]) if stsb else 0,
             "heldout_sequences": len(rows)}
    return scores, notes


def render(scores, notes, timings, histories, config, fit):
    columns = [("stsb_spearman", "STS-B Spearman (x100)", lambda v: f"{100 * v:.1f}"),
               ("top1_agreement", "MLM top-1 agreement", lambda v: f"{v:.1%}"),
               ("mlm_loss", "masked-token loss", lambda v: f"{v:.3f}"),
               ("mlm_accuracy", "masked-token accuracy", lambda v: f"{v:.1%}")]
    present = [c for c in columns if any(c[0] in s for s in scores.values())]
    lines = ["| model | " + " | ".join(c[1] for c in present) + " |", "|---|" + "---:|" * len(present)]
    for key, s in scores.items():
        lines.append(f"| {LABELS[key]} | " + " | ".join(fmt(s[k]) if k in s else "" for k, _, fmt in present) + " |")
    t = config["training"]
    fit_note = (f"best held-out masked-token loss {fit['heldout_loss']:.2f} at update {fit['best_step']} of at most "
                f"{config['fit_teacher_mlm_head_steps']}; uniform guess {fit['uniform_loss']:.2f}")
    text = ["## Intermediate-layer terms on a narrower student", "", *lines, "",
            f"Same {t['max_steps']} steps x {t['per_device_train_batch_size']} sequences of at most "
            f"{config['max_length']} tokens, data order, masking and seed for both variants; student 4 layers x "
            "312 (12 heads, FFN 1200), random initialisation; teacher all-MiniLM-L6-v2 with its MLM head fitted, "
            f"body frozen ({fit_note}). Intermediate weights: "
            + ", ".join(f"{k}={v}" for k, v in config["intermediate"].items() if v is not None) + "."]
    if notes.get("stsb_source"):
        text.append(f"STS-B: {notes['stsb_pairs']} dev pairs ({notes['stsb_source']}).")
    elif notes.get("stsb_unavailable"):
        text.append(notes["stsb_unavailable"])
    text.append(f"Held-out text: {notes['heldout_sequences']} corpus lines not trained on; masked-token figures at "
                "the positions the run's masking picks there (fixed seed). The demo's cosines to the teacher need "
                "the teacher's width, so they do not apply to this student.")
    for name in histories:
        last = histories[name][-1] if histories[name] else {}
        terms = ", ".join(f"{k} {v:.3f}" for k, v in sorted(last.items()) if k.startswith("loss_"))
        text.append(f"- `{name}`: {timings[name] / 60:.1f} min of training; last logged terms: {terms}.")
    return "\n".join(text) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.smoke, args.steps, args.seed)
    seed = config["training"]["seed"]
    dataset, heldout_file, tokenizer, counts = prepare_data(out, config)
    teacher = fitted_teacher(out, dataset, collator_for(tokenizer, counts, config, seed), config)
    init_dir = initial_student(out, teacher, config)
    students, timings, histories = {}, {}, {}
    for name in VARIANTS:
        print(f"===== distil: {name} =====", flush=True)
        students[name], timings[name], histories[name] = distil(
            out, name, teacher, init_dir, dataset, collator_for(tokenizer, counts, config, seed), tokenizer, config)
    scores, notes = score_all(teacher, init_dir, students, tokenizer, collator_for(tokenizer, counts, config, seed),
                              heldout_file, config, args.stsb_file)
    fit = json.loads((out / "teacher" / "fit_log.json").read_text())["summary"]
    markdown = render(scores, notes, timings, histories, config, fit)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"scores": scores, "seconds": timings, "config": config},
                                                 indent=2), encoding="utf-8")
    print(markdown)
    return {"scores": scores, "markdown": markdown}


if __name__ == "__main__":
    main()
