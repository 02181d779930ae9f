"""Launched on 2 CPU ranks by tests/test_faults.py: rank 1 alone sees a NaN loss term at step 2."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

import tiny  # noqa: E402
from distil_trainer import DistillationArguments, DistillationTrainer, losses  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
tok = tiny.bert_tokenizer()
data = Dataset.from_dict(dict(tok(tiny.real_lines(64), truncation=True, max_length=32)))
args = DistillationArguments(output_dir=str(out / "run"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                             max_steps=3, learning_rate=1e-3, save_strategy="no", disable_tqdm=True, seed=3)
trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args,
                              train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok))
original, calls = losses.hidden_cosine, {"n": 0}


def poisoned(*a, **kw):
    calls["n"] += 1
    value = original(*a, **kw)
    return value * float("nan") if rank == 1 and calls["n"] == 2 else value


losses.hidden_cosine = poisoned
trainer.train()
checksum = sum(float(p.double().sum()) for p in trainer.model.parameters())
(out / f"rank{rank}.json").write_text(json.dumps({"nonfinite_steps": trainer.nonfinite_steps,
                                                  "global_step": trainer.state.global_step, "checksum": checksum}))
torch.distributed.destroy_process_group()
