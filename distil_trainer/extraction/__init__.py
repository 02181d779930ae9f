"""Initialise a student from selected teacher layers (DistilBERT's "one layer out of two"), chosen by a fixed rule
or by measuring the teacher on calibration text, optionally narrowed by activation importance (Minitron)."""

from .api import STUDENT_TYPES, extract_student, load_teacher
from .calibration import CalibrationSet, load_calibration
from .depth import MEASURED_STRATEGIES, LayerChoice, choose_layers
from .importance import boundary_distances, layer_scores
from .layers import STRATEGIES, select_layers
from .report import CONFIG_KEY, ExtractionReport
from .save import save_student
from .width import prune_width

__all__ = [
    "CONFIG_KEY", "CalibrationSet", "ExtractionReport", "LayerChoice", "MEASURED_STRATEGIES", "STRATEGIES",
    "STUDENT_TYPES", "boundary_distances", "choose_layers", "extract_student", "layer_scores", "load_calibration",
    "load_teacher", "prune_width", "save_student", "select_layers",
]
