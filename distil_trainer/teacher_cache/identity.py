"""What a teacher-output cache was computed from (its identity), and the errors a reader gets when that is not what
it expects. Every field of the identity is compared on load; a mismatch names the field."""

import hashlib

import torch

from ..data.cache import stable_hash, tokenizer_identity
from ..model_utils import unwrap

# Config keys that say where or with which library version a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")
# Tokenizer identity fields that name where it was loaded from: the same tokenizer saved elsewhere is the same.
_TOKENIZER_LOCATION_KEYS = ("name_or_path",)


class TeacherCacheMismatch(ValueError):
    """The cache was computed from another teacher, tokenizer, dataset or setting than the one expected."""


class TeacherCacheDamaged(ValueError):
    """A file of the cache is missing, truncated or corrupted."""


def weights_sha256(model):
    """sha256 over (name, dtype, shape, bytes) of the state dict, sorted by name: equal for equal weights wherever
    they were loaded from, different after any change to any parameter or buffer."""
    h = hashlib.sha256()
    state = unwrap(model).state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, bfloat16 included
    return h.hexdigest()


def teacher_identity(model):
    inner = unwrap(model)
    config = inner.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    text_config = inner.config.get_text_config()
    # Layer count and width travel in the clear: training from the cache checks the student against them
    # (hidden_states index of the last layer for L_cos, the width of the cached states).
    return {"class": type(inner).__name__, "config_sha256": stable_hash(config),
            "num_hidden_layers": getattr(text_config, "num_hidden_layers", None),
            "hidden_size": getattr(text_config, "hidden_size", None),
            "weights_sha256": weights_sha256(inner)}


def data_identity(dataset):
    """(fingerprint, rows) of a `datasets.Dataset`: the fingerprint follows its content and every transform."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise TypeError(f"The teacher cache needs a datasets.Dataset (with a fingerprint and a length), got "
                        f"{type(dataset).__name__}. Load the data with datasets.load_from_disk or "
                        "distil_trainer.data.load_binarized.")
    return fingerprint, len(dataset)


def masking_identity(collator, batch_size):
    """What decides the MLM masks: the collator's proportions, its per-token masking probabilities (token counts,
    smoothing and special tokens together), its seed and padding, and the batches it sees (their size: the masks
    are drawn per batch)."""
    word_mask, word_keep, word_rand = (round(float(p), 6) for p in collator.action_probs.tolist())
    probs = collator.token_probs.to(torch.float32).contiguous().numpy()
    return {"mlm_mask_prop": float(collator.mlm_mask_prop), "word_mask": word_mask, "word_keep": word_keep,
            "word_rand": word_rand, "token_probs_sha256": hashlib.sha256(probs.tobytes()).hexdigest(),
            "mask_token_id": int(collator.mask_token_id), "seed": int(collator.seed),
            "pad_to_multiple_of": collator.pad_to_multiple_of, "batch_size": int(batch_size)}


def _comparable(field, value):
    if field == "tokenizer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in _TOKENIZER_LOCATION_KEYS}
    if field == "hidden_layers" and value is not None:
        return list(value)
    return value


def differing_fields(recorded, expected):
    """Names of the identity fields in `expected` whose value differs from `recorded`'s."""
    return [field for field, value in expected.items()
            if _comparable(field, recorded.get(field)) != _comparable(field, value)]


def _describe(field, value):
    if field == "teacher" and isinstance(value, dict):
        return f"{value.get('class')} with weights sha256 {str(value.get('weights_sha256'))[:12]}..."
    if field == "tokenizer" and isinstance(value, dict):
        return f"{value.get('name_or_path')!r} ({value.get('vocab_size')} tokens)"
    if isinstance(value, dict):
        return stable_hash(value)[:12]
    return repr(value)


REBUILD = ("Rebuild it (distil-trainer cache-teacher ... --overwrite, or build_teacher_cache(..., overwrite=True)) "
           "or point to the cache built for these inputs.")
REPLACE = ("Pass overwrite=True (--overwrite) to replace it with a cache of these inputs, or choose another output "
           "directory.")


def mismatch_message(path, recorded, expected, fields, fix=REBUILD):
    parts = [f"{f}: cache has {_describe(f, recorded.get(f))}, expected {_describe(f, expected[f])}" for f in fields]
    return (f"The teacher cache {str(path)!r} was computed with a different {', '.join(fields)} "
            f"({'; '.join(parts)}). {fix}")


def expected_identity(teacher=None, tokenizer=None, data=None, **settings):
    """Identity fields to compare from what a caller holds: a model, a tokenizer, a dataset, and plain settings
    (`top_k`, `positions`, `dtype`, `head`, `hidden_layers`, `epochs`, `vocab_size`); None means not compared."""
    expected = {}
    if teacher is not None:
        expected["teacher"] = teacher_identity(teacher)
    if tokenizer is not None:
        expected["tokenizer"] = tokenizer_identity(tokenizer)
    if data is not None:
        expected["data"], expected["rows"] = data_identity(data)
    for field, value in settings.items():
        if value is not None:
            expected[field] = value
    return expected
