"""The recipe under `accelerate launch`: 2 CPU processes over gloo, and DeepSpeed ZeRO-2 / ZeRO-3 on CPU, give the
same losses and the same student as one process with the same global batch and data order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pipeline import make_corpus, make_teacher

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    teacher = make_teacher(root / "gpt2", family="gpt2")
    corpus = make_corpus(root / "corpus.txt", n=120)
    config = root / "recipe.yaml"
    config.write_text(f"""teacher_name: {teacher}
file_path: {corpus}
student_layers: "0,2"
max_length: 48
max_steps: 3
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
    run([sys.executable, str(REPO / "recipes" / "distilgpt2.py"), "--config", str(config),
         "--output_dir", str(reference), "--per_device_train_batch_size", "8", "--use_cpu", "true"])
    return root, config, reference


def run(cmd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def logged_losses(run_dir):
    log = json.loads((Path(run_dir) / "student" / "training_log.json").read_text())
    return [(r["loss"], r["loss_clm"], r["loss_ce"], r["loss_cos"]) for r in log if "loss" in r]


def assert_same_run(run_dir, reference):
    got, expected = logged_losses(run_dir), logged_losses(reference)
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-7)
    # Loaded, not read raw: a DeepSpeed save may also store the tied copy of the embeddings (lm_head.weight).
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(Path(reference) / "student").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def accelerate_launch(config_file, recipe_config, output_dir, extra_args=(), env=None):
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                str(REPO / "recipes" / "distilgpt2.py"), "--config", str(recipe_config),
                "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", *extra_args], env)


def test_two_cpu_processes_match_one(setup):
    root, config, reference = setup
    proc = accelerate_launch(REPO / "accelerate_configs" / "cpu_2proc.yaml", config, root / "two",
                             env={"ACCELERATE_USE_CPU": "1"})
    assert_same_run(root / "two", reference)
    assert proc.stdout.count("==> [1/8] binarize") == 1  # stages print once, from the main process


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_matches_one_process(setup, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    root, config, reference = setup
    # The shipped config, with 2 processes and the Trainer's own AdamW (DeepSpeed's fused optimizers need
    # compiled ops, which a DS_BUILD_OPS=0 install on CPU does not have).
    ds_config = json.loads((REPO / "accelerate_configs" / f"deepspeed_zero{stage}.json").read_text())
    ds_config.pop("optimizer")
    ds_config.pop("scheduler")
    ds_config["zero_allow_untested_optimizer"] = True
    ds_config["zero_force_ds_cpu_optimizer"] = False
    ds_json = root / f"zero{stage}.json"
    ds_json.write_text(json.dumps(ds_config))
    launch = (REPO / "accelerate_configs" / f"deepspeed_zero{stage}.yaml").read_text()
    launch = launch.replace(f"accelerate_configs/deepspeed_zero{stage}.json", str(ds_json))
    launch = launch.replace("num_processes: 8", "num_processes: 2")
    launch_file = root / f"zero{stage}.yaml"
    launch_file.write_text(launch)

    # No ACCELERATE_USE_CPU here (it turns DeepSpeed off); gloo gives DeepSpeed its CPU process group.
    proc = accelerate_launch(launch_file, config, root / f"zero{stage}", extra_args=("--ddp_backend", "gloo"))
    assert_same_run(root / f"zero{stage}", reference)
    # The teacher ran inside a DeepSpeed engine of the configured stage (3: partitioned for inference).
    assert f"Teacher: DeepSpeed inference engine, ZeRO stage {stage if stage == 3 else 0}" in proc.stderr
