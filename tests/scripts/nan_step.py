"""Launched on 2 ranks by tests/test_faults.py (DDP over gloo, or DeepSpeed ZeRO on CPU): one rank sees a NaN loss
term at one optimizer step. Each rank writes what it saw after every step (learning rate, a checksum of its own
weights and of its optimizer state) to OUT/rank<r>.json.

usage: nan_step.py OUT NAN_STEP NAN_RANK [TRAINING_ARGUMENTS_JSON]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import DataCollatorForLanguageModeling, TrainerCallback  # noqa: E402

import tiny  # noqa: E402
from distil_trainer import DistillationArguments, DistillationTrainer, losses  # noqa: E402

out, nan_step, nan_rank = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
rank = int(os.environ.get("RANK", 0))
tok = tiny.bert_tokenizer()
data = Dataset.from_dict(dict(tok(tiny.real_lines(64), truncation=True, max_length=32)))
settings = dict(output_dir=str(out / "run"), report_to=[], per_device_train_batch_size=4, max_steps=3,
                learning_rate=1e-3, save_strategy="no", disable_tqdm=True, seed=3, logging_steps=1)
args = DistillationArguments(**{**settings, **overrides})
trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args,
                              train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok))
original, calls = losses.hidden_cosine, {"n": 0}


def poisoned(*a, **kw):
    calls["n"] += 1  # one call per micro-batch: with no accumulation, call n is optimizer step n
    value = original(*a, **kw)
    return value * float("nan") if rank == nan_rank and calls["n"] == nan_step else value


def local_tensors(model):
    """This rank's own copy of each parameter (its partition under ZeRO-3)."""
    return [getattr(p, "ds_tensor", p) for p in model.parameters()]


def innermost_optimizer(optimizer):
    """The torch optimizer under the accelerate / DeepSpeed wrappers: the one holding Adam's moments."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class Record(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        state_sums = {}
        for i, s in enumerate(innermost_optimizer(trainer.optimizer).state.values()):
            for k, v in s.items():
                state_sums[f"{i}.{k}"] = float(v.double().sum()) if torch.is_tensor(v) else float(v)
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
        self.steps.append({
            "global_step": state.global_step,
            "learning_rate": trainer._get_learning_rate(),
            "weights": sum(float(t.double().sum()) for t in local_tensors(trainer.model_wrapped)),
            "finite": all(bool(torch.isfinite(t).all()) for t in local_tensors(trainer.model_wrapped)),
            "optimizer_state": state_sums,
            "deepspeed_skipped_steps": engine.skipped_steps if engine is not None else None,
        })


record = Record()
trainer.add_callback(record)
losses.hidden_cosine = poisoned
trainer.train()
(out / f"rank{rank}.json").write_text(json.dumps({
    "nonfinite_steps": trainer.nonfinite_steps, "nonfinite_terms": trainer.nonfinite_terms,
    "stopped_on_nonfinite": trainer.stopped_on_nonfinite, "global_step": trainer.state.global_step,
    "steps": record.steps,
}))
