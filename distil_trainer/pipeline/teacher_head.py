"""Fit a masked-LM head onto a teacher that ships without one (e.g. sentence-embedding BERTs such as
all-MiniLM-L6-v2), so that the soft-target term has teacher logits to match.

The body, and the decoder tied to the word embeddings, stay frozen: only the head's transform (dense + LayerNorm)
and output bias are trained. The teacher's representations are therefore exactly those it shipped with.
"""

import json
import logging
import shutil
from pathlib import Path

from ..atomic import atomic_directory

logger = logging.getLogger(__name__)
MARKER = "fitted_mlm_head.json"


def trainable_head_parameters(model):
    """Names of the parameters of the MLM head that are trained: those not shared with the body."""
    body = {id(p) for p in model.base_model.parameters()}
    head = [(n, p) for n, p in model.named_parameters() if id(p) not in body]
    if not head:
        raise ValueError(f"{type(model).__name__} has no head parameters separate from its body.")
    return head


def fit_mlm_head(teacher, train_dataset, data_collator, output_dir, steps, identity, batch_size=32,
                 learning_rate=5e-3, seed=0, save=True):
    """Train the head for `steps` steps and save the teacher to `output_dir` (when `save`: the main process);
    reuse a saved one whose `identity` (teacher, data, steps, seed) matches."""
    import torch
    from transformers import Trainer, TrainingArguments

    output_dir = Path(output_dir)
    marker = output_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()) == identity:
        logger.info("Reusing the fitted teacher MLM head in %s", output_dir)
        return type(teacher).from_pretrained(output_dir).eval(), True

    for p in teacher.parameters():
        p.requires_grad_(False)
    head = trainable_head_parameters(teacher)
    for _, p in head:
        p.requires_grad_(True)
    logger.info("Fitting the teacher MLM head (%s) for %d steps, body frozen", [n for n, _ in head], steps)
    # The Trainer writes nothing here (no checkpoints, no reports); it still wants an output directory.
    args = TrainingArguments(output_dir=str(output_dir.parent / (output_dir.name + ".work")), max_steps=steps,
                             per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                             warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 10), save_strategy="no",
                             report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
                             train_sampling_strategy="random", disable_tqdm=False)
    trainer = Trainer(model=teacher, args=args, train_dataset=train_dataset, data_collator=data_collator)
    result = trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if save:
        with atomic_directory(output_dir, overwrite=True) as tmp:
            teacher.save_pretrained(tmp)
            (tmp / "fit_log.json").write_text(json.dumps(trainer.state.log_history, indent=2))
            (tmp / MARKER).write_text(json.dumps(identity, indent=2, sort_keys=True))
    logger.info("Teacher MLM head fitted: final training loss %.3f", result.training_loss)
    return teacher, False


def last_fit_loss(output_dir):
    """The last logged training loss of a fitted head (None if unknown)."""
    path = Path(output_dir) / "fit_log.json"
    if not path.exists():
        return None
    losses = [r["loss"] for r in json.loads(path.read_text()) if "loss" in r]
    return losses[-1] if losses else None
