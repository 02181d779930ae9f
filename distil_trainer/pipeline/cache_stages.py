"""The optional teacher-cache stage (`--teacher_cache DIR`): the teacher runs once over the training data and the
Distil stage trains from its stored outputs, with no teacher forward. Runs that ask for the same cache (another
ablation variant, another student initialisation, the same command again) reuse it."""

import math

from .recipe_args import ConfigError
from .stage import Stage

LAST_HIDDEN = -1  # the hidden-state index L_cos compares


def training_epochs(args, n_rows, world_size):
    """Epochs the Trainer will run (its own arithmetic, `Trainer.set_initial_training_values`): an MLM cache holds
    one masked copy per epoch."""
    if args.max_steps is None or args.max_steps <= 0:
        return max(1, math.ceil(args.num_train_epochs))
    batch = args.per_device_train_batch_size
    batches = n_rows // batch if args.dataloader_drop_last else math.ceil(n_rows / batch)
    # accelerate shards whole batches over the ranks (BatchSamplerShard, even_batches): the last, incomplete round
    # of batches is dropped with drop_last, else completed
    per_rank = batches // world_size if args.dataloader_drop_last else math.ceil(batches / world_size)
    updates_per_epoch = max(math.ceil(per_rank / args.gradient_accumulation_steps), 1)
    return math.ceil(args.max_steps / updates_per_epoch)


def cache_settings(ctx):
    """What the cache holds, derived from the distillation arguments: the positions L_ce reads, the hidden layer
    L_cos reads, one masked copy per training epoch, masks drawn per training micro-batch (as online)."""
    t, r = ctx.training_args, ctx.recipe_args
    positions = ("masked" if t.restrict_ce_to_mask else "tokens") if ctx.masked_lm else "tokens"
    epochs = training_epochs(t, len(ctx.train_dataset), ctx.state.num_processes) if ctx.masked_lm else 1
    return {"top_k": r.teacher_cache_top_k or None, "dtype": r.teacher_cache_dtype, "positions": positions,
            "hidden_layers": [LAST_HIDDEN] if t.alpha_cos > 0 else [], "epochs": epochs,
            "batch_size": t.per_device_train_batch_size}


def _refuse_untrainable(ctx, teacher, settings):
    """What a cache cannot train is refused before the teacher pass, not after it."""
    from ..model_utils import LM_HEADS
    from ..teacher_cache.build import plan_build, resolve_teacher
    from ..teacher_cache.training import _check_arguments  # the trainer's own refusals, run early

    try:
        _, head = resolve_teacher(teacher)
        plan = plan_build(teacher, head, ctx.tokenizer, shard_rows=4096, mlm_collator=_mlm_collator(ctx), **settings)
        _check_arguments(ctx.training_args, {"top_k": plan.top_k, "vocab_size": plan.vocab_size,
                                             "positions": plan.positions}, head in LM_HEADS)
    except ValueError as err:
        raise ConfigError(f"teacher_cache: {err}") from None
    return plan


def _mlm_collator(ctx):
    return ctx.collator if ctx.masked_lm else None


def _reusable(path, teacher, plan, ctx):
    """The complete cache at `path` when it was computed from these inputs and holds at least the hidden layers
    this run needs (a cache built for L_cos serves a run without it); None otherwise: then `build_teacher_cache`
    builds it, refuses a cache of other inputs there (it compares every field) or rebuilds a damaged one."""
    from ..teacher_cache import TeacherCacheDamaged, load_teacher_cache
    from ..teacher_cache.build import cache_identity
    from ..teacher_cache.identity import differing_fields
    from ..teacher_cache.store import read_manifest

    manifest = read_manifest(path)
    if manifest is None:
        return None
    wanted = cache_identity(teacher, ctx.tokenizer, ctx.train_dataset, plan)
    cached = manifest["identity"]
    others = {k: v for k, v in wanted.items() if k != "hidden_layers"}
    if differing_fields(cached, others) or not set(wanted["hidden_layers"]) <= set(cached.get("hidden_layers") or []):
        return None
    try:
        return load_teacher_cache(path)
    except TeacherCacheDamaged:
        return None  # build_teacher_cache builds it again


class CacheTeacher(Stage):
    """Build (or reuse) the teacher-output cache the Distil stage trains from; off unless --teacher_cache."""

    name = "cache teacher outputs"
    inputs = ("teacher", "train_dataset", "collator", "tokenizer", "masked_lm")
    outputs = ("teacher_cache",)
    main_process_first = True  # rank 0 builds, the others find it complete and reuse it

    def enabled(self, ctx):
        return bool(ctx.recipe_args.teacher_cache)

    def before(self, ctx):
        ctx.teacher_cache = None  # Distil trains with the teacher model unless this stage runs

    def cache_key(self, ctx):
        # With the teacher, tokenizer and data: the identity build_teacher_cache records and compares.
        return {"path": ctx.recipe_args.teacher_cache, **cache_settings(ctx)}

    def skip(self, ctx):
        if (ctx.final_dir / "model.safetensors").exists() and not ctx.training_args.overwrite_output_dir:
            return "skipped: the student is trained already (no teacher pass needed)"  # as Distil skips
        return None

    def run(self, ctx):
        from pathlib import Path

        from ..teacher_cache import TeacherCacheMismatch, build_teacher_cache

        path, settings = Path(ctx.recipe_args.teacher_cache), cache_settings(ctx)
        plan = _refuse_untrainable(ctx, ctx.teacher, settings)
        cache = _reusable(path, ctx.teacher, plan, ctx)
        reused = cache is not None
        if cache is None:
            try:
                cache = build_teacher_cache(ctx.teacher, ctx.train_dataset, path, ctx.tokenizer,
                                            mlm_collator=_mlm_collator(ctx), device=ctx.training_args.device,
                                            verbose=ctx.is_main, temperature=ctx.training_args.temperature,
                                            **settings)
            except TeacherCacheMismatch as err:
                raise ConfigError(f"teacher_cache: {err} In a recipe: give each teacher, data and cache settings its "
                                  "own --teacher_cache folder, or delete this one.") from None
        ctx.teacher_cache = cache
        ctx.result["teacher_cache"] = str(cache.path)
        ctx.result["teacher_cache_built"] = not reused  # False: this run ran no teacher pass
        s = cache.stats
        return (f"{'reused' if reused else 'built'} {cache.path}: {s.get('rows')} rows x {cache.num_epochs} "
                f"epoch(s), {s.get('positions')} positions, top_k={cache.identity.get('top_k')}, "
                f"{cache.identity.get('dtype')}, {s.get('bytes', 0) / 2**20:.1f} MiB")
