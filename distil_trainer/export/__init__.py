"""Export a distilled student for deployment: ONNX graphs checked against PyTorch in ONNX Runtime, optional
dynamic int8 quantisation, and the measurements that say what they buy (latency) and cost (int8's accuracy change).

Needs the `export` extra (onnx, onnxruntime, onnxscript); importing this package does not, so a missing extra is
reported by the call that needs it, with the install command.
"""

from .measure import int8_embedding_change, measure_latencies, measure_latencies_side_by_side
from .onnx_export import DEFAULT_ATOL, DEFAULT_OPSET, EXPORTERS, ExportParityError, export_onnx
from .quantize import quantize_int8
from .runtime import load_session, read_manifest, run_session, sentence_embeddings
from .tasks import AUTO, DECODER_TYPES, EMBEDDING, ENCODER_TYPES, TASKS

__all__ = [
    "AUTO", "DECODER_TYPES", "DEFAULT_ATOL", "DEFAULT_OPSET", "EMBEDDING", "ENCODER_TYPES", "EXPORTERS",
    "ExportParityError", "TASKS", "export_onnx", "int8_embedding_change", "load_session", "measure_latencies",
    "measure_latencies_side_by_side", "quantize_int8", "read_manifest", "run_session", "sentence_embeddings",
]
