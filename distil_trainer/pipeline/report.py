"""What a run reports about its student: parameter counts, measured inference speed, loss curves, and the
report.md that gathers them."""

import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic


def count_parameters(model) -> int:
    """Distinct parameters (tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.inference_mode()
def _one_pass(model, batches):
    start = time.perf_counter()
    for batch in batches:
        model(**batch)
    return time.perf_counter() - start


def measure_speed_ratio(teacher, student, batches, rounds=5):
    """Fastest of `rounds` passes over `batches` for each model, alternating them; the minimum is the figure least
    disturbed by other work on the machine (as timeit reports). Returns (teacher_s, student_s, teacher/student)."""
    teacher_inputs = _accepted(teacher, batches)
    student_inputs = _accepted(student, batches)
    teacher.eval()
    student.eval()
    _one_pass(teacher, teacher_inputs[:1])  # warm-up
    _one_pass(student, student_inputs[:1])
    t_times, s_times = [], []
    for _ in range(rounds):
        t_times.append(_one_pass(teacher, teacher_inputs))
        s_times.append(_one_pass(student, student_inputs))
    t, s = min(t_times), min(s_times)
    return t, s, t / s


def _accepted(model, batches):
    from ..model_utils import forward_arguments

    keep = forward_arguments(model) - {"labels"}
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in b.items() if k in keep} for b in batches]


def plot_loss_curves(log_history, path):
    """PNG of the total loss and each logged term against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log_history if "loss" in r and "step" in r]
    if not rows:
        return None
    terms = sorted({k for r in rows for k in r if k.startswith("loss_")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], marker="o", markersize=3)
    axes[0].set_title("total loss")
    for term in terms:
        axes[1].plot(steps, [r.get(term, float("nan")) for r in rows], marker="o", markersize=3, label=term)
    axes[1].set_title("loss terms (per-term means)")
    axes[1].legend()
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(output_dir, teacher_name, teacher, student, log_history, speed, training_args, teacher_head=None,
                 scores=None, latency=None):
    """report.md (and loss_curve.png) in `output_dir`: the one-line result and the scores (when scored), the fitted
    teacher head's figures, loss weights, parameter counts, measured speed (and the ONNX latencies when measured),
    first and last logged losses; returns its path."""
    output_dir = Path(output_dir)
    png = plot_loss_curves(log_history, output_dir / "loss_curve.png")
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    rows = [r for r in log_history if "loss" in r]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    weights = ", ".join(f"{n}={getattr(training_args, n)}" for n in
                        ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos", "alpha_embed",
                         "alpha_embed_relation") if getattr(training_args, n))
    lines = [
        f"# Distillation report: {output_dir.name}",
        "",
        f"Teacher `{teacher_name}` -> student `{student.config.model_type}` with "
        f"{student.config.get_text_config().num_hidden_layers} layers; loss weights {weights}, "
        f"temperature {training_args.temperature}.",
        "",
    ]
    lines += _scores_section(scores)
    lines += _teacher_head_section(teacher_head)
    lines += [
        "## Size and speed",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        f"| parameters | {t_params:,} | {s_params:,} | {s_params / t_params:.1%} |",
        f"| inference time ({speed['how']}) | {speed['teacher_seconds']:.3f} s | {speed['student_seconds']:.3f} s "
        f"| {speed['student_seconds'] / speed['teacher_seconds']:.1%} ({speed['ratio']:.2f}x faster) |",
        "",
    ]
    if latency:
        from .onnx_latency import latency_table

        lines += ["### CPU latency in PyTorch and ONNX Runtime", "", *latency_table(latency), ""]
    if rows:
        terms = sorted(k for k in last if k.startswith("loss_") or k == "teacher_agreement")
        lines += ["## Training", "", "| logged | step | loss | " + " | ".join(terms) + " |",
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


def _scores_section(scores):
    from .score_text import scores_notes, scores_table

    if not scores:
        return []
    lines = ["## Quality", ""]
    if scores.get("result_line"):
        lines += [f"**{scores['result_line']}**", ""]
    lines += scores_table(scores) + [""]
    return lines + [" ".join(scores_notes(scores)), ""]


def _teacher_head_section(head):
    """The fitted MLM head of a teacher shipped without one: how it was fitted and how well it predicts."""
    if not head:
        return []
    decoder = ("its own decoder, initialised from the word embeddings and trained" if head["decoder"] == "untied"
               else "the decoder tied to the frozen word embeddings")
    stop = (f"stopped after {head['steps']} updates, the held-out loss no longer improving" if head["stopped_early"]
            else f"ran its {head['steps']} updates (max)")
    return ["## Teacher MLM head", "",
            "The teacher was shipped without an MLM head. Before distilling, one was fitted with the body frozen "
            f"(transform and output bias, with {decoder}) on the body's outputs at {head['masked_rows']:,} masked "
            f"positions of the training corpus, {head['heldout_rows']:,} of them held out for early stopping; it "
            f"{stop}, and the head of update {head['best_step']} was kept. L_ce matches the logits of this head.",
            "",
            "| masked positions | loss | top-1 accuracy |", "|---|---:|---:|",
            f"| training (sample) | {head['train_loss']:.3f} | {head['train_accuracy']:.1%} |",
            f"| held out | {head['heldout_loss']:.3f} | {head['heldout_accuracy']:.1%} |",
            f"| uniform guess | {head['uniform_loss']:.3f} | |", ""]
