"""Launched on 2 ranks by tests/test_process_group.py: a short DDP distillation that keeps its trainer alive to the
end (as most scripts do) and, at interpreter exit after every other exit hook, writes the names of the gloo threads
still running to OUT/rank<r>.json. Those threads outliving Python is what made ranks abort at exit (SIGABRT).

usage: exit_threads.py OUT
"""

import atexit
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

out, rank = Path(sys.argv[1]), int(os.environ.get("RANK", 0))


def report_threads():  # registered first, so it runs after the trainer's own exit hook
    names = [Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    (out / f"rank{rank}.json").write_text(json.dumps(sorted(n for n in names if "gloo" in n)))


atexit.register(report_threads)

from datasets import Dataset  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

import tiny  # noqa: E402
from distil_trainer import DistillationArguments, DistillationTrainer  # noqa: E402

tok = tiny.bert_tokenizer()
data = Dataset.from_dict(dict(tok(tiny.real_lines(32), truncation=True, max_length=32)))
args = DistillationArguments(output_dir=str(out / "run"), report_to=[], per_device_train_batch_size=4, max_steps=2,
                             save_strategy="no", disable_tqdm=True, use_cpu=True)
trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args,
                              train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok))
trainer.train()
