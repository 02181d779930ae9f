"""Names of what a run writes under `output_dir` (the full layout is in the package docstring)."""

STUDENT_DIR = "student"  # the distilled student, its tokenizer and model card: what is pushed
STUDENT_INIT_DIR = "student_init"  # the student before distillation
TEACHER_HEAD_DIR = "teacher_mlm_head"  # the teacher with a fitted MLM head
TRAINING_LOG = "training_log.json"  # the Trainer's log history, beside the student
SCORES_FILE = "scores.json"  # the Score stage's figures and their cache key
