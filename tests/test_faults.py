"""Faults: SIGKILL mid-run and mid-binarization, a full disk during a save, non-finite losses (one process, two,
DeepSpeed ZeRO on 2 CPU ranks), non-finite weights at a save, a second run on a directory in use. In every case
nothing good is lost and a re-run continues exactly."""

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
from launch import accelerate_launch, deepspeed_launch_file, trainer_optimizer
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


def optimizer_snapshot(trainer):
    """Everything a skipped update must leave as it was: weights, Adam's moments and step counts, the schedule."""
    optimizer = trainer.optimizer.optimizer  # under accelerate's wrapper
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "adam": [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()],
        "lr": [g["lr"] for g in optimizer.param_groups],
        "scheduler_steps": trainer.lr_scheduler.state_dict()["last_epoch"],
    }


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@reliability("NaN in one loss term (default policy 'skip')",
             "that update is skipped: weights, Adam's moments and step counts, and the learning-rate schedule stay "
             "as they were (only the step counter advances); counted and logged with the term; training goes on")
def test_nonfinite_term_skips_the_update(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path, max_steps=3, logging_steps=1, save_strategy="no", warmup_steps=0)
    snapshots = []

    class Snap(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshots.append(optimizer_snapshot(trainer))

    trainer.add_callback(Snap())
    nan_on_call(monkeypatch, {2})
    trainer.train()
    assert trainer.nonfinite_steps == 1 and trainer.nonfinite_terms == {"cos": 1}
    assert trainer.state.global_step == 3
    first, skipped, third = snapshots
    # Step 2 changed nothing: not the weights, not Adam's state, not the learning rate or the scheduler's count.
    assert same_tensors(first["weights"], skipped["weights"])
    assert len(first["adam"]) == len(skipped["adam"]) > 0
    assert all(same_tensors(a, b) for a, b in zip(first["adam"], skipped["adam"]))
    assert skipped["lr"] == first["lr"] and skipped["scheduler_steps"] == first["scheduler_steps"] == 1
    # Step 3 trained, as the second update of Adam and with the schedule's second value.
    assert not same_tensors(skipped["weights"], third["weights"])
    assert all(int(s["step"]) == 2 for s in third["adam"])
    assert third["scheduler_steps"] == 2 and third["lr"][0] < first["lr"][0]
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


@reliability("non-finite weights at a checkpoint save (however they got there)",
             "that checkpoint is not written: the run stops with an error naming the parameters; the earlier "
             "checkpoints are intact and the resume uses the last one")
def test_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    trainer = small_trainer(tmp_path, max_steps=3, save_steps=1)

    class CorruptAfterStep2(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:  # after the update, before the Trainer saves checkpoint-2
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    trainer.add_callback(CorruptAfterStep2())
    with pytest.raises(RuntimeError, match=r"Not writing checkpoint-2: 1 student parameters hold NaN/inf "
                                           r"\(distilbert\.embeddings\.word_embeddings\.weight\)"):
        trainer.train()
    out = Path(trainer.args.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert get_last_checkpoint(str(out)).endswith("checkpoint-1")
    saved = AutoModelForMaskedLM.from_pretrained(out / "checkpoint-1").state_dict()
    assert all(torch.isfinite(v).all() for v in saved.values())


def launch_nan_step(tmp_path, config_file, nan_step, nan_rank, training_args, env=None):
    """Run tests/scripts/nan_step.py on 2 ranks; returns each rank's report."""
    script = REPO / "tests" / "scripts" / "nan_step.py"
    proc = accelerate_launch(config_file, script, tmp_path, nan_step, nan_rank, json.dumps(training_args), env=env,
                             timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)], proc


def assert_step_skipped(steps, skipped_step):
    """Step `skipped_step` (1-based) left weights, optimizer state and learning rate as the step before left them;
    the step after trained."""
    before, skipped, after = steps[skipped_step - 2], steps[skipped_step - 1], steps[skipped_step]
    for key in ("weights", "optimizer_state", "learning_rate"):
        assert skipped[key] == before[key], key
    assert after["weights"] != skipped["weights"] and after["optimizer_state"] != skipped["optimizer_state"]
    assert all(s["finite"] for s in steps)


@reliability("NaN on one rank of two (DDP over gloo)", "both ranks learn it at the same step and skip it (weights, "
                                                       "optimizer state and learning rate untouched); no hang; "
                                                       "weights stay identical on both ranks")
def test_nonfinite_on_one_rank_of_two(tmp_path):
    reports, _ = launch_nan_step(tmp_path, REPO / "accelerate_configs" / "cpu_2proc.yaml", 2, 1,
                                 {"use_cpu": True}, env={"ACCELERATE_USE_CPU": "1"})
    for r in reports:
        assert r["nonfinite_terms"] == {"cos": 1} and r["global_step"] == 3
        assert_step_skipped(r["steps"], 2)
    assert reports[0]["steps"] == reports[1]["steps"]


def checkpoint_weights(run_dir):
    from safetensors.torch import load_file

    return {p.name: load_file(p / "model.safetensors") for p in sorted(Path(run_dir).glob("checkpoint-*"))}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@reliability("NaN on one rank, on a checkpoint step, under DeepSpeed ZeRO-2 / ZeRO-3 (2 CPU ranks)",
             "DeepSpeed's overflow check skips the update (weights, optimizer state and learning rate untouched) "
             "and the guard counts it; the checkpoint of that step holds the last good weights; training goes on")
def test_nonfinite_on_a_save_step_under_deepspeed(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    config = deepspeed_launch_file(stage, tmp_path, trainer_optimizer)
    reports, _ = launch_nan_step(tmp_path, config, 2, 1, {"ddp_backend": "gloo", "save_strategy": "steps",
                                                          "save_steps": 1})
    for r in reports:
        assert r["nonfinite_terms"] == {"cos": 1} and r["global_step"] == 3 and not r["stopped_on_nonfinite"]
        assert_step_skipped(r["steps"], 2)
        assert [s["deepspeed_skipped_steps"] for s in r["steps"]] == [0, 1, 1]
    saved = checkpoint_weights(tmp_path / "run")
    assert list(saved) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(torch.isfinite(t).all() for weights in saved.values() for t in weights.values())
    assert same_tensors(saved["checkpoint-1"], saved["checkpoint-2"])


@pytest.mark.slow
@reliability("NaN on a checkpoint step under DeepSpeed with its overflow checks off (ZeRO-2, compute_grad_norm "
             "false): DeepSpeed applies the non-finite update",
             "training stops at that step and nothing of that state is saved; the last checkpoint holds finite "
             "weights and is the one a re-run resumes from")
def test_deepspeed_applying_a_nonfinite_update_stops_without_saving(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")

    def no_overflow_check(ds_config):
        trainer_optimizer(ds_config)
        ds_config["zero_optimization"]["compute_grad_norm"] = False  # fp32 ZeRO-2 then checks nothing

    config = deepspeed_launch_file(2, tmp_path, no_overflow_check)
    reports, proc = launch_nan_step(tmp_path, config, 2, 1, {"ddp_backend": "gloo", "save_strategy": "steps",
                                                             "save_steps": 1, "max_grad_norm": 0.0})
    assert "DeepSpeed applied that update" in proc.stderr
    for r in reports:
        assert r["stopped_on_nonfinite"] and r["global_step"] == 2
        assert not r["steps"][1]["finite"]  # the state that must not be saved
    saved = checkpoint_weights(tmp_path / "run")
    assert list(saved) == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in saved["checkpoint-1"].values())
    assert get_last_checkpoint(str(tmp_path / "run")).endswith("checkpoint-1")


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
