"""`distil-trainer` command line: one sub-command per job, each in `distil_trainer/commands/`.

Sub-command modules are imported only when chosen, so `distil-trainer --help` stays fast
(importing torch and transformers takes seconds).
"""

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "binarize": ("distil_trainer.commands.binarize", "Tokenize a text corpus into a cached Arrow dataset."),
    "token-counts": ("distil_trainer.commands.token_counts", "Count token frequencies of a binarized dataset."),
    "extract": ("distil_trainer.commands.extract", "Initialise a student from selected teacher layers."),
    "cache-teacher": ("distil_trainer.commands.cache_teacher",
                      "Run a teacher once over a binarized dataset and cache its outputs for training."),
    "export": ("distil_trainer.commands.export",
               "Export a saved student to ONNX (checked against PyTorch in ONNX Runtime; optional int8)."),
}


def build_parser(argv):
    parser = argparse.ArgumentParser(prog="distil-trainer", description="Knowledge distillation tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(func=module.run)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
