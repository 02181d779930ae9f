"""Stages on the models: load the teacher, fit its MLM head if it ships without one, extract the student."""

import json
import logging

from .layout import STUDENT_INIT_DIR, TEACHER_HEAD_DIR
from .recipe_args import ConfigError
from .stage import Stage

logger = logging.getLogger(__name__)

RANDOM_INIT = "random"  # student_init value of the random-initialisation ablation
# Config fields that fix a student's size, under the names of the families the recipes use.
SIZE_FIELDS = ("dim", "hidden_size", "n_embd", "n_layers", "num_hidden_layers", "n_layer", "n_heads",
               "num_attention_heads", "n_head", "hidden_dim", "intermediate_size", "vocab_size",
               "max_position_embeddings", "n_positions", "type_vocab_size")


class LoadTeacher(Stage):
    name = "load teacher"
    outputs = ("teacher", "missing", "missing_head", "masked_lm")
    whole_models = True

    def run(self, ctx):
        from .. import extraction
        from .report import count_parameters

        m = ctx.model_args
        ctx.teacher, ctx.missing = extraction.load_teacher(m.teacher_name, m.trust_remote_code,
                                                           revision=m.teacher_revision, seed=ctx.training_args.seed)
        ctx.missing_head = _missing_head_keys(ctx.teacher, ctx.missing)
        return (f"{type(ctx.teacher).__name__}, {count_parameters(ctx.teacher):,} parameters"
                + (f"; NO pretrained head ({len(ctx.missing_head)} head tensors missing)" if ctx.missing_head else ""))

    def after(self, ctx):
        teacher_is_mlm = type(ctx.teacher).__name__.endswith("ForMaskedLM")
        ctx.masked_lm = teacher_is_mlm or ctx.model_args.student_type == "distilbert"


class FitTeacherHead(Stage):
    """A teacher shipped without an MLM head gets one fitted (body frozen), or the run stops here."""

    name = "fit teacher MLM head"
    inputs = ("teacher", "missing_head", "train_dataset", "collator", "data_dir")
    outputs = ("teacher", "missing", "missing_head")

    def enabled(self, ctx):
        from .objective import EMBEDDING, objective

        # The embedding objective reads no logits: no head to fit (the first call decides the objective).
        return objective(ctx) != EMBEDDING and bool(ctx.model_args.fit_teacher_mlm_head_steps)

    def before(self, ctx):
        m, t = ctx.model_args, ctx.training_args
        needs_logits = t.alpha_ce > 0 or t.alpha_mse > 0
        if ctx.missing_head and needs_logits and not m.fit_teacher_mlm_head_steps:
            raise ConfigError(
                f"the teacher {m.teacher_name} has no pretrained LM head ({ctx.missing_head[0]} and "
                f"{len(ctx.missing_head) - 1} more are missing), so alpha_ce/alpha_mse would match random logits. "
                "Set fit_teacher_mlm_head_steps (fits the head with the body frozen) or set alpha_ce=0 and "
                "alpha_mse=0.")

    def cache_key(self, ctx):
        m = ctx.model_args
        return {"teacher": m.teacher_name, "revision": m.teacher_revision, "steps": m.fit_teacher_mlm_head_steps,
                "decoder": m.fit_teacher_mlm_head_decoder, "method": "cached-body-outputs", "data": ctx.data_dir.name,
                "samples": len(ctx.train_dataset), "seed": ctx.training_args.seed}

    def skip(self, ctx):
        return None if ctx.missing_head else "skipped: the teacher has a pretrained head"

    def run(self, ctx):
        from .teacher_head import fit_mlm_head

        head_dir = ctx.out / TEACHER_HEAD_DIR
        ctx.state.wait_for_everyone()
        ctx.teacher, reused = fit_mlm_head(ctx.teacher, ctx.train_dataset, ctx.collator, head_dir,
                                           ctx.model_args.fit_teacher_mlm_head_steps, self.cache_key(ctx),
                                           decoder=ctx.model_args.fit_teacher_mlm_head_decoder,
                                           seed=ctx.training_args.seed, save=ctx.is_main)
        ctx.state.wait_for_everyone()
        # As save_pretrained records on the main process: every rank's teacher then has the config of the saved
        # one (a teacher-output cache compares the config).
        ctx.teacher.config.architectures = [type(ctx.teacher).__name__]
        ctx.missing = ctx.missing_head = []  # the head now exists, and the student copies it
        ctx.result["teacher_head"] = str(head_dir)
        return ("reused " if reused else "fitted ") + str(head_dir)


class ExtractStudent(Stage):
    """The student initialised from teacher layers (or, with student_init=random, their shape only)."""

    name = "extract student"
    inputs = ("teacher", "missing", "tokenizer", "train_dataset")
    outputs = ("student", "layer_map", "student_choice")
    main_process_first = True
    whole_models = True

    def cache_key(self, ctx):
        return ctx.model_args.student_init  # a cached initial student made another way is refused

    def skip(self, ctx):
        init_dir = ctx.out / STUDENT_INIT_DIR
        if not (init_dir / "config.json").exists():
            return None
        ctx.student = load_like(ctx.teacher, init_dir)
        _check_student_init(ctx.student, self.cache_key(ctx), init_dir)
        _check_student_shape(ctx.student, ctx.model_args, init_dir)
        return f"reused {init_dir}"

    def run(self, ctx):
        from .. import extraction

        m, init_dir = ctx.model_args, ctx.out / STUDENT_INIT_DIR
        student, report = extraction.extract_student(
            ctx.teacher, layers=_layers(m), strategy=m.layer_strategy, num_layers=m.student_num_layers,
            student_type=m.student_type, teacher_missing_keys=ctx.missing, return_report=True,
            calibration=_calibration(ctx), keep_ends=m.keep_ends, iterative=m.iterative,
            hidden_size=m.student_hidden_size, num_attention_heads=m.student_num_attention_heads,
            intermediate_size=m.student_intermediate_size, progress=not ctx.training_args.disable_tqdm)
        if m.student_init == RANDOM_INIT:
            student = _reinitialise(student, report, ctx.training_args.seed)
        if ctx.is_main:
            extraction.save_student(student, ctx.tokenizer, init_dir, report=report)
        ctx.student = student
        return (f"layers {report.teacher_layers} -> {type(student).__name__} in {init_dir}"
                + (" (weights RANDOMLY re-initialised)" if m.student_init == RANDOM_INIT else ""))

    def after(self, ctx):
        from .. import extraction

        m = ctx.model_args
        if m.student_reference_config:
            check_reference_config(ctx.student, m.student_reference_config)
        if m.student_init == RANDOM_INIT and ctx.training_args.freeze_pos_embs:
            logger.warning("student_init=random with freeze_pos_embs: the position embeddings stay at their random "
                           "initial values for the whole run.")
        record = ctx.student.config.to_dict().get(extraction.CONFIG_KEY, {})
        # A re-initialised student took only its shape from the teacher layers: the card shows no layer map.
        ctx.layer_map = None if record.get("student_init") == RANDOM_INIT else record.get("teacher_layers")
        ctx.student_choice = {k: record[k] for k in ("layer_choice", "width") if record.get(k)} or None
        if record.get("layer_choice") and ctx.layer_map:
            _match_intermediate_layers(ctx.training_args, ctx.layer_map)


def check_reference_config(student, reference_path):
    """The extracted student must have the sizes of the original Distil* student config."""
    with open(reference_path, encoding="utf-8") as f:
        reference = json.load(f)
    actual = student.config.to_dict()
    wrong = [f"{k}: reference {reference[k]}, student {actual[k]}" for k in SIZE_FIELDS
             if k in reference and k in actual and reference[k] != actual[k]]
    if wrong:
        raise ConfigError(f"the student differs from {reference_path}: {'; '.join(wrong)}. Check teacher_name, "
                          "student_type and student_layers.")


def load_like(teacher, directory):
    """Reload a saved student with the head class of the teacher (DistilBERT for student_type=distilbert)."""
    import transformers

    from ..model_utils import CAUSAL_LM, head_kind

    auto = transformers.AutoModelForCausalLM if head_kind(teacher) == CAUSAL_LM else transformers.AutoModelForMaskedLM
    return auto.from_pretrained(directory)


def _missing_head_keys(teacher, missing_keys):
    prefix = teacher.base_model_prefix + "."
    return [k for k in missing_keys if not k.startswith(prefix)]


def _calibration(ctx):
    """The calibration set for measured strategies and width pruning: calibration_file, else the training data."""
    from .. import extraction

    m = ctx.model_args
    needed = m.layer_strategy in extraction.MEASURED_STRATEGIES or any(
        v is not None for v in (m.student_hidden_size, m.student_num_attention_heads, m.student_intermediate_size))
    if not needed:
        return None
    source = m.calibration_file or ctx.train_dataset
    return extraction.load_calibration(source, ctx.tokenizer, m.calibration_tokens,
                                       ctx.data_args.max_length or 256)


def _match_intermediate_layers(training_args, teacher_layers):
    """Hidden-state terms of a student whose layers were chosen by measurement: student layer m learns from the
    output of the teacher layer it was copied from (0 = embeddings), unless the run gives its own map."""
    terms = ("alpha_hidden", "alpha_attn")
    if training_args.intermediate_layer_map or not any(getattr(training_args, t, 0) > 0 for t in terms):
        return
    training_args.intermediate_layer_map = ",".join(
        ["0:0"] + [f"{s + 1}:{t + 1}" for s, t in enumerate(teacher_layers)])
    logger.info("intermediate_layer_map set to the measured layer choice: %s", training_args.intermediate_layer_map)


def _check_student_shape(student, model_args, init_dir):
    """A cached initial student must have the layers and widths this run asks for (its config's extraction record),
    or a changed recipe would train the old student silently."""
    from .. import extraction

    m, record = model_args, student.config.to_dict().get(extraction.CONFIG_KEY, {})
    kept, layers = record.get("teacher_layers"), _layers(model_args)
    sizes = {name: after for name, (_, after) in (record.get("width") or {}).get("sizes", {}).items()}
    asked = {"student_layers": (kept, layers)} if layers is not None else {
        "layer_strategy": (record.get("strategy"), m.layer_strategy),
        "student_num_layers": (len(kept) if kept is not None else None, m.student_num_layers)}
    asked.update({f"student_{name}": (sizes.get(name), getattr(m, f"student_{name}"))
                  for name in ("hidden_size", "num_attention_heads", "intermediate_size")})
    differ = [f"{key}={want} (it has {have})" for key, (have, want) in asked.items()
              if want is not None and have != want]
    if sizes and not any(getattr(m, f"student_{n}") is not None
                         for n in ("hidden_size", "num_attention_heads", "intermediate_size")):
        differ.append("no width pruning (it is width-pruned)")
    if differ:
        raise ConfigError(f"{init_dir} holds a student made another way than this run asks for: {'; '.join(differ)}. "
                          f"Use another output_dir (or delete {init_dir}).")


def _layers(model_args):
    if model_args.student_layers:
        return [int(x) for x in str(model_args.student_layers).replace(" ", "").split(",") if x != ""]
    return None


def _reinitialise(student, report, seed):
    """The student's architecture with fresh weights (the model class's own initialisation, seeded), for the
    random-initialisation ablation; `report` and the config record say that nothing was copied."""
    from transformers import set_seed

    from .. import extraction

    set_seed(seed)
    fresh = type(student)(student.config).to(student.dtype).eval()
    report.copied = {}
    report.randomly_initialised = sorted(fresh.state_dict())
    setattr(fresh.config, extraction.CONFIG_KEY, {**report.config_record(), "student_init": RANDOM_INIT})
    return fresh


def _check_student_init(student, wanted, init_dir):
    """A cached initial student must have been made the way this run asks for."""
    from .. import extraction

    found = student.config.to_dict().get(extraction.CONFIG_KEY, {}).get("student_init", "teacher_layers")
    if found != wanted:
        raise ConfigError(f"{init_dir} holds a student with student_init={found}, but this run asks for "
                          f"student_init={wanted}; use another output_dir (or delete {init_dir}).")
