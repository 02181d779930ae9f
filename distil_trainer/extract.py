"""Student initialisation from teacher layers; the implementation lives in `distil_trainer.extraction`."""

from .extraction import (  # noqa: F401
    CONFIG_KEY,
    STRATEGIES,
    STUDENT_TYPES,
    ExtractionReport,
    extract_student,
    load_teacher,
    save_student,
    select_layers,
)
