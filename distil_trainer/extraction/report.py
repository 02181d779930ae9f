"""What an extraction did, tensor by tensor, so nothing random hides behind a 'loaded' student."""

from dataclasses import dataclass, field

# Key under which the student's config records its origin (survives save_pretrained / from_pretrained).
CONFIG_KEY = "distillation"


@dataclass
class ExtractionReport:
    teacher: str
    teacher_layers: list
    strategy: str | None
    student_type: str
    # student tensor name -> teacher tensor name it was copied from (or a formula, e.g. "a + b[0]").
    copied: dict = field(default_factory=dict)
    # student tensors left at their random initialisation (e.g. an MLM head the teacher checkpoint lacks).
    randomly_initialised: list = field(default_factory=list)
    # teacher tensors outside the dropped layers that the student has no place for (e.g. BERT's pooler).
    teacher_unused: list = field(default_factory=list)
    # measured layer choice (depth.LayerChoice.record()): every teacher layer's score and why it was kept or dropped.
    layer_choice: dict | None = None
    # width pruning (width.width_record): sizes before/after, calibration, every kept index.
    width: dict | None = None

    def config_record(self):
        """The dict stored as ``student.config.distillation``."""
        return {
            "teacher": self.teacher,
            "teacher_layers": list(self.teacher_layers),
            "strategy": self.strategy,
            "student_type": self.student_type,
            "randomly_initialised": sorted(self.randomly_initialised),
            **({"layer_choice": compact_layer_choice(self.layer_choice)} if self.layer_choice else {}),
            **({"width": compact_width(self.width)} if self.width else {}),
        }

    def summary(self):
        lines = [
            f"Student from {self.teacher!r}: teacher layers {list(self.teacher_layers)}"
            + (f" (strategy {self.strategy})" if self.strategy else "")
            + f", student type {self.student_type}.",
            f"  {len(self.copied)} tensors copied from the teacher.",
        ]
        if self.randomly_initialised:
            lines.append(
                f"  {len(self.randomly_initialised)} tensors RANDOMLY INITIALISED (absent in the teacher): "
                + ", ".join(sorted(self.randomly_initialised))
            )
        if self.teacher_unused:
            lines.append("  Teacher tensors with no place in the student: " + ", ".join(sorted(self.teacher_unused)))
        if self.layer_choice:
            lines += ["  " + line for line in layer_choice_lines(self.layer_choice)]
        if self.width:
            lines += ["  " + line for line in width_lines(self.width)]
        return "\n".join(lines)


SCORE_NAMES = {"block_influence": "block influence (1 - cos)", "angular": "angular distance"}


def compact_layer_choice(choice):
    """What the student's config keeps of a layer choice: every layer's score and the reason, not the rounds."""
    return {key: choice[key] for key in ("strategy", "kept", "scores", "reasons", "calibration", "keep_ends",
                                         "iterative", "block_distances") if key in choice}


def compact_width(width):
    """What the student's config keeps of width pruning: sizes and method, not the kept indices."""
    return {key: width[key] for key in ("method", "calibration", "sizes", "parameters") if key in width}


def layer_choice_lines(choice):
    """One line per teacher layer: score, kept or dropped, why."""
    name = SCORE_NAMES.get(choice["strategy"], choice["strategy"])
    head = (f"Layers chosen by {choice['strategy']}" + (" (iterative)" if choice.get("iterative") else "")
            + f" on {choice['calibration']}; score = {name} of each layer alone:")
    reasons = {int(k): v for k, v in choice["reasons"].items()}
    return [head] + [f"  layer {i:>3}: {score:.4f}  {reasons.get(i, '')}" for i, score in enumerate(choice["scores"])]


def width_lines(width):
    sizes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in width["sizes"].items() if a != b) or "unchanged"
    return [f"Width pruned to {sizes} (every copied tensor sliced), by {width['method']}, measured on "
            f"{width['calibration']}."]
