"""Save an extracted student atomically: write into a temporary sibling directory, then rename it into place."""

import json
from dataclasses import asdict

from ..atomic import atomic_directory, check_output_dir

REPORT_FILE = "extraction_report.json"


def save_student(student, tokenizer, output_dir, overwrite=False, report=None):
    """Write `student` (safetensors + config), `tokenizer` (if not None) and `report` (as extraction_report.json)
    to `output_dir` as one atomic step. Returns the output path."""
    path = check_output_dir(output_dir, overwrite).resolve()
    with atomic_directory(path, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return path
