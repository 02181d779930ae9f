"""Initialise a student from selected teacher layers (DistilBERT's "one layer out of two")."""

from .api import STUDENT_TYPES, extract_student, load_teacher
from .layers import STRATEGIES, select_layers
from .report import CONFIG_KEY, ExtractionReport
from .save import save_student

__all__ = [
    "CONFIG_KEY", "ExtractionReport", "STRATEGIES", "STUDENT_TYPES", "extract_student", "load_teacher",
    "save_student", "select_layers",
]
