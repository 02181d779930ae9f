"""Run a training script under `accelerate launch --config_file accelerate_configs/fsdp.yaml` on CPU processes.

usage (as the launched script): fsdp_on_cpu.py SCRIPT [SCRIPT ARGS]

torch's FSDP2 (`fully_shard`) works on CPU over gloo, but accelerate (1.16) turns FSDP on only for processes on an
accelerator device: a CPU process stays MULTI_CPU and trains unsharded, whatever the launch config says. For the
tests alone, this lifts that one gate (the FSDP plugin accelerate built from the config is kept) and prints, after
training, what the student's parameters really were, so that the test can check that they were sharded.
"""

import runpy
import sys

from accelerate import state as accelerate_state
from accelerate.utils import DistributedType

from distil_trainer import DistillationTrainer

_state_init = accelerate_state.AcceleratorState.__init__


def _state_init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


_train = DistillationTrainer.train


def _train_and_report(self, *args, **kwargs):
    result = _train(self, *args, **kwargs)
    param = next(self.model.parameters())
    print(f"student under {self.accelerator.distributed_type}: {type(self.model).__name__}, parameters "
          f"{type(param).__name__} {getattr(param, 'placements', None)}", flush=True)
    return result


accelerate_state.AcceleratorState.__init__ = _state_init_with_fsdp_on_cpu
DistillationTrainer.train = _train_and_report
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
