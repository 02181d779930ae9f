"""Entry point: pick the layers, dispatch to the right copier, record what was done in the student's config."""

import logging

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ..model_utils import resolve_gguf
from .blocks import num_layers_of
from .distilbert import extract_distilbert
from .layers import DEFAULT_STRATEGY, resolve_layers
from .report import CONFIG_KEY
from .same_arch import extract_same_architecture

logger = logging.getLogger(__name__)

STUDENT_TYPES = ("same", "distilbert")


def _auto_class(model_type):
    """Masked-LM class for encoders that have one (BERT, RoBERTa, ...), causal-LM class for decoders."""
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return AutoModelForMaskedLM
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModel


def load_teacher(name_or_path, trust_remote_code=False, revision=None):
    """(teacher, missing_keys): the teacher with its LM head; `missing_keys` lists tensors the checkpoint lacked
    (e.g. the MLM head of a sentence-embedding BERT), which transformers initialised at random.

    `name_or_path` may also be a GGUF file, `path/model.gguf` or `folder_or_repo::model.gguf` (see
    `model_utils.resolve_gguf`): transformers de-quantizes it into its regular class (LlamaForCausalLM, ...).
    """
    source, gguf_kwargs = resolve_gguf(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision,
                                            **gguf_kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load a teacher config from {name_or_path!r} ({err}). Pass a local model directory, a GGUF "
            "file, or a Hub model name that is available (offline mode needs it in the cache)."
        ) from err
    auto_class = _auto_class(config.model_type)
    teacher, info = auto_class.from_pretrained(
        source, trust_remote_code=trust_remote_code, revision=revision, output_loading_info=True, **gguf_kwargs
    )
    return teacher.eval(), sorted(info.get("missing_keys", ()))


def extract_student(
    teacher,
    layers=None,
    strategy=None,
    num_layers=None,
    student_type=None,
    *,
    config_overrides=None,
    teacher_missing_keys=(),
    trust_remote_code=False,
    return_report=False,
):
    """A student initialised from selected teacher layers.

    Args:
        teacher: a ``PreTrainedModel`` or a name/path (loaded with :func:`load_teacher`).
        layers: explicit increasing teacher layer indices, e.g. ``[0, 2, 4, 7, 9, 11]``; or None to use `strategy`.
        strategy: ``every_other`` | ``uniform`` | ``first`` | ``last`` (rules in ``extraction.layers``); default
            ``uniform`` with ``num_layers = n // 2`` -- DistilBERT's 0,2,4,7,9,11 for a 12-layer teacher.
        num_layers: student depth for a strategy (must equal ``len(layers)`` if both are given).
        student_type: ``same`` (default; the teacher's class and config with fewer layers) or ``distilbert``
            (BERT teacher -> ``DistilBertForMaskedLM``).
        config_overrides: extra student config values (e.g. dropout); width/depth changes are refused.
        teacher_missing_keys: teacher tensor names that are random (absent from its checkpoint); the matching student
            tensors are reported as randomly initialised. Filled in automatically when `teacher` is a name/path.
        return_report: also return the :class:`ExtractionReport`.

    Returns the student in eval mode (or ``(student, report)``). ``student.config.distillation`` records
    ``teacher``, ``teacher_layers``, ``strategy``, ``student_type`` and ``randomly_initialised``.
    """
    if isinstance(teacher, str) or hasattr(teacher, "__fspath__"):
        teacher, teacher_missing_keys = load_teacher(str(teacher), trust_remote_code=trust_remote_code)
    student_type = student_type or "same"
    if student_type not in STUDENT_TYPES:
        raise ValueError(f"Unknown student_type {student_type!r}; choose one of {', '.join(STUDENT_TYPES)}.")
    chosen = resolve_layers(num_layers_of(teacher.config), layers, strategy, num_layers)
    used_strategy = None if layers is not None else (strategy or DEFAULT_STRATEGY)

    if student_type == "distilbert" and teacher.config.model_type != "distilbert":
        student, report = extract_distilbert(teacher, chosen, config_overrides, teacher_missing_keys)
    else:
        student, report = extract_same_architecture(teacher, chosen, config_overrides, teacher_missing_keys)
        report.student_type = student_type

    report.teacher = teacher.config._name_or_path or getattr(teacher, "name_or_path", "") or ""
    report.strategy = used_strategy
    setattr(student.config, CONFIG_KEY, report.config_record())
    if report.randomly_initialised:
        logger.warning(
            "%d student tensors are randomly initialised (absent in the teacher): %s",
            len(report.randomly_initialised), ", ".join(report.randomly_initialised),
        )
    logger.info(report.summary())
    return (student, report) if return_report else student
