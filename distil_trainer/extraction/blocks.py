"""Find a model's stack of transformer blocks and build a shallower config of the same architecture."""

import logging

from torch import nn

from .report import CONFIG_KEY

logger = logging.getLogger(__name__)

# Usual attribute names of the block list (BERT/RoBERTa `layer`, Llama `layers`, GPT-2 `h`, T5-like `block`).
BLOCK_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")

# Config fields that fix tensor shapes: extraction copies tensors, so these must stay the teacher's.
WIDTH_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "type_vocab_size", "n_embd", "n_inner", "n_head", "n_positions", "dim", "hidden_dim",
    "n_heads",
)
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def num_layers_of(config):
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(
            f"Cannot tell how many layers a {type(config).__name__} has (no num_hidden_layers in its config); "
            "this model type is not supported for layer extraction."
        )
    return n


def _is_block_list(module):
    return isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1


def find_blocks(model):
    """(dotted name, ModuleList) of the model's transformer blocks.

    Prefers a ModuleList of identical blocks whose length is ``config.num_hidden_layers`` (outermost one, so an
    MoE's per-block expert list never wins); among several, the one named like ``layer``/``layers``/``h``. Without a
    layer count in the config, falls back to the longest such ModuleList.
    """
    lists = [(name, mod) for name, mod in model.named_modules() if _is_block_list(mod)]
    # Drop lists nested inside another candidate (e.g. experts inside each block).
    lists = [(n, m) for n, m in lists if not any(n.startswith(other + ".") for other, _ in lists if other != n)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of identical blocks; cannot extract layers from it.")
    n_layers = getattr(model.config, "num_hidden_layers", None)
    matching = [(n, m) for n, m in lists if len(m) == n_layers] if isinstance(n_layers, int) else []
    if len(matching) > 1:
        named = [(n, m) for n, m in matching if n.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES]
        matching = named or matching
    if len(matching) == 1:
        return matching[0]
    if len(matching) > 1:
        raise ValueError(
            f"{type(model).__name__} has several block stacks of {n_layers} layers "
            f"({', '.join(n for n, _ in matching)}); encoder-decoder models are not supported."
        )
    longest = max(len(m) for _, m in lists)
    best = [(n, m) for n, m in lists if len(m) == longest]
    if len(best) > 1:
        raise ValueError(
            f"Cannot tell which ModuleList holds the blocks of {type(model).__name__}: "
            f"{', '.join(n for n, _ in best)} all have {longest} entries."
        )
    return best[0]


def check_overrides(teacher_config, overrides):
    """Refuse config overrides that would change depth (use the layer choice) or width (tensors could not be copied)."""
    for key, value in (overrides or {}).items():
        real = teacher_config.attribute_map.get(key, key)
        if key in DEPTH_KEYS or real in DEPTH_KEYS:
            raise ValueError(
                f"Do not set {key}={value!r} in config_overrides: the student's depth is the number of selected "
                "layers; pass layers=[...] or num_layers=k instead."
            )
        if (key in WIDTH_KEYS or real in WIDTH_KEYS) and hasattr(teacher_config, real):
            old = getattr(teacher_config, real)
            if value != old:
                raise ValueError(
                    f"Layer extraction copies the teacher's weights, so the student keeps its width: cannot change "
                    f"{key} from {old!r} to {value!r}. Drop that override, or train a randomly initialised (or another "
                    "pre-trained) student of the width you want instead."
                )


def shallow_config(teacher_config, layers, overrides=None):
    """The teacher's config with ``len(layers)`` layers; per-layer list fields (e.g. ``layer_types``) sliced to match."""
    n = num_layers_of(teacher_config)
    check_overrides(teacher_config, overrides)
    values = teacher_config.to_dict()
    depth_key = teacher_config.attribute_map.get("num_hidden_layers", "num_hidden_layers")
    values[depth_key] = len(layers)
    for key, value in list(values.items()):
        if key == depth_key or not isinstance(value, (list, tuple)) or "layer" not in key.lower():
            continue
        if len(value) == n:
            values[key] = [value[i] for i in layers]
        else:
            logger.warning(
                "Config field %s=%r mentions layers but is not a per-layer list of length %d; copied unchanged -- "
                "check it still fits a %d-layer student.", key, value, n, len(layers),
            )
    values.pop(CONFIG_KEY, None)  # a teacher that is itself an extracted student: its record is not ours
    values["_name_or_path"] = ""
    # The student is built unquantized from this config; a teacher's quantization record (GGUF de-quantized on
    # loading, bitsandbytes...) would make the saved student load as "quantized", which Trainer refuses to train.
    values.pop("quantization_config", None)
    values.update(overrides or {})
    return type(teacher_config).from_dict(values)
