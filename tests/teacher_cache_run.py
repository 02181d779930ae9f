"""A tiny masked-LM distillation trained from a teacher-output cache, run by test_teacher_cache_train.py in one
process and under `accelerate launch` on 2 CPU processes (each rank reads its own rows of the cache).

Usage: python tests/teacher_cache_run.py CACHE_DIR OUTPUT_DIR PER_DEVICE_BATCH_SIZE [--k v ...]
Writes OUTPUT_DIR/log.json (the logged losses) and OUTPUT_DIR/student (the exported student)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from distil_trainer import DistillationArguments, DistillationTrainer  # noqa: E402

WEIGHTS = dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=True)


def student():
    return tiny.tiny_distilbert_mlm(dropout=0.0, attention_dropout=0.0)


def main(cache_dir, output_dir, batch_size, extra):
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", output_dir, "--report_to", "none", "--max_steps", "3", "--logging_steps", "1",
        "--save_strategy", "no", "--learning_rate", "1e-2", "--train_sampling_strategy", "sequential",
        "--per_device_train_batch_size", str(batch_size), "--disable_tqdm", "true",
        *[x for k, v in WEIGHTS.items() for x in (f"--{k}", str(v))], *extra])
    trainer = DistillationTrainer(model=student(), teacher_cache=cache_dir, args=args,
                                  processing_class=tiny.bert_tokenizer())
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "student"))
    if trainer.args.should_save:
        log = [e for e in trainer.state.log_history if "loss" in e]
        (Path(output_dir) / "log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
