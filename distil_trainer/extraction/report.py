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

    def config_record(self):
        """The dict stored as ``student.config.distillation``."""
        return {
            "teacher": self.teacher,
            "teacher_layers": list(self.teacher_layers),
            "strategy": self.strategy,
            "student_type": self.student_type,
            "randomly_initialised": sorted(self.randomly_initialised),
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
        return "\n".join(lines)
