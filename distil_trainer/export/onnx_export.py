"""Export a student to ONNX with torch.onnx, check it against PyTorch in ONNX Runtime, and write the folder:

    model.onnx        the fp32 graph (batch and sequence axes dynamic), model.onnx.data beside it for models
                      over 1.5 GiB (protobuf's 2 GiB limit)
    model.int8.onnx   with quantize="int8": weights dynamically quantized to int8 (quantize.py)
    config.json       the model's config; tokenizer files when a tokenizer is given
    export.json       task, inputs, outputs, exporter, opset, versions, and the measured parity

Why torch.onnx and not optimum: optimum's ONNX exporter (the `optimum-onnx` package) requires transformers < 4.58,
and this project runs on transformers 5. The default exporter is torch's own, torch.export-based one (`dynamo`,
torch's default since 2.9); `torchscript` selects the legacy tracing exporter, deprecated by torch but still
shipped, for a model the new one cannot capture. The parity check runs after either.
"""

import contextlib
import copy
import json
import logging
import warnings

import numpy as np
import torch

from ..atomic import atomic_directory, check_output_dir
from .runtime import FP32_FILE, MANIFEST, load_session, require_export_packages, run_session
from .tasks import AUTO, DECODER_TYPES, export_module, has_sequence_axis

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
EXTERNAL_DATA_BYTES = 1536 * 2**20  # above this the weights go to model.onnx.data (protobuf files stop at 2 GiB)
TRACE_SHAPE = (2, 8)  # >= 2 on both axes: torch.export would fix an axis of size 1 as a constant
VERIFY_SHAPE = (3, 13)  # another shape than the traced one, so a baked-in size would show


class ExportParityError(ValueError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


def example_inputs(config, names, shape, seed=0):
    """Token tensors of `shape` ([batch, sequence]) for a model of `config`: random ids, each row after the first
    padded at its end (pad id, mask 0) by a different amount, so the graph is traced and checked with its padding
    path."""
    batch, length = shape
    config = config.get_text_config()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(10, config.vocab_size - 1), config.vocab_size, shape, generator=generator)
    mask = torch.ones(shape, dtype=torch.long)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    for row in range(1, batch):
        real = max(1, length - (row * 4) % length)
        ids[row, real:] = pad_id
        mask[row, real:] = 0
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(shape, dtype=torch.long)}
    return tuple(tensors[name] for name in names)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' notes that say nothing about this export: the tracer's warning at every Python
    branch on a tensor (the parity check on another shape is the real test), the legacy exporter's deprecation
    notice (chosen on purpose), its note that negative indices would break advanced indexing (the indices here
    come from masks and positions), torch.export's axis-renaming and pytree notes, and the absent torchvision ops."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*(axis name|LeafSpec|advanced indexing)", category=Warning)
            yield
    finally:
        registration.setLevel(level)


def _torch_export(module, args, path, names, outputs, task, exporter, opset, external):
    with _quiet_exporter():
        if exporter == "dynamo":
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=list(outputs),
                              dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
                              opset_version=opset, external_data=external, verbose=False)
            return
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        axes.update({o: {0: "batch", 1: "sequence"} if has_sequence_axis(task, o) else {0: "batch"}
                     for o in outputs})
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=list(outputs),
                          dynamic_axes=axes, opset_version=opset)


def output_differences(task, reference, candidate, attention_mask):
    """{output: max |reference - candidate|}, per-token outputs compared at real (mask 1) positions only: a padded
    query position attends to nothing real, and what a graph computes there is not used by anyone."""
    real = np.asarray(attention_mask).astype(bool)
    diffs = {}
    for name, ref in reference.items():
        ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(candidate[name], dtype=np.float64)
        if ref.shape != cand.shape:
            raise ExportParityError(f"Output {name!r}: ONNX Runtime gave shape {cand.shape}, PyTorch {ref.shape}.")
        if has_sequence_axis(task, name):
            ref, cand = ref[real], cand[real]
        diffs[name] = float(np.abs(ref - cand).max())
    return diffs


@torch.inference_mode()
def torch_outputs(module, outputs, inputs):
    """{output name: array} of the PyTorch module on the same inputs as the graph."""
    return {name: t.float().numpy() for name, t in zip(outputs, module(*inputs))}


def verify_parity(module, onnx_dir, task, names, outputs, atol):
    """Run PyTorch and ONNX Runtime on fresh inputs of another shape; raise ExportParityError above `atol`."""
    inputs = example_inputs(module.model.config, names, VERIFY_SHAPE, seed=1)
    reference = torch_outputs(module, outputs, inputs)
    got = run_session(load_session(onnx_dir), dict(zip(names, inputs)))
    diffs = output_differences(task, reference, got, inputs[names.index("attention_mask")])
    worst = max(diffs.values())
    if not worst <= atol:  # also catches NaN
        raise ExportParityError(
            f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} ({diffs}), more than atol={atol:g}. "
            "Try the other exporter (--exporter torchscript / dynamo), or pass a larger --atol if this size of "
            "float32 rounding is expected for the model.")
    return {"max_abs_diff": diffs, "atol": atol, "shape": list(VERIFY_SHAPE),
            "compared": "real (attention_mask 1) positions of per-token outputs; all of per-sequence ones"}


def _versions():
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _manifest(model, task, names, outputs, exporter, opset, parity):
    config = model.config
    manifest = {"format": "onnx", "task": task, "model_type": config.model_type,
                "architecture": type(model).__name__, "inputs": names, "outputs": list(outputs),
                "dynamic_axes": {"batch": 0, "sequence": 1}, "exporter": exporter, "opset": opset,
                "files": {"fp32": FP32_FILE}, "parity": parity, "versions": _versions()}
    if task == "embedding":
        manifest["sentence_embedding"] = "mean of last_hidden_state over attention_mask 1 positions, not normalised"
    if config.model_type in DECODER_TYPES:
        manifest["kv_cache"] = "none: each call computes the logits of the whole sequence (no past key/values)"
    return manifest


def _check_arguments(exporter, quantize):
    if exporter not in EXPORTERS:
        raise ValueError(f"Unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}.")
    if quantize not in (None, "int8"):
        raise ValueError(f"Unknown quantization {quantize!r}; the one offered is 'int8' (dynamic, weights int8).")


def export_onnx(model, output_dir, *, task=AUTO, tokenizer=None, quantize=None, exporter="dynamo",
                opset=DEFAULT_OPSET, atol=DEFAULT_ATOL, overwrite=False):
    """Export `model` (a supported encoder or decoder, see tasks.py) to `output_dir` as described above, written
    as one atomic step. `task`: "auto" (the model's own head; a bare encoder becomes an embedding model) or one of
    tasks.TASKS. Raises ExportParityError when ONNX Runtime and PyTorch differ by more than `atol`. Returns the
    folder's path. The model is put in eval mode."""
    _check_arguments(exporter, quantize)
    require_export_packages(exporter)
    path = check_output_dir(output_dir, overwrite).resolve()
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # ONNX Runtime's CPU kernels run float32; the caller keeps its dtype
    module, task, names, outputs = export_module(model, task)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _torch_export(module, example_inputs(model.config, names, TRACE_SHAPE), tmp / FP32_FILE, names, outputs, task,
                      exporter, opset, external)
        parity = verify_parity(module, tmp, task, names, outputs, atol)
        manifest = _manifest(module.model, task, names, outputs, exporter, opset, parity)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if quantize == "int8":
            from .quantize import quantize_int8

            quantize_int8(tmp, external_data=external)
    return path
