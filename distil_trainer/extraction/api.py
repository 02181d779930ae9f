"""Entry point: pick the layers, dispatch to the right copier, record what was done in the student's config."""

import logging

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ..model_utils import resolve_gguf, seeded_initialisation
from .blocks import num_layers_of
from .calibration import CalibrationSet
from .depth import MEASURED_STRATEGIES, choose_layers
from .distilbert import extract_distilbert
from .layers import DEFAULT_STRATEGY, resolve_layers
from .report import CONFIG_KEY
from .same_arch import extract_same_architecture
from .width import prune_width

logger = logging.getLogger(__name__)

STUDENT_TYPES = ("same", "distilbert")


def _auto_class(model_type):
    """Masked-LM class for encoders that have one (BERT, RoBERTa, ...), causal-LM class for decoders."""
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return AutoModelForMaskedLM
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModel


def load_teacher(name_or_path, trust_remote_code=False, revision=None, seed=0):
    """(teacher, missing_keys): the teacher with its LM head; `missing_keys` lists tensors the checkpoint lacked
    (e.g. the MLM head of a sentence-embedding BERT), which are initialised at random from `seed`, the same on
    every rank (`model_utils.seeded_initialisation`).

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
    with seeded_initialisation(seed):
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
    calibration=None,
    keep_ends=None,
    iterative=False,
    hidden_size=None,
    num_attention_heads=None,
    intermediate_size=None,
    progress=True,
    config_overrides=None,
    teacher_missing_keys=(),
    trust_remote_code=False,
    return_report=False,
):
    """A student initialised from selected teacher layers.

    Args:
        teacher: a ``PreTrainedModel`` or a name/path (loaded with :func:`load_teacher`).
        layers: explicit increasing teacher layer indices, e.g. ``[0, 2, 4, 7, 9, 11]``; or None to use `strategy`.
        strategy: ``every_other`` | ``uniform`` | ``first`` | ``last`` (rules in ``extraction.layers``), or
            measured on `calibration`: ``block_influence`` | ``angular`` (``extraction.depth``); default ``uniform``
            with ``num_layers = n // 2`` -- DistilBERT's 0,2,4,7,9,11 for a 12-layer teacher. With width targets and
            no depth request at all (no layers, strategy or num_layers), every layer is kept.
        num_layers: student depth for a strategy (must equal ``len(layers)`` if both are given).
        calibration: a :class:`CalibrationSet` (``extraction.load_calibration``) or token-id lists; needed by the
            measured strategies and by width pruning.
        keep_ends: measured strategies only: never drop the first and last layers (default True).
        iterative: ``block_influence`` only: drop one layer at a time, measuring the remaining stack again.
        hidden_size, num_attention_heads, intermediate_size: width targets (``extraction.width``), applied to the
            student after the layer choice, by activation importance measured on `calibration`.
        progress: show progress bars while measuring.
        student_type: ``same`` (default; the teacher's class and config with fewer layers) or ``distilbert``
            (BERT teacher -> ``DistilBertForMaskedLM``).
        config_overrides: extra student config values (e.g. dropout); width/depth changes are refused.
        teacher_missing_keys: teacher tensor names that are random (absent from its checkpoint); the matching student
            tensors are reported as randomly initialised. Filled in automatically when `teacher` is a name/path.
        return_report: also return the :class:`ExtractionReport`.

    Returns the student in eval mode (or ``(student, report)``). ``student.config.distillation`` records
    ``teacher``, ``teacher_layers``, ``strategy``, ``student_type`` and ``randomly_initialised``, plus
    ``layer_choice`` (every teacher layer's score and why it was kept or dropped) for a measured strategy and
    ``width`` (sizes before/after) for width pruning; the report also holds every kept head, neuron and channel.
    """
    if isinstance(teacher, str) or hasattr(teacher, "__fspath__"):
        teacher, teacher_missing_keys = load_teacher(str(teacher), trust_remote_code=trust_remote_code)
    student_type = student_type or "same"
    if student_type not in STUDENT_TYPES:
        raise ValueError(f"Unknown student_type {student_type!r}; choose one of {', '.join(STUDENT_TYPES)}.")
    widths = {"hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
              "intermediate_size": intermediate_size}
    calibration = _calibration(calibration, strategy, widths)
    chosen, used_strategy, choice = _choose_layers(teacher, layers, strategy, num_layers, widths, calibration,
                                                   keep_ends, iterative, progress)

    if student_type == "distilbert" and teacher.config.model_type != "distilbert":
        student, report = extract_distilbert(teacher, chosen, config_overrides, teacher_missing_keys)
    else:
        student, report = extract_same_architecture(teacher, chosen, config_overrides, teacher_missing_keys)
        report.student_type = student_type

    report.teacher = teacher.config._name_or_path or getattr(teacher, "name_or_path", "") or ""
    report.strategy = used_strategy
    report.layer_choice = choice.record() if choice is not None else None
    if any(v is not None for v in widths.values()):
        student, report.width = prune_width(student, calibration, progress=progress, **widths)
    setattr(student.config, CONFIG_KEY, report.config_record())
    if report.randomly_initialised:
        logger.warning(
            "%d student tensors are randomly initialised (absent in the teacher): %s",
            len(report.randomly_initialised), ", ".join(report.randomly_initialised),
        )
    logger.info(report.summary())
    return (student, report) if return_report else student


def _calibration(calibration, strategy, widths):
    """The calibration set, required (and only meaningful) for measured strategies and width pruning."""
    needs = strategy in MEASURED_STRATEGIES or any(v is not None for v in widths.values())
    if calibration is None:
        if needs:
            what = f"strategy {strategy!r}" if strategy in MEASURED_STRATEGIES else "width pruning"
            raise ValueError(f"{what} measures the teacher on calibration text: pass calibration= (a CalibrationSet "
                             "from extraction.load_calibration, or token-id lists); on the command line, "
                             "--calibration_file PATH (plain text or a distil-trainer binarize folder).")
        return None
    return calibration if isinstance(calibration, CalibrationSet) else CalibrationSet(calibration)


def _choose_layers(teacher, layers, strategy, num_layers, widths, calibration, keep_ends, iterative, progress):
    """(teacher layers kept, strategy name for the record, LayerChoice of a measured strategy or None)."""
    n_teacher = num_layers_of(teacher.config)
    choice = _measured_choice(teacher, layers, strategy, num_layers, calibration, keep_ends, iterative, progress)
    width_only = (any(v is not None for v in widths.values()) and layers is None and strategy is None
                  and num_layers is None)
    if choice is not None:
        chosen = choice.kept
    elif width_only:
        chosen = list(range(n_teacher))  # width pruning only: the depth stays the teacher's
    else:
        chosen = resolve_layers(n_teacher, layers, strategy, num_layers)
    used_strategy = None if layers is not None or width_only else (strategy or DEFAULT_STRATEGY)
    return chosen, used_strategy, choice


def _measured_choice(teacher, layers, strategy, num_layers, calibration, keep_ends, iterative, progress):
    """The LayerChoice of a measured strategy; None for the fixed strategies (which take no measuring options)."""
    if strategy not in MEASURED_STRATEGIES:
        if iterative or keep_ends is not None:
            raise ValueError("keep_ends and iterative apply to the measured strategies (block_influence, angular); "
                             f"strategy {strategy!r} ignores them. Drop them or choose a measured strategy.")
        return None
    if layers is not None:
        raise ValueError(f"Give either an explicit layer list ({list(layers)}) or a strategy ({strategy!r}), "
                         "not both.")
    return choose_layers(teacher, calibration, strategy, num_layers, keep_ends is not False, iterative, progress)
