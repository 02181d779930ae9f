"""Ending a multi-process run while Python is still whole.

Why: a gloo worker thread destroys each collective it finished, and with it a copy of the launching thread's
thread-local state, which can hold Python objects; releasing them takes the GIL. When that happens after the
interpreter began to shut down, Python ends the thread with `pthread_exit`, whose forced unwinding through torch's
C++ destructors calls `std::terminate`: the rank dies with SIGABRT ("terminate called without an active exception")
after training finished well -- about one run in four with a small DDP script on 2 CPU ranks.

`destroy_process_group()` alone does not prevent it: it joins the worker threads only when the group object dies,
and two things keep it alive: the DDP wrapper (the Trainer's `model_wrapped`, accelerate's model list, DeepSpeed's
engine), and default arguments such as `group=group.WORLD` in modules imported after the group was made
(`torch.distributed.nn.functional`, which DDP imports; DeepSpeed's comm backend), which bind it for good.
`end_process_group` releases both, then destroys the group, so its threads are joined while the interpreter runs.
`DistillationTrainer` registers it to run at exit; the recipes call it when the pipeline ends.
"""

import atexit
import gc
import types
import weakref

import torch.distributed as dist

_trainers = weakref.WeakSet()  # the trainers whose wrappers hold the group, released at exit
_exit_hook_registered = False


def _without_groups(values):
    return tuple(None if isinstance(v, dist.ProcessGroup) else v for v in values)


def _unbind_group_defaults():
    """Set every function default that holds a process group back to None, its meaning before a group existed (the
    default group). Modules imported after `init_process_group` bind the live group in defaults such as
    `group=group.WORLD` (torch.distributed.nn.functional, DeepSpeed's comm backend) and keep it alive for good."""
    for obj in gc.get_objects():
        if type(obj) is not types.FunctionType:  # type(), not isinstance: no attribute lookup on proxies
            continue
        if obj.__defaults__ and any(isinstance(v, dist.ProcessGroup) for v in obj.__defaults__):
            obj.__defaults__ = _without_groups(obj.__defaults__)
        if obj.__kwdefaults__ and any(isinstance(v, dist.ProcessGroup) for v in obj.__kwdefaults__.values()):
            obj.__kwdefaults__ = dict(zip(obj.__kwdefaults__, _without_groups(obj.__kwdefaults__.values())))


def release_trainer(trainer):
    """Drop the trainer's references to its distributed wrappers (DDP, DeepSpeed engines): it keeps its unwrapped
    student, which can still be saved or evaluated on one process, but cannot resume training."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.free_memory()  # accelerate's lists of prepared models, optimizers and the DeepSpeed engine
    trainer.model_wrapped = trainer.model
    trainer.deepspeed = None
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None and hasattr(teacher, "module"):  # a DeepSpeed inference engine around the teacher
        trainer.teacher = teacher.module


def end_process_group(*trainers):
    """Release the trainers' distributed wrappers (all live DistillationTrainers when none are given) and whatever
    else holds the process group, and destroy it if that is not done yet: its worker threads are joined now, not
    during interpreter exit."""
    if not dist.is_available():
        return
    for trainer in trainers or list(_trainers):
        release_trainer(trainer)
    _unbind_group_defaults()
    gc.collect()  # the wrappers sit in reference cycles (module <-> hooks)
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def end_process_group_at_exit(trainer):
    """Have `end_process_group` run for `trainer` at interpreter exit (atexit runs before Python shuts down)."""
    global _exit_hook_registered
    _trainers.add(trainer)
    if not _exit_hook_registered:
        atexit.register(end_process_group)
        _exit_hook_registered = True
