"""A tiny sentence-embedding distillation (L_embed through a width projection, L_embed_relation), run by
test_embedding_trainer.py in one process and under `accelerate launch` on 2 CPU processes (DDP over gloo).

Usage: python tests/embedding_run.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE [extra DistillationArguments as --k v]
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

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def main(output_dir, batch_size, extra):
    tok = tiny.bert_tokenizer()
    teacher = tiny.tiny_bert_mlm(**NO_DROPOUT)
    student = tiny.tiny_bert_mlm(layers=2, hidden=24, seed=11, **NO_DROPOUT)  # another width: a projection
    torch.manual_seed(0)
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", output_dir, "--report_to", "none", "--max_steps", "3", "--logging_steps", "1",
        "--save_strategy", "no", "--learning_rate", "1e-2", "--train_sampling_strategy", "sequential",
        "--remove_unused_columns", "false", "--per_device_train_batch_size", str(batch_size), "--disable_tqdm",
        "true", "--alpha_ce", "0", "--alpha_mlm", "0", "--alpha_cos", "0", "--alpha_embed", "1.0",
        "--alpha_embed_relation", "0.5", "--embed_relation_temperature", "0.1", *extra])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=masked_examples(tok, n=24), data_collator=PadCollator(tok.pad_token_id),
                                  processing_class=tok)
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "student"))
    if trainer.args.should_save:
        log = [e for e in trainer.state.log_history if "loss" in e]
        (Path(output_dir) / "log.json").write_text(json.dumps(log))
        projection = {k: v.tolist() for k, v in trainer.model.distillation_projections.state_dict().items()}
        (Path(output_dir) / "projection.json").write_text(json.dumps(projection))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
