"""The words and tables that present a run's scores (student_scores.py computes them): the one-line result,
a Markdown table with a row per model, and notes on what was measured. No torch here: the model card uses it."""

import math

MODEL_ROLES = ("teacher", "student_init", "student")
ROLE_NAMES = {"teacher": "teacher", "student_init": "student before distillation", "student": "distilled student"}


def result_line(scores, speed_ratio, parameter_ratio):
    """"keeps X% of the teacher's score at Y x speed; distillation added +Z points over the extracted student":
    STS-B Spearman when there is one, else the held-out sentence-embedding cosine to the teacher."""
    m = scores["models"]
    student, init = m.get("student", {}), m.get("student_init", {})
    tail = f"at {speed_ratio:.2f}x speed with {parameter_ratio:.0%} of its parameters"
    if "stsb_spearman" in student and m.get("teacher", {}).get("stsb_spearman"):
        teacher = m["teacher"]["stsb_spearman"]
        line = (f"Result: the student keeps {student['stsb_spearman'] / teacher:.1%} of the teacher's STS-B score "
                f"(Spearman {100 * student['stsb_spearman']:.1f} vs {100 * teacher:.1f}) {tail}")
        if "stsb_spearman" in init:
            line += "; " + distillation_gain(student["stsb_spearman"], init["stsb_spearman"], teacher)
        return line + "."
    if "sentence_cosine" in student:
        line = (f"Result: STS-B unavailable; on held-out text the student's sentence embeddings keep "
                f"{student['sentence_cosine']:.1%} cosine similarity to the teacher's {tail}")
        if "sentence_cosine" in init:
            line += f"; before distillation {init['sentence_cosine']:.1%}"
        return line + "."
    return f"Result: no quality score (STS-B unavailable and no held-out text); the student runs {tail}."


def distillation_gain(student, extracted, teacher):
    """What distillation added over the student as extracted, in Spearman points (x100), and the share of the
    extracted student's gap to the teacher it closed."""
    line = (f"distillation added {100 * (student - extracted):+.1f} points over the extracted student "
            f"({100 * extracted:.1f})")
    if teacher > extracted:
        line += f", closing {(student - extracted) / (teacher - extracted):.0%} of its gap to the teacher"
    return line


def scores_table(scores):
    """Markdown table of the scores, one row per model."""
    columns = [("stsb_spearman", "STS-B Spearman (x100)", lambda v: f"{100 * v:.1f}"),
               ("sentence_cosine", "sentence cos to teacher", lambda v: f"{v:.3f}"),
               ("token_cosine", "token cos to teacher", lambda v: f"{v:.3f}"),
               ("top1_agreement", "MLM top-1 agreement", lambda v: f"{v:.1%}"),
               ("mlm_loss", "masked-token loss", lambda v: f"{v:.3f}"),
               ("mlm_accuracy", "masked-token accuracy", lambda v: f"{v:.1%}")]
    present = [c for c in columns if any(c[0] in s for s in scores["models"].values())]
    if not present:
        return []
    lines = ["| model | " + " | ".join(c[1] for c in present) + " |", "|---|" + "---:|" * len(present)]
    for role in MODEL_ROLES:
        if role in scores["models"]:
            s = scores["models"][role]
            lines.append(f"| {ROLE_NAMES[role]} | "
                         + " | ".join(fmt(s[key]) if key in s and not _nan(s[key]) else "" for key, _, fmt in present)
                         + " |")
    return lines


def _nan(value):
    return isinstance(value, float) and math.isnan(value)


def scores_notes(scores):
    """What the figures are measured on, in sentences."""
    notes = []
    if scores.get("stsb_source"):
        notes.append(f"STS-B: {scores['stsb_pairs']} dev pairs from {scores['stsb_source']}, Spearman correlation "
                     "of the gold scores with the cosine of the sentence embeddings "
                     f"({scores.get('pooling', 'mean pooling')} of the last hidden states).")
    elif scores.get("stsb_unavailable"):
        notes.append(scores["stsb_unavailable"])
    if scores.get("heldout_sequences"):
        mlm = any("mlm_loss" in s for s in scores["models"].values())
        notes.append(f"Held-out text: {scores['heldout_sequences']} sequences the run did not train on; cosines of "
                     "the unmasked text's token and sentence embeddings to the teacher's"
                     + ("; MLM figures at the positions the run's masking picks there (fixed seed)." if mlm else "."))
    return notes
