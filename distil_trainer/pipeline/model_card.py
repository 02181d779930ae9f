"""Model card (README.md) for a distilled student, built with `huggingface_hub.ModelCard`.

The YAML metadata carries the usual Hub fields (library, base model, datasets, `model-index` evaluation results) plus a
`distillation:` block with the exact settings, so the numbers are machine-readable and round-trip through
`ModelCard.load`. The Markdown body shows the same numbers for people.

This module never receives a Hub token; `_reject_tokens` additionally refuses any value that looks like one, so a
token pasted into a free-text field cannot end up in a public README.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..atomic import write_text_atomic

# User access tokens ("hf_" + 30+ alphanumerics) and the older "api_" tokens.
_TOKEN_PATTERN = re.compile(r"\b(hf|api)_[A-Za-z0-9]{20,}\b")
# A Hub repo id: "name" or "namespace/name" (local paths are not valid `base_model` values).
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class StudentCardInfo:
    """Everything the model card reports about one distillation run. Filled in by the training pipeline."""

    model_name: str  # repo id or display name of the student, e.g. "me/distilbert-base-uncased"
    teacher_name: str  # Hub id or local path of the teacher
    student_parameters: int
    teacher_parameters: int
    teacher_revision: str | None = None
    architecture: str | None = None  # student's `config.model_type`, e.g. "distilbert"
    # Student layer i was initialised from teacher layer layer_map[i]; a dict {student: teacher} is accepted too.
    layer_map: Sequence[int] | Mapping[int, int] | None = None
    # How the student was chosen by measurement (the `layer_choice` / `width` entries of its config's
    # `distillation` record): every teacher layer's score and why it was kept, the widths before and after.
    student_choice: Mapping | None = None
    loss_weights: Mapping[str, float] = field(default_factory=dict)  # {"alpha_ce": 5.0, "alpha_mlm": 2.0, ...}
    temperature: float | None = None
    datasets: Sequence[str] = ()  # training data (Hub dataset ids or descriptions)
    train_steps: int | None = None
    tokens_seen: int | None = None
    speed_ratio: float | None = None  # measured teacher time / student time (>1 means the student is faster)
    speed_measurement: str | None = None  # how the speed ratio was measured, e.g. "batch 32 x 128 tokens, A100"
    # CPU latency of teacher and student in PyTorch and ONNX Runtime fp32 / int8, measured side by side
    # (export.measure_latencies_side_by_side's result; the recipes' --onnx_latency).
    latency: Mapping | None = None
    eval_results: Sequence[EvalResult] = ()
    language: str | list[str] | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    tags: Sequence[str] = ()
    # Quality of teacher / student before distillation / student (pipeline.student_scores; keys "models",
    # "stsb_source", "stsb_unavailable", "stsb_pairs", "heldout_sequences", "result_line").
    scores: Mapping | None = None
    # Set when the student is also a sentence-transformers model (saved with modules.json): how it pools, and the
    # objective it was distilled with, e.g. "mean pooling, L2-normalised (read from ...)".
    sentence_embedding: str | None = None

    @property
    def parameter_ratio(self) -> float:
        return self.student_parameters / self.teacher_parameters


def _normalised_layer_map(layer_map) -> dict[int, int] | None:
    if layer_map is None:
        return None
    items = layer_map.items() if isinstance(layer_map, Mapping) else enumerate(layer_map)
    return {int(student): int(teacher) for student, teacher in items}


def _validate(info: StudentCardInfo) -> None:
    if not info.model_name:
        raise ValueError("StudentCardInfo.model_name is empty: pass the student's repo id or a display name.")
    if not info.teacher_name:
        raise ValueError("StudentCardInfo.teacher_name is empty: pass the teacher's Hub id or path.")
    for name in ("student_parameters", "teacher_parameters"):
        if int(getattr(info, name)) <= 0:
            raise ValueError(f"StudentCardInfo.{name} must be a positive parameter count, got {getattr(info, name)}.")
    for key in info.loss_weights:
        if not key.startswith("alpha_"):
            raise ValueError(f"loss_weights key {key!r} is not a loss weight: use the argument names (alpha_ce, ...).")
    if info.temperature is not None and info.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {info.temperature}.")
    if info.speed_ratio is not None and info.speed_ratio <= 0:
        raise ValueError(f"speed_ratio must be > 0 (teacher time / student time), got {info.speed_ratio}.")
    if info.eval_results and not all(isinstance(r, EvalResult) for r in info.eval_results):
        raise ValueError("eval_results must be huggingface_hub.EvalResult objects.")
    if info.scores is not None and not isinstance(info.scores.get("models"), Mapping):
        raise ValueError("scores must hold a 'models' mapping ({role: {figure: value}}), as student_scores returns.")


def _reject_tokens(text: str) -> None:
    if _TOKEN_PATTERN.search(text):
        raise ValueError("The model card would contain something that looks like a Hub access token; remove it from "
                         "the StudentCardInfo fields (tokens belong only in push_student_to_hub(token=...)).")


def _card_data(info: StudentCardInfo) -> ModelCardData:
    distillation = {
        "teacher": info.teacher_name,
        "teacher_revision": info.teacher_revision,
        "temperature": info.temperature,
        "loss_weights": {k: float(v) for k, v in info.loss_weights.items()} or None,
        "layer_map": _normalised_layer_map(info.layer_map),
        "student_choice": _choice_metadata(info.student_choice),
        "train_steps": info.train_steps,
        "tokens_seen": info.tokens_seen,
        "student_parameters": int(info.student_parameters),
        "teacher_parameters": int(info.teacher_parameters),
        "parameter_ratio": round(info.parameter_ratio, 6),
        "speed_ratio": info.speed_ratio,
        "speed_measurement": info.speed_measurement,
        "latency": info.latency,
        "scores": _scores_metadata(info.scores),
        "sentence_embedding": info.sentence_embedding,
    }
    is_hub_id = bool(_HUB_ID_PATTERN.match(info.teacher_name)) and not os.path.exists(info.teacher_name)
    return ModelCardData(
        model_name=info.model_name,
        base_model=info.teacher_name if is_hub_id else None,
        datasets=list(info.datasets) or None,
        eval_results=[*info.eval_results, *_stsb_eval_result(info.scores)] or None,
        language=info.language,
        license=info.license,
        library_name="sentence-transformers" if info.sentence_embedding else "transformers",
        pipeline_tag=info.pipeline_tag or ("sentence-similarity" if info.sentence_embedding else None),
        tags=["distillation", "distil_trainer", *(["sentence-transformers"] if info.sentence_embedding else []),
              *info.tags],
        distillation={k: v for k, v in distillation.items() if v is not None},
    )


def _scores_metadata(scores) -> dict | None:
    """The figures of each model, rounded, with where STS-B came from (or why it was missing)."""
    if not scores:
        return None
    out = {"models": {role: {k: round(float(v), 4) for k, v in figures.items()}
                      for role, figures in scores["models"].items()}}
    for key in ("stsb_source", "stsb_unavailable", "heldout_sequences", "result_line"):
        if scores.get(key):
            out[key] = scores[key]
    return out


def _stsb_eval_result(scores) -> list[EvalResult]:
    """The student's STS-B score as a model-index entry (when there is one)."""
    value = ((scores or {}).get("models", {}).get("student") or {}).get("stsb_spearman")
    if value is None:
        return []
    return [EvalResult(task_type="sentence-similarity", dataset_type="glue", dataset_name="GLUE STS-B",
                       dataset_config="stsb", dataset_split="validation", metric_type="spearmanr",
                       metric_name="Spearman of cosine (mean pooling)", metric_value=round(float(value), 4))]


def _quality_section(scores) -> list[str]:
    from .score_text import scores_notes, scores_table

    if not scores:
        return []
    lines = ["", "## Quality", ""]
    if scores.get("result_line"):
        lines += [f"**{scores['result_line']}**", ""]
    lines += scores_table(scores)
    notes = scores_notes(scores)
    return lines + ([""] + notes if notes else [])


def _choice_metadata(choice) -> dict | None:
    """The measured choice as card metadata: scores rounded, layer keys as plain ints."""
    if not choice:
        return None
    out = {}
    layers = choice.get("layer_choice")
    if layers:
        out["layer_choice"] = {
            "strategy": layers["strategy"], "iterative": bool(layers.get("iterative")),
            "keep_ends": bool(layers.get("keep_ends", True)), "calibration": layers.get("calibration"),
            "kept": [int(i) for i in layers["kept"]], "scores": [round(float(x), 6) for x in layers["scores"]]}
    if choice.get("width"):
        width = choice["width"]
        out["width"] = {"sizes": {k: [int(a), int(b)] for k, (a, b) in width["sizes"].items()},
                        "method": width.get("method"), "calibration": width.get("calibration")}
    return out


def _choice_section(choice) -> list[str]:
    """How the layers (and widths) were chosen: one row per teacher layer with its score, kept or not, and why."""
    if not choice:
        return []
    from ..extraction.report import SCORE_NAMES

    lines = []
    layers = choice.get("layer_choice")
    if layers:
        score_name = SCORE_NAMES.get(layers["strategy"], layers["strategy"])
        reasons = {int(k): v for k, v in layers.get("reasons", {}).items()}
        kept = {int(i) for i in layers["kept"]}
        lines += ["", "### How the layers were chosen", "",
                  f"Measured on the teacher: strategy `{layers['strategy']}`"
                  + (" (iterative: measured again after each removal)" if layers.get("iterative") else "")
                  + f", on {layers.get('calibration')}; first and last layers "
                  + ("always kept." if layers.get("keep_ends", True) else "droppable."), "",
                  f"| Teacher layer | Score: {score_name} | Kept | Why |", "|---|---|---|---|"]
        lines += [f"| {i} | {float(score):.4f} | {'yes' if i in kept else 'no'} | {reasons.get(i, '')} |"
                  for i, score in enumerate(layers["scores"])]
    width = choice.get("width")
    if width:
        lines += ["", "### Width", "", f"Pruned by {width.get('method')}, on {width.get('calibration')}.", "",
                  "| Size | Teacher | Student |", "|---|---|---|"]
        lines += [f"| {k} | {a} | {b} |" for k, (a, b) in width["sizes"].items()]
    return lines


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _body(info: StudentCardInfo) -> str:
    teacher = info.teacher_name + (f" (revision `{info.teacher_revision}`)" if info.teacher_revision else "")
    lines = [
        f"# {info.model_name}",
        "",
        f"A student model distilled from **{teacher}** with distil_trainer"
        + (f" ({info.architecture} architecture)." if info.architecture else "."),
        "",
        "## Size",
        "",
        "| | Parameters |",
        "|---|---|",
        f"| Student | {_fmt_int(info.student_parameters)} |",
        f"| Teacher | {_fmt_int(info.teacher_parameters)} |",
        f"| Student / teacher | {info.parameter_ratio:.3f} |",
    ]
    if info.speed_ratio is not None:
        lines += ["", f"Measured speed: the student runs **{info.speed_ratio:.2f}x** as fast as the teacher"
                      + (f" ({info.speed_measurement})." if info.speed_measurement else ".")]
    if info.latency:
        from .onnx_latency import latency_table

        lines += ["", "CPU latency, PyTorch and ONNX Runtime (the student also ships as ONNX: `distil-trainer export`):",
                  "", *latency_table(info.latency)]

    lines += ["", "## Distillation", "", "| Setting | Value |", "|---|---|"]
    lines.append(f"| Teacher | {info.teacher_name} |")
    if info.teacher_revision:
        lines.append(f"| Teacher revision | {info.teacher_revision} |")
    if info.temperature is not None:
        lines.append(f"| Temperature | {info.temperature:g} |")
    for key, value in info.loss_weights.items():
        lines.append(f"| {key} | {float(value):g} |")
    if info.train_steps is not None:
        lines.append(f"| Training steps | {_fmt_int(info.train_steps)} |")
    if info.tokens_seen is not None:
        lines.append(f"| Tokens seen | {_fmt_int(info.tokens_seen)} |")
    if info.datasets:
        lines.append(f"| Training data | {', '.join(info.datasets)} |")

    layer_map = _normalised_layer_map(info.layer_map)
    if layer_map:
        lines += ["", "### Layer map", "", "Student layers were initialised from these teacher layers:", "",
                  "| Student layer | Teacher layer |", "|---|---|"]
        lines += [f"| {s} | {t} |" for s, t in sorted(layer_map.items())]

    lines += _choice_section(info.student_choice)
    lines += _quality_section(info.scores)

    if info.eval_results:
        lines += ["", "## Evaluation", "", "| Task | Dataset | Split | Metric | Value |", "|---|---|---|---|---|"]
        for r in info.eval_results:
            lines.append(f"| {r.task_name or r.task_type} | {r.dataset_name} | {r.dataset_split or ''} "
                         f"| {r.metric_name or r.metric_type} | {r.metric_value} |")

    lines += ["", "## Usage", ""] + _sentence_transformers_usage(info) + [
              "```python", "from transformers import AutoModel, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{info.model_name}")',
              f'model = AutoModel.from_pretrained("{info.model_name}")', "```", ""]
    return "\n".join(lines)


def _sentence_transformers_usage(info: StudentCardInfo) -> list[str]:
    """For a student saved as a sentence-transformers model: how to embed sentences with it."""
    if not info.sentence_embedding:
        return []
    return [f"A sentence-embedding model ({info.sentence_embedding}). With sentence-transformers "
            "(`pip install sentence-transformers`), it embeds as the teacher does:", "",
            "```python", "from sentence_transformers import SentenceTransformer", "",
            f'model = SentenceTransformer("{info.model_name}")',
            'embeddings = model.encode(["A man is playing a guitar.", "Someone plays an instrument."])',
            "similarity = model.similarity(embeddings[0:1], embeddings[1:2])", "```", "",
            "Or with transformers alone (the body's last hidden states, pooled as above):", ""]


def build_model_card(info: StudentCardInfo) -> ModelCard:
    """The student's model card: Hub metadata (incl. `model-index` from `info.eval_results`) + a Markdown body."""
    _validate(info)
    data = _card_data(info)
    content = f"---\n{data.to_yaml()}\n---\n\n{_body(info)}"
    _reject_tokens(content)
    return ModelCard(content)


def write_model_card(info: StudentCardInfo, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `build_model_card(info)` to `output_dir/README.md` atomically; returns the path.

    An existing README.md is only replaced when `overwrite=True`.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} is not a directory: save the student there first (save_pretrained).")
    target = output_dir / "README.md"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it.")
    write_text_atomic(target, str(build_model_card(info)))
    return target
