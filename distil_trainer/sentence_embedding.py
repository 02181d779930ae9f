"""How a sentence-embedding model turns token vectors into one vector per sentence, read from and written to the
folder layout of sentence-transformers (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`).

A teacher with a `modules.json` (in its folder, or its Hub repo through the cache) is read: its Pooling module
gives the pooling (mean, CLS or last token) and a Normalize module the L2 normalisation. Without one, mean pooling
without normalisation is the default. A student saved with `write_sentence_transformers_files` loads with `SentenceTransformer(folder)` and embeds as the
teacher does. The sentence-transformers package is not needed for either.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from .losses import POOLING_MODES

# modules.json types (the last component of their class path) this project reads and writes.
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# sentence-transformers' legacy boolean keys (still read by its current versions) -> our pooling mode names.
_LEGACY_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                        "pooling_mode_lasttoken": "lasttoken", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean"}
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


@dataclass(frozen=True)
class Pooling:
    """Pooling mode ("mean", "cls" or "lasttoken"), L2 normalisation, and where the choice came from."""

    mode: str = "mean"
    normalize: bool = False
    source: str = "default: mean pooling, no normalisation (no sentence-transformers modules.json)"

    def describe(self) -> str:
        return f"{self.mode} pooling{', L2-normalised' if self.normalize else ''} ({self.source})"


def _module_kind(entry) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def sentence_transformers_file(source, relative, revision=None) -> Path | None:
    """The local path of file `relative` of a model folder, or of a Hub repo (from the cache, or downloaded unless
    offline), or None when there is no such file or `source` is neither."""
    if not source:
        return None
    if Path(source).is_dir():
        path = Path(source) / relative
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(str(source), relative, revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # not a repo id (a GGUF file's path, say)
        return None
    return Path(found) if found else None


def read_pooling(source, revision=None) -> Pooling | None:
    """The pooling of a sentence-transformers model (a folder or a Hub repo), or None when `source` is not one (no
    modules.json).

    Raises ValueError, naming the module and the fix, for what this project cannot reproduce: a pooling mode other
    than mean/CLS/last token, several modes at once, or modules after the transformer other than Pooling and
    Normalize (a Dense projection, say), since distilling embeddings computed another way would be wrong silently.
    """
    modules_file = sentence_transformers_file(source, "modules.json", revision)
    if modules_file is None:
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    kinds = [_module_kind(m) for m in modules]
    other = [k for k in kinds if k not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if other:
        raise ValueError(f"{source}/modules.json has module(s) {other} besides Transformer, Pooling and Normalize; the "
                         "embedding terms pool the last hidden state only. Set embed_pooling (and embed_normalize) to "
                         "distil the pooled embeddings before those modules, or distil another teacher.")
    pooling = next((m for m in modules if _module_kind(m) == _POOLING), None)
    mode = "mean"
    if pooling is not None:
        folder = pooling.get("path", POOLING_DIR)
        relative = f"{folder}/config.json" if folder else "config.json"
        mode = _pooling_mode(sentence_transformers_file(source, relative, revision), f"{source}/{relative}")
    return Pooling(mode=mode, normalize=_NORMALIZE in kinds, source=f"read from {source}/modules.json")


def _pooling_mode(config_path, where) -> str:
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path is not None else {}
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{where} pools with {modes}; the embedding terms reproduce one of "
                         f"{', '.join(POOLING_MODES)}. Set embed_pooling to one of them to override.")
    return modes[0]


def resolve_pooling(teacher_source=None, mode=None, normalize=None) -> Pooling:
    """The pooling the embedding terms use: the teacher's (`read_pooling` of its folder or Hub repo), else mean
    pooling without normalisation; `mode` / `normalize` (not None) override it."""
    found = read_pooling(teacher_source) if teacher_source else None
    base = found or Pooling()
    if mode is not None and mode not in POOLING_MODES:
        raise ValueError(f"embed_pooling={mode!r}; use one of {', '.join(POOLING_MODES)} (or leave it unset to read "
                         "the teacher's sentence-transformers folder).")
    if mode is None and normalize is None:
        return base
    overridden = [f"{k}={v}" for k, v in (("embed_pooling", mode), ("embed_normalize", normalize)) if v is not None]
    return Pooling(mode=mode or base.mode, normalize=base.normalize if normalize is None else bool(normalize),
                   source=f"{', '.join(overridden)}; otherwise {base.source}")


def model_source(model) -> str | None:
    """Where a model was loaded from (its `name_or_path`: a folder or a Hub repo id), if recorded."""
    from .model_utils import unwrap

    path = getattr(unwrap(model), "name_or_path", None) or getattr(unwrap(model).config, "_name_or_path", None)
    return str(path) if path else None


def write_sentence_transformers_files(folder, pooling: Pooling, width: int, max_seq_length: int):
    """Make the saved model in `folder` (config, weights, tokenizer) a sentence-transformers model as well: modules.json
    (Transformer, Pooling, and Normalize when `pooling.normalize`), 1_Pooling/config.json, sentence_bert_config.json
    and config_sentence_transformers.json (cosine similarity). The pooling config is written with the boolean keys
    every sentence-transformers version reads."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
        (folder / NORMALIZE_DIR).mkdir(exist_ok=True)
    config = {"word_embedding_dimension": int(width)}
    config.update({key: pooling.mode == name for key, name in _LEGACY_POOLING_KEYS.items()})
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    _write_json(folder / POOLING_DIR / "config.json", config)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    _write_json(folder / "modules.json", modules)  # last: a folder with modules.json is complete


def _write_json(path, value):
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
