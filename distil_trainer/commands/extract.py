"""`distil-trainer extract`: initialise a student from selected teacher layers and save it with the tokenizer.

Layers are chosen by a fixed rule or by measuring the teacher on calibration text (block_influence, angular); the
student can also be narrowed (hidden_size, num_attention_heads, intermediate_size) by activation importance.

Replaces the original scripts/extract_distilbert.py (BERT -> DistilBERT) and scripts/extract.py (RoBERTa/GPT-2):
same flag names where they existed, a safetensors model directory instead of a raw .pth state dict.
"""

import logging
import sys

STRATEGY_CHOICES = ("every_other", "uniform", "first", "last", "block_influence", "angular")


def true_or_false(text):
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def add_arguments(parser):
    parser.add_argument("--model_name", required=True,
                        help="Teacher: Hub name, local directory, or GGUF file (path/model.gguf, or "
                             "folder_or_repo::model.gguf).")
    parser.add_argument("--dump_checkpoint", required=True, help="Output directory for the student.")
    parser.add_argument("--model_type", default=None,
                        help="Expected teacher model_type (bert, roberta, gpt2, llama, ...); checked against its config.")
    parser.add_argument("--vocab_transform", action="store_true",
                        help="Accepted for compatibility with the original script; the MLM head (vocab transform "
                             "included) is now always copied.")
    parser.add_argument("--layers", default=None, help="Teacher layers to keep, e.g. 0,2,4,7,9,11.")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None,
                        help="Layer choice when --layers is not given (default: uniform, n//2 layers). Measured on "
                             "--calibration_file: block_influence drops the layers whose output is closest to their "
                             "input (lowest 1 - cos, ShortGPT); angular drops the contiguous run of layers whose "
                             "input and output are closest in angular distance (Gromov et al.).")
    parser.add_argument("--num_layers", type=int, default=None, help="Student depth for --strategy.")
    parser.add_argument("--calibration_file", default=None,
                        help="Text the measured strategies and width pruning run the teacher on: a plain text file "
                             "(one sequence per line) or a folder made by distil-trainer binarize.")
    parser.add_argument("--calibration_tokens", type=int, default=4096,
                        help="Tokens of --calibration_file to measure on (default 4096, from its start).")
    parser.add_argument("--calibration_max_length", type=int, default=256,
                        help="Longest calibration sequence, in tokens (longer lines are cut; default 256).")
    parser.add_argument("--keep_ends", type=true_or_false, default=None, metavar="{true,false}",
                        help="Measured strategies: keep the teacher's first and last layers (default true).")
    parser.add_argument("--iterative", action="store_true",
                        help="block_influence: drop one layer at a time, measuring the remaining layers again.")
    parser.add_argument("--hidden_size", type=int, default=None,
                        help="Width pruning: hidden channels to keep (by activation importance at the norm layers).")
    parser.add_argument("--num_attention_heads", type=int, default=None,
                        help="Width pruning: attention heads to keep per layer (whole key-value groups under GQA).")
    parser.add_argument("--intermediate_size", type=int, default=None,
                        help="Width pruning: MLP neurons to keep per layer.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bars while measuring.")
    parser.add_argument("--student_type", choices=("same", "distilbert"), default="same",
                        help="same: teacher's architecture; distilbert: BERT teacher -> DistilBertForMaskedLM.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output directory.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow custom model code from the teacher's repository (off by default).")


def _load_tokenizer(name, trust_remote_code):
    from distil_trainer.model_utils import load_tokenizer

    try:
        return load_tokenizer(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        logging.getLogger(__name__).warning("No tokenizer saved: could not load one from %r (%s).", name, err)
        return None


def _calibration(args, tokenizer):
    from distil_trainer.extraction import load_calibration

    if args.calibration_file is None:
        return None  # extract_student says when a strategy or width target needs it
    if tokenizer is None:
        raise ValueError("--calibration_file needs the teacher's tokenizer, which could not be loaded (see the warning "
                         "above).")
    return load_calibration(args.calibration_file, tokenizer, args.calibration_tokens, args.calibration_max_length)


def _extract(args):
    from distil_trainer.extraction import extract_student, load_teacher, save_student
    from distil_trainer.extraction.layers import parse_layer_list
    from distil_trainer.atomic import check_output_dir

    check_output_dir(args.dump_checkpoint, args.overwrite)  # fail before the (slow) teacher load
    layers = parse_layer_list(args.layers) if args.layers is not None else None
    if args.vocab_transform:
        print("--vocab_transform is accepted for compatibility; the MLM head is always copied.")
    teacher, missing = load_teacher(args.model_name, trust_remote_code=args.trust_remote_code)
    if args.model_type is not None and teacher.config.model_type != args.model_type:
        raise ValueError(
            f"--model_type {args.model_type} does not match the teacher's model_type "
            f"{teacher.config.model_type!r}; fix --model_type or drop it."
        )
    tokenizer = _load_tokenizer(args.model_name, args.trust_remote_code)
    student, report = extract_student(
        teacher, layers=layers, strategy=args.strategy, num_layers=args.num_layers,
        student_type=args.student_type, teacher_missing_keys=missing, return_report=True,
        calibration=_calibration(args, tokenizer), keep_ends=args.keep_ends, iterative=args.iterative,
        hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, progress=not args.no_progress,
    )
    report.teacher = args.model_name
    student.config.distillation = report.config_record()
    path = save_student(student, tokenizer, args.dump_checkpoint, overwrite=args.overwrite, report=report)
    print(report.summary())
    print(f"Saved {type(student).__name__} ({student.num_parameters():,} parameters) to {path}")


def run(args):
    try:
        _extract(args)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"distil-trainer extract: error: {err}", file=sys.stderr)
        return 2
    return 0
