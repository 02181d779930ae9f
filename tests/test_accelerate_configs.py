"""accelerate_configs/: every YAML loads with accelerate's own loader and passes `accelerate launch` validation;
DeepSpeed JSONs are valid and at the stage they claim. (Running them: tests/test_distributed.py.)"""

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

import tiny

CONFIGS = tiny.REPO_ROOT / "accelerate_configs"
EXPECTED = {  # file: (distributed_type, num_processes, num_machines, mixed_precision)
    "cpu_single.yaml": (DistributedType.NO, 1, 1, "no"),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, "no"),
    "single_gpu.yaml": (DistributedType.NO, 1, 1, "bf16"),
    "multi_gpu_8.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "multi_node_2x8.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1, None),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8, 1, None),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
}


def test_every_yaml_is_listed_here_and_in_the_readme():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    readme = (CONFIGS / "README.md").read_text()
    for name in [*EXPECTED, "deepspeed_zero2.json", "deepspeed_zero3.json"]:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_loads_and_validates_for_launch(name):
    path = CONFIGS / name
    assert path.read_text().startswith("# "), "each config starts with a comment saying when to use it"
    cfg = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == EXPECTED[name]
    # Nested plugin keys are only checked by `accelerate launch`, which copies them onto its own arguments.
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for key in [*cfg.deepspeed_config, *cfg.fsdp_config]:
        assert key in known, f"{name}: {key} is not an accelerate launch option"
    args, defaults, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    assert args.num_processes == EXPECTED[name][1]
    assert args.use_deepspeed == (cfg.distributed_type == DistributedType.DEEPSPEED)
    assert args.use_fsdp == (cfg.distributed_type == DistributedType.FSDP)


def test_multi_node_machine_rank_is_overridden_from_the_command_line():
    path = str(CONFIGS / "multi_node_2x8.yaml")
    parser = launch_command_parser()
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", path, "--machine_rank", "1", "t.py"]))
    assert args.machine_rank == 1 and args.num_machines == 2 and args.main_process_port == 29500


def test_fsdp_config_is_fsdp2_with_transformer_wrapping():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_matches_its_yaml_and_stage(stage):
    cfg = load_config_from_file(str(CONFIGS / f"deepspeed_zero{stage}.yaml"))
    json_path = Path(cfg.deepspeed_config["deepspeed_config_file"])
    assert json_path.parts[0] == "accelerate_configs" and json_path.name == f"deepspeed_zero{stage}.json"
    ds = json.loads((tiny.REPO_ROOT / json_path).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # Values the HF Trainer fills in from the training arguments.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto" and ds["optimizer"]["params"]["lr"] == "auto"
    # No DeepSpeed scheduler: the Trainer's own (lr_scheduler_type, warmup_steps: the recipes' linear schedule with
    # warm-up) drives DeepSpeed's optimizer. DeepSpeed's WarmupDecayLR warms up logarithmically unless told
    # otherwise and stretches warm-ups under 2 steps; test_distributed.py checks the learning rates step by step.
    assert "scheduler" not in ds
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # accelerate rejects fields set both in the YAML and the JSON; the YAML leaves them to the JSON.
    assert set(cfg.deepspeed_config) <= {"deepspeed_config_file", "zero3_init_flag"}
    assert cfg.mixed_precision is None


PROBE = """
import sys, torch
from accelerate import Accelerator
acc = Accelerator()
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), "sum").item()
line = f"{acc.process_index} {acc.num_processes} {acc.device.type} {acc.state.backend} {acc.distributed_type} {total}"
with open(f"{sys.argv[1]}/rank{acc.process_index}.txt", "w") as f:  # one file per rank: stdout would interleave
    f.write(line)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # an orderly gloo shutdown; exiting without it can abort a rank
"""


def test_cpu_2proc_really_starts_two_gloo_ranks(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with socket.socket() as s:  # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(port), str(script), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [p.read_text().split() for p in sorted(tmp_path.glob("rank*.txt"))]
    # sum over ranks of (rank + 1) = 1 + 2 = 3, computed through a gloo all-reduce
    assert ranks == [[str(r), "2", "cpu", "gloo", "DistributedType.MULTI_CPU", "3.0"] for r in (0, 1)]
