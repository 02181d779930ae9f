"""Output directories that double as caches: fingerprints, metadata beside the data, atomic publication
and integrity checks. Shared by binarization and token counting."""

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ..atomic import write_text_atomic

HASH_CHUNK = 8 << 20


@contextlib.contextmanager
def datasets_progress_bars(enabled):
    """While active, `datasets`' own progress bars are on or off; their earlier state is restored after."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def stable_hash(obj):
    """sha256 of a JSON-serialisable object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_identity(tokenizer):
    """What identifies a tokenizer's output: its full serialised pipeline (vocab, merges, normaliser...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer. Binarization "
                         "needs one for batched tokenization and a reliable cache fingerprint; load it with "
                         "AutoTokenizer.from_pretrained(name) (the default in transformers 5).")
    # Padding and truncation are call-time settings that any earlier `tokenizer(..., padding=True)` leaves in the
    # backend; they do not change what binarize produces (it sets its own), so they are not part of the identity.
    pipeline = json.loads(backend.to_str())
    pipeline.pop("padding", None)
    pipeline.pop("truncation", None)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "backend_sha256": hashlib.sha256(json.dumps(pipeline, sort_keys=True).encode("utf-8")).hexdigest(),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }


def describe_files(directory, names):
    """{name: {size, mtime_ns, sha256}} for files inside `directory`."""
    described = {}
    for n in names:
        path = os.path.join(directory, n)
        st = os.stat(path)
        described[n] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    return described


# How much of a cached file check_files reads: "changed" (default) hashes only the files whose size or
# modification time differ from those recorded, so an untouched cache of any size is checked in milliseconds and
# anything written to it since is caught; True hashes every file (also catches bit rot that kept the mtime);
# False compares sizes only.
VERIFY_MODES = ("changed", True, False)


def check_files(directory, described, verify_checksums="changed"):
    """Problems (list of strings) found comparing files on disk with their recorded size/mtime/sha256."""
    if verify_checksums not in VERIFY_MODES:
        raise ValueError(f"verify_checksums={verify_checksums!r}; use 'changed', True or False.")
    problems = []
    for name, info in described.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"missing file {name}")
            continue
        st = os.stat(path)
        if st.st_size != info["size"]:
            problems.append(f"{name} has {st.st_size} bytes, {info['size']} were written (truncated or modified)")
            continue
        untouched = info.get("mtime_ns") == st.st_mtime_ns  # metadata from before mtimes were recorded: hash
        must_hash = verify_checksums is True or (verify_checksums == "changed" and not untouched)
        if must_hash and file_sha256(path) != info["sha256"]:
            problems.append(f"{name} content does not match its recorded sha256 (corrupted or modified)")
    return problems


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def new_build_dir(final_path):
    """A fresh temporary directory next to `final_path` (same filesystem, so os.replace is atomic)."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    build = final_path.parent / f".{final_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    return build


def publish_dir(built, final_path):
    """Move a completed directory into place. An existing one (the caller checked overwrite) is moved
    aside first and deleted after, so readers never see a half-written directory."""
    final_path = Path(final_path)
    old = None
    if final_path.exists():
        old = final_path.parent / f".{final_path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final_path, old)
    os.replace(built, final_path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
