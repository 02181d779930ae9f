"""Trainer callbacks that `DistillationTrainer` installs for itself, and the weight check behind its saves."""

import logging

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class CollatorEpochCallback(TrainerCallback):
    """Tells a collator with `set_epoch` (the MLM collator's seeded masking) which epoch it is collating."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


def check_epoch_reaches_workers(args, collator, dataset):
    """Refuse persistent DataLoader workers when the collator or the dataset reads the epoch (`set_epoch`).

    The epoch callbacks set it in the main process at each epoch's start, before Trainer creates that epoch's
    iterator: fresh workers (`dataloader_persistent_workers=False`) start from the main process's objects and see
    it, but persistent workers keep their copies from the first epoch, so every epoch would repeat epoch 0's masks
    (a seeded `MaskedLMCollator`) or masked copy (an MLM teacher cache's `CachedEpochsDataset`). A collator counts
    when it has `set_epoch` (CollatorEpochCallback calls it) unless its `uses_epoch` is False; a dataset when its
    `uses_epoch` is True."""
    if not (args.dataloader_num_workers > 0 and args.dataloader_persistent_workers):
        return
    stale = [type(collator).__name__] if hasattr(collator, "set_epoch") and getattr(collator, "uses_epoch", True) \
        else []
    stale += [type(dataset).__name__] if getattr(dataset, "uses_epoch", False) else []
    if stale:
        raise ValueError(f"dataloader_persistent_workers=True with dataloader_num_workers={args.dataloader_num_workers}"
                         f": {' and '.join(stale)} depend{'s' if len(stale) == 1 else ''} on the epoch, which "
                         "persistent workers never learn (they keep their copy from epoch 0, so every epoch would "
                         "reuse epoch 0's masks). Set dataloader_persistent_workers=False: the workers then restart "
                         "at each epoch and read it (one worker start-up per epoch), or dataloader_num_workers=0.")


class NonFiniteLossGuard(TrainerCallback):
    """Skips (or stops at) an optimizer step whose loss terms were not finite, the same way on every rank.

    `compute_loss` flags each non-finite term without synchronising. Before the optimizer step all ranks
    all-reduce the flags (one small collective per step), so every rank takes the same decision at the same step
    and none waits for another.

    A skipped update changes nothing but the Trainer's step counter (and the data position):
    - PyTorch optimizers (one process, DDP, FSDP): the gradients are dropped, so `optimizer.step()` has nothing to
      apply and the weights, Adam's moments and its per-parameter step counts stay as they were; the optimizer is
      marked as having skipped its step, which is what the Trainer checks before stepping the LR scheduler (the
      signal fp16's GradScaler raises on overflow), so the learning rate does not advance either. With fp16 the
      GradScaler skips the step on the non-finite gradients by itself (and lowers its loss scale, as it does for
      any overflow).
    - DeepSpeed applies the update inside `backward()`, before this callback runs. Its own overflow check skips a
      step whose gradients are non-finite, which is what a non-finite loss gives: optimizer state and schedule are
      left as they were. If DeepSpeed applied the step all the same (its checks are off, e.g. bf16
      `check_grad_overflow: false` or `compute_grad_norm: false`), the run stops and that state is never saved.
    `nonfinite_loss="stop"`, or `max_consecutive_nonfinite` skips in a row, stops after saving a checkpoint of
    the (untouched) weights.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.consecutive = 0
        self.discard_state = False  # DeepSpeed applied a non-finite update: nothing may be saved from here on

    def _bad_terms(self):
        trainer = self.trainer
        flags = trainer._nonfinite_flags
        if trainer.accelerator.num_processes > 1:
            flags = trainer.accelerator.reduce(flags.clone(), reduction="sum")
        trainer._nonfinite_flags = torch.zeros_like(trainer._nonfinite_flags)
        return [t for t, n in zip(trainer.terms, flags.tolist()) if n > 0]

    def _mark_optimizer_step_skipped(self, skipped):
        """Tell the Trainer the optimizer did not step, so that it does not step the LR scheduler either."""
        optimizer = self.trainer.optimizer
        if isinstance(optimizer, AcceleratedOptimizer) and self.trainer.accelerator.scaler is None:
            # accelerate sets this itself only when a GradScaler is in use; without one it is ours to set and reset.
            optimizer._is_overflow = skipped

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        bad_terms = self._bad_terms()
        if not trainer.is_deepspeed_enabled:
            self._mark_optimizer_step_skipped(bool(bad_terms))
        if not bad_terms:
            self.consecutive = 0
            return
        self.consecutive += 1
        trainer.nonfinite_steps += 1
        for t in bad_terms:
            trainer.nonfinite_terms[t] = trainer.nonfinite_terms.get(t, 0) + 1
        step = state.global_step + 1
        if trainer.is_deepspeed_enabled and trainer.model_wrapped.was_step_applied():
            logger.error("Non-finite %s at step %d, and DeepSpeed applied that update (its overflow checks are off): "
                         "stopping without saving this state. The last checkpoint is intact and a re-run resumes "
                         "from it; keep DeepSpeed's overflow checks on so that such steps are skipped.",
                         ", ".join(bad_terms), step)
            trainer.stopped_on_nonfinite = self.discard_state = True
            control.should_training_stop = True
            control.should_save = False
            return
        if not trainer.is_deepspeed_enabled and trainer.accelerator.scaler is None:
            for p in model.parameters():
                p.grad = None
        stop = args.nonfinite_loss == "stop" or self.consecutive >= args.max_consecutive_nonfinite
        logger.warning("Non-finite %s at step %d: update skipped (%d skipped so far)%s", ", ".join(bad_terms), step,
                       trainer.nonfinite_steps,
                       "; stopping after saving a checkpoint of the last good weights" if stop else "")
        if stop:
            trainer.stopped_on_nonfinite = True
            control.should_training_stop = True
            control.should_save = True

    # The Trainer's own flow (DefaultFlowCallback, which runs before this callback) asks for a save on save steps,
    # at the last step and at epoch ends; a discarded state must not be saved on any of them.
    def on_step_end(self, args, state, control, **kwargs):
        if self.discard_state:
            control.should_save = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.discard_state:
            control.should_save = False


def _local_shard(param):
    """This rank's part of a parameter: ds_tensor under ZeRO-3, the local shard of an FSDP2 DTensor, else itself."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def nonfinite_parameters(model, accelerator):
    """Names of the parameters holding NaN or inf on any rank (each rank checks its own shard). Collective: call it
    on every rank; all get the same answer."""
    from .model_utils import unwrap

    named = list(unwrap(model).named_parameters())
    bad = torch.stack([~torch.isfinite(_local_shard(p).detach()).all() for _, p in named]).int()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(accelerator.device), reduction="sum")
    return [name for (name, _), n in zip(named, bad.tolist()) if n]
