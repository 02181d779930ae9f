"""The recipe under `accelerate launch` with the shipped launch configs on 2 CPU ranks gives the same losses,
learning rates and student as one process with the same global batch and data order: DDP over gloo
(cpu_2proc.yaml), DeepSpeed ZeRO-2 / ZeRO-3 (deepspeed_zero{2,3}.yaml with their JSON as shipped) and FSDP2
(fsdp.yaml, in fp32; accelerate turns FSDP on only for processes on an accelerator device, so on CPU the launch
goes through tests/scripts/fsdp_on_cpu.py, which lifts that one gate)."""

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from launch import CONFIGS, REPO, accelerate_launch, deepspeed_launch_file
from test_pipeline import make_corpus, make_teacher

pytestmark = pytest.mark.slow
RECIPE = REPO / "recipes" / "distilgpt2.py"
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    teacher = make_teacher(root / "gpt2", family="gpt2")
    corpus = make_corpus(root / "corpus.txt", n=120)
    config = root / "recipe.yaml"
    # 2 warm-up steps of 4: the learning rate rises linearly, then decays linearly (the recipes' schedule).
    config.write_text(f"""teacher_name: {teacher}
file_path: {corpus}
student_layers: "0,2"
max_length: 48
max_steps: {STEPS}
warmup_steps: 2
alpha_mlm: 0.0
alpha_clm: 2.0
learning_rate: 1.0e-3
logging_steps: 1
save_strategy: "no"
report_to: none
train_sampling_strategy: sequential
seed: 56
disable_tqdm: true
""")
    # The single-process reference: batch 8.
    reference = root / "one"
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(config), "--output_dir", str(reference),
                           "--per_device_train_batch_size", "8", "--use_cpu", "true"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, config, reference


def launch_recipe(config_file, recipe_config, output_dir, extra_args=(), launch_args=(), env=None):
    proc = accelerate_launch(config_file, RECIPE, "--config", recipe_config, "--output_dir", output_dir,
                             "--per_device_train_batch_size", "4", *extra_args, launch_args=launch_args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def logged(run_dir):
    log = json.loads((Path(run_dir) / "student" / "training_log.json").read_text())
    return [(r["loss"], r["loss_clm"], r["loss_ce"], r["loss_cos"], r["learning_rate"]) for r in log if "loss" in r]


def assert_same_run(run_dir, reference, deepspeed=False):
    got, expected = logged(run_dir), logged(reference)
    assert len(got) == len(expected) == STEPS
    for g, e in zip(got, expected):
        assert g[:-1] == pytest.approx(e[:-1], rel=1e-5, abs=1e-7)
    learning_rates = [g[-1] for g in got]
    if deepspeed:
        # DeepSpeed steps the scheduler inside backward(), before the Trainer reads the rate it logs: each logged
        # value is the next step's (the weights below show that each step applied the reference's rate).
        assert learning_rates[:-1] == pytest.approx([e[-1] for e in expected][1:])
    else:
        assert learning_rates == pytest.approx([e[-1] for e in expected])
    # Loaded, not read raw: a DeepSpeed save may also store the tied copy of the embeddings (lm_head.weight).
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(Path(reference) / "student").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_reference_schedule_warms_up_then_decays(setup):
    _, _, reference = setup
    # HF linear schedule, 2 warm-up steps of 4, read at each update: 0, 1/2, 1, 1/2 of the peak 1e-3.
    assert [r[-1] for r in logged(reference)] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_two_cpu_processes_match_one(setup):
    root, config, reference = setup
    proc = launch_recipe(CONFIGS / "cpu_2proc.yaml", config, root / "two", env={"ACCELERATE_USE_CPU": "1"})
    assert_same_run(root / "two", reference)
    assert proc.stdout.count("==> [1/8] binarize") == 1  # stages print once, from the main process


@functools.lru_cache(maxsize=None)
def fused_adam_unavailable():
    """Why DeepSpeed's FusedAdam cannot run here, or None. A DS_BUILD_OPS=0 install builds the op (its CPU version
    on a CPU machine) on first use, which needs a C++ compiler and ninja; built once here, the ranks reuse it."""
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder("FusedAdamBuilder").load(verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means the same: not available here
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_config_on_cpu_matches_one_process(setup, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    root, config, reference = setup
    unavailable = fused_adam_unavailable()
    if unavailable is None:
        launch_file = CONFIGS / f"deepspeed_zero{stage}.yaml"  # as shipped, JSON included; 2 ranks, not 8
    else:
        # Everything as shipped but the optimizer's implementation: DeepSpeed's torch.optim.AdamW path.
        warnings.warn(f"DeepSpeed's FusedAdam cannot be built here ({unavailable}); the shipped JSON runs with "
                      "\"torch_adam\": true")
        launch_file = deepspeed_launch_file(stage, root, lambda c: c["optimizer"]["params"].update(torch_adam=True))
    # No ACCELERATE_USE_CPU here (it turns DeepSpeed off); gloo gives DeepSpeed its CPU process group.
    proc = launch_recipe(launch_file, config, root / f"zero{stage}", extra_args=("--ddp_backend", "gloo"))
    assert_same_run(root / f"zero{stage}", reference, deepspeed=True)
    output = proc.stdout + proc.stderr
    # The teacher ran inside a DeepSpeed engine of the configured stage (3: partitioned for inference).
    assert f"Teacher: DeepSpeed inference engine, ZeRO stage {stage if stage == 3 else 0}" in output


def test_shipped_fsdp_config_on_cpu_matches_one_process(setup):
    root, config, reference = setup
    # fsdp.yaml on 2 ranks, fp32 (its bf16 would make the comparison approximate); accelerate's gate that keeps
    # FSDP off CPU processes is lifted by the launched wrapper (see tests/scripts/fsdp_on_cpu.py).
    wrapper = REPO / "tests" / "scripts" / "fsdp_on_cpu.py"
    proc = accelerate_launch(CONFIGS / "fsdp.yaml", wrapper, RECIPE, "--config", config, "--output_dir",
                             root / "fsdp", "--per_device_train_batch_size", "4", "--ddp_backend", "gloo",
                             launch_args=("--mixed_precision", "no"), env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # Really sharded: FSDP2 turned the student's class into FSDP<class> and its parameters into DTensor shards.
    sharded = "student under DistributedType.FSDP: FSDPGPT2LMHeadModel, parameters DTensor (Shard(dim=0),)"
    assert proc.stdout.count(sharded) == 2
    assert_same_run(root / "fsdp", reference)
