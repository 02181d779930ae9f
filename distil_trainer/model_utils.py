"""What the trainer needs to know about a model: its head, its widths, which embeddings to freeze,
how to load and place a frozen teacher."""

import contextlib
import copy
import inspect
import logging
import os

import torch

logger = logging.getLogger(__name__)

MASKED_LM, CAUSAL_LM = "masked_lm", "causal_lm"
SEQUENCE_CLASSIFICATION, QUESTION_ANSWERING, TOKEN_CLASSIFICATION = (
    "sequence_classification", "question_answering", "token_classification")
BARE = "bare"  # an encoder/decoder without a head: hidden states only, no logits
TASK_HEADS = (SEQUENCE_CLASSIFICATION, QUESTION_ANSWERING, TOKEN_CLASSIFICATION)
LM_HEADS = (MASKED_LM, CAUSAL_LM)

# Class-name suffix -> head kind; transformers names its heads consistently.
_SUFFIX_TO_HEAD = (
    ("ForMaskedLM", MASKED_LM),
    ("ForCausalLM", CAUSAL_LM),
    ("LMHeadModel", CAUSAL_LM),
    ("ForSequenceClassification", SEQUENCE_CLASSIFICATION),
    ("ForQuestionAnswering", QUESTION_ANSWERING),
    ("ForTokenClassification", TOKEN_CLASSIFICATION),
)

_AUTO_CLASS_FOR_HEAD = {
    MASKED_LM: "AutoModelForMaskedLM",
    CAUSAL_LM: "AutoModelForCausalLM",
    SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    QUESTION_ANSWERING: "AutoModelForQuestionAnswering",
    TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
    BARE: "AutoModel",
}


def unwrap(model):
    """The underlying `PreTrainedModel` of a DDP/DeepSpeed/compiled wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def head_kind(model) -> str:
    name = type(unwrap(model)).__name__
    for suffix, kind in _SUFFIX_TO_HEAD:
        if name.endswith(suffix):
            return kind
    return BARE


def hidden_size(model):
    config = unwrap(model).config
    return getattr(config.get_text_config(), "hidden_size", None)


def vocab_size(model):
    """Rows of the output embedding when there is one (what the logits measure), else the config's vocab size."""
    inner = unwrap(model)
    out = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None and out.weight.dim() == 2:
        return out.weight.shape[0]
    return getattr(inner.config.get_text_config(), "vocab_size", None)


def forward_arguments(model) -> set:
    """Names `model.forward` accepts, so a batch can be filtered per model (DistilBERT takes no token_type_ids)."""
    return set(inspect.signature(unwrap(model).forward).parameters)


def uses_token_type_ids(model) -> bool:
    """Whether `model` reads segment ids: its forward takes `token_type_ids` and it has more than one type.

    BERT (2 types) does; DistilBERT (no such argument) does not; RoBERTa (1 type) takes them but has only
    segment 0, so giving it the 1s of a pair would index past its embedding table. GPT-2 takes them but looks
    them up in its word embeddings (no `type_vocab_size`), so it is left to its default too.
    """
    if model is None or "token_type_ids" not in forward_arguments(model):
        return False
    types = getattr(unwrap(model).config.get_text_config(), "type_vocab_size", None)
    return types is not None and types > 1


GGUF_FILE_SEPARATOR = "::"


def resolve_gguf(name_or_path: str) -> tuple[str, dict]:
    """(what from_pretrained loads, extra keyword arguments) for a model name that may point into a GGUF file.

    `path/to/model.gguf` and `folder_or_hub_repo::model.gguf` become (folder, {"gguf_file": "model.gguf"}), which
    transformers de-quantizes into a regular model (Llama, Qwen2, Mistral, GPT-2, ...); any other name is returned
    unchanged with no extra arguments.
    """
    text = str(name_or_path)
    if GGUF_FILE_SEPARATOR in text:
        folder, file = text.split(GGUF_FILE_SEPARATOR, 1)
        if not file.endswith(".gguf"):
            raise ValueError(f"{text!r}: the part after {GGUF_FILE_SEPARATOR!r} must be a .gguf file name, e.g. "
                             f"'my/folder{GGUF_FILE_SEPARATOR}model.Q4_1.gguf'.")
    elif text.endswith(".gguf"):
        folder, file = os.path.split(text)
    else:
        return text, {}
    require_gguf(text)
    return folder or ".", {"gguf_file": file}


def require_gguf(what: str):
    """Raise ImportError naming the fix when the `gguf` package transformers reads GGUF files with is missing."""
    from transformers.utils import is_gguf_available
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    if not is_gguf_available():
        raise ImportError(f"Loading {what!r} needs the gguf package (>= {GGUF_MIN_VERSION}), which transformers "
                          "reads GGUF files with: pip install gguf  (or pip install 'distil-trainer-hf[gguf]').")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer for a Hub name, a local directory or a GGUF file (see `resolve_gguf`)."""
    from transformers import AutoTokenizer

    name, gguf_kwargs = resolve_gguf(name_or_path)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **gguf_kwargs)


@contextlib.contextmanager
def seeded_initialisation(seed: int):
    """Weights that `from_pretrained` must initialise itself (those its checkpoint lacks, e.g. the MLM head of a
    sentence-embedding model) are drawn from `seed` inside this block: the same on every rank and in every run, by
    construction rather than by each process's RNG state; the caller's RNG streams are left as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def load_teacher(name_or_path: str, student_head: str, init_kwargs: dict | None = None, seed: int = 0):
    """Load a teacher by Hub name, local path or GGUF file (see `resolve_gguf`) with the Auto class that matches
    the student's head. Tensors its checkpoint lacks are initialised from `seed` (`seeded_initialisation`)."""
    import transformers

    source, gguf_kwargs = resolve_gguf(name_or_path)
    kwargs = {**gguf_kwargs, **(init_kwargs or {})}
    kwargs.setdefault("trust_remote_code", False)
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    auto_class = getattr(transformers, _AUTO_CLASS_FOR_HEAD[student_head])
    try:
        with seeded_initialisation(seed):
            return auto_class.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load the teacher {name_or_path!r} with {auto_class.__name__}: {err}\n"
            "Pass a local directory saved with save_pretrained, or a Hub name with network access "
            "(unset HF_HUB_OFFLINE), or pass the loaded model itself as teacher_model=."
        ) from err


def freeze_teacher(teacher):
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# Parameter-name endings of learned absolute position embeddings across the supported families:
# BERT/RoBERTa/DistilBERT `embeddings.position_embeddings`, GPT-2 `wpe`, BART-style `embed_positions`.
_POSITION_EMBEDDING_SUFFIXES = ("position_embeddings.weight", "wpe.weight", "embed_positions.weight")
_TOKEN_TYPE_EMBEDDING_SUFFIXES = ("token_type_embeddings.weight",)


def _freeze_by_suffix(model, suffixes):
    frozen = []
    for name, param in unwrap(model).named_parameters():
        if name.endswith(suffixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def freeze_position_embeddings(model) -> list:
    frozen = _freeze_by_suffix(model, _POSITION_EMBEDDING_SUFFIXES)
    if not frozen:
        raise ValueError(
            f"freeze_pos_embs=True but {type(unwrap(model)).__name__} has no learned position embeddings "
            "(it may use rotary or relative positions); set freeze_pos_embs=False."
        )
    return frozen


def freeze_token_type_embeddings(model) -> list:
    frozen = _freeze_by_suffix(model, _TOKEN_TYPE_EMBEDDING_SUFFIXES)
    if not frozen:
        logger.warning("freeze_token_type_embds=True has no effect: %s has no token-type embeddings.",
                       type(unwrap(model)).__name__)
    return frozen


def prepare_teacher_for_deepspeed(teacher, accelerator):
    """Wrap the frozen teacher in a DeepSpeed inference engine.

    Under ZeRO-3 the teacher's parameters are partitioned across ranks like the student's (gathered layer by layer
    during its forward); under ZeRO-1/2, which only partition optimizer state and gradients, the teacher has
    neither, so it runs as stage 0 (a full replica per rank).
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        width = hidden_size(teacher) or 1024
        # The teacher never produces gradients, so the reduce bucket only needs a sane size; "auto" values that
        # the Trainer would fill for the student are filled here from the teacher's width.
        for key, value in (("reduce_bucket_size", width * width),
                           ("stage3_param_persistence_threshold", 10 * width),
                           ("stage3_prefetch_bucket_size", int(0.9 * width * width))):
            if zero.get(key) in (None, "auto"):
                zero[key] = value
    else:
        # Stage-1/2 settings only concern gradients and optimizer state, which the teacher has none of (and some,
        # such as compute_grad_norm=false, are refused at stage 0).
        zero = config["zero_optimization"] = {"stage": 0}
    for key in list(zero):
        if zero[key] == "auto":
            zero.pop(key)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def unpartitioned_loading():
    """Load models with full tensors even when DeepSpeed ZeRO-3 is configured.

    Under ZeRO-3, `from_pretrained` partitions parameters across ranks as it loads; copying layers from a teacher
    into a student needs the full tensors. The student is partitioned when the Trainer prepares it, and the teacher
    by `prepare_teacher_for_deepspeed`.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)
