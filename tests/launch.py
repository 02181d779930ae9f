"""`accelerate launch` on 2 CPU ranks for the multi-process tests: a free port per launch (parallel test runs must
not meet on one rendezvous port) and DeepSpeed launch files derived from the shipped ones."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config_file, script, *script_args, launch_args=(), env=None, timeout=600):
    """Launch `script` with `config_file` on 2 processes; returns the finished process (not checked)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", "2", "--main_process_port", str(free_port()), *launch_args, str(script),
           *map(str, script_args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def deepspeed_launch_file(stage, directory, edit):
    """A copy of the shipped ZeRO-`stage` YAML pointing at a copy of its JSON changed by `edit(config)`."""
    ds_config = json.loads((CONFIGS / f"deepspeed_zero{stage}.json").read_text())
    edit(ds_config)
    ds_json = Path(directory) / f"zero{stage}.json"
    ds_json.write_text(json.dumps(ds_config))
    shipped = f"accelerate_configs/deepspeed_zero{stage}.json"
    launch = (CONFIGS / f"deepspeed_zero{stage}.yaml").read_text()
    assert shipped in launch
    launch_file = Path(directory) / f"zero{stage}.yaml"
    launch_file.write_text(launch.replace(shipped, str(ds_json)))
    return launch_file


def trainer_optimizer(ds_config):
    """Edit for `deepspeed_launch_file`: the Trainer's own AdamW and schedule in place of the JSON's optimizer."""
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    ds_config["zero_allow_untested_optimizer"] = True
    ds_config["zero_force_ds_cpu_optimizer"] = False
