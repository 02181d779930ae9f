"""A tiny distillation with L_hidden (width projections), L_attn and L_relation, run by
test_intermediate_trainer.py in one process and under `accelerate launch` (DeepSpeed ZeRO-3 on 2 CPU processes).

Usage: python tests/intermediate_run.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE [extra DistillationArguments as --k v]
Writes OUTPUT_DIR/log.json (the logged losses) and OUTPUT_DIR/student (the exported student)."""

import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402
from test_accumulation import PadCollator, masked_examples  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from distil_trainer import DistillationArguments, DistillationTrainer  # noqa: E402

WEIGHTS = dict(alpha_ce=1.0, alpha_mlm=1.0, alpha_cos=0.0, alpha_hidden=1.0, alpha_attn=10.0, alpha_relation=1.0,
               relation_heads=4)


def main(output_dir, batch_size, extra):
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distil_trainer").setLevel(logging.INFO)  # the teacher's DeepSpeed engine is logged
    tok = tiny.bert_tokenizer()
    # Built before the arguments, so no ZeRO-3 zero.Init partitions them at construction: the same weights on
    # every rank and in the single-process run (DeepSpeed partitions them when the Trainer prepares them).
    teacher = tiny.tiny_bert_mlm(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = tiny.tiny_distilbert_mlm(hidden=24, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", output_dir, "--report_to", "none", "--max_steps", "3", "--logging_steps", "1",
        "--save_strategy", "no", "--learning_rate", "1e-2", "--train_sampling_strategy", "sequential",
        "--remove_unused_columns", "false", "--per_device_train_batch_size", str(batch_size),
        "--disable_tqdm", "true", *[x for k, v in WEIGHTS.items() for x in (f"--{k}", str(v))], *extra])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=masked_examples(tok, n=24), data_collator=PadCollator(tok.pad_token_id),
                                  processing_class=tok)
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "student"))
    if trainer.args.should_save:
        log = [e for e in trainer.state.log_history if "loss" in e]
        (Path(output_dir) / "log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
