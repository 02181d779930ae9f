"""Per-token frequencies of a binarized dataset (replaces the original `scripts/token_counts.py`).

Counting is vectorised: `np.bincount` over the flat values of each Arrow chunk of `input_ids`.
The vector is saved as `.npy` (allow_pickle=False) with a JSON sidecar (`<name>.json`) holding the
dataset fingerprint, vocab size, totals and the file's sha256; a later call with the same dataset and
vocab size reuses it. Written atomically.
"""

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import cache

DEFAULT_COUNTS_FILE = "token_counts.npy"


@dataclass
class TokenCountsResult:
    counts: np.ndarray  # int64, shape [vocab_size]
    path: Path
    cache_hit: bool
    seconds: float = 0.0


def _flat_values(list_array):
    """Token ids of a (chunked piece of a) list column as one numpy array, respecting slices."""
    if isinstance(list_array, pa.ChunkedArray):
        return [v for chunk in list_array.chunks for v in _flat_values(chunk)]
    return [list_array.flatten().to_numpy(zero_copy_only=False)]


def count_tokens(dataset, vocab_size=None, column="input_ids"):
    """Frequency of every token id in `dataset[column]` (a datasets.Dataset), as an int64 vector."""
    if column not in dataset.column_names:
        raise ValueError(f"Dataset has no {column!r} column (columns: {dataset.column_names}).")
    if getattr(dataset, "_indices", None) is not None:  # a select()/shuffle() view: count what it shows
        dataset = dataset.flatten_indices()
    counts = np.zeros(vocab_size or 0, dtype=np.int64)
    for values in _flat_values(dataset.data.column(column)):
        if values.size == 0:
            continue
        try:  # one pass: bincount itself rejects negative ids, and its length reveals the largest id
            chunk_counts = np.bincount(values, minlength=len(counts))
        except ValueError:
            raise ValueError(f"Negative token id in {column!r}.") from None
        if vocab_size is not None and len(chunk_counts) > vocab_size:
            raise ValueError(f"Token id {len(chunk_counts) - 1} does not fit a count vector of vocab_size={vocab_size}: "
                             "the data's vocabulary is larger. Pass the tokenizer's full size (len(tokenizer)) as "
                             "--vocab_size.")
        if len(chunk_counts) > len(counts):
            counts = np.pad(counts, (0, len(chunk_counts) - len(counts)))
        counts += chunk_counts
    return counts


def save_counts_atomic(path, counts):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
    try:
        with open(tmp, "wb") as f:
            np.save(f, counts, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves neither a partial file nor a changed one
        raise


def load_token_counts(path):
    """Counts saved by `compute_token_counts` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Token counts {str(path)!r} not found. Create them with `distil-trainer "
                                "token-counts --data_file <binarized dir>`.")
    counts = np.load(path, allow_pickle=False)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{path} does not hold a 1-D integer count vector (shape {counts.shape}, {counts.dtype}).")
    return counts


def compute_token_counts(data_dir, output_path=None, vocab_size=None, overwrite=False):
    """Count tokens of the binarized dataset in `data_dir`; save to `output_path` (default
    `<data_dir>/token_counts.npy`) with a `.json` sidecar. Reuses a matching saved vector."""
    from .binarize import load_binarized

    start = time.perf_counter()
    data_dir = Path(data_dir)
    dataset, meta = load_binarized(data_dir)
    if vocab_size is None:
        vocab_size = meta["tokenizer"]["vocab_size"]
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}.")
    output_path = Path(output_path) if output_path is not None else data_dir / DEFAULT_COUNTS_FILE
    sidecar = output_path.with_suffix(".json")
    wanted = {"dataset_fingerprint": meta["fingerprint"], "vocab_size": int(vocab_size)}

    old = cache.read_json(sidecar)
    if output_path.exists():
        matches = isinstance(old, dict) and "file" in old and all(old.get(k) == v for k, v in wanted.items())
        if matches and not cache.check_files(output_path.parent, {output_path.name: old["file"]}):
            return TokenCountsResult(load_token_counts(output_path), output_path, True,
                                     time.perf_counter() - start)
        if not matches and not overwrite:
            raise ValueError(f"{output_path} exists but was counted for another dataset or vocab_size. Pass "
                             "overwrite=True (--overwrite) or choose another --token_counts_dump.")
    counts = count_tokens(dataset, vocab_size)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    save_counts_atomic(output_path, counts)
    info = {**wanted, "total_tokens": int(counts.sum()), "distinct_tokens": int(np.count_nonzero(counts)),
            "num_rows": len(dataset), "file": cache.describe_files(output_path.parent, [output_path.name])[output_path.name]}
    cache.write_json_atomic(sidecar, info)
    return TokenCountsResult(counts, output_path, False, time.perf_counter() - start)
