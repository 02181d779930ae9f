"""Training from a teacher cache equals online training (the same logged losses and the same update) for the heads
and vocabularies not covered by test_teacher_cache_train.py: a masked LM whose head has more rows than its tokenizer
(padded vocabularies, as Qwen2.5, Pythia and Phi ship), a student padded narrower than the teacher, extractive QA and
token classification; and the top-k KL restricted to a shared vocabulary range against a plain formula."""

import pytest
import torch
from datasets import Dataset

import tiny
from test_accumulation import PadCollator
from test_teacher_cache_train import MLM_WEIGHTS, assert_same_training, online_rows, token_rows, train
from distil_trainer.data import MaskedLMCollator
from distil_trainer.teacher_cache import build_teacher_cache
from distil_trainer.teacher_cache.outputs import CachedTeacherOutput, topk_kl_sums

NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TOKENS = 30522  # len(tiny.bert_tokenizer())
PADDED = 30720  # the head padded to a multiple of 256 rows: 198 rows no token maps to
MLM_LOSSES = ("loss", "loss_ce", "loss_mlm", "loss_cos", "teacher_agreement")


# ---- padded vocabularies ----

def padded_teacher(rows=PADDED):
    return tiny.tiny_bert_mlm(vocab_size=rows, layers=2, **NO_DROPOUT_BERT)


def padded_student(rows=PADDED):
    return tiny.tiny_distilbert_mlm(vocab_size=rows, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory):
    """Every logit (k = V) of a teacher whose head has 198 rows past its tokenizer, float32, at the masked
    positions, with the last hidden layer."""
    tok = tiny.bert_tokenizer()
    assert len(tok) == TOKENS
    collator = MaskedLMCollator(tok, mlm_smoothing=0.0, seed=4)
    return build_teacher_cache(padded_teacher(), token_rows(tok, 16), tmp_path_factory.mktemp("padded") / "cache",
                               tok, top_k=None, dtype="float32", hidden_layers=[-1], mlm_collator=collator,
                               batch_size=4, verbose=False)


def test_the_cache_keeps_every_row_of_a_padded_head(padded_cache):
    """The padded rows take part in the teacher's softmax: the stored logsumexp is over all 30720 logits."""
    assert padded_cache.identity["vocab_size"] == padded_cache.identity["top_k"] == PADDED
    tok = tiny.bert_tokenizer()
    row = padded_cache.epoch(0)[0]
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logits = padded_teacher()(input_ids=ids).logits[0, row["teacher_positions"]].double()
    torch.testing.assert_close(torch.tensor(row["teacher_logsumexp"]).double(), torch.logsumexp(logits, -1),
                               rtol=1e-6, atol=1e-5)
    assert torch.logsumexp(logits[:, :len(tok)], -1).lt(torch.logsumexp(logits, -1) - 1e-3).all()


@pytest.mark.parametrize("extra", [{}, {"alpha_mse": 0.01}], ids=["top-k path", "dense path"])
def test_padded_vocabulary_from_the_cache_equals_online(padded_cache, tmp_path, extra):
    """Teacher and student both padded to 30720 rows: online, the KL and L_mse run over all 30720 logits; from
    the cache too (the top-k path of L_ce on the student's masked rows, or the dense logits with alpha_mse)."""
    tok = tiny.bert_tokenizer()
    weights = {**MLM_WEIGHTS, **extra}
    online = train(tmp_path / "online", padded_student(), teacher_model=padded_teacher(),
                   train_dataset=online_rows(padded_cache), data_collator=PadCollator(tok.pad_token_id), **weights)
    cached = train(tmp_path / "cached", padded_student(), teacher_cache=padded_cache, processing_class=tok, **weights)
    assert cached[2]._shared_vocab is None and online[2]._shared_vocab is None
    assert_same_training(online, cached, MLM_LOSSES + (("loss_mse",) if extra else ()))


@pytest.mark.parametrize("extra", [{}, {"alpha_mse": 0.01}], ids=["top-k path", "dense path"])
def test_a_student_padded_narrower_than_the_cache_compares_the_shared_range_as_online(padded_cache, tmp_path, extra):
    """Student 30600 rows, teacher 30720: online compares the first 30600 logits of each (shared_vocab_size); from
    the cache the teacher's stored entries past 30600 are left out the same way."""
    tok = tiny.bert_tokenizer()
    weights = {**MLM_WEIGHTS, **extra}
    online = train(tmp_path / "online", padded_student(30600), teacher_model=padded_teacher(),
                   train_dataset=online_rows(padded_cache), data_collator=PadCollator(tok.pad_token_id),
                   processing_class=tok, teacher_processing_class=tok, **weights)
    cached = train(tmp_path / "cached", padded_student(30600), teacher_cache=padded_cache, processing_class=tok,
                   **weights)
    assert online[2]._shared_vocab == cached[2]._shared_vocab == 30600
    assert_same_training(online, cached, MLM_LOSSES + (("loss_mse",) if extra else ()))


def test_a_student_narrower_than_the_tokenizer_is_refused(padded_cache, tmp_path):
    from distil_trainer import DistillationArguments, DistillationTrainer
    from test_accumulation import ALL_ZERO

    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{**ALL_ZERO, **MLM_WEIGHTS})
    with pytest.raises(ValueError, match=r"logits span 30720 entries and the student's head 30000.*30522 tokens"):
        DistillationTrainer(model=padded_student(30000), teacher_cache=padded_cache, args=args,
                            processing_class=tiny.bert_tokenizer())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_kl_over_a_shared_range_is_the_renormalised_kl_of_the_ids_inside_it(T):
    """A top-k holding ids past the student's range: the KL is over the stored ids inside it, renormalised (plain
    float64 per row), and the agreement compares the student's arg-max with the highest in-range teacher id."""
    g = torch.Generator().manual_seed(0)
    V_teacher, V_shared, k = 50, 40, 12
    teacher = torch.randn(3, 4, V_teacher, generator=g) * 3
    teacher[..., V_shared:] += 4.0  # the padded rows rank high: several of them in every top k
    student = torch.randn(3, 4, V_shared, generator=g) * 3
    mask = torch.rand(3, 4, generator=g) > 0.3
    top = teacher.topk(k, dim=-1)
    out = CachedTeacherOutput(topk_ids=top.indices, topk_logits=top.values)
    sums, (agree, n) = topk_kl_sums(student, out, T, mask, vocab_size=V_shared, teacher_wider=True)
    expected, expected_agree = 0.0, 0
    for b, i in torch.nonzero(mask).tolist():
        ids, z = top.indices[b, i], top.values[b, i].double()
        inside = ids < V_shared
        assert 0 < int(inside.sum()) < k  # the case under test: some stored ids fall outside the range
        p = torch.softmax(z[inside] / T, -1)
        log_q = torch.log_softmax(student[b, i].double() / T, -1)[ids[inside]]
        expected += float((p * (p.log() - log_q)).sum()) * T**2
        expected_agree += int(student[b, i].argmax() == ids[inside][0])
    assert sums["ce"].item() == pytest.approx(expected, rel=1e-5)
    assert (int(agree), n) == (expected_agree, int(mask.sum()))


# ---- extractive QA and token classification ----

def qa_rows(tok, n=16):
    """Question/context pairs with token_type_ids and an answer span inside the context."""
    lines = tiny.real_lines(2 * n, min_words=6)
    rows = []
    for i in range(n):
        enc = tok(lines[2 * i][:60], lines[2 * i + 1], truncation=True, max_length=14 + (i * 5) % 24)
        context = [j for j, t in enumerate(enc["token_type_ids"]) if t == 1][:-1]  # the context, not its [SEP]
        start = context[i % len(context)]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "token_type_ids": enc["token_type_ids"], "start_positions": start,
                     "end_positions": min(start + 2, context[-1])})
    return Dataset.from_list(rows)


class QACollator(PadCollator):
    def __call__(self, features):
        batch = super().__call__(features)
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([f[key] for f in features])
        return batch


def test_question_answering_from_the_cache_equals_online(tmp_path):
    tok = tiny.bert_tokenizer()
    data = qa_rows(tok)
    teacher = tiny.tiny_bert_qa(**NO_DROPOUT_BERT)
    cache = build_teacher_cache(teacher, data, tmp_path / "cache", tok, dtype="float32", verbose=False)
    assert cache.identity["head"] == "question_answering"
    assert cache.epoch(0)["start_positions"] == data["start_positions"]
    make = lambda: tiny.tiny_bert_qa(layers=1, seed=8, **NO_DROPOUT_BERT)  # noqa: E731
    weights = dict(alpha_ce=1.0, alpha_mse=0.5, alpha_task=1.0, temperature=2.0)
    online = train(tmp_path / "online", make(), teacher_model=teacher, train_dataset=data,
                   data_collator=QACollator(tok.pad_token_id), **weights)
    cached = train(tmp_path / "cached", make(), teacher_cache=cache, processing_class=tok, **weights)
    assert_same_training(online, cached, ("loss", "loss_ce", "loss_mse", "loss_task", "teacher_agreement"))


NUM_TAGS = 5


def tagging_rows(tok, n=16):
    """Per-token tags (-100 on special tokens and every third token, as a word's later sub-tokens) and a
    distillation mask on the tagged tokens."""
    rows = []
    for i, line in enumerate(tiny.real_lines(n, min_words=4)):
        enc = tok(line, truncation=True, max_length=8 + (i * 7) % 30)
        n_ids = len(enc["input_ids"])
        labels = [-100 if j in (0, n_ids - 1) or j % 3 == 2 else (j + i) % NUM_TAGS for j in range(n_ids)]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "token_type_ids": enc["token_type_ids"], "labels": labels,
                     "distillation_mask": [int(label != -100) for label in labels]})
    return Dataset.from_list(rows)


class TaggingCollator(PadCollator):
    def __call__(self, features):
        batch = super().__call__(features)
        width = batch["input_ids"].shape[1]
        batch["distillation_mask"] = torch.tensor([f["distillation_mask"] + [0] * (width - len(f["distillation_mask"]))
                                                   for f in features])
        return batch


def tiny_tagger(layers=2, seed=9):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=128,
                                                 num_labels=NUM_TAGS, **NO_DROPOUT_BERT)).eval()


def test_token_classification_from_the_cache_equals_online(tmp_path):
    tok = tiny.bert_tokenizer()
    data = tagging_rows(tok)
    teacher = tiny_tagger()
    cache = build_teacher_cache(teacher, data, tmp_path / "cache", tok, dtype="float32", verbose=False)
    assert cache.identity["head"] == "token_classification"
    stored = cache.epoch(0)
    assert stored["labels"] == data["labels"] and stored["distillation_mask"] == data["distillation_mask"]
    weights = dict(alpha_ce=1.0, alpha_mse=0.5, alpha_task=1.0, temperature=2.0)
    online = train(tmp_path / "online", tiny_tagger(1, seed=10), teacher_model=teacher, train_dataset=data,
                   data_collator=TaggingCollator(tok.pad_token_id), **weights)
    cached = train(tmp_path / "cached", tiny_tagger(1, seed=10), teacher_cache=cache, processing_class=tok, **weights)
    assert_same_training(online, cached, ("loss", "loss_ce", "loss_mse", "loss_task", "teacher_agreement"))
