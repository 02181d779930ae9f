"""A multi-process run ends with its process group destroyed while Python still runs (process_group.py).

A gloo worker thread that frees a finished collective after the interpreter began to shut down aborts the process
("terminate called without an active exception"), about one run in four with a small DDP script. The threads are
joined only when the group object dies; these tests check that nothing keeps it alive at exit (the DDP wrapper,
defaults bound by modules imported after the group existed), deterministically, by reading the threads left."""

import json
import sys

import pytest
import torch.distributed as dist

from distil_trainer import process_group
from launch import CONFIGS, REPO, accelerate_launch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


@pytest.mark.slow
@pytest.mark.reliability(fault="a 2-rank DDP run (gloo) reaches interpreter exit with its trainer still alive",
                         outcome="the trainer's exit hook releases the DDP wrapper and destroys the process group, so "
                                 "its worker threads are joined before Python shuts down (a worker freeing a "
                                 "collective after that aborted the rank with SIGABRT)")
def test_no_gloo_thread_outlives_a_two_rank_run(tmp_path):
    proc = accelerate_launch(CONFIGS / "cpu_2proc.yaml", REPO / "tests" / "scripts" / "exit_threads.py", tmp_path,
                             env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [], f"rank {rank}"


def test_group_defaults_bound_after_init_are_set_back_to_none():
    """A module imported after init_process_group binds the live group in `group=group.WORLD` defaults; they are set
    back to None (the default group, what they hold when imported before a group exists)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        world = dist.group.WORLD

        def collective(tensor, group=world, *, other_group=world):
            return tensor, group, other_group

        process_group.end_process_group()
        assert not dist.is_initialized()
        assert collective.__defaults__ == (None,) and collective.__kwdefaults__ == {"other_group": None}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
