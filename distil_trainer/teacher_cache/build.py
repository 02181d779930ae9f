"""Writing a teacher-output cache: run the teacher once over a dataset and store what the distillation losses need
(top-k logits + logsumexp for LM heads, full logits for task heads, optional hidden states), shard by shard.

A build happens in `<cache_dir>.partial/` with `progress.json` rewritten (atomically) after each complete shard, so
a killed build resumes after its last complete shard; the finished folder is renamed to `<cache_dir>` with its
manifest. See `store.py` for the layout and docs/teacher_cache.md ("Teacher-output cache") for the stored columns.
"""

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import cache
from ..model_utils import (_SUFFIX_TO_HEAD, CAUSAL_LM, LM_HEADS, MASKED_LM, TASK_HEADS, head_kind, load_teacher,
                           load_tokenizer, unwrap, vocab_size)
from .identity import (REPLACE, TeacherCacheMismatch, data_identity, differing_fields, masking_identity,
                       mismatch_message, teacher_identity)
from .shard import DTYPES, compute_shard
from .store import (FORMAT, LOW_TOPK_MASS, MANIFEST_FILE, TeacherCache, load_teacher_cache, partial_dir, read_manifest,
                    shard_problems, topk_coverage)

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


@dataclass
class CachePlan:
    """The checked settings of one build."""
    head: str
    positions: str | None
    top_k: int | None
    vocab_size: int | None
    dtype: str
    hidden_layers: list
    epochs: int
    batch_size: int
    shard_rows: int
    collator: object = None
    coverage_temperature: float = 1.0  # the statistics only, not the identity: what is stored does not depend on it


# ---- settings -------------------------------------------------------------------------------------------------
def _head_from_config(name_or_path):
    from transformers import AutoConfig

    from ..model_utils import resolve_gguf

    source, gguf_kwargs = resolve_gguf(name_or_path)
    architectures = AutoConfig.from_pretrained(source, **gguf_kwargs).architectures or []
    for arch in architectures:
        for suffix, kind in _SUFFIX_TO_HEAD:
            if arch.endswith(suffix):
                return kind
    raise ValueError(f"Cannot tell the head of {name_or_path!r} from its config (architectures={architectures}); "
                     f"pass head= (--head) as one of {', '.join(LM_HEADS + TASK_HEADS)}.")


def resolve_teacher(teacher, head=None):
    """(model, head): a loaded model as is, or a name/path/GGUF loaded with the Auto class of its head."""
    if isinstance(teacher, (str, os.PathLike)):
        head = head or _head_from_config(str(teacher))
        teacher = load_teacher(str(teacher), head)
    found = head_kind(teacher)
    if head is not None and head != found:
        raise ValueError(f"head={head!r} but the teacher {type(unwrap(teacher)).__name__} has a {found} head.")
    if found not in LM_HEADS + TASK_HEADS:
        raise ValueError(f"The teacher {type(unwrap(teacher)).__name__} has no output head ({found}): there are no "
                         "predictions to cache. Load it with its LM or task head.")
    return teacher, found


def _hidden_layers(teacher, layers):
    n_states = unwrap(teacher).config.get_text_config().num_hidden_layers + 1  # embeddings + each layer
    resolved = []
    for i in layers or ():
        j = int(i) + n_states if int(i) < 0 else int(i)
        if not 0 <= j < n_states:
            raise ValueError(f"hidden layer {i} does not exist: the teacher has {n_states} hidden states "
                             f"(0 = embeddings .. {n_states - 1} = last layer; -1 = last).")
        resolved.append(j)
    return sorted(set(resolved))


def plan_build(teacher, head, tokenizer, *, top_k, positions, dtype, hidden_layers, epochs, mlm_collator, batch_size,
               shard_rows):
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; the cache stores float16 or float32 (Arrow has no bfloat16).")
    if batch_size < 1 or shard_rows < 1:
        raise ValueError(f"batch_size and shard_rows must be >= 1, got {batch_size} and {shard_rows}.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    # Shards hold whole batches, so the MLM masks (drawn per batch) do not depend on where a resumed build restarted.
    shard_rows = math.ceil(shard_rows / batch_size) * batch_size
    plan = CachePlan(head=head, positions=None, top_k=None, vocab_size=None, dtype=dtype,
                     hidden_layers=_hidden_layers(teacher, hidden_layers), epochs=int(epochs),
                     batch_size=int(batch_size), shard_rows=int(shard_rows))
    if head in TASK_HEADS:
        if positions is not None:
            raise ValueError(f"positions={positions!r} applies to LM heads; a {head} teacher's full logits are stored.")
        if epochs != 1 or mlm_collator is not None:
            raise ValueError("epochs > 1 and mlm_collator are for masked-LM teachers (one masked copy per epoch); "
                             f"a {head} teacher sees the same inputs every epoch, so build one epoch.")
        return plan
    # Every row of the head, padded ones included (Qwen2.5, Pythia, Phi pad theirs past the tokenizer): the online
    # softmax runs over all of them, so the cached top-k and logsumexp must too.
    plan.vocab_size = vocab_size(teacher)
    plan.top_k = plan.vocab_size if top_k is None else int(top_k)
    if not 1 <= plan.top_k <= plan.vocab_size:
        raise ValueError(f"top_k={top_k} must be between 1 and the vocabulary size {plan.vocab_size}.")
    plan.positions = positions or ("masked" if head == MASKED_LM else "tokens")
    allowed = ("masked", "tokens") if head == MASKED_LM else ("tokens",)
    if plan.positions not in allowed:
        raise ValueError(f"positions={positions!r} for a {head} teacher; use one of {', '.join(allowed)} "
                         "(masked: the MLM-masked positions, tokens: every non-padding token).")
    if head == CAUSAL_LM:
        if epochs != 1 or mlm_collator is not None:
            raise ValueError("epochs > 1 and mlm_collator are for masked-LM teachers; a causal-LM teacher sees the "
                             "same inputs every epoch, so build one epoch.")
        return plan
    if mlm_collator is None or getattr(mlm_collator, "seed", None) is None:
        raise ValueError("A masked-LM teacher cache needs mlm_collator=MaskedLMCollator(tokenizer, ..., seed=S): the "
                         "masks must be reproducible (an unseeded collator draws from the global RNG), so that the "
                         "cache is the same every time it is built and resumed.")
    plan.collator = mlm_collator
    return plan


def cache_identity(teacher, tokenizer, dataset, plan):
    data_fingerprint, rows = data_identity(dataset)
    return {"teacher": teacher_identity(teacher), "tokenizer": cache.tokenizer_identity(tokenizer),
            "data": data_fingerprint, "rows": rows, "head": plan.head, "positions": plan.positions,
            "top_k": plan.top_k, "vocab_size": plan.vocab_size, "dtype": plan.dtype,
            "hidden_layers": plan.hidden_layers,
            "masking": masking_identity(plan.collator, plan.batch_size) if plan.collator is not None else None,
            "epochs": plan.epochs}


# ---- the build: shards, progress, publication -----------------------------------------------------------------
def _write_shard(table, build_dir, rel_path):
    """save_to_disk into a temporary sibling, then rename: a shard folder is complete or absent."""
    import datasets

    final = build_dir / rel_path
    tmp = final.parent / (final.name + ".tmp")
    for leftover in (tmp, final):  # from a build killed while writing this shard
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with cache.datasets_progress_bars(False):  # one bar for the whole build, not one per shard save
        datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(tmp))
    os.replace(tmp, final)
    return cache.describe_files(final, sorted(p.name for p in final.iterdir() if p.is_file()))


def _resume_progress(build_dir, identity, plan):
    """The progress of an earlier, interrupted build of the same cache, or a fresh one."""
    fresh = {"format": FORMAT, "identity": identity, "shard_rows": plan.shard_rows, "seconds": 0.0,
             "epochs": [[] for _ in range(plan.epochs)]}
    progress = cache.read_json(build_dir / PROGRESS_FILE)
    if not isinstance(progress, dict) or progress.get("shard_rows") != plan.shard_rows \
            or differing_fields(progress.get("identity", {}), identity):
        if build_dir.exists():
            logger.warning("Discarding %s: an unfinished build of another cache (or with other shard_rows).", build_dir)
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True)
        cache.write_json_atomic(build_dir / PROGRESS_FILE, fresh)
        return fresh
    done = {"epochs": [{"shards": shards} for shards in progress["epochs"]]}
    if shard_problems(build_dir, done, "changed"):  # a damaged finished shard: redo the build from scratch
        logger.warning("An unfinished build in %s has damaged shards; starting it again.", build_dir)
        shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True)
        cache.write_json_atomic(build_dir / PROGRESS_FILE, fresh)
        return fresh
    return progress


def _existing_cache(output_dir, identity, overwrite):
    """A complete, intact cache of this identity at output_dir, or None when one has to be built."""
    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        return None
    manifest = read_manifest(output_dir)
    if manifest is None:
        if overwrite:
            return None
        raise FileExistsError(f"{str(output_dir)!r} exists and is not a teacher cache; pass overwrite=True "
                              "(--overwrite) to replace it, or choose another output directory.")
    fields = differing_fields(manifest["identity"], identity)
    if fields:
        if overwrite:
            return None
        raise TeacherCacheMismatch(mismatch_message(output_dir, manifest["identity"], identity, fields, REPLACE))
    try:
        return load_teacher_cache(output_dir)
    except ValueError as err:
        logger.warning("%s; building it again.", err)
        return None


@contextlib.contextmanager
def _teacher_ready(teacher, device):
    """The teacher in eval mode on `device` for the build; its mode and device restored after."""
    inner = unwrap(teacher)
    first = next(inner.parameters(), None)
    original = first.device if first is not None else torch.device("cpu")
    if device is None:
        device = original if original.type != "cpu" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = inner.training
    inner.eval()
    inner.to(device)
    try:
        yield torch.device(device)
    finally:
        inner.to(original)
        inner.train(was_training)


def _pad_id(tokenizer):
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _stats(progress, rows, temperature):
    shards = [s for epoch in progress["epochs"] for s in epoch]
    positions = sum(s["positions"] for s in shards)
    mass = sum(s["topk_mass_sum"] for s in shards)
    size = sum(f["size"] for s in shards for f in s["files"].values())
    lm = bool(positions and progress["identity"]["top_k"])
    # At the training temperature, from the shards measured at it (a build resumed with another one has none).
    at_t = lm and all(s.get("temperature") == temperature for s in shards)
    return {"rows": rows, "positions": positions, "bytes": size, "seconds": round(progress["seconds"], 3),
            "topk_mass_mean": (mass / positions) if lm else None,
            "topk_mass_temperature": temperature if at_t else None,
            "topk_mass_mean_at_temperature": sum(s["topk_mass_sum_at_t"] for s in shards) / positions if at_t
            else None}


def build_teacher_cache(teacher, dataset, output_dir, tokenizer, *, head=None, top_k=64, positions=None,
                        dtype="float16", hidden_layers=(), epochs=1, mlm_collator=None, batch_size=32, shard_rows=4096,
                        device=None, overwrite=False, verbose=True, temperature=1.0):
    """Run `teacher` once over `dataset` (a `datasets.Dataset` with unpadded `input_ids`) and cache its outputs in
    `output_dir`; returns the `TeacherCache`. An existing cache of the same identity is returned as is, one of
    another identity refused unless `overwrite`; an interrupted build resumes after its last complete shard.

    `teacher`: a model or a name/path/GGUF file. LM heads store `top_k` logits (None: the whole vocabulary), their
    ids and the logsumexp of all logits at `positions` ("tokens": every non-padding token, the causal-LM default;
    "masked": the masked positions, the MLM default); task heads store their full logits. `hidden_layers`: indices
    into the teacher's hidden states (0 = embeddings, -1 = last) stored in `dtype`. MLM: `epochs` masked copies, copy
    e masked by `mlm_collator` (a seeded `MaskedLMCollator`) after `set_epoch(e)`, in batches of `batch_size`.
    `temperature`: the training temperature, at which the top-k coverage is measured too (the statistics only).
    One build of `output_dir` at a time: a second one, from any process, is refused naming the first (`build_lock`).
    """
    start_time = time.perf_counter()
    output_dir = Path(output_dir)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    teacher, head = resolve_teacher(teacher, head)
    if len(dataset) == 0 or "input_ids" not in dataset.column_names:
        raise ValueError("The dataset is empty or has no input_ids column; give a binarized/tokenized dataset.")
    plan = plan_build(teacher, head, tokenizer, top_k=top_k, positions=positions, dtype=dtype,
                      hidden_layers=hidden_layers, epochs=epochs, mlm_collator=mlm_collator, batch_size=batch_size,
                      shard_rows=shard_rows)
    plan.coverage_temperature = float(temperature)
    identity = cache_identity(teacher, tokenizer, dataset, plan)
    existing = _existing_cache(output_dir, identity, overwrite)
    if existing is None:
        with build_lock(output_dir):
            # Checked again under the lock: another build may have published this cache since the first look.
            existing = _existing_cache(output_dir, identity, overwrite)
            if existing is None:
                result = _build(teacher, dataset, tokenizer, plan, identity, output_dir, device, verbose)
                if verbose:
                    print(format_summary(result, cache_hit=False, seconds=time.perf_counter() - start_time))
                return result
    if verbose:
        print(format_summary(existing, cache_hit=True))
    return existing


def build_lock(output_dir):
    """Held while `output_dir` is built: a lock file next to it (`.<name>.build.lock`, the run lock of run_lock.py,
    so a dead build's lock is taken over as a dead run's is). Another process building the same cache meanwhile is
    refused with `OutputDirInUse` naming this one (pid, host, start, command)."""
    from ..run_lock import output_dir_lock

    output_dir = Path(output_dir).resolve()
    return output_dir_lock(output_dir.parent, lock_name=f".{output_dir.name}.build.lock",
                           what=f"The teacher cache {str(output_dir)!r} (being built)")


def _build(teacher, dataset, tokenizer, plan, identity, output_dir, device, verbose):
    """Compute the missing shards in `<output_dir>.partial`, write the manifest, publish the folder."""
    build_dir = partial_dir(output_dir)
    progress = _resume_progress(build_dir, identity, plan)
    _compute_missing_shards(teacher, dataset, tokenizer, plan, progress, build_dir, device, verbose)
    manifest = {"format": FORMAT, "identity": identity,
                "epochs": [{"shards": [{k: s[k] for k in ("path", "rows", "files")} for s in epoch]}
                           for epoch in progress["epochs"]],
                "stats": _stats(progress, len(dataset), plan.coverage_temperature)}
    cache.write_json_atomic(build_dir / MANIFEST_FILE, manifest)  # last: its presence = the cache is complete
    os.remove(build_dir / PROGRESS_FILE)
    cache.publish_dir(build_dir, output_dir)
    return TeacherCache(output_dir, manifest)


def _compute_missing_shards(teacher, dataset, tokenizer, plan, progress, build_dir, device, verbose):
    """Run the teacher over every shard `progress` does not list yet, recording each one as soon as it is on disk."""
    from tqdm.auto import tqdm

    n_rows = len(dataset)
    starts = list(range(0, n_rows, plan.shard_rows))
    done_rows = sum(s["rows"] for epoch in progress["epochs"] for s in epoch)
    epoch_before = getattr(plan.collator, "epoch", 0)
    with _teacher_ready(teacher, device) as dev, \
            tqdm(total=n_rows * plan.epochs, initial=done_rows, desc="Caching teacher outputs", unit=" rows",
                 disable=not verbose) as bar:
        try:
            for e in range(plan.epochs):
                for s in range(len(progress["epochs"][e]), len(starts)):
                    shard_start = time.perf_counter()
                    begin, end = starts[s], min(starts[s] + plan.shard_rows, n_rows)
                    table, columns = compute_shard(teacher, dataset, begin, end, plan, e, _pad_id(tokenizer), dev, bar)
                    rel = f"epoch-{e}/shard-{s:05d}"
                    files = _write_shard(table, build_dir, rel)
                    progress["epochs"][e].append({"path": rel, "rows": end - begin, "files": files,
                                                  "positions": columns.positions,
                                                  "topk_mass_sum": columns.topk_mass_sum,
                                                  "topk_mass_sum_at_t": columns.topk_mass_sum_at_t,
                                                  "temperature": plan.coverage_temperature})
                    progress["seconds"] += time.perf_counter() - shard_start
                    cache.write_json_atomic(build_dir / PROGRESS_FILE, progress)
        finally:
            if plan.collator is not None:
                plan.collator.set_epoch(epoch_before)


def format_summary(teacher_cache, cache_hit, seconds=None):
    s, i = teacher_cache.stats, teacher_cache.identity
    lines = [f"teacher cache summary ({'cache hit' if cache_hit else 'built'}: {teacher_cache.path})",
             f"  head              {i['head']:>12}",
             f"  rows              {s['rows']:>12,}",
             f"  epochs            {teacher_cache.num_epochs:>12,}",
             f"  stored positions  {s['positions']:>12,}",
             f"  bytes on disk     {s['bytes']:>12,}"]
    if s["positions"]:
        lines.append(f"  bytes / position  {s['bytes'] / s['positions']:>12,.1f}")
    if s.get("topk_mass_mean") is not None:
        lines.append(f"  top-{i['top_k']} mass mean  {s['topk_mass_mean']:>10.4f}  (teacher probability in the "
                     "top-k, T = 1)")
        if s.get("topk_mass_mean_at_temperature") is not None and s["topk_mass_temperature"] != 1:
            lines.append(f"  top-{i['top_k']} mass at T  {s['topk_mass_mean_at_temperature']:>10.4f}  (at the "
                         f"training temperature T = {s['topk_mass_temperature']:g})")
        mass, temperature = topk_coverage(s)
        if mass < LOW_TOPK_MASS:
            lines.append(f"  warning: under {LOW_TOPK_MASS:.0%} of the teacher's probability is kept at T = "
                         f"{temperature:g}; the renormalised top-k target is much sharper than the teacher (see "
                         "docs/teacher_cache.md, Training from the cache): consider a larger top_k")
    lines.append(f"  teacher time      {s['seconds']:>11.1f}s")
    if seconds is not None:
        lines.append(f"  total time        {seconds:>11.1f}s")
    return "\n".join(lines)
