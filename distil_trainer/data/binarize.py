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


@dataclass
class _Source:
    """The resolved input: local text files (read into Arrow at build time) or a Hub dataset, maybe a stream."""
    files: list | None  # None for a Hub dataset
    hub_text: object  # datasets.Dataset or IterableDataset; None for files
    text_column: str
    name: object  # file_path or dataset_name, for messages
    identity: dict  # what the fingerprint records about the input


@dataclass
class _Plan:
    """One `binarize` call resolved: what to read, how to tokenize and pack it, and the fingerprint of its output."""
    tokenizer: object
    rules: SequenceRules
    source: _Source
    pack: int | None
    batch_size: int
    num_proc: int | None
    options: dict
    parts: dict  # hashes of tokenizer, input and options: a mismatch message names the ones that changed
    fingerprint: str


def _check_arguments(file_path, dataset_name, pack, num_proc):
    if (file_path is None) == (dataset_name is None):
        raise ValueError("Pass exactly one input: file_path (--file_path) or dataset_name (--dataset_name).")
    if pack is not None and pack < 2:
        raise ValueError(f"pack (block size) must be at least 2, got {pack}.")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}.")


def _sequence_rules(tokenizer, max_length, min_length, max_unk_share):
    begin, end, unk = wrapping_token_ids(tokenizer)
    return SequenceRules(begin_id=begin, end_id=end, max_length=resolve_max_length(tokenizer, max_length),
                         min_length=min_length, unk_id=unk, max_unk_share=max_unk_share)


def _resolve_input(file_path, dataset_name, dataset_config, split, text_column, streaming, num_proc):
    if file_path is not None:
        files = list_text_files(file_path)
        # The files are read into an Arrow table whose one column is "text", whatever text_column says.
        return _Source(files, None, "text", file_path, {"files": file_identity(files)})
    if streaming and num_proc not in (None, 1):
        logger.warning("num_proc is ignored with streaming=True (a stream is tokenized in one process).")
    text_ds = load_hub_text(dataset_name, dataset_config, split, text_column, streaming)
    identity = hub_identity(text_ds, dataset_name, dataset_config, split, text_column, streaming)
    return _Source(None, text_ds, text_column, dataset_name, identity)


def _plan(tokenizer, rules, source, pack, batch_size, num_proc):
    """The options that shape the output, and the fingerprint of tokenizer + input + options."""
    options = {"rules": rules.as_dict(), "pack": pack}
    if pack is not None:  # packing drops a tail per map batch, so batching shapes the output
        options.update(batch_size=batch_size, num_proc=num_proc)
    parts = {"tokenizer": cache.stable_hash(cache.tokenizer_identity(tokenizer)),
             "input": cache.stable_hash(source.identity), "options": cache.stable_hash(options)}
    fingerprint = cache.stable_hash({"format_version": FORMAT_VERSION, **parts})
    return _Plan(tokenizer, rules, source, pack, batch_size, num_proc, options, parts, fingerprint)


def _reusable_output(output_dir, plan, verify_checksums, overwrite):
    """(dataset, metadata) of an intact output with this fingerprint, else None: build it. An output of other
    inputs or options, or a foreign path, is refused unless `overwrite`; a damaged one is rebuilt."""
    state, detail = _inspect_output(output_dir, plan.fingerprint, plan.parts, verify_checksums)
    if state == "hit":
        return detail
    if state in ("mismatch", "foreign") and not overwrite:
        raise ValueError(f"{detail}. Pass overwrite=True (--overwrite) to replace it, or choose another output "
                         "directory (--dump_file).")
    if state == "corrupt":
        logger.warning("Cached output %s is damaged (%s); rebuilding it.", output_dir, "; ".join(detail))
    return None


def _cache_hit_result(output_dir, dataset, meta, start, verbose):
    stats = BinarizeStats(**meta["stats"])
    if verbose:
        print(format_summary(stats, True, output_dir) + f"\n  (cache checked in {time.perf_counter() - start:.1f}s)")
    return BinarizeResult(dataset, output_dir, True, stats, meta)


def _read_files(files, work, stats, verbose):
    """The lines of `files` as a one-column ("text") Dataset on an Arrow file in `work`; counts undecodable lines."""
    import datasets
    from tqdm.auto import tqdm

    with tqdm(desc="Reading text", unit=" lines", disable=not verbose) as bar:
        report = write_text_arrow(files, work / "text.arrow", progress=bar)
    stats.lines_with_bad_bytes = report.lines_with_bad_bytes
    stats.first_bad_line = list(report.first_bad) if report.first_bad else None
    return datasets.Dataset.from_file(str(work / "text.arrow"))


def _marked_features():
    """Columns written by `encode_batch`: the ids and length, and the helper columns the rules mark rows with."""
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")), LENGTH_COLUMN: datasets.Value("int32"),
        STATUS_COLUMN: datasets.Value("int8"), SPLIT_COLUMN: datasets.Value("bool"),
        CHUNK_COLUMN: datasets.Value("int32")})


def _encode_kwargs(plan):
    return {"tokenizer": plan.tokenizer, "rules": plan.rules, "text_column": plan.source.text_column}


def _tokenize_in_memory(text_ds, plan, work, stats):
    stats.sequences_read = len(text_ds)
    if stats.sequences_read == 0:
        raise ValueError(f"The input is empty (no lines in {plan.source.name}). "
                         "Give a corpus with one sequence per line.")
    return text_ds.map(encode_batch, batched=True, batch_size=plan.batch_size, num_proc=plan.num_proc,
                       fn_kwargs=_encode_kwargs(plan), remove_columns=[plan.source.text_column],
                       features=_marked_features(), cache_file_name=str(work / "encoded.arrow"),
                       new_fingerprint=plan.fingerprint[:32] + "-encoded", desc="Tokenizing")


def _tokenize_stream(text_ds, plan, work, stats):
    """Encode a stream in this process into an Arrow dataset in `work`, counting the rows that flow through."""
    import datasets

    text_column = plan.source.text_column
    counter = {"n": 0}

    def count_inputs(batch):  # the stream has no length: count what flows through
        counter["n"] += len(batch[text_column])
        return batch

    features = _marked_features()
    encoded_stream = text_ds.map(count_inputs, batched=True, batch_size=plan.batch_size).map(
        encode_batch, batched=True, batch_size=plan.batch_size, fn_kwargs=_encode_kwargs(plan),
        remove_columns=[text_column], features=features)
    marked = datasets.Dataset.from_generator(_iterate, features=features, cache_dir=str(work / "stream"),
                                             gen_kwargs={"iterable": encoded_stream},
                                             fingerprint=plan.fingerprint[:32] + "-stream")
    stats.sequences_read = counter["n"]
    return marked


def _tokenize(text_ds, plan, work, stats):
    """Every sequence encoded, split and marked kept/dropped by the rules (see `sequence_rules`)."""
    import datasets

    if isinstance(text_ds, datasets.IterableDataset):
        marked = _tokenize_stream(text_ds, plan, work, stats)
    else:
        marked = _tokenize_in_memory(text_ds, plan, work, stats)
    if stats.sequences_read == 0:
        raise ValueError(f"The input is empty (no rows in {plan.source.name}).")
    return marked


def _filter_by_rules(marked, rules, stats):
    """The kept rows without the helper columns; what the rules did is counted into `stats`."""
    keep = _stats_from_marked(marked, stats)
    if stats.kept == 0:
        raise ValueError(f"No sequence survived the rules ({stats.sequences_read} read, {stats.dropped_short} "
                         f"shorter than {rules.min_length} tokens, {stats.dropped_unk} with >= "
                         f"{rules.max_unk_share:.0%} unknown tokens). Check the input and tokenizer.")
    kept = marked if len(keep) == len(marked) else marked.select(keep)
    return kept.remove_columns(HELPER_COLUMNS)


def _pack(kept, plan, work, stats):
    """The kept sequences concatenated and cut into blocks of `plan.pack` tokens (causal-LM packing)."""
    import datasets

    pack = plan.pack
    packed = kept.map(pack_batch, batched=True, batch_size=plan.batch_size, num_proc=plan.num_proc,
                      fn_kwargs={"block_size": pack}, remove_columns=kept.column_names,
                      features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                                  LENGTH_COLUMN: datasets.Value("int32")}),
                      cache_file_name=str(work / "packed.arrow"), new_fingerprint=plan.fingerprint[:32] + "-packed",
                      desc=f"Packing into blocks of {pack}")
    stats.packed_blocks = len(packed)
    if len(packed) == 0:
        raise ValueError(f"Packing left no block: the corpus holds {stats.tokens} tokens, fewer than one "
                         f"block of {pack}. Lower --pack.")
    return packed


def _write_dataset(kept, final, plan, stats, start):
    """Save `kept` to `final` with its metadata (fingerprint, input, options, statistics, file checksums)."""
    # One writer: saving is I/O-bound, and datasets' workers are spawned (seconds of imports each).
    kept.save_to_disk(str(final))
    stats.seconds = time.perf_counter() - start
    rules = plan.rules
    metadata = {
        "format_version": FORMAT_VERSION, "fingerprint": plan.fingerprint, "fingerprint_parts": plan.parts,
        "created_unix": time.time(), "tokenizer": cache.tokenizer_identity(plan.tokenizer),
        "input": plan.source.identity, "options": plan.options, "stats": asdict(stats), "num_rows": len(kept),
        "num_tokens": int(stats.tokens if plan.pack is None else len(kept) * plan.pack),
        "special_token_ids": {"begin": rules.begin_id, "end": rules.end_id, "unk": rules.unk_id},
        "length_column": LENGTH_COLUMN,
        "files": cache.describe_files(final, sorted(p.name for p in final.iterdir() if p.is_file())),
    }
    cache.write_json_atomic(final / METADATA_FILE, metadata)
    return metadata


def _build_and_publish(output_dir, plan, stats, start, verbose):
    """Build the output in a temporary sibling directory, move it into place, and return its metadata."""
    build = cache.new_build_dir(output_dir)
    try:
        with cache.datasets_progress_bars(verbose):
            work = build / "work"
            work.mkdir()
            text_ds = plan.source.hub_text
            if text_ds is None:
                text_ds = _read_files(plan.source.files, work, stats, verbose)
            marked = _tokenize(text_ds, plan, work, stats)
            kept = _filter_by_rules(marked, plan.rules, stats)
            if plan.pack is not None:
                kept = _pack(kept, plan, work, stats)
            final = build / "dataset"
            metadata = _write_dataset(kept, final, plan, stats, start)
            del text_ds, marked, kept  # release memory maps on work files before deleting them
            cache.publish_dir(final, output_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return metadata


def _built_result(output_dir, stats, metadata, verbose):
    import datasets

    dataset = datasets.load_from_disk(str(output_dir))
    if verbose:
        print(format_summary(stats, False, output_dir))
    return BinarizeResult(dataset, output_dir, False, stats, metadata)


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
    import datasets  # noqa: F401  imported before the clock starts: `stats.seconds` leaves out its import time

    start = time.perf_counter()
    _check_arguments(file_path, dataset_name, pack, num_proc)
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(tokenizer)
    rules = _sequence_rules(tokenizer, max_length, min_length, max_unk_share)
    source = _resolve_input(file_path, dataset_name, dataset_config, split, text_column, streaming, num_proc)
    plan = _plan(tokenizer, rules, source, pack, batch_size, num_proc)
    cached = _reusable_output(output_dir, plan, verify_checksums, overwrite)
    if cached is not None:
        return _cache_hit_result(output_dir, *cached, start, verbose)
    stats = BinarizeStats()
    metadata = _build_and_publish(output_dir, plan, stats, start, verbose)
    return _built_result(output_dir, stats, metadata, verbose)


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

