"""Binarization: text -> token ids in a cached, memory-mapped Arrow dataset (replaces the original
single-process `scripts/binarized_data.py`, keeping its rules but not its exact splitting; see `sequence_rules`).

The output directory is also the cache. It holds the `save_to_disk` files plus `binarize_metadata.json`
(fingerprint, tokenizer, input, options, statistics, size, mtime and sha256 of every data file). A later call
with the same fingerprint reuses it after checking the files (by default, sizes and modification times; files
whose time changed are re-hashed); a different tokenizer, input (path, size, mtime) or option gives a different
fingerprint, and the existing output is then refused unless `overwrite=True`. A truncated or corrupted output
with the right fingerprint is rebuilt.
Everything is built in a temporary sibling directory and moved into place with `os.replace`.
"""

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import cache
from .sequence_rules import (CHUNK_COLUMN, DROPPED_SHORT, DROPPED_UNK, HELPER_COLUMNS, KEPT, SPLIT_COLUMN,
                             STATUS_COLUMN, SequenceRules, encode_batch, pack_batch)
from .text_input import file_identity, hub_identity, list_text_files, load_hub_text, write_text_arrow

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "binarize_metadata.json"
LENGTH_COLUMN = "length"


@dataclass
class BinarizeStats:
    sequences_read: int = 0
    sequences_split: int = 0  # input sequences longer than max_length
    chunks_from_splits: int = 0
    dropped_short: int = 0
    dropped_unk: int = 0
    kept: int = 0  # sequences after the rules (before packing)
    tokens: int = 0  # tokens in kept sequences, special tokens included
    packed_blocks: int | None = None
    lines_with_bad_bytes: int = 0
    first_bad_line: list | None = None  # [file, line]
    seconds: float = 0.0


@dataclass
class BinarizeResult:
    dataset: object  # datasets.Dataset, memory-mapped from output_dir
    output_dir: Path
    cache_hit: bool
    stats: BinarizeStats
    metadata: dict = field(default_factory=dict)


def wrapping_token_ids(tokenizer):
    """(begin, end, unk) ids the original used: [CLS]/[SEP] for MLM tokenizers, else bos/eos (GPT-2)."""
    begin = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if begin is None or end is None:
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} has no cls/bos or sep/eos token, so sequences cannot "
                         "be wrapped in begin/end special tokens. Add them (tokenizer.add_special_tokens("
                         "{'bos_token': ..., 'eos_token': ...})) or use the model's own tokenizer.")
    unk = tokenizer.unk_token_id
    # GPT-2's unk is <|endoftext|>, also its wrapper: it has no real unknowns, so the rule does not apply.
    if unk in (begin, end):
        unk = None
    return begin, end, unk


# The original scripts/binarized_data.py's --tokenizer_type: which special tokens wrapped each sequence.
ORIGINAL_WRAPPING = {"bert": ("cls_token", "sep_token"), "roberta": ("cls_token", "sep_token"),
                     "gpt2": ("bos_token", "eos_token")}


def check_tokenizer_type(tokenizer, tokenizer_type):
    """Refuse a tokenizer whose begin/end tokens are not those the original `--tokenizer_type` wrapped with."""
    if tokenizer_type not in ORIGINAL_WRAPPING:
        raise ValueError(f"tokenizer_type={tokenizer_type!r}; the original accepted {', '.join(ORIGINAL_WRAPPING)}.")
    expected = [getattr(tokenizer, f"{name}_id", None) for name in ORIGINAL_WRAPPING[tokenizer_type]]
    begin, end, _ = wrapping_token_ids(tokenizer)
    if expected != [begin, end]:
        names = "/".join(ORIGINAL_WRAPPING[tokenizer_type])
        raise ValueError(
            f"--tokenizer_type {tokenizer_type} wraps sequences in the tokenizer's {names}, but "
            f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} would be wrapped in "
            f"{tokenizer.convert_ids_to_tokens([begin, end])}. Give the tokenizer of that model type, or drop "
            "--tokenizer_type (the wrapping always comes from the tokenizer itself).")


def resolve_max_length(tokenizer, max_length):
    if max_length is not None:
        return int(max_length)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is None or model_max > 1_000_000:  # transformers' "no limit" sentinel is huge
        raise ValueError("The tokenizer does not define model_max_length; pass max_length (--max_length).")
    return int(model_max)


def load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _inspect_output(output_dir, fingerprint, parts, verify_checksums):
    """('absent'|'hit'|'corrupt'|'mismatch'|'foreign', detail)."""
    import datasets

    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        return "absent", None
    if not output_dir.is_dir():
        return "foreign", f"{output_dir} is a file, not a binarized dataset directory"
    meta = cache.read_json(output_dir / METADATA_FILE)
    if not isinstance(meta, dict) or "fingerprint" not in meta or "files" not in meta:
        return "foreign", f"{output_dir} exists but has no readable {METADATA_FILE} (not a binarize output, or damaged)"
    if meta["fingerprint"] != fingerprint:
        old = meta.get("fingerprint_parts", {})
        differs = [k for k in parts if old.get(k) != parts[k]] or ["format"]
        return "mismatch", f"{output_dir} was binarized with a different {', '.join(differs)}"
    problems = cache.check_files(output_dir, meta["files"], verify_checksums)
    if problems:
        return "corrupt", problems
    try:
        ds = datasets.load_from_disk(str(output_dir))
    except Exception as e:  # a damaged Arrow file fails in many ways
        return "corrupt", [f"load_from_disk failed: {type(e).__name__}: {e}"]
    if len(ds) != meta.get("num_rows"):
        return "corrupt", [f"{len(ds)} rows on disk, {meta.get('num_rows')} recorded"]
    return "hit", (ds, meta)


def _stats_from_marked(marked, stats):
    """Fill stats from the status/from_split/chunk columns with Arrow, without a Python loop over rows."""
    table = marked.data
    status = table.column(STATUS_COLUMN).to_numpy()
    from_split = table.column(SPLIT_COLUMN).to_numpy(zero_copy_only=False)
    chunk = table.column(CHUNK_COLUMN).to_numpy()
    lengths = table.column(LENGTH_COLUMN).to_numpy()
    stats.sequences_split = int(np.count_nonzero(from_split & (chunk == 0)))
    stats.chunks_from_splits = int(np.count_nonzero(from_split))
    stats.dropped_short = int(np.count_nonzero(status == DROPPED_SHORT))
    stats.dropped_unk = int(np.count_nonzero(status == DROPPED_UNK))
    keep = status == KEPT
    stats.kept = int(np.count_nonzero(keep))
    stats.tokens = int(lengths[keep].sum(dtype=np.int64))
    return np.flatnonzero(keep)


def format_summary(stats, cache_hit, output_dir):
    s = stats
    lines = [
        f"binarize summary ({'cache hit' if cache_hit else 'built'}: {output_dir})",
        f"  sequences read    {s.sequences_read:>12,}",
        f"  split (too long)  {s.sequences_split:>12,}  -> {s.chunks_from_splits:,} chunks",
        f"  dropped short     {s.dropped_short:>12,}",
        f"  dropped unknown   {s.dropped_unk:>12,}",
        f"  kept              {s.kept:>12,}",
        f"  tokens            {s.tokens:>12,}",
    ]
    if s.packed_blocks is not None:
        lines.append(f"  packed blocks     {s.packed_blocks:>12,}")
    if s.lines_with_bad_bytes:
        lines.append(f"  lines with non-UTF-8 bytes (replaced by U+FFFD): {s.lines_with_bad_bytes:,}"
                     f" (first: {s.first_bad_line[0]}, line {s.first_bad_line[1]})")
    lines.append(f"  time              {s.seconds:>11.1f}s")
    return "\n".join(lines)


def _iterate(iterable):
    yield from iterable


def binarize(output_dir, tokenizer, *, file_path=None, dataset_name=None, dataset_config=None, split="train",
             text_column="text", streaming=False, max_length=None, min_length=12, max_unk_share=0.5, pack=None,
             num_proc=None, batch_size=1000, overwrite=False, verify_checksums="changed", verbose=True):
    """Tokenize a corpus into `output_dir` (a `save_to_disk` dataset with `input_ids` and `length`).

    Input: `file_path` (a file with one sequence per line, or a folder of such files) or a Hub dataset
    (`dataset_name`, `dataset_config`, `split`, `text_column`; `streaming=True` for corpora larger than disk).
    `tokenizer`: a fast tokenizer or a name/path for AutoTokenizer. `pack`: block size for causal-LM packing.
    `verify_checksums`: how an existing output is checked before reuse (see `cache.check_files`): "changed"
    hashes only files whose size or modification time changed since they were written, True every file.
    Returns a BinarizeResult; `cache_hit` tells whether an existing output was reused.
    """
    import datasets

    start = time.perf_counter()
    if (file_path is None) == (dataset_name is None):
        raise ValueError("Pass exactly one input: file_path (--file_path) or dataset_name (--dataset_name).")
    if pack is not None and pack < 2:
        raise ValueError(f"pack (block size) must be at least 2, got {pack}.")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}.")
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(tokenizer)
    begin, end, unk = wrapping_token_ids(tokenizer)
    rules = SequenceRules(begin_id=begin, end_id=end, max_length=resolve_max_length(tokenizer, max_length),
                          min_length=min_length, unk_id=unk, max_unk_share=max_unk_share)

    stats = BinarizeStats()
    if file_path is not None:
        files = list_text_files(file_path)
        input_identity = {"files": file_identity(files)}
        text_ds = None
    else:
        if streaming and num_proc not in (None, 1):
            logger.warning("num_proc is ignored with streaming=True (a stream is tokenized in one process).")
        text_ds = load_hub_text(dataset_name, dataset_config, split, text_column, streaming)
        input_identity = hub_identity(text_ds, dataset_name, dataset_config, split, text_column, streaming)
    options = {"rules": rules.as_dict(), "pack": pack}
    if pack is not None:  # packing drops a tail per map batch, so batching shapes the output
        options.update(batch_size=batch_size, num_proc=num_proc)
    parts = {"tokenizer": cache.stable_hash(cache.tokenizer_identity(tokenizer)),
             "input": cache.stable_hash(input_identity), "options": cache.stable_hash(options)}
    fingerprint = cache.stable_hash({"format_version": FORMAT_VERSION, **parts})

    state, detail = _inspect_output(output_dir, fingerprint, parts, verify_checksums)
    if state == "hit":
        ds, meta = detail
        stats = BinarizeStats(**meta["stats"])
        result = BinarizeResult(ds, output_dir, True, stats, meta)
        if verbose:
            print(format_summary(stats, True, output_dir) + f"\n  (cache checked in {time.perf_counter() - start:.1f}s)")
        return result
    if state in ("mismatch", "foreign") and not overwrite:
        raise ValueError(f"{detail}. Pass overwrite=True (--overwrite) to replace it, or choose another output "
                         "directory (--dump_file).")
    if state == "corrupt":
        logger.warning("Cached output %s is damaged (%s); rebuilding it.", output_dir, "; ".join(detail))

    build = cache.new_build_dir(output_dir)
    try:
        with cache.datasets_progress_bars(verbose):
            work = build / "work"
            work.mkdir()
            if text_ds is None:
                text_column = "text"
                from tqdm.auto import tqdm

                with tqdm(desc="Reading text", unit=" lines", disable=not verbose) as bar:
                    report = write_text_arrow(files, work / "text.arrow", progress=bar)
                stats.lines_with_bad_bytes = report.lines_with_bad_bytes
                stats.first_bad_line = list(report.first_bad) if report.first_bad else None
                text_ds = datasets.Dataset.from_file(str(work / "text.arrow"))
            features = datasets.Features({
                "input_ids": datasets.List(datasets.Value("int32")), LENGTH_COLUMN: datasets.Value("int32"),
                STATUS_COLUMN: datasets.Value("int8"), SPLIT_COLUMN: datasets.Value("bool"),
                CHUNK_COLUMN: datasets.Value("int32")})
            fn_kwargs = {"tokenizer": tokenizer, "rules": rules, "text_column": text_column}
            if isinstance(text_ds, datasets.IterableDataset):
                counter = {"n": 0}

                def count_inputs(batch):  # the stream has no length: count what flows through
                    counter["n"] += len(batch[text_column])
                    return batch

                encoded_stream = text_ds.map(count_inputs, batched=True, batch_size=batch_size).map(
                    encode_batch, batched=True, batch_size=batch_size, fn_kwargs=fn_kwargs,
                    remove_columns=[text_column], features=features)
                marked = datasets.Dataset.from_generator(_iterate, features=features, cache_dir=str(work / "stream"),
                                                         gen_kwargs={"iterable": encoded_stream},
                                                         fingerprint=fingerprint[:32] + "-stream")
                stats.sequences_read = counter["n"]
            else:
                stats.sequences_read = len(text_ds)
                if stats.sequences_read == 0:
                    raise ValueError(f"The input is empty (no lines in {file_path or dataset_name}). "
                                     "Give a corpus with one sequence per line.")
                marked = text_ds.map(encode_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                                     fn_kwargs=fn_kwargs, remove_columns=[text_column], features=features,
                                     cache_file_name=str(work / "encoded.arrow"),
                                     new_fingerprint=fingerprint[:32] + "-encoded", desc="Tokenizing")
            if stats.sequences_read == 0:
                raise ValueError(f"The input is empty (no rows in {dataset_name}).")
            keep = _stats_from_marked(marked, stats)
            if stats.kept == 0:
                raise ValueError(f"No sequence survived the rules ({stats.sequences_read} read, {stats.dropped_short} "
                                 f"shorter than {rules.min_length} tokens, {stats.dropped_unk} with >= "
                                 f"{rules.max_unk_share:.0%} unknown tokens). Check the input and tokenizer.")
            kept = marked if len(keep) == len(marked) else marked.select(keep)
            kept = kept.remove_columns(HELPER_COLUMNS)
            if pack is not None:
                kept = kept.map(pack_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                                fn_kwargs={"block_size": pack}, remove_columns=kept.column_names,
                                features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                                            LENGTH_COLUMN: datasets.Value("int32")}),
                                cache_file_name=str(work / "packed.arrow"), new_fingerprint=fingerprint[:32] + "-packed",
                                desc=f"Packing into blocks of {pack}")
                stats.packed_blocks = len(kept)
                if len(kept) == 0:
                    raise ValueError(f"Packing left no block: the corpus holds {stats.tokens} tokens, fewer than one "
                                     f"block of {pack}. Lower --pack.")
            final = build / "dataset"
            # One writer: saving is I/O-bound, and datasets' workers are spawned (seconds of imports each).
            kept.save_to_disk(str(final))
            stats.seconds = time.perf_counter() - start
            metadata = {
                "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "fingerprint_parts": parts,
                "created_unix": time.time(), "tokenizer": cache.tokenizer_identity(tokenizer),
                "input": input_identity, "options": options, "stats": asdict(stats), "num_rows": len(kept),
                "num_tokens": int(stats.tokens if pack is None else len(kept) * pack),
                "special_token_ids": {"begin": begin, "end": end, "unk": unk},
                "length_column": LENGTH_COLUMN,
                "files": cache.describe_files(final, sorted(p.name for p in final.iterdir() if p.is_file())),
            }
            cache.write_json_atomic(final / METADATA_FILE, metadata)
            del text_ds, marked, kept  # release memory maps on work files before deleting them
            cache.publish_dir(final, output_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)

    ds = datasets.load_from_disk(str(output_dir))
    if verbose:
        print(format_summary(stats, False, output_dir))
    return BinarizeResult(ds, output_dir, False, stats, metadata)


def load_binarized(output_dir, verify_checksums="changed"):
    """Load a binarized dataset and its metadata, refusing a damaged one with a clear message."""
    import datasets

    output_dir = Path(output_dir)
    meta = cache.read_json(output_dir / METADATA_FILE)
    if not isinstance(meta, dict):
        raise FileNotFoundError(f"{output_dir} has no {METADATA_FILE}: it is not a `distil-trainer binarize` output. "
                                "Run distil-trainer binarize first.")
    problems = cache.check_files(output_dir, meta["files"], verify_checksums)
    if problems:
        raise ValueError(f"Binarized dataset {output_dir} is damaged ({'; '.join(problems)}). Re-run "
                         "distil-trainer binarize with the same arguments to rebuild it.")
    return datasets.load_from_disk(str(output_dir)), meta


def is_binarized_dir(path):
    """Whether `path` is a folder written by `binarize` (it holds the metadata file)."""
    return path is not None and (Path(path) / METADATA_FILE).is_file()


def tokenizer_mismatch(meta, tokenizer):
    """None if `tokenizer` produces the ids of the binarized data described by `meta`, else what differs.

    Compared: the tokenizer's serialised pipeline (vocabulary, merges, normaliser, added tokens), its size and the
    begin/end/unk ids the sequences were wrapped in -- not its name or path, nor a pad token set after loading."""
    recorded = meta.get("tokenizer", {})
    mine = cache.tokenizer_identity(tokenizer)
    differs = [k for k in ("backend_sha256", "vocab_size") if recorded.get(k) != mine[k]]
    begin, end, unk = wrapping_token_ids(tokenizer)
    if meta.get("special_token_ids") != {"begin": begin, "end": end, "unk": unk}:
        differs.append("begin/end/unk token ids")
    if not differs:
        return None
    return (f"it was binarized with the tokenizer {recorded.get('name_or_path')!r} "
            f"({recorded.get('vocab_size')} tokens), whose {', '.join(differs)} differ from those of "
            f"{mine['name_or_path']!r} ({mine['vocab_size']} tokens)")


def use_binarized(data_dir, tokenizer, max_length=None, verify_checksums="changed"):
    """A BinarizeResult for an existing `binarize` output, refused with a message when `tokenizer` (the teacher's)
    would not have produced its ids, or when its sequences are longer than `max_length`."""
    data_dir = Path(data_dir)
    dataset, meta = load_binarized(data_dir, verify_checksums)
    problem = tokenizer_mismatch(meta, tokenizer)
    if problem:
        raise ValueError(f"Binarized data {str(data_dir)!r} does not match the teacher's tokenizer: {problem}. "
                         "Binarize the corpus again with the teacher's tokenizer (distil-trainer binarize "
                         "--tokenizer_name <teacher>).")
    options = meta.get("options", {})
    longest = options.get("pack") or options.get("rules", {}).get("max_length")
    if max_length is not None and longest is not None and longest > max_length:
        raise ValueError(f"Binarized data {str(data_dir)!r} holds sequences of up to {longest} tokens, longer than "
                         f"max_length={max_length}. Binarize it again with --max_length {max_length} (or --pack "
                         f"{max_length}), or raise max_length.")
    return BinarizeResult(dataset, data_dir, True, BinarizeStats(**meta["stats"]), meta)

