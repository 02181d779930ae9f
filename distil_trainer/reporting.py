"""What a run reports about its student: parameter counts, measured inference speed, loss curves."""

import time

import torch


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
    from .model_utils import forward_arguments

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
