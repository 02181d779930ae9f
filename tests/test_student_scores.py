"""The scores that say whether a student is any good (pipeline/student_scores.py, score_text.py), each checked
against an independent computation: numpy mean pooling, cosine and a hand-made Spearman (average ranks for ties),
and a plain full forward of the models for the masked-token figures."""

import csv

import numpy as np
import pytest
import torch

import tiny
from distil_trainer.data.collators import MaskedLMCollator
from distil_trainer.pipeline import student_scores as ss
from distil_trainer.pipeline.score_text import result_line, scores_notes, scores_table

STSB_DEV = tiny.SHARED_DATA / "glue" / "STS-B" / "dev.tsv"


def _ranks(values):
    """1-based ranks, ties sharing their average rank (by hand, no scipy)."""
    values = list(values)
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return np.array(ranks)


def _spearman_by_hand(x, y):
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


def _write_stsb(path, rows):
    """A GLUE-layout STS-B tsv (10 columns, score last) with a BOM, as a released file may have."""
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        f.write("\t".join(header) + "\n")
        for i, (a, b, score) in enumerate(rows):
            f.write("\t".join([str(i), "main", "x", "2012", str(i), "none", "none", a, b, f"{score:.3f}"]) + "\n")
    return path


def _real_pairs(n):
    with open(STSB_DEV, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:n + 1]
    a, b, s = (header.index(c) for c in ("sentence1", "sentence2", "score"))
    return [(r[a], r[b], float(r[s])) for r in body]


def test_mean_pool_weights_only_real_tokens():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = ss.mean_pool(hidden, mask)
    h = hidden.numpy()
    expected = np.stack([h[0, :2].mean(0), h[1].mean(0)])
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_spearman_matches_hand_ranks_with_ties():
    x = [0.3, 0.1, 0.1, 0.9, 0.5, 0.5, 0.2]
    y = [1.0, 2.0, 2.0, 5.0, 3.0, 4.0, 0.0]
    assert ss.spearman(x, y) == pytest.approx(_spearman_by_hand(x, y), abs=1e-12)


def test_stsb_spearman_of_a_tiny_model_equals_an_independent_computation(tmp_path):
    pairs = _real_pairs(24)
    path = _write_stsb(tmp_path / "dev.tsv", pairs)
    stsb = ss.read_stsb_tsv(path)
    assert stsb["sentence1"][0] == pairs[0][0] and stsb["score"] == [p[2] for p in pairs]
    model, tok = tiny.tiny_bert_mlm(layers=2), tiny.bert_tokenizer()
    got = ss.stsb_spearman(model, tok, stsb)

    def embedding(sentence):  # one sentence at a time: no padding, so a plain mean over its tokens
        ids = tok(sentence, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return model.bert(input_ids=ids).last_hidden_state[0].numpy().mean(0)

    cosines = []
    for a, b, _ in pairs:
        u, v = embedding(a), embedding(b)
        cosines.append(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    assert got == pytest.approx(_spearman_by_hand(cosines, [p[2] for p in pairs]), abs=1e-5)


def test_stsb_reader_keeps_quotes_and_names_a_wrong_file(tmp_path):
    path = _write_stsb(tmp_path / "dev.tsv", [('He said "no".', "A 'quoted' one", 2.5)])
    assert ss.read_stsb_tsv(path)["sentence1"] == ['He said "no".']
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="sentence1/sentence2/score"):
        ss.read_stsb_tsv(bad)
    with pytest.raises(FileNotFoundError, match="stsb_file"):
        ss.read_stsb_tsv(tmp_path / "missing.tsv")


def test_stsb_offline_without_a_file_is_reported_not_raised(monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what load_dataset does offline with nothing cached
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    pairs, source, why = ss.load_stsb(None)
    assert pairs is None and source is None
    assert "STS-B was unavailable (Couldn't reach 'nyu-mll/glue'" in why and "--stsb_file" in why


def _heldout_setup():
    tok = tiny.bert_tokenizer()
    rows = ss.read_heldout_lines(tiny.real_lines(10), tok, max_length=48)
    collator = MaskedLMCollator(tok, mlm_smoothing=0.0, seed=5)
    return tok, rows, collator


def test_fidelity_of_the_teacher_to_itself_is_perfect():
    _, rows, collator = _heldout_setup()
    teacher = tiny.tiny_bert_mlm(layers=2)
    figures = ss.heldout_fidelity({"teacher": teacher}, teacher, rows, collator)["teacher"]
    assert figures["token_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert figures["sentence_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert figures["top1_agreement"] == 1.0


@pytest.mark.parametrize("make_student", [lambda: tiny.tiny_bert_mlm(layers=1, seed=7),
                                          lambda: tiny.tiny_distilbert_mlm(layers=1, seed=8)])
def test_fidelity_figures_equal_a_plain_full_forward(make_student):
    _, rows, collator = _heldout_setup()
    teacher, student = tiny.tiny_bert_mlm(layers=2), make_student()
    got = ss.heldout_fidelity({"student": student}, teacher, rows, collator, batch_size=4)["student"]

    # Independently: one sequence at a time (no padding), full MLM logits, masks as the collator drew them per batch.
    token_cos, sent_cos, agree, loss, correct, n_tok, n_masked = [], [], 0, 0.0, 0, 0, 0
    for start in range(0, len(rows), 4):
        batch = collator(rows[start:start + 4])
        for i in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][i].sum())
            masked_ids = batch["input_ids"][i, :length][None]
            labels = batch["labels"][i, :length]
            original = torch.where(labels != -100, labels, masked_ids[0])[None]
            with torch.no_grad():
                t_h = teacher.base_model(input_ids=original).last_hidden_state[0].numpy()
                s_h = student.base_model(input_ids=original).last_hidden_state[0].numpy()
                t_logits = teacher(input_ids=masked_ids).logits[0][labels != -100]
                s_logits = student(input_ids=masked_ids).logits[0][labels != -100]
            token_cos += list((t_h * s_h).sum(1) / np.linalg.norm(t_h, axis=1) / np.linalg.norm(s_h, axis=1))
            t_mean, s_mean = t_h.mean(0), s_h.mean(0)
            sent_cos.append(t_mean @ s_mean / np.linalg.norm(t_mean) / np.linalg.norm(s_mean))
            y = labels[labels != -100]
            log_probs = s_logits - torch.logsumexp(s_logits, -1, keepdim=True)
            loss += float(-log_probs[torch.arange(len(y)), y].sum())
            agree += int((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
            correct += int((s_logits.argmax(-1) == y).sum())
            n_masked += len(y)
    assert got["token_cosine"] == pytest.approx(float(np.mean(token_cos)), abs=1e-4)
    assert got["sentence_cosine"] == pytest.approx(float(np.mean(sent_cos)), abs=1e-4)
    assert got["mlm_loss"] == pytest.approx(loss / n_masked, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / n_masked)
    assert got["mlm_accuracy"] == pytest.approx(correct / n_masked)


def test_fidelity_from_unmasked_batches_pools_as_told_and_has_no_mlm_figures():
    """The embedding objective's collator masks nothing: only the embedding cosines, sentences pooled by CLS here."""
    from distil_trainer.data.collators import PaddingCollator
    from distil_trainer.sentence_embedding import Pooling

    tok, rows, _ = _heldout_setup()
    teacher, student = tiny.tiny_bert_mlm(layers=2), tiny.tiny_bert_mlm(layers=1, seed=7)
    got = ss.heldout_fidelity({"student": student}, teacher, rows, PaddingCollator(tok), batch_size=4,
                              pooling=Pooling("cls", True))["student"]
    assert set(got) == {"token_cosine", "sentence_cosine"}
    sent_cos = []
    for row in rows:  # one sequence at a time, no padding: the first position's vectors
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            t, s = (m.base_model(input_ids=ids).last_hidden_state[0, 0].numpy() for m in (teacher, student))
        sent_cos.append(t @ s / np.linalg.norm(t) / np.linalg.norm(s))
    assert got["sentence_cosine"] == pytest.approx(float(np.mean(sent_cos)), abs=1e-4)


def test_result_line_uses_stsb_else_heldout_fidelity():
    with_stsb = {"models": {"teacher": {"stsb_spearman": 0.80}, "student_init": {"stsb_spearman": 0.60},
                            "student": {"stsb_spearman": 0.76}}}
    line = result_line(with_stsb, 2.0, 0.77)
    assert "keeps 95.0% of the teacher's STS-B score" in line and "2.00x speed" in line
    # (76 - 60) / (80 - 60) of the gap closed, in Spearman points x100
    assert "distillation added +16.0 points over the extracted student (60.0), closing 80% of its gap" in line
    without = {"models": {"teacher": {"sentence_cosine": 1.0}, "student_init": {"sentence_cosine": 0.8},
                          "student": {"sentence_cosine": 0.9}},
               "stsb_unavailable": "STS-B was unavailable (offline); pass --stsb_file ..."}
    line = result_line(without, 2.0, 0.77)
    assert "STS-B unavailable" in line and "90.0%" in line and "80.0%" in line
    assert "STS-B was unavailable" in " ".join(scores_notes(without))
    table = "\n".join(scores_table(with_stsb))
    assert "| distilled student | 76.0 |" in table and "| teacher | 80.0 |" in table
