"""Stages that train: distil the student (resuming from the last checkpoint), save it atomically."""

import json
import os
import shutil

from .layout import STUDENT_DIR, TRAINING_LOG
from .stage import Stage


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (non-finite loss); checkpoints are intact, no student is saved."""


class Distil(Stage):
    name = "distil"
    inputs = ("student", "teacher", "train_dataset", "collator", "tokenizer", "teacher_cache")
    outputs = ("trainer",)

    def cache_key(self, ctx):
        return str(ctx.out)  # checkpoint-<step>/ there: a re-run resumes from the last one

    def skip(self, ctx):
        if (ctx.final_dir / "model.safetensors").exists() and not ctx.training_args.overwrite_output_dir:
            ctx.trainer = None
            return f"skipped: {ctx.final_dir} holds a finished run (--overwrite_output_dir to train again)"
        return None

    def run(self, ctx):
        from transformers.trainer_utils import get_last_checkpoint

        from ..distillation_trainer import DistillationTrainer

        args, out = ctx.training_args, ctx.out
        last = None if args.overwrite_output_dir or not out.is_dir() else get_last_checkpoint(str(out))
        if ctx.is_main and last:
            print(f"    resuming from {last}", flush=True)
        if ctx.teacher_cache is not None:  # no teacher forward: its rows and collator come from the cache
            trainer = DistillationTrainer(model=ctx.student, teacher_cache=ctx.teacher_cache, args=args,
                                          processing_class=ctx.tokenizer)
        else:
            trainer = DistillationTrainer(model=ctx.student, teacher_model=ctx.teacher, args=args,
                                          train_dataset=ctx.train_dataset, data_collator=ctx.collator,
                                          processing_class=ctx.tokenizer)
        train_result = trainer.train(resume_from_checkpoint=last)
        if trainer.stopped_on_nonfinite:
            raise TrainingStopped(
                f"training stopped at step {trainer.state.global_step}: non-finite loss "
                f"({', '.join(trainer.nonfinite_terms)}); no student was saved. The last good checkpoint is in "
                f"{out}; fix the cause (learning rate, data, precision) and run the same command to resume.")
        ctx.trainer = trainer
        return (f"{trainer.state.global_step} steps, final loss "
                f"{train_result.training_loss:.4f}, {trainer.state.num_input_tokens_seen or 0} tokens"
                + (" (teacher outputs from the cache)" if ctx.teacher_cache is not None else ""))


class SaveStudent(Stage):
    """The student, tokenizer and training log, written to student.partial/ and then renamed to student/."""

    name = "save student"
    inputs = ("trainer", "tokenizer")

    def skip(self, ctx):
        return f"kept {ctx.final_dir}" if ctx.trainer is None else None

    def run(self, ctx):
        state, final_dir = ctx.state, ctx.final_dir
        partial = ctx.out / (STUDENT_DIR + ".partial")
        if ctx.is_main and partial.exists():
            shutil.rmtree(partial)
        state.wait_for_everyone()
        ctx.trainer.save_model(str(partial))  # every rank: DeepSpeed ZeRO-3 gathers the shards here
        if ctx.is_main:
            ctx.tokenizer.save_pretrained(partial)
            _save_as_sentence_transformer(ctx, partial)
            (partial / TRAINING_LOG).write_text(json.dumps(ctx.trainer.state.log_history, indent=2))
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(partial, final_dir)
        state.wait_for_everyone()
        return str(final_dir)


def _save_as_sentence_transformer(ctx, folder):
    """A student distilled with the embedding objective is also a sentence-transformers model (SentenceTransformer(
    folder) embeds as the run's scores do: the teacher's pooling, max_seq_length = the run's max_length)."""
    from ..model_utils import hidden_size
    from ..sentence_embedding import write_sentence_transformers_files
    from .objective import EMBEDDING, objective, scoring_pooling

    if objective(ctx) == EMBEDDING:
        write_sentence_transformers_files(folder, scoring_pooling(ctx), hidden_size(ctx.trainer.model),
                                          ctx.data_args.max_length or 128)
