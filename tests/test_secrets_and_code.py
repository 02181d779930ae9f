"""Secrets and code: a whole recipe run with a Hub push never writes the token anywhere; weights are
safetensors; nothing in the package unpickles data or weights; remote code stays off unless asked."""

import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from hub_server import FakeHub
from test_hub_push import _hub_env
from test_pipeline import make_corpus, make_teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.reliability(fault="Hub token given to a run that pushes", outcome="the token reaches the Hub in the "
                         "Authorization header only: no log line, model card, config, checkpoint or other file "
                         "of the run contains it")
def test_recipe_run_with_push_never_writes_the_token(tmp_path):
    token = "hf_" + secrets.token_hex(16)
    teacher = make_teacher(tmp_path / "bert")
    corpus = make_corpus(tmp_path / "corpus.txt", n=60)
    out = tmp_path / "run"
    with FakeHub(token=token) as hub:
        env = _hub_env(hub, tmp_path / "hf_home")
        proc = subprocess.run(
            [sys.executable, str(REPO / "recipes" / "distilbert.py"), "--teacher_name", teacher, "--file_path", corpus,
             "--output_dir", str(out), "--student_layers", "0,2", "--max_length", "48", "--max_steps", "4",
             "--save_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
             "--report_to", "tensorboard",
             "--report", "true", "--use_cpu", "true", "--push_to_hub", "true", "--hub_model_id", "tester/student",
             "--hub_token", token, "--student_reference_config", ""],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pushed = hub.files("tester/student")
        assert {"config.json", "model.safetensors", "README.md"} <= set(pushed)
        assert any(auth == f"Bearer {token}" for _, _, auth in hub.requests)

    assert token not in proc.stdout and token not in proc.stderr
    written = [p for p in out.rglob("*") if p.is_file()] + [p for p in (tmp_path / "hf_home").rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in written) and any("checkpoint-" in str(p) for p in written)
    for path in written:
        assert token.encode() not in path.read_bytes(), path
    # Weights are safetensors; the Trainer's pickled training_args.bin is replaced by a token-masked JSON.
    # (Checkpoints keep optimizer/scheduler/RNG tensors in .pt files, which transformers reads back with
    # torch.load(weights_only=True): tensors only, no code.)
    assert not [p for p in written if p.suffix in (".bin", ".pkl", ".pickle")]
    assert {p.name for p in written if p.suffix == ".safetensors"} == {"model.safetensors"}
    assert list(out.rglob("training_args.json"))


def test_package_never_unpickles():
    """No pickle/dill import, and torch.load only with weights_only=True, in the package, recipes and eval."""
    offenders = []
    for folder in ("distil_trainer", "recipes", "eval"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"^\s*(import pickle|from pickle|import dill|import cPickle)", text, re.M):
                offenders.append(f"{path}: pickle import")
            for call in re.findall(r"torch\.load\([^)]*\)", text):
                if "weights_only=True" not in call:
                    offenders.append(f"{path}: {call}")
            if re.search(r"trust_remote_code\s*=\s*True", text):
                offenders.append(f"{path}: trust_remote_code=True hard-coded")
    assert offenders == []


@pytest.mark.reliability(fault="teacher whose config asks for remote code", outcome="refused unless the user "
                         "passes trust_remote_code; the model's code is never run")
def test_remote_code_is_not_run_without_consent(tmp_path):
    from distil_trainer.extraction import load_teacher

    model_dir = tmp_path / "custom"
    tiny.tiny_bert_mlm().save_pretrained(model_dir)
    marker = tmp_path / "code_was_run"
    (model_dir / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertForMaskedLM\nclass EvilModel(BertForMaskedLM):\n    pass\n")
    config = (model_dir / "config.json").read_text()
    config = config.replace('"model_type": "bert"', '"model_type": "bert", "auto_map": {"AutoModelForMaskedLM": '
                                                   '"modeling_evil.EvilModel"}')
    (model_dir / "config.json").write_text(config)
    teacher, _ = load_teacher(str(model_dir))  # the default: the library's own BERT class, not the repo's code
    assert type(teacher).__name__ == "BertForMaskedLM"
    assert not marker.exists()
