"""Trainer callbacks that `DistillationTrainer` installs for itself."""

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class CollatorEpochCallback(TrainerCallback):
    """Tells a collator with `set_epoch` (the MLM collator's seeded masking) which epoch it is collating."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class NonFiniteLossGuard(TrainerCallback):
    """Skips (or stops at) an optimizer step whose loss terms were not finite, the same way on every rank.

    `compute_loss` flags each non-finite term without synchronising. Before the optimizer step all ranks
    all-reduce the flags (one small collective per step), so every rank takes the same decision at the same step
    and none waits for another. Skipping drops the gradients, so the optimizer leaves weights and moments as
    they were; "stop" also asks the Trainer to save a checkpoint of those untouched weights and to stop.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.consecutive = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer
        flags = trainer._nonfinite_flags
        if trainer.accelerator.num_processes > 1:
            flags = trainer.accelerator.reduce(flags.clone(), reduction="sum")
        trainer._nonfinite_flags = torch.zeros_like(trainer._nonfinite_flags)
        bad_terms = [t for t, n in zip(trainer.terms, flags.tolist()) if n > 0]
        if not bad_terms:
            self.consecutive = 0
            return
        self.consecutive += 1
        trainer.nonfinite_steps += 1
        for t in bad_terms:
            trainer.nonfinite_terms[t] = trainer.nonfinite_terms.get(t, 0) + 1
        if trainer.is_deepspeed_enabled:
            # DeepSpeed applies the update inside backward(); it cannot be skipped here. Stop before saving it.
            logger.error("Non-finite %s at step %d under DeepSpeed: stopping without saving this state; the last "
                         "checkpoint is intact and a re-run resumes from it.", bad_terms, state.global_step + 1)
            trainer.stopped_on_nonfinite = True
            control.should_training_stop = True
            control.should_save = False
            return
        if trainer.accelerator.scaler is None:  # fp16's GradScaler skips non-finite steps by itself
            for p in model.parameters():
                p.grad = None
        stop = args.nonfinite_loss == "stop" or self.consecutive >= args.max_consecutive_nonfinite
        logger.warning("Non-finite %s at step %d: update skipped (%d skipped so far)%s", ", ".join(bad_terms),
                       state.global_step + 1, trainer.nonfinite_steps,
                       "; stopping after saving a checkpoint of the last good weights" if stop else "")
        if stop:
            trainer.stopped_on_nonfinite = True
            control.should_training_stop = True
            control.should_save = True
