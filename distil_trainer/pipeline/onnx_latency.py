"""The recipes' `--onnx_latency` stage: export teacher and student to ONNX (fp32 and dynamic int8), then measure the
CPU latency of both in PyTorch and in ONNX Runtime side by side in one run (export.measure), for the report and the
model card."""

import copy
import json
from pathlib import Path

from ..atomic import write_text_atomic
from .stage import Stage

LATENCY_FILE = "onnx_latency.json"
ONNX_DIR = "onnx"
BACKEND_NAMES = (("pytorch", "PyTorch fp32"), ("onnx_fp32", "ONNX Runtime fp32"), ("onnx_int8", "ONNX Runtime int8"))


class OnnxLatency(Stage):
    name = "onnx latency"
    inputs = ("teacher", "tokenizer", "train_dataset", "masked_lm")
    outputs = ("latency",)
    main_process_only = True

    def enabled(self, ctx):
        return ctx.recipe_args.onnx_latency

    def before(self, ctx):
        from .output_stages import load_saved

        ctx.latency = None  # the export packages were checked with the arguments (recipe_args.py)
        if ctx.recipe_args.onnx_latency:
            load_saved(ctx)

    def cache_key(self, ctx):
        from ..data.cache import stable_hash
        from .output_stages import _file_identity

        teacher = ctx.result.get("teacher_head")
        files = [ctx.final_dir / "model.safetensors"] + ([Path(teacher) / "model.safetensors"] if teacher else [])
        return stable_hash({"teacher": [ctx.model_args.teacher_name, ctx.model_args.teacher_revision],
                            "files": [_file_identity(f) for f in files], "max_length": ctx.data_args.max_length,
                            "heldout": _file_identity(ctx.recipe_args.heldout_file) if ctx.recipe_args.heldout_file
                            else None})[:16]

    def skip(self, ctx):
        path = ctx.out / LATENCY_FILE
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == self.cache_key(ctx):
                ctx.latency = saved["latency"]
                return f"reused {path}"
        return None

    def run(self, ctx):
        from ..export import export_onnx, measure_latencies_side_by_side

        task = "embedding" if ctx.masked_lm else "auto"  # an encoder student is deployed as an encoder
        # fp32 copies on the CPU: training may have left the teacher on a GPU or in bf16, and the table says "fp32".
        models = {role: copy.deepcopy(model).float().cpu().eval()
                  for role, model in (("teacher", ctx.teacher), ("student", ctx.final_student))}
        folders = {role: export_onnx(model, ctx.out / ONNX_DIR / role, task=task, tokenizer=ctx.tokenizer,
                                     quantize="int8", overwrite=True) for role, model in models.items()}
        ctx.latency = measure_latencies_side_by_side(
            {role: (model, folders[role]) for role, model in models.items()}, ctx.tokenizer, latency_texts(ctx),
            batch_size=8, sequence_length=min(ctx.data_args.max_length or 128, 128))
        path = ctx.out / LATENCY_FILE
        write_text_atomic(path, json.dumps({"key": self.cache_key(ctx), "latency": ctx.latency}, indent=2))
        ctx.result["onnx_latency"] = str(path)
        student = ctx.latency["models"]["student"]
        return (f"student {student['pytorch_ms']:.1f} ms PyTorch, {student['onnx_fp32_ms']:.1f} ms ONNX fp32, "
                f"{student['onnx_int8_ms']:.1f} ms int8 -> {path}")


def latency_texts(ctx, count=64):
    """Texts the latency batch is cut from: the held-out lines when the run has them, else decoded training rows."""
    held_out = ctx.recipe_args.heldout_file
    if held_out:
        lines = [line.strip() for line in Path(held_out).read_text(encoding="utf-8").splitlines() if line.strip()]
        return lines[:count]
    dataset = ctx.train_dataset
    return [ctx.tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True)
            for i in range(min(len(dataset), count))]


def latency_table(latency):
    """Markdown lines: milliseconds per batch of teacher and student per backend, and the student's speed-up."""
    if not latency:
        return []
    teacher, student = latency["models"]["teacher"], latency["models"]["student"]
    lines = ["| backend | teacher (ms / batch) | student (ms / batch) | student speed-up |", "|---|---:|---:|---:|"]
    for key, label in BACKEND_NAMES:
        t, s = teacher.get(f"{key}_ms"), student.get(f"{key}_ms")
        if t is not None and s is not None:
            lines.append(f"| {label} | {t:.1f} | {s:.1f} | {t / s:.2f}x |")
    best = min((student[f"{k}_ms"], label) for k, label in BACKEND_NAMES if student.get(f"{k}_ms") is not None)
    lines += ["", f"Student in {best[1]} against the teacher in PyTorch: "
                  f"{teacher['pytorch_ms'] / best[0]:.2f}x faster. Measured side by side: {latency['setup']['how']}."]
    return lines
