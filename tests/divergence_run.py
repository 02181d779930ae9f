"""A tiny causal-LM distillation with L_ce under a chosen divergence, run by test_divergences.py in one process and
under `accelerate launch` on 2 CPU processes (DDP over gloo).

Usage: python tests/divergence_run.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE [extra DistillationArguments as --k v]
Writes OUTPUT_DIR/log.json (the logged losses) and OUTPUT_DIR/student (the exported student)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402
from test_accumulation import PadCollator, masked_examples  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from distil_trainer import DistillationArguments, DistillationTrainer  # noqa: E402

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def main(output_dir, batch_size, extra):
    tok = tiny.gpt2_tokenizer()
    teacher = tiny.tiny_gpt2_lm(**NO_DROPOUT)
    student = tiny.tiny_gpt2_lm(layers=2, seed=7, **NO_DROPOUT)
    torch.manual_seed(0)
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", output_dir, "--report_to", "none", "--max_steps", "3", "--logging_steps", "1",
        "--save_strategy", "no", "--learning_rate", "1e-2", "--train_sampling_strategy", "sequential",
        "--remove_unused_columns", "false", "--per_device_train_batch_size", str(batch_size), "--disable_tqdm",
        "true", "--alpha_ce", "1.0", "--alpha_clm", "0.5", "--alpha_mlm", "0.0", "--alpha_cos", "0.0", *extra])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=masked_examples(tok, n=24, causal=True),
                                  data_collator=PadCollator(tok.pad_token_id))
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "student"))
    if trainer.args.should_save:
        log = [e for e in trainer.state.log_history if "loss" in e]
        (Path(output_dir) / "log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
