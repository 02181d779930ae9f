"""How much of the mini reproduction's teacher a top-k cache keeps: the teacher's probability inside its k largest
logits at the masked positions, at the training temperature (T = 2) and at T = 1.

    python benchmarks/topk_coverage.py --output_dir runs/topk_coverage     # ~3 min on 2 shared CPU cores

The teacher is mini_repro.py's: the shipped all-MiniLM-L6-v2 with its MLM head fitted (body frozen) by the pipeline's
own fitter (`fit_mlm_head`, at most --fit_steps updates, tied decoder, early stopping) on the first --sequences
demo-corpus sequences of at most 128 tokens, masked as mini_repro masks them (DistilBERT masking, token counts of
those sequences, smoothing 0.7, seed 56). On the same sequences the teacher cache is built as mini_repro's pipeline
builds it (top --top_k logits at the masked positions, coverage measured at --temperature): its statistics give the
figure, and a plain float64 softmax over every logit gives it again for several k as a cross-check. Writes
<output_dir>/topk_coverage.json and prints it.
"""

import argparse
import json
import os
import sys
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")  # every input is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KS = (32, 128, 1024, 4096)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--sequences", type=int, default=400, help="Demo-corpus sequences fitted and measured on.")
    p.add_argument("--fit_steps", type=int, default=400, help="At most this many head updates (mini_repro's).")
    p.add_argument("--top_k", type=int, default=1024, help="The cache's k (mini_repro's --teacher_cache_top_k).")
    p.add_argument("--temperature", type=float, default=2.0, help="The training temperature (mini_repro's).")
    p.add_argument("--seed", type=int, default=56)
    return p.parse_args(argv)


def fitted_teacher_and_data(out, args):
    from transformers import AutoTokenizer, BertForMaskedLM

    from distil_trainer.data import MaskedLMCollator
    from distil_trainer.data.binarize import binarize
    from distil_trainer.data.token_counts import compute_token_counts
    from distil_trainer.pipeline.demo_inputs import demo_corpus, demo_teacher_dir
    from distil_trainer.pipeline.teacher_head import fit_mlm_head

    tokenizer = AutoTokenizer.from_pretrained(demo_teacher_dir())
    lines = demo_corpus(out / "demo_corpus.txt").read_text(encoding="utf-8").splitlines()
    corpus = out / f"first_{args.sequences}_lines.txt"  # the corpus's head: its first sequences, as mini_repro's
    corpus.write_text("\n".join(lines[:args.sequences]) + "\n", encoding="utf-8")
    data_dir = out / f"data_{args.sequences}"
    dataset = binarize(data_dir, tokenizer, file_path=str(corpus), max_length=128, verbose=False).dataset
    dataset = dataset.select(range(min(args.sequences, len(dataset))))
    counts = compute_token_counts(data_dir, vocab_size=len(tokenizer)).counts
    collator = MaskedLMCollator(tokenizer, token_counts=counts, mlm_smoothing=0.7, seed=args.seed)
    identity = {"teacher": "all-MiniLM-L6-v2", "steps": args.fit_steps, "sequences": len(dataset), "seed": args.seed}
    teacher, _ = fit_mlm_head(BertForMaskedLM.from_pretrained(demo_teacher_dir()).eval(), dataset, collator,
                              out / "teacher", args.fit_steps, identity, seed=args.seed)
    return teacher, tokenizer, dataset, collator


def plain_coverage(teacher, cache, temperatures):
    """{T: {k: mean over the cached positions of softmax(z / T)'s mass on the k largest logits}} in float64."""
    import torch

    sums = {T: {k: 0.0 for k in KS} for T in temperatures}
    n = 0
    with torch.no_grad():
        for row in cache.epoch(0).select_columns(["input_ids", "teacher_positions"]).to_list():
            if not row["teacher_positions"]:
                continue
            logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0, row["teacher_positions"]].double()
            n += logits.shape[0]
            for T in temperatures:
                top = torch.softmax(logits / T, -1).sort(-1, descending=True).values.cumsum(-1)
                for k in KS:
                    sums[T][k] += float(top[:, k - 1].sum())
    return {str(T): {str(k): v / n for k, v in by_k.items()} for T, by_k in sums.items()}, n


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from distil_trainer.teacher_cache import build_teacher_cache

    teacher, tokenizer, dataset, collator = fitted_teacher_and_data(out, args)
    from distil_trainer.pipeline.teacher_head import FIT_LOG

    fit_log = out / "teacher" / FIT_LOG
    fit = json.loads(fit_log.read_text())["summary"] if fit_log.exists() else None
    cache = build_teacher_cache(teacher, dataset, out / "cache", tokenizer, top_k=args.top_k, positions="masked",
                                mlm_collator=collator, batch_size=16, temperature=args.temperature, verbose=False)
    plain, positions = plain_coverage(teacher, cache, sorted({1.0, args.temperature}))
    s = cache.stats
    result = {"sequences": len(dataset), "masked_positions": positions, "top_k": args.top_k,
              "temperature": args.temperature, "cache_topk_mass_at_temperature": s["topk_mass_mean_at_temperature"],
              "cache_topk_mass_t1": s["topk_mass_mean"], "plain_float64_mass_by_T_and_k": plain,
              "head_fit": fit}
    (out / "topk_coverage.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"top-{args.top_k} coverage at the masked positions: {100 * s['topk_mass_mean_at_temperature']:.1f}% of the "
          f"teacher's probability at T = {args.temperature:g}, {100 * s['topk_mass_mean']:.1f}% at T = 1")
    return result


if __name__ == "__main__":
    main()
