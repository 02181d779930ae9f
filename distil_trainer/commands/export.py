"""`distil-trainer export --format onnx`: a saved student as an ONNX graph checked against PyTorch in ONNX Runtime,
optionally with an int8 copy (distil_trainer/export/)."""

import logging
import sys
from pathlib import Path

FORMATS = ("onnx",)


def add_arguments(parser):
    from ..export import AUTO, DEFAULT_ATOL, DEFAULT_OPSET, EXPORTERS, TASKS

    parser.add_argument("--model", required=True, help="Model folder saved with save_pretrained (a student).")
    parser.add_argument("--output_dir", required=True, help="Folder to write the export to.")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="Export format (default: onnx).")
    parser.add_argument("--task", choices=(AUTO, *TASKS), default=AUTO,
                        help="What the graph computes. auto (default): the model's own head; a model without one "
                             "exports as embedding (last_hidden_state and mean-pooled sentence_embedding). "
                             "embedding also works for an encoder with a head (its encoder only).")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="Also write model.int8.onnx (dynamic int8 quantisation of the weights).")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                        help="torch.onnx exporter: dynamo (torch.export-based, default) or torchscript (legacy "
                             "tracing exporter, for a model the first cannot capture).")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}).")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"Largest ONNX Runtime vs PyTorch difference accepted (default {DEFAULT_ATOL:g}).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output folder.")


def load_model(path):
    """The saved model in float32 with its own head class (config.architectures), and its tokenizer or None."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from ..export.tasks import check_model_type

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {path!r} is not a model folder (no config.json); give a folder written "
                                "by save_pretrained, e.g. a distilled student's output_dir.")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_model_type(config.model_type)  # before the weights are read
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else AutoModel
    if model_class is None:
        raise ValueError(f"Architecture {architecture!r} of {path} is not a transformers class; ONNX export needs "
                         "one of the supported families' own classes.")
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        logging.getLogger(__name__).warning("No tokenizer copied: could not load one from %r (%s).", path, err)
        tokenizer = None
    return model, tokenizer


def _summary(path):
    from ..export import read_manifest

    manifest = read_manifest(path)
    lines = [f"Exported {manifest['architecture']} as {manifest['task']} to {path} ({manifest['exporter']} exporter, "
             f"opset {manifest['opset']}): {', '.join(manifest['files'].values())}",
             f"ONNX Runtime vs PyTorch, max abs difference: {manifest['parity']['max_abs_diff']}"]
    if "int8" in manifest:
        lines.append(f"int8 vs fp32 graph, max abs difference: {manifest['int8']['max_abs_diff_vs_fp32']}")
    if "kv_cache" in manifest:
        lines.append(f"KV cache: {manifest['kv_cache']}")
    return "\n".join(lines)


def _export(args):
    from ..export import export_onnx
    from ..atomic import check_output_dir
    from ..export.runtime import require_export_packages

    require_export_packages(args.exporter)
    check_output_dir(args.output_dir, args.overwrite)  # fail before the model is loaded
    model, tokenizer = load_model(args.model)
    path = export_onnx(model, args.output_dir, task=args.task, tokenizer=tokenizer, quantize=args.quantize,
                       exporter=args.exporter, opset=args.opset, atol=args.atol, overwrite=args.overwrite)
    print(_summary(path))


def run(args):
    try:
        _export(args)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"distil-trainer export: error: {err}", file=sys.stderr)
        return 2
    return 0
