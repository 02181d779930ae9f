"""ONNX Runtime side of an export folder: its manifest, CPU sessions, and running them on tokenized text."""

import json
from pathlib import Path

import numpy as np

MANIFEST = "export.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
EXTRA = "export"  # the setup.cfg extra that installs what export needs


def require_export_packages(exporter=None):
    """Raise ImportError naming the extra to install when onnx or onnxruntime is missing (or onnxscript, which
    torch's default exporter, `dynamo`, writes the graph with)."""
    import importlib.util

    needed = ("onnx", "onnxruntime", "onnxscript") if exporter == "dynamo" else ("onnx", "onnxruntime")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed: pip install "
            f"'distil-trainer-hf[{EXTRA}]' (from a checkout: pip install -e '.[{EXTRA}]'), or pip install onnx "
            "onnxruntime onnxscript.")


def read_manifest(onnx_dir):
    """The export.json of an export folder (what `export_onnx` wrote: task, inputs, outputs, files)."""
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {onnx_dir} is not an export folder; create one with "
                                "`distil-trainer export --format onnx` or distil_trainer.export.export_onnx.")
    return json.loads(path.read_text(encoding="utf-8"))


def onnx_file(onnx_dir, int8=False):
    """Path of the fp32 (or int8) graph of an export folder; a clear error when the int8 one was not made."""
    path = Path(onnx_dir) / (INT8_FILE if int8 else FP32_FILE)
    if not path.is_file():
        fix = "export with --quantize int8 (or call quantize_int8 on the folder)" if int8 else "export it again"
        raise FileNotFoundError(f"{path} not found; {fix}.")
    return path


def load_session(onnx_dir, int8=False, threads=None):
    """A CPU InferenceSession of the folder's fp32 (or int8) graph; `threads` sets its intra-op thread count
    (None: ONNX Runtime's default, one per core)."""
    require_export_packages()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CPU provider's per-node placement notes are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_file(onnx_dir, int8)), options, providers=["CPUExecutionProvider"])


def session_feed(session, encoding):
    """The session's inputs from a tokenizer encoding (torch tensors or arrays) as int64 arrays. Segment ids the
    graph takes but the encoding lacks are zeros (a single sentence)."""
    feed = {}
    for spec in session.get_inputs():
        value = encoding.get(spec.name)
        if value is None and spec.name == "token_type_ids":
            value = np.zeros_like(np.asarray(encoding["input_ids"]))
        if value is None:
            raise KeyError(f"The graph takes {spec.name!r} but the encoding holds only {sorted(encoding)}.")
        feed[spec.name] = np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.int64)
    return feed


def run_session(session, encoding):
    """{output name: array} of one run of `session` on `encoding`."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, session_feed(session, encoding))))


def sentence_embeddings(session, tokenizer, texts, batch_size=64, max_length=128):
    """float32 [n, dim] sentence embeddings (the graph's `sentence_embedding` output) of `texts`."""
    if "sentence_embedding" not in [o.name for o in session.get_outputs()]:
        raise ValueError("This graph has no sentence_embedding output; export the model with task 'embedding'.")
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        out.append(run_session(session, enc)["sentence_embedding"])
    return np.concatenate(out).astype(np.float32)
