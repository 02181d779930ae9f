"""Faults: SIGKILL mid-run and mid-binarization, a full disk during a save, non-finite losses (one process and
two), a second run on a directory in use. In every case nothing good is lost and a re-run continues exactly."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, Trainer
from transformers.trainer_utils import get_last_checkpoint

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer, losses
from distil_trainer.run_lock import LOCK_NAME, OutputDirInUse, output_dir_lock
from test_pipeline import make_corpus, make_teacher

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def reliability(fault, outcome):
    """Marks a test as a row of the reliability table (docs/RELIABILITY.md, written by conftest.py)."""
    return pytest.mark.reliability(fault=fault, outcome=outcome)


# ---- SIGKILL mid-run: re-running the same command resumes and ends exactly where an uninterrupted run ends ----

def recipe_command(config, output_dir):
    return [sys.executable, str(REPO / "recipes" / "distilbert.py"), "--config", str(config),
            "--output_dir", str(output_dir)]


@reliability("SIGKILL during training", "re-running the same command resumes from the last complete checkpoint; "
                                        "the final student equals an uninterrupted run's (max diff < 1e-6)")
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    teacher = make_teacher(tmp_path / "bert", dropout=0.1)  # dropout: the RNG state must be restored too
    corpus = make_corpus(tmp_path / "corpus.txt", n=300)
    config = tmp_path / "recipe.yaml"
    config.write_text(f"""teacher_name: {teacher}
file_path: {corpus}
student_type: distilbert
student_layers: "0,2"
max_length: 64
max_steps: 40
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
save_steps: 4
save_total_limit: 2
logging_steps: 4
learning_rate: 1.0e-3
train_sampling_strategy: group_by_length
report_to: none
use_cpu: true
seed: 56
disable_tqdm: true
""")
    straight = subprocess.run(recipe_command(config, tmp_path / "straight"), env=ENV, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(recipe_command(config, killed_dir), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed_dir / "checkpoint-8" / "trainer_state.json").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "student").exists(), "the run finished before it could be killed"
    assert (killed_dir / LOCK_NAME).exists()  # left behind by the killed run, naming a dead pid

    resumed = subprocess.run(recipe_command(config, killed_dir), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    a = AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "student").state_dict()
    b = AutoModelForMaskedLM.from_pretrained(killed_dir / "student").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@reliability("SIGKILL during binarization", "no partial output is published; the re-run builds exactly the "
                                             "uninterrupted result")
def test_sigkill_during_binarization(tmp_path):
    from distil_trainer.data import binarize

    big = tmp_path / "big.txt"
    lines = tiny.real_lines(2000, min_words=3)
    big.write_text("\n".join(lines * 15) + "\n")
    reference = binarize(tmp_path / "reference", tiny.bert_tokenizer(), file_path=str(big), verbose=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distil_trainer.cli", "binarize", "--file_path", str(big), "--tokenizer_name",
           str(tiny.minilm_dir()), "--dump_file", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4.0)  # inside tokenization or writing
    finished_early = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not finished_early:
        assert not out.exists() or not any(p.name.endswith(".arrow") for p in out.iterdir())
    rerun = binarize(out, tiny.bert_tokenizer(), file_path=str(big), verbose=False)
    assert rerun.dataset["input_ids"] == reference.dataset["input_ids"]


# ---- a full disk during a checkpoint save ----

def small_trainer(tmp_path, **kw):
    tok = tiny.bert_tokenizer()
    data = Dataset.from_dict(dict(tok(tiny.real_lines(64), truncation=True, max_length=32)))
    args = DistillationArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                                 per_device_train_batch_size=4, learning_rate=1e-3, disable_tqdm=True, **kw)
    return DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args,
                               train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok))


@reliability("disk full (ENOSPC) while writing a checkpoint", "the run stops with the OSError; earlier "
                                                              "checkpoints are intact and the resume uses the last "
                                                              "complete one")
def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path, max_steps=4, save_steps=2)
    original = Trainer._save_rng_state

    def failing(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", failing)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    out = Path(trainer.args.output_dir)
    assert not (out / "checkpoint-4").exists()
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")

    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    resumed = small_trainer(tmp_path, max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(out)))
    assert resumed.state.global_step == 4 and (out / "checkpoint-4" / "trainer_state.json").exists()


@reliability("disk full (ENOSPC) while saving token counts", "no counts file is published; the previous one "
                                                              "is unchanged")
def test_disk_full_during_token_counts(tmp_path, monkeypatch):
    import numpy as np

    from distil_trainer.data import binarize, compute_token_counts

    corpus = make_corpus(tmp_path / "c.txt", n=50)
    data_dir = tmp_path / "data"
    binarize(data_dir, tiny.bert_tokenizer(), file_path=corpus, verbose=False)
    first = compute_token_counts(data_dir)
    saved = first.path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError):  # a recount (another vocab size) that hits a full disk
        compute_token_counts(data_dir, vocab_size=len(tiny.bert_tokenizer()) + 8, overwrite=True)
    assert first.path.read_bytes() == saved
    assert not [p for p in first.path.parent.iterdir() if "tmp" in p.name]


# ---- non-finite losses ----

def nan_on_call(monkeypatch, calls_to_poison):
    """Make L_cos non-finite on the given (1-based) calls."""
    original = losses.hidden_cosine
    count = {"n": 0}

    def poisoned(*args, **kwargs):
        count["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if count["n"] in calls_to_poison else value

    monkeypatch.setattr(losses, "hidden_cosine", poisoned)


@reliability("NaN in one loss term (default policy 'skip')", "that update is skipped (weights and optimizer "
                                                              "untouched), counted and logged with the term; "
                                                              "training goes on")
def test_nonfinite_term_skips_the_update(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path, max_steps=3, logging_steps=1, save_strategy="no")
    snapshots = []

    class Snap(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Snap())
    nan_on_call(monkeypatch, {2})
    trainer.train()
    assert trainer.nonfinite_steps == 1 and trainer.nonfinite_terms == {"cos": 1}
    # Step 2 changed nothing; steps 1 and 3 trained.
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged[1]["nonfinite_steps_skipped"] == 1 and logged[1]["nonfinite_cos"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@reliability("NaN in a loss term with nonfinite_loss='stop'", "training stops at that step after saving a "
                                                               "checkpoint of the last good weights")
def test_nonfinite_stop_policy_saves_good_weights(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path, max_steps=5, save_steps=100, nonfinite_loss="stop")
    nan_on_call(monkeypatch, {3})
    trainer.train()
    assert trainer.stopped_on_nonfinite and trainer.state.global_step == 3
    checkpoint = Path(get_last_checkpoint(trainer.args.output_dir))
    saved = AutoModelForMaskedLM.from_pretrained(checkpoint).state_dict()
    assert all(torch.isfinite(v).all() for v in saved.values())


@reliability("NaN on one rank of two (DDP over gloo)", "both ranks learn it at the same step and skip it; no "
                                                       "hang; weights stay identical on both ranks")
def test_nonfinite_on_one_rank_of_two(tmp_path):
    script = REPO / "tests" / "scripts" / "nan_on_one_rank.py"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), str(script), str(tmp_path)],
                          env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["nonfinite_steps"] == 1 and r["global_step"] == 3
    assert results[0]["checksum"] == results[1]["checksum"]


# ---- one run per output directory ----

@reliability("a second run on an output directory in use", "refused with a message naming the other run "
                                                           "(pid, host, start, command)")
def test_second_run_on_a_directory_in_use_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from distil_trainer.run_lock import "
                               "output_dir_lock\nwith output_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirInUse, match=rf"in use by run pid {holder.pid} on .* since .*"):
            with output_dir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and is taken over.
    with output_dir_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
