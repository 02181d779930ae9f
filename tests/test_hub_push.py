"""push_student_to_hub over real HTTP against tests/hub_server.py, then a pull with transformers' from_pretrained.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import time, and conftest has already imported it offline in
this process, so the push and the pull each run in a fresh subprocess pointed at the fake Hub.
"""

import json
import os
import secrets
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from hub_server import FakeHub

from distil_trainer.pipeline.hub import mask_token, push_student_to_hub
from distil_trainer.pipeline.model_card import StudentCardInfo, write_model_card

PUSH = r"""
import logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from distil_trainer.pipeline.hub import push_student_to_hub
folder, token = sys.argv[1], os.environ.pop("FAKE_HUB_TOKEN")
first = push_student_to_hub(folder, "tester/tiny-student", token=token)
second = push_student_to_hub(folder, "tester/tiny-student-private", token=token, private=True, revision="dev",
                             commit_message="student on a branch")
print(first.commit_url)
print(second.commit_url)
"""

PULL = r"""
import json, sys
from safetensors.torch import save_file
from transformers import AutoModelForMaskedLM, AutoTokenizer
repo_id, out = sys.argv[1], sys.argv[2]
model = AutoModelForMaskedLM.from_pretrained(repo_id)
tokenizer = AutoTokenizer.from_pretrained(repo_id)
save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out + "/pulled.safetensors")
ids = tokenizer("Distillation keeps most of the accuracy.")["input_ids"]
print(json.dumps({"class": type(model).__name__, "vocab": len(tokenizer), "ids": ids}))
"""


def _run(code, args, env, timeout=120):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(tiny.REPO_ROOT))


def _hub_env(hub, hf_home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(tiny.REPO_ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


def _files_containing(root, needle: bytes):
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_push_then_pull_through_fake_hub(tmp_path):
    token = "hf_fake" + secrets.token_hex(16)
    student, tokenizer = tiny.tiny_distilbert_mlm(), tiny.bert_tokenizer()
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_model_card(StudentCardInfo(model_name="tester/tiny-student", teacher_name="bert-base-uncased",
                                     student_parameters=student.num_parameters(), teacher_parameters=110_000_000,
                                     loss_weights={"alpha_ce": 5.0, "alpha_mlm": 2.0}, temperature=2.0), folder)
    local_files = sorted(p.name for p in folder.iterdir())
    hf_home, pulled = tmp_path / "hf_home", tmp_path / "pulled"
    pulled.mkdir()

    with FakeHub(token=token) as hub:
        push = _run(PUSH, [folder], _hub_env(hub, hf_home, FAKE_HUB_TOKEN=token))
        assert push.returncode == 0, push.stderr[-3000:]
        pull = _run(PULL, ["tester/tiny-student", pulled], _hub_env(hub, hf_home))
        assert pull.returncode == 0, pull.stderr[-3000:]

        # Everything the student folder holds arrived, byte for byte, in one commit on main.
        remote = hub.files("tester/tiny-student")
        assert sorted(set(remote) - {".gitattributes"}) == local_files
        for name in local_files:
            assert remote[name] == (folder / name).read_bytes(), name
        # The second push: a private repo, created with private visibility, files on branch "dev" only.
        assert hub.repos["tester/tiny-student-private"].private
        assert {"name": "tiny-student-private", "organization": "tester", "visibility": "private",
                "type": "model"}.items() <= hub.create_payloads[-1].items()
        assert "README.md" in hub.files("tester/tiny-student-private", "dev")
        assert "README.md" not in hub.files("tester/tiny-student-private", "main")
        assert hub.commit_messages == ["Upload distilled student with distil_trainer", "student on a branch"]
        commit_urls = push.stdout.split()
        assert commit_urls[0] == f"{hub.url}/tester/tiny-student/commit/{hub.repos['tester/tiny-student'].branches['main']}"

        # The token was sent as a bearer token on every write request, and only there.
        writes = [(m, p, a) for m, p, a in hub.requests if m == "POST" and p != "/api/validate-yaml"]
        assert {p.split("/")[-2] if "/api/models/" in p else p for _, p, _ in writes} >= {
            "/api/repos/create", "preupload", "commit", "branch"}
        assert all(a == f"Bearer {token}" for _, _, a in writes)
        pull_requests = [r for r in hub.requests if r[0] in ("GET", "HEAD")]
        assert pull_requests and all(a is None for _, _, a in pull_requests)
        assert hub.unhandled == []  # every request huggingface_hub / transformers made had a real answer

    # The pulled model is exactly the pushed one; the tokenizer behaves identically.
    got = load_file(pulled / "pulled.safetensors")
    want = student.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    result = json.loads(pull.stdout.strip().splitlines()[-1])
    assert result["class"] == "DistilBertForMaskedLM"
    assert result["vocab"] == len(tokenizer) == 30522
    assert result["ids"] == tokenizer("Distillation keeps most of the accuracy.")["input_ids"]

    # The token appears nowhere: not in output, not in the card, not on disk (student folder or HF cache).
    assert mask_token(token) in push.stderr  # the push did log, masked
    for text in (push.stdout, push.stderr, pull.stdout, pull.stderr):
        assert token not in text
    assert token not in (folder / "README.md").read_text()
    assert list(hf_home.rglob("*")), "the pull should have filled the HF cache"
    assert _files_containing(folder, token.encode()) == []
    assert _files_containing(hf_home, token.encode()) == []
    assert _files_containing(pulled, token.encode()) == []


def test_push_rejects_a_folder_without_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        push_student_to_hub(tmp_path / "missing", "tester/x", token="hf_unused")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        push_student_to_hub(tmp_path, "tester/x", token="hf_unused")


def test_mask_token_never_returns_the_token():
    token = "hf_" + "a1" * 17
    assert mask_token(token) == "hf_***" and token not in mask_token(token)
    assert mask_token(None) == "<none>" and mask_token("short") == "***"
