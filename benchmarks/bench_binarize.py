"""Binarization and token counting vs the original single-process approach, on real WikiText.

    python benchmarks/bench_binarize.py --mb 50 --mb_large 200 --num_proc 2

Builds a temporary corpus of --mb MB by repeating the WikiText files in ../shared/data, then prints:
throughput of `binarize` (num_proc) vs one `tokenizer.encode` per line in a Python loop + pickle dump (the
original `binarized_data.py`; pickle appears only here, as the baseline), the cached second run's time as
a % of the first, `count_tokens` vs `collections.Counter`, and the peak RSS of binarize + count at each size.
Every measured phase runs in its own child process, so peak RSS is that phase's alone.
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext"


def make_corpus(path, mb):
    sources = sorted(WIKITEXT.rglob("*.tokens"))
    if not sources:
        sys.exit(f"No WikiText files under {WIKITEXT}.")
    blobs = [p.read_bytes() for p in sources]
    target, written = mb * (1 << 20), 0
    with open(path, "wb") as f:
        while written < target:
            for b in blobs:
                b = b[:target - written]
                f.write(b)
                written += len(b)
                if written >= target:
                    break
    return path


def load_bert():
    sys.path.insert(0, str(REPO / "tests"))
    import tiny

    return tiny.bert_tokenizer()


def peak_rss_mb():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest tokenization worker
    return own / 1024, kids / 1024


def phase_baseline(corpus, out):
    import numpy as np

    tok = load_bert()
    start = time.perf_counter()
    rows = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = tok.encode(f"{tok.cls_token} {line.strip()} {tok.sep_token}", add_special_tokens=False)
            rows.append(np.uint16(ids))
    with open(out, "wb") as f:
        pickle.dump(rows, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"seconds": time.perf_counter() - start, "lines": len(rows)}


def phase_binarize(corpus, out, num_proc, count):
    sys.path.insert(0, str(REPO))
    from distil_trainer.data import binarize, compute_token_counts

    tok = load_bert()  # outside the timing, as in the baseline
    start = time.perf_counter()
    res = binarize(out, tok, file_path=corpus, max_length=512, num_proc=num_proc, verbose=False)
    result = {"seconds": time.perf_counter() - start, "cache_hit": res.cache_hit, "tokens": res.stats.tokens,
              "lines": res.stats.sequences_read, "rows": len(res.dataset)}
    if count:
        start = time.perf_counter()
        compute_token_counts(out, Path(out).parent / f"counts-{time.time_ns()}.npy")
        result["count_seconds"] = time.perf_counter() - start
    return result


def phase_counting(out):
    sys.path.insert(0, str(REPO))
    from distil_trainer.data import count_tokens, load_binarized

    ds, meta = load_binarized(out)
    start = time.perf_counter()
    counts = count_tokens(ds, meta["tokenizer"]["vocab_size"])
    vectorised = time.perf_counter() - start
    rows = ds["input_ids"][:]  # Python lists, materialised outside the timing (favours the baseline)
    rows = [list(r) for r in rows]
    start = time.perf_counter()
    counter = Counter()
    for r in rows:
        counter.update(r)
    baseline = time.perf_counter() - start
    assert all(counts[t] == n for t, n in counter.items()) and counts.sum() == sum(counter.values())
    return {"vectorised": vectorised, "counter": baseline}


def run_child(*args):
    cmd = [sys.executable, __file__, "--phase", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"phase {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(argv):
    phase, *rest = argv
    if phase == "baseline":
        result = phase_baseline(*rest)
    elif phase == "binarize":
        result = phase_binarize(rest[0], rest[1], int(rest[2]), rest[3] == "1")
    else:
        result = phase_counting(rest[0])
    result["peak_rss_mb"], result["peak_worker_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        return child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="Corpus size in MB (default 50).")
    parser.add_argument("--mb_large", type=int, default=0, help="Also measure peak memory at this size (e.g. 200).")
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--skip_baseline", action="store_true", help="Skip the slow one-encode-per-line baseline.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp / "corpus.txt", args.mb)
        size_mb = corpus.stat().st_size / (1 << 20)
        print(f"corpus: {size_mb:.0f} MB of WikiText, bert-base-uncased tokenizer, num_proc={args.num_proc}")
        first = run_child("binarize", corpus, tmp / "bin", args.num_proc, 0)
        second = run_child("binarize", corpus, tmp / "bin", args.num_proc, 0)
        assert not first["cache_hit"] and second["cache_hit"]
        print(f"binarize (first run):   {first['seconds']:8.1f} s  {size_mb / first['seconds']:6.2f} MB/s  "
              f"{first['lines']:,} lines -> {first['rows']:,} sequences, {first['tokens']:,} tokens")
        print(f"binarize (cached run):  {second['seconds']:8.2f} s  = {100 * second['seconds'] / first['seconds']:.1f}% "
              "of the first")
        if not args.skip_baseline:
            base = run_child("baseline", corpus, tmp / "baseline.pkl")
            print(f"baseline (encode/line + pickle): {base['seconds']:8.1f} s  {size_mb / base['seconds']:6.2f} MB/s"
                  f"  -> binarize is {base['seconds'] / first['seconds']:.1f}x faster")
        counting = run_child("counting", tmp / "bin")
        print(f"token counts: np.bincount over Arrow chunks {counting['vectorised']:.3f} s, Counter "
              f"{counting['counter']:.2f} s -> {counting['counter'] / counting['vectorised']:.0f}x")
        for mb in [args.mb] + ([args.mb_large] if args.mb_large else []):
            c = make_corpus(tmp / f"mem{mb}.txt", mb)
            m = run_child("binarize", c, tmp / f"mem{mb}", args.num_proc, 1)
            print(f"peak RSS, binarize + count at {mb} MB: main process {m['peak_rss_mb']:.0f} MB, largest worker "
                  f"{m['peak_worker_rss_mb']:.0f} MB ({m['seconds']:.1f} s + {m['count_seconds']:.2f} s)")
            c.unlink()


if __name__ == "__main__":
    main()
