"""Fitting the MLM head of a teacher shipped without one (pipeline/teacher_head.py): the cached rows are the body's
outputs at the masked positions, only the head trains, early stopping keeps the best head, the figures in
fit_log.json are the head's real loss and accuracy, and an untied decoder is saved, reloaded and copied by the
student extraction."""

import json

import pytest
import torch

import tiny
from distil_trainer import extraction
from distil_trainer.data.collators import MaskedLMCollator
from distil_trainer.pipeline import teacher_head as th


def _bare_teacher(tmp_path):
    """A BERT saved without its MLM head (as sentence-embedding models ship), loaded as the pipeline does."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path / "bare"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(path)
    tiny.bert_tokenizer().save_pretrained(path)
    teacher, missing = extraction.load_teacher(str(path))
    return teacher, missing


def _data(n=40):
    from datasets import Dataset

    tok = tiny.bert_tokenizer()
    ids = tok(tiny.real_lines(n), truncation=True, max_length=48)["input_ids"]
    return Dataset.from_dict({"input_ids": ids}), MaskedLMCollator(tok, mlm_smoothing=0.0, seed=3)


def test_masked_rows_are_the_body_outputs_at_the_masked_positions(tmp_path):
    teacher, _ = _bare_teacher(tmp_path)
    dataset, collator = _data(12)
    hidden, targets = th.masked_rows(teacher, dataset, collator, batch_size=5)
    # Independently: each sequence alone (no padding), masked as the collator masks it in its length-sorted batch.
    lengths = [len(x) for x in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    expected_h, expected_y = [], []
    for start in range(0, len(order), 5):
        batch = collator([{"input_ids": dataset[i]["input_ids"]} for i in order[start:start + 5]])
        for row in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][row].sum())
            with torch.no_grad():
                h = teacher.bert(input_ids=batch["input_ids"][row, :length][None]).last_hidden_state[0]
            labels = batch["labels"][row, :length]
            expected_h.append(h[labels != -100])
            expected_y.append(labels[labels != -100])
    # Rows come out batch by batch, row-major: the same order as above.
    torch.testing.assert_close(hidden, torch.cat(expected_h), atol=1e-5, rtol=1e-4)
    assert torch.equal(targets, torch.cat(expected_y))


def test_early_stopping_keeps_the_best_head_and_stops_after_patience():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5)
    hidden, targets = torch.randn(400, 8), torch.randint(0, 5, (400,))  # noise: held-out loss soon stops improving
    train, held = torch.arange(300), torch.arange(300, 400)
    log, best_step, early = th.train_head(head, list(head.parameters()), hidden, targets, train, held, max_steps=2000,
                                          batch_size=64, learning_rate=0.05, eval_every=5, patience=3)
    assert early and log[-1]["step"] < 2000
    best = min(log, key=lambda r: r["heldout_loss"])
    assert best_step == best["step"]
    # The best head was restored: its held-out loss (recomputed by hand) is the logged minimum.
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(head(hidden[held]), targets[held]).item()
    assert loss == pytest.approx(best["heldout_loss"], rel=1e-5)
    assert log[-1]["step"] - best_step == 3 * 5  # patience evaluations after the best


@pytest.mark.parametrize("decoder", ["tied", "untied"])
def test_fit_trains_only_the_head_and_logs_its_real_figures(tmp_path, decoder):
    teacher, _ = _bare_teacher(tmp_path)
    body_before = {k: v.clone() for k, v in teacher.bert.state_dict().items()}
    dataset, collator = _data(40)
    out = tmp_path / "head"
    fitted, reused = th.fit_mlm_head(teacher, dataset, collator, out, steps=60, identity={"k": decoder},
                                     decoder=decoder, batch_size=64, learning_rate=3e-3, eval_every=10,
                                     patience=100, seed=0)
    assert not reused
    for k, v in fitted.bert.state_dict().items():
        assert torch.equal(v, body_before[k]), k  # the body (word embeddings included) is untouched
    record = json.loads((out / th.FIT_LOG).read_text())
    summary, log = record["summary"], record["log"]
    assert summary["decoder"] == decoder and summary["steps"] == 60 and not summary["stopped_early"]
    assert log[0]["step"] == 0 and min(r["heldout_loss"] for r in log[1:]) < log[0]["heldout_loss"] - 0.1
    # The summary's held-out figures are those of the saved head on the held-out rows, recomputed here.
    reloaded = type(fitted).from_pretrained(out).eval()
    hidden, targets = th.masked_rows(reloaded, dataset, collator)
    _, held = th.heldout_split(len(targets), seed=0)
    with torch.no_grad():
        logits = reloaded.cls(hidden[held])
    loss = torch.nn.functional.cross_entropy(logits, targets[held]).item()
    assert summary["heldout_loss"] == pytest.approx(loss, rel=1e-4)
    assert summary["heldout_accuracy"] == pytest.approx((logits.argmax(-1) == targets[held]).float().mean().item())
    assert th.fit_summary(out) == summary

    decoder_weight = reloaded.cls.predictions.decoder.weight
    if decoder == "untied":
        assert reloaded.config.tie_word_embeddings is False
        assert decoder_weight.data_ptr() != reloaded.bert.embeddings.word_embeddings.weight.data_ptr()
        assert not torch.equal(decoder_weight, body_before["embeddings.word_embeddings.weight"])
        assert torch.equal(reloaded.cls.predictions.bias, reloaded.cls.predictions.decoder.bias)
    else:
        assert torch.equal(decoder_weight, body_before["embeddings.word_embeddings.weight"])

    # Same identity: reused, not refitted.
    again, reused = th.fit_mlm_head(teacher, dataset, collator, out, steps=60, identity={"k": decoder},
                                    decoder=decoder)
    assert reused


@pytest.mark.parametrize("student_type", ["same", "distilbert"])
def test_students_copy_an_untied_decoder(tmp_path, student_type):
    teacher, _ = _bare_teacher(tmp_path)
    dataset, collator = _data(20)
    fitted, _ = th.fit_mlm_head(teacher, dataset, collator, tmp_path / "head", steps=10, identity={},
                                decoder="untied", batch_size=64, learning_rate=1e-2, eval_every=5, seed=0)
    student, report = extraction.extract_student(fitted, layers=[0], student_type=student_type, return_report=True)
    assert report.randomly_initialised == []
    decoder = fitted.cls.predictions.decoder
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    if student_type == "same":
        assert torch.equal(student.cls.predictions.decoder.weight, decoder.weight)
        assert torch.equal(student.cls.predictions.decoder.bias, decoder.bias)
        assert not torch.equal(student.cls.predictions.decoder.weight, student.bert.embeddings.word_embeddings.weight)
    else:
        assert torch.equal(student.vocab_projector.weight, decoder.weight)
        assert torch.equal(student.vocab_projector.bias, decoder.bias)
    # A student of the teacher's full depth would give the teacher's logits: check the head path on one layer.
    with torch.no_grad():
        student(input_ids=ids)


def test_a_missing_head_starts_from_the_run_seed_whatever_the_process_rng(tmp_path):
    """The random start of a head the checkpoint lacks is drawn from the seed passed in, not from the process's RNG
    state (which differs between ranks and runs); the caller's RNG stream is left where it was."""
    _bare_teacher(tmp_path)
    path = str(tmp_path / "bare")

    def head(seed, consume):
        torch.randn(consume)  # RNG use before loading, as another rank or another program would differ in
        before = torch.random.get_rng_state()
        teacher, missing = extraction.load_teacher(path, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before)
        assert "cls.predictions.transform.dense.weight" in missing
        return teacher.cls.predictions.transform.dense.weight.detach().clone()

    assert torch.equal(head(5, 1), head(5, 1000))
    assert not torch.equal(head(5, 1), head(6, 1))
    # The trainer's loader (a teacher given by name) draws it the same way, from args.seed.
    from distil_trainer.model_utils import MASKED_LM, load_teacher

    by_name = load_teacher(path, MASKED_LM, seed=5).cls.predictions.transform.dense.weight
    assert torch.equal(by_name, head(5, 7))
