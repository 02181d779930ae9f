"""Which objective a recipe run distils with, decided from the teacher before any stage runs:

- "embedding": the teacher's sentence embeddings (alpha_embed, pooled the teacher's way). The default for a
  sentence-embedding teacher: a sentence-transformers folder (modules.json), or a checkpoint saved without any LM
  head (its config's architectures name a bare encoder such as BertModel). The logit and MLM terms (alpha_ce,
  alpha_mse, alpha_mlm) are turned off, no MLM head is fitted, the batches are whole unmasked sentences, and the
  student is saved as a sentence-transformers model too. alpha_cos and the hidden-state terms stay as configured.
- "logits": the triple loss of the recipe's configuration (a teacher without an MLM head gets one fitted first when
  fit_teacher_mlm_head_steps is set). The default for every other teacher.

`distillation_objective` chooses one explicitly; "auto" (the default) decides as above.
"""

from .recipe_args import ConfigError

AUTO, EMBEDDING, LOGITS = "auto", "embedding", "logits"
OBJECTIVES = (AUTO, EMBEDDING, LOGITS)
DEFAULT_EMBED_WEIGHT = 1.0  # alpha_embed when the embedding objective finds no embedding weight configured
_TURNED_OFF = ("alpha_ce", "alpha_mse", "alpha_mlm")  # need a teacher LM head, or train the student's
_HEAD_SUFFIXES = ("ForMaskedLM", "ForCausalLM", "LMHeadModel", "ForPreTraining", "ForSequenceClassification",
                  "ForQuestionAnswering", "ForTokenClassification")


def sentence_embedding_teacher(teacher_name, revision=None, trust_remote_code=False):
    """(True, why) for a sentence-embedding teacher (a sentence-transformers folder, or a checkpoint whose config
    names only architectures without a head), else (False, why)."""
    from transformers import AutoConfig

    from ..sentence_embedding import sentence_transformers_file

    if sentence_transformers_file(teacher_name, "modules.json", revision) is not None:
        return True, f"a sentence-transformers model ({teacher_name}/modules.json)"

    try:
        config = AutoConfig.from_pretrained(teacher_name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # a GGUF file, or a config that cannot be read here: the run loads it later anyway
        return False, f"not known to be a sentence-embedding model (its config could not be read: {type(err).__name__})"
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith(s) for a in architectures for s in _HEAD_SUFFIXES):
        return True, f"a checkpoint without an LM head (architectures {architectures})"
    return False, f"a model with a head (architectures {architectures or 'not recorded'})"


def objective(ctx):
    """The run's objective ("embedding" or "logits"), decided once and kept in `ctx.objective`. Choosing the
    embedding objective sets the training arguments' weights (see the module docstring)."""
    if getattr(ctx, "objective", None):
        return ctx.objective
    m, t = ctx.model_args, ctx.training_args
    choice, why = m.distillation_objective, "distillation_objective=" + m.distillation_objective
    if choice not in OBJECTIVES:
        raise ConfigError(f"distillation_objective={choice!r}; use one of {', '.join(OBJECTIVES)}.")
    if choice == AUTO:
        is_embedding, what = sentence_embedding_teacher(m.teacher_name, m.teacher_revision, m.trust_remote_code)
        choice, why = (EMBEDDING if is_embedding else LOGITS), f"auto: the teacher is {what}"
    if choice == EMBEDDING:
        if ctx.recipe_args.teacher_cache:
            raise ConfigError("teacher_cache: the embedding objective compares pooled sentence embeddings, which a "
                              "teacher-output cache does not hold; drop --teacher_cache, or set "
                              "distillation_objective=logits.")
        turned_off = [f"{n}={getattr(t, n)}" for n in _TURNED_OFF if getattr(t, n) > 0]
        for name in _TURNED_OFF:
            setattr(t, name, 0.0)
        if t.alpha_embed <= 0 and t.alpha_embed_relation <= 0:
            t.alpha_embed = DEFAULT_EMBED_WEIGHT
        why += f"; off: {', '.join(turned_off)}" if turned_off else ""
    ctx.objective, ctx.objective_reason = choice, why
    if ctx.is_main:  # printed before the stage headers, like them
        print(f"==> distillation objective: {choice} ({why})", flush=True)
    return choice


def describe(ctx) -> str:
    """One line for the model card and report: the objective, why, and its weights."""
    t = ctx.training_args
    terms = ("alpha_embed", "alpha_embed_relation", "alpha_cos", "alpha_hidden") if ctx.objective == EMBEDDING else (
        "alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos")
    weights = ", ".join(f"{n}={getattr(t, n)}" for n in terms if getattr(t, n) > 0)
    return f"{ctx.objective} ({ctx.objective_reason}); weights {weights}"


def scoring_pooling(ctx):
    """How sentence embeddings are pooled for the scores and the sentence-transformers export: the teacher's way
    (sentence_embedding.resolve_pooling, with the run's embed_pooling / embed_normalize), mean pooling when the
    teacher's folder pools in a way the project does not reproduce."""
    from ..sentence_embedding import Pooling, resolve_pooling

    t = ctx.training_args
    try:
        return resolve_pooling(ctx.model_args.teacher_name, t.embed_pooling, t.embed_normalize)
    except ValueError as err:
        return Pooling(source=f"mean pooling: {err}")
