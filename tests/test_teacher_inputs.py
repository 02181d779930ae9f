"""Task distillation from a BERT teacher into a DistilBERT student (the paper's SQuAD second step, GLUE pairs,
XNLI): the teacher gets every batch column its forward takes, segment ids included, and the student only its own.

The end-to-end tests run the eval scripts with a DistilBERT tokenizer (which leaves token_type_ids out by default),
record the teacher's inputs and logits inside training with a forward hook, and compare them with the teacher
called directly on the pair as BERT's own tokenizer encodes it."""

import functools
import logging
import sys

import pytest
import torch

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import common  # noqa: E402
import run_glue  # noqa: E402
import run_squad  # noqa: E402
import run_xnli  # noqa: E402

GLUE = tiny.SHARED_DATA / "glue"
SQUAD_DEV = tiny.SHARED_DATA / "squad" / "dev-v1.1.json"
XNLI = tiny.SHARED_DATA / "xnli"
TINY = dict(vocab_size=30522, max_position_embeddings=128)


@functools.lru_cache(maxsize=None)
def distilbert_tokenizer():
    """DistilBERT's tokenizer class on bert-base-uncased's vocabulary: no token_type_ids unless asked for."""
    from transformers import DistilBertTokenizer

    return DistilBertTokenizer.from_pretrained(str(tiny.minilm_dir()))


def distilbert(head, seed=11, **kw):
    import transformers
    from transformers import DistilBertConfig

    torch.manual_seed(seed)
    cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **TINY, **kw)
    return getattr(transformers, f"DistilBertFor{head}")(cfg).eval()


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class ForwardSpy:
    """Records the tensor keyword arguments and the output of every forward call of `model`."""

    def __init__(self, model):
        self.calls = []
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def stop(self):
        """Stop recording (before the test calls the model itself)."""
        self._handle.remove()

    def _record(self, module, args, kwargs, output):
        self.calls.append(({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}, output))


@pytest.fixture
def spy_on_teacher(monkeypatch):
    """Wrap common.load_teacher so that the scripts' teacher is spied on; returns a list that gets the spy."""
    spies = []
    load = common.load_teacher

    def load_and_spy(*args, **kwargs):
        teacher = load(*args, **kwargs)
        if teacher is not None:
            spies.append((teacher, ForwardSpy(teacher)))
        return teacher

    monkeypatch.setattr(common, "load_teacher", load_and_spy)
    return spies


def check_teacher_rows(spy, reference, output_keys):
    """Every row the teacher saw is a reference encoding (segment ids included), and its outputs there equal the
    teacher's own on that encoding alone. `reference`: {input_ids tuple: (encoding, direct outputs)}.
    Returns the number of rows checked."""
    rows = 0
    for kwargs, output in spy.calls:
        assert "token_type_ids" in kwargs, f"the teacher got {sorted(kwargs)}, no token_type_ids"
        for i in range(kwargs["input_ids"].shape[0]):
            real = kwargs["attention_mask"][i].bool()
            ids = tuple(kwargs["input_ids"][i][real].tolist())
            assert ids in reference, "the teacher saw a sequence that is not one of the task's encodings"
            encoding, direct = reference[ids]
            assert kwargs["token_type_ids"][i][real].tolist() == [
                t for t, m in zip(encoding["token_type_ids"], encoding["attention_mask"]) if m]
            for key in output_keys:
                # Per-position outputs (QA) are compared at the real tokens; padding is the batch's, not the row's.
                got, want = getattr(output, key)[i], direct[key]
                if key != "logits":
                    got, want = got[real], want[torch.tensor(encoding["attention_mask"]).bool()]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            rows += 1
    return rows


def direct_outputs(teacher, encodings, output_keys):
    """{input_ids tuple: (encoding, {key: the teacher's output called on this encoding alone})}."""
    reference = {}
    with torch.no_grad():
        for enc in encodings:
            batch = {k: torch.tensor([enc[k]]) for k in ("input_ids", "token_type_ids", "attention_mask")}
            out = teacher(**batch)
            ids = tuple(t for t, m in zip(enc["input_ids"], enc["attention_mask"]) if m)
            reference[ids] = (enc, {k: getattr(out, k)[0] for k in output_keys})
    return reference


def pair_encodings(first, second, max_length):
    """The pairs as BERT's own tokenizer (the teacher's) encodes them: with segment ids, no padding."""
    tok = tiny.bert_tokenizer()
    enc = tok(list(first), list(second), truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in range(len(first))]


# ---- GLUE sentence pairs (MRPC) ----

GLUE_FAST = ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--num_train_epochs", "1",
             "--max_train_samples", "16", "--max_eval_samples", "8", "--max_seq_length", "64", "--use_cpu", "true",
             "--logging_steps", "1", "--seeds", "7"]


def test_glue_pair_teacher_gets_segment_ids(tmp_path, spy_on_teacher):
    student = save(distilbert("SequenceClassification", num_labels=2), distilbert_tokenizer(), tmp_path / "student")
    teacher = save(tiny.tiny_bert_classifier(num_labels=2, layers=2, seed=9), tiny.bert_tokenizer(),
                   tmp_path / "teacher")
    run_glue.main(["--model_name_or_path", student, "--task_name", "mrpc", "--data_dir", str(GLUE / "MRPC"),
                   "--output_dir", str(tmp_path / "out"), "--teacher", teacher, *GLUE_FAST])

    (model, spy), = spy_on_teacher
    spy.stop()
    task = run_glue.TASKS["mrpc"]
    encodings = []
    for split, n in (("train", 16), ("dev", 8)):
        rows = run_glue.read_tsv(GLUE / "MRPC" / f"{split}.tsv", "mrpc", task)
        encodings += pair_encodings(rows["sentence1"][:n], rows["sentence2"][:n], 64)
    assert any(1 in e["token_type_ids"] for e in encodings)
    rows = check_teacher_rows(spy, direct_outputs(model, encodings, ["logits"]), ["logits"])
    assert rows >= 16  # every training example at least once (evaluation adds the dev rows)


# ---- SQuAD windows (question, context) ----

SQUAD_ARGS = ["--train_file", str(SQUAD_DEV), "--validation_file", str(SQUAD_DEV), "--train_articles", "0:1",
              "--eval_articles", "1:2", "--max_train_samples", "12", "--max_eval_samples", "4",
              "--max_seq_length", "128", "--doc_stride", "32", "--per_device_train_batch_size", "8",
              "--num_train_epochs", "1", "--use_cpu", "true", "--logging_steps", "1", "--seeds", "7"]


def squad_window_encodings(articles, n):
    """Training windows of the first `n` questions, encoded by BERT's own tokenizer as run_squad windows them."""
    rows = run_squad.read_squad_json(SQUAD_DEV, articles)
    tok = tiny.bert_tokenizer()
    enc = tok([q.lstrip() for q in rows["question"][:n]], rows["context"][:n], truncation="only_second",
              max_length=128, stride=32, return_overflowing_tokens=True, padding="max_length")
    return [{k: enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask")}
            for i in range(len(enc["input_ids"]))]


def test_squad_teacher_gets_segment_ids_and_student_predicts(tmp_path, spy_on_teacher):
    student = save(distilbert("QuestionAnswering"), distilbert_tokenizer(), tmp_path / "student")
    teacher = save(tiny.tiny_bert_qa(layers=2, seed=9), tiny.bert_tokenizer(), tmp_path / "teacher")
    payload = run_squad.main(["--model_name_or_path", student, "--output_dir", str(tmp_path / "out"),
                              "--teacher", teacher, *SQUAD_ARGS])
    assert set(payload["median"]) == {"exact_match", "f1"}  # prediction on the student alone ran too

    (model, spy), = spy_on_teacher
    spy.stop()
    encodings = squad_window_encodings(slice(0, 1), 12)
    assert all(1 in e["token_type_ids"] for e in encodings)  # the context is segment 1 in every window
    keys = ["start_logits", "end_logits"]
    rows = check_teacher_rows(spy, direct_outputs(model, encodings, keys), keys)
    assert rows == len(encodings)  # one epoch over the training windows; prediction runs the student alone


# ---- XNLI (premise, hypothesis) ----

def test_xnli_teacher_gets_segment_ids(tmp_path, spy_on_teacher):
    student = save(distilbert("SequenceClassification", num_labels=3), distilbert_tokenizer(), tmp_path / "student")
    teacher = save(tiny.tiny_bert_classifier(num_labels=3, layers=2, seed=9), tiny.bert_tokenizer(),
                   tmp_path / "teacher")
    run_xnli.main(["--model_name_or_path", student, "--data_dir", str(XNLI), "--train_file", str(XNLI / "dev-en.tsv"),
                   "--eval_languages", "de", "--max_train_samples", "16", "--max_eval_samples", "8",
                   "--output_dir", str(tmp_path / "out"), "--seeds", "7", "--per_device_train_batch_size", "8",
                   "--num_train_epochs", "1", "--use_cpu", "true", "--teacher", teacher])
    (model, spy), = spy_on_teacher
    spy.stop()
    en = run_xnli.read_xnli_tsv(XNLI / "dev-en.tsv")
    de = run_xnli.read_xnli_tsv(XNLI / "dev-de.tsv")
    encodings = (pair_encodings(en["premise"][:16], en["hypothesis"][:16], 128)
                 + pair_encodings(de["premise"][:8], de["hypothesis"][:8], 128))
    assert check_teacher_rows(spy, direct_outputs(model, encodings, ["logits"]), ["logits"]) >= 16


# ---- the trainer itself: columns kept for the teacher, filtered for the student ----

def mrpc_features(n, with_labels=True):
    from datasets import Dataset

    rows = run_glue.read_tsv(GLUE / "MRPC" / "dev.tsv", "mrpc", run_glue.TASKS["mrpc"])
    enc = distilbert_tokenizer()(rows["sentence1"][:n], rows["sentence2"][:n], truncation=True, max_length=64,
                                 return_token_type_ids=True)
    columns = dict(enc)
    if with_labels:
        columns["labels"] = rows["label"][:n]
    return Dataset.from_dict(columns)


def make_trainer(tmp_path, student, teacher, train=None):
    from transformers import DataCollatorWithPadding

    from distil_trainer import DistillationArguments, DistillationTrainer

    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, alpha_ce=1.0, alpha_mlm=0.0,
                                 alpha_cos=0.0, alpha_task=1.0, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=4, max_steps=2, save_strategy="no")
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                               data_collator=DataCollatorWithPadding(distilbert_tokenizer()))


def test_trainer_gives_each_model_its_own_columns(tmp_path):
    from distil_trainer.model_utils import forward_arguments

    student = distilbert("SequenceClassification", num_labels=2)
    teacher = tiny.tiny_bert_classifier(num_labels=2, layers=2, seed=9)
    trainer = make_trainer(tmp_path, student, teacher, train=mrpc_features(8))
    student_spy, teacher_spy = ForwardSpy(student), ForwardSpy(teacher)
    trainer.train()
    assert teacher_spy.calls and all("token_type_ids" in kw for kw, _ in teacher_spy.calls)
    allowed = forward_arguments(student)
    assert student_spy.calls and all(set(kw) <= allowed and "token_type_ids" not in kw for kw, _ in student_spy.calls)

    # Prediction without labels: Trainer calls the student itself, which must not get the teacher's columns.
    student_spy.calls.clear()
    trainer.predict(mrpc_features(6, with_labels=False))
    assert student_spy.calls and all("token_type_ids" not in kw for kw, _ in student_spy.calls)


def test_trainer_warns_once_when_pair_batch_has_no_segment_ids(tmp_path, caplog):
    student = distilbert("SequenceClassification", num_labels=2)
    teacher = tiny.tiny_bert_classifier(num_labels=2, layers=2, seed=9)
    trainer = make_trainer(tmp_path, student, teacher)
    rows = mrpc_features(4)
    batch = {k: torch.tensor(rows[k][:1]) for k in ("input_ids", "attention_mask", "labels")}  # no token_type_ids
    with caplog.at_level(logging.WARNING, logger="distil_trainer.distillation_trainer"):
        trainer.compute_loss(student, dict(batch))
        trainer.compute_loss(student, dict(batch))
    warnings = [r for r in caplog.records if "token_type_ids" in r.getMessage()]
    assert len(warnings) == 1 and "return_token_type_ids=True" in warnings[0].getMessage()


# ---- the rule the eval scripts share ----

def test_token_type_kwargs_rule():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    bert_teacher = tiny.tiny_bert_classifier(num_labels=2)
    assert common.token_type_kwargs(distilbert_tokenizer(), bert_teacher) == {"return_token_type_ids": True}
    assert common.token_type_kwargs(distilbert_tokenizer(), None) == {}
    assert common.token_type_kwargs(distilbert_tokenizer(), distilbert("SequenceClassification", num_labels=2)) == {}
    # RoBERTa takes token_type_ids but has one type: a pair's 1s would index past its table.
    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64,
                                                             type_vocab_size=1))
    assert common.token_type_kwargs(tiny.roberta_tokenizer(), roberta) == {}
    # A tokenizer that puts both sequences in segment 0 cannot feed a teacher that reads segments.
    with pytest.raises(ValueError, match="segment 0.*--tokenizer_name"):
        common.token_type_kwargs(tiny.roberta_tokenizer(), bert_teacher)
