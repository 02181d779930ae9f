"""report.md of a recipe run: loss curves, parameter counts and the measured CPU inference speed."""

from pathlib import Path

from .atomic import write_text_atomic
from .reporting import count_parameters, plot_loss_curves


def write_report(output_dir, teacher_name, teacher, student, log_history, speed, training_args,
                 teacher_head_loss=None):
    output_dir = Path(output_dir)
    png = plot_loss_curves(log_history, output_dir / "loss_curve.png")
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    rows = [r for r in log_history if "loss" in r]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    weights = ", ".join(f"{n}={getattr(training_args, n)}" for n in
                        ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos") if getattr(training_args, n))
    lines = [
        f"# Distillation report: {output_dir.name}",
        "",
        f"Teacher `{teacher_name}` -> student `{student.config.model_type}` with "
        f"{student.config.get_text_config().num_hidden_layers} layers; loss weights {weights}, "
        f"temperature {training_args.temperature}.",
        "",
    ]
    if teacher_head_loss is not None:
        import math

        lines += ["The teacher was shipped without an MLM head. Before distilling, its head (transform + output "
                  "bias; the decoder is tied to the frozen word embeddings) was fitted on the training corpus with "
                  "the body frozen, so L_ce matches the logits of that fitted head. Its last MLM training loss was "
                  f"{teacher_head_loss:.3f} (a uniform guess over the {student.config.vocab_size} tokens scores "
                  f"{math.log(student.config.vocab_size):.3f}): a short fit gives a weak head, and L_ce can only "
                  "transfer what that head knows.", ""]
    lines += [
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        f"| parameters | {t_params:,} | {s_params:,} | {s_params / t_params:.1%} |",
        f"| inference time ({speed['how']}) | {speed['teacher_seconds']:.3f} s | {speed['student_seconds']:.3f} s "
        f"| {speed['student_seconds'] / speed['teacher_seconds']:.1%} ({speed['ratio']:.2f}x faster) |",
        "",
    ]
    if rows:
        terms = sorted(k for k in last if k.startswith("loss_") or k == "teacher_agreement")
        lines += ["| logged | step | loss | " + " | ".join(terms) + " |",
                  "|---|---:|---:|" + "---:|" * len(terms)]
        for name, r in (("first", first), ("last", last)):
            lines.append(f"| {name} | {r.get('step')} | {r['loss']:.4f} | "
                         + " | ".join(f"{r.get(t, float('nan')):.4f}" for t in terms) + " |")
        lines.append("")
    if png:
        lines += ["![loss curves](loss_curve.png)", ""]
    path = output_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
