"""The run machinery of the recipes (the library core -- arguments, trainer, losses, data, extraction -- lives
beside it in `distil_trainer`). The pipeline every recipe runs:

    binarize -> load teacher -> token counts -> fit its MLM head (teachers shipped without one) -> extract the
    student -> cache the teacher's outputs (--teacher_cache) -> distil (resumable) -> save student + tokenizer ->
    score (--score) -> ONNX export and CPU latency (--onnx_latency) -> model card -> report -> push to the Hub

Each stage (`stage.Stage`, listed in `runner.STAGES`) names the run fields it reads and writes, the key of its
cached output and its skip-if-done rule; it is skipped when its output exists, prints a one-line summary, and runs
on the main process first in multi-process launches where it builds a cache (the other ranks then find its output
and reuse it).

Modules: runner (the stage list and loop, `main`), stage, data_stages, model_stages, cache_stages, training_stages,
output_stages, layout (output names), recipe_args (YAML + command line), model_card, report, hub, teacher_head,
student_scores (what --score measures), score_text (its one-line result and tables), demo_inputs.

Layout of `output_dir`:
    data/binarized-<key>/     tokenized corpus (Arrow) and token_counts.npy (unless data_cache_dir is set)
    teacher_mlm_head/         the teacher with a fitted MLM head (only for teachers shipped without one) and
                              fit_log.json (its masked-token loss and accuracy, train and held out)
    student_init/             the student as extracted from the teacher, before distillation (with
                              --student_init random: the same architecture with fresh random weights)
    checkpoint-<step>/        Trainer checkpoints (optimizer, scheduler, RNG, data position): re-running resumes
    student/                  the distilled student, its tokenizer and model card (README.md): what is pushed
    scores.json               with --score: teacher / initial / distilled student scores and their cache key
    report.md, loss_curve.png with --report
"""

from .layout import STUDENT_DIR, STUDENT_INIT_DIR, TEACHER_HEAD_DIR, TRAINING_LOG
from .model_stages import RANDOM_INIT, SIZE_FIELDS, check_reference_config
from .recipe_args import ConfigError, parse_recipe_args
from .runner import STAGES, main, run_pipeline, run_stages
from .training_stages import TrainingStopped

__all__ = ["ConfigError", "RANDOM_INIT", "SIZE_FIELDS", "STAGES", "STUDENT_DIR", "STUDENT_INIT_DIR",
           "TEACHER_HEAD_DIR", "TRAINING_LOG", "TrainingStopped", "check_reference_config", "main",
           "parse_recipe_args", "run_pipeline", "run_stages"]
