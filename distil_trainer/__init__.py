"""distil_trainer: knowledge distillation of transformer models on transformers.Trainer and accelerate."""

__version__ = "0.1.0"

from .versions import check_versions

# Fail here, with one line naming the package and version, rather than train with silently wrong gradients.
check_versions()

# Imported on first use so that `distil-trainer --help` and the data tools do not pay for importing Trainer.
_LAZY = {
    "DistillationArguments": "distil_trainer.distillation_config",
    "DistillationTrainer": "distil_trainer.distillation_trainer",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distil_trainer' has no attribute {name!r}")
