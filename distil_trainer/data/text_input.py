"""Reading raw text: local files (one sequence per line) into an Arrow file, or a Hub dataset.

Local files are read in binary blocks and decoded as UTF-8; undecodable bytes become U+FFFD and the
affected lines are counted, the first one reported by file and line number.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

logger = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20  # read size; a longer line simply spans several reads
BATCH_BYTES = 64 << 20  # flush an Arrow record batch at this much text (string offsets are 32-bit)
BATCH_LINES = 10_000
TEXT_SCHEMA = pa.schema([pa.field("text", pa.string())])
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class DecodeReport:
    lines_read: int = 0
    bytes_read: int = 0
    lines_with_bad_bytes: int = 0
    first_bad: tuple | None = None  # (file, 1-based line number)
    files: list = field(default_factory=list)


def list_text_files(path):
    """The files to read for `path`: the file itself, or every non-hidden file under a folder, sorted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Input text {str(path)!r} does not exist. Pass an existing file or folder "
                                "with --file_path, or a Hub dataset with --dataset_name.")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"Input folder {str(path)!r} holds no files (hidden files are skipped).")
    return files


def file_identity(files):
    """What the cache fingerprint sees of local input: path, size and modification time of each file."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _decode_lines(raw_lines, file, first_line_no, report):
    try:
        # Fast path: the whole block at once.
        return b"\n".join(raw_lines).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    out = []
    for offset, raw in enumerate(raw_lines):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(raw.decode("utf-8", errors="replace"))
            report.lines_with_bad_bytes += 1
            if report.first_bad is None:
                report.first_bad = (str(file), first_line_no + offset)
    return out


def iter_lines(files, report):
    """Decoded lines (without their line breaks) of every file, in order."""
    for file in files:
        report.files.append(str(file))
        line_no, carry, first_block = 1, b"", True
        with open(file, "rb") as f:
            while True:
                block = f.read(BLOCK_BYTES)
                report.bytes_read += len(block)
                if first_block and block.startswith(UTF8_BOM):
                    block = block[len(UTF8_BOM):]
                first_block = False
                if not block:
                    break
                pieces = (carry + block).split(b"\n")
                carry = pieces.pop()
                if not pieces:
                    continue
                pieces = [p[:-1] if p.endswith(b"\r") else p for p in pieces]
                yield from _decode_lines(pieces, file, line_no, report)
                line_no += len(pieces)
            if carry:
                carry = carry[:-1] if carry.endswith(b"\r") else carry
                yield from _decode_lines([carry], file, line_no, report)


def write_text_arrow(files, arrow_path, progress=None):
    """Write all lines of `files` to an Arrow stream file with one `text` column; return a DecodeReport."""
    report = DecodeReport()
    batch, batch_bytes = [], 0
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, TEXT_SCHEMA) as writer:
        def flush():
            nonlocal batch, batch_bytes
            if batch:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=TEXT_SCHEMA))
                report.lines_read += len(batch)
                if progress is not None:
                    progress.update(len(batch))
            batch, batch_bytes = [], 0

        for line in iter_lines(files, report):
            batch.append(line)
            batch_bytes += len(line)
            if len(batch) >= BATCH_LINES or batch_bytes >= BATCH_BYTES:
                flush()
        flush()
    if report.lines_with_bad_bytes:
        file, line_no = report.first_bad
        logger.warning("%d line(s) held bytes that are not UTF-8; they were replaced by U+FFFD (first: %s, line %d).",
                       report.lines_with_bad_bytes, file, line_no)
    return report


def load_hub_text(dataset_name, dataset_config, split, text_column, streaming):
    """`datasets.load_dataset` with errors turned into messages that name the fix."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_name, dataset_config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types; the user needs one clear message
        raise ValueError(f"Could not load dataset {dataset_name!r} (config={dataset_config!r}, split={split!r}): "
                         f"{type(e).__name__}: {e}. Check the name, config and split, and network access "
                         "(HF_DATASETS_OFFLINE), or pass a local file with --file_path.") from None
    columns = ds.column_names if not streaming else (list(ds.features) if ds.features else None)
    if columns is not None and text_column not in columns:
        raise ValueError(f"Dataset {dataset_name!r} has no column {text_column!r}; its columns are {columns}. "
                         "Choose one with --text_column.")
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([text_column])
    return ds


def hub_identity(ds, dataset_name, dataset_config, split, text_column, streaming):
    ident = {"dataset_name": dataset_name, "dataset_config": dataset_config, "split": split,
             "text_column": text_column, "streaming": streaming}
    # A materialised dataset has a content fingerprint; a stream only has its name (documented limitation).
    if not streaming:
        ident["datasets_fingerprint"] = ds._fingerprint
    elif os.path.exists(str(dataset_name)):
        ident["local_files"] = file_identity(list_text_files(dataset_name))
    return ident
