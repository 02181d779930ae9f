"""Load named teacher tensors into a student and prove every student tensor is accounted for."""

import torch


def load_into_student(student, tensors, random_keys):
    """Copy ``tensors`` (student name -> tensor) into `student`; every other student tensor must be in `random_keys`.

    Shapes are checked first so a mismatch names the tensor instead of failing inside ``load_state_dict``.
    Copies happen in place, so weights the student ties (embeddings / LM head) stay tied.
    """
    own = student.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise RuntimeError(f"Extraction produced tensors the student does not have: {unknown[:10]}")
    mismatched = [
        f"{name}: teacher {tuple(t.shape)} vs student {tuple(own[name].shape)}"
        for name, t in tensors.items()
        if t.shape != own[name].shape
    ]
    if mismatched:
        raise ValueError(
            "Teacher and student tensor shapes differ, so the weights cannot be copied: " + "; ".join(mismatched[:10])
            + ". The student must keep the teacher's width; drop the config override that changes it."
        )
    unaccounted = sorted(set(own) - set(tensors) - set(random_keys))
    if unaccounted:
        raise RuntimeError(
            f"Student tensors with no teacher source and not declared random: {unaccounted[:10]}"
            + (" ..." if len(unaccounted) > 10 else "")
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(dtype=own[name].dtype, device=own[name].device))
