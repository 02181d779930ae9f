"""Property-based tests: arbitrary text through the binarizer, arbitrary batches through the collators."""

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from distil_trainer.data import CausalLMCollator, MaskedLMCollator, binarize
from distil_trainer.data.sequence_rules import KEPT, SequenceRules, encode_batch
from distil_trainer.data.text_input import DecodeReport, iter_lines

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text_lines = st.lists(st.one_of(st.text(max_size=300), st.just(""), st.text(" \t\r\x0b\x0c\u00a0\u2028", max_size=5),
                                st.text(st.characters(codec="utf-8", categories=["Cc", "Zs", "So", "Lo"]), max_size=80)),
                      min_size=1, max_size=12)


@FUZZ
@given(lines=text_lines, max_length=st.integers(12, 40), which=st.sampled_from(["bert", "roberta", "gpt2"]))
def test_encode_rules_invariants(lines, max_length, which):
    tok = getattr(tiny, f"{which}_tokenizer")()
    begin = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    rules = SequenceRules(begin_id=begin, end_id=end, max_length=max_length, unk_id=None)
    out = encode_batch({"text": lines}, tok, rules, "text")
    for seq, length, status in zip(out["input_ids"], out["length"], out["status"]):
        assert seq[0] == begin and seq[-1] == end and len(seq) == length <= max_length
        assert all(0 <= t < len(tok) for t in seq)
        assert (status == KEPT) == (length >= 12)
    inner = [t for seq in out["input_ids"] for t in seq[1:-1]]
    expected = [t for line in lines
                for t in tok(line.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    assert inner == expected  # splitting loses and duplicates nothing


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.binary(max_size=60), min_size=0, max_size=8))
def test_line_reader_matches_bytes_split(tmp_path_factory, chunks):
    raw = b"\n".join(chunks)
    path = tmp_path_factory.mktemp("raw") / "f.txt"
    path.write_bytes(raw)
    report = DecodeReport()
    got = list(iter_lines([path], report))
    # A leading UTF-8 BOM marks the encoding, it is not text (a file holding only a BOM is empty).
    content = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    expected = content.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()  # a final newline ends the last line, it does not start a new one
    expected = [e[:-1] if e.endswith(b"\r") else e for e in expected]
    assert got == [e.decode("utf-8", errors="replace") for e in expected]
    bad = [i for i, e in enumerate(expected) if _undecodable(e)]
    assert report.lines_with_bad_bytes == len(bad)
    assert report.first_bad == ((str(path), bad[0] + 1) if bad else None)


def _undecodable(b):
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=text_lines, long_words=st.integers(0, 3000))
def test_binarize_end_to_end_never_crashes(tmp_path_factory, lines, long_words):
    d = tmp_path_factory.mktemp("fz")
    lines = lines + [" ".join(["word"] * long_words), "enough ordinary words here to keep one sequence alive ok"]
    (d / "in.txt").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    res = binarize(d / "out", tiny.bert_tokenizer(), file_path=d / "in.txt", max_length=32, verbose=False)
    assert res.stats.kept == len(res.dataset) >= 1
    assert all(12 <= n <= 32 for n in res.dataset["length"])


id_rows = st.lists(st.lists(st.integers(0, 30521), min_size=0, max_size=40), min_size=1, max_size=6)


@FUZZ
@given(rows=id_rows, prop=st.floats(0.01, 1.0), smoothing=st.sampled_from([0.0, 0.7]), seed=st.integers(0, 2**31))
def test_mlm_invariants_on_arbitrary_batches(rows, prop, smoothing, seed):
    tok = tiny.bert_tokenizer()
    counts = np.random.default_rng(seed).integers(0, 1000, size=len(tok))
    collate = MaskedLMCollator(tok, counts, mlm_mask_prop=prop, mlm_smoothing=smoothing,
                               generator=torch.Generator().manual_seed(seed))
    out = collate([{"input_ids": r} for r in rows])
    special = set(tok.all_special_ids)
    chosen = out["labels"] != -100
    candidates = sum(1 for r in rows for t in r if t not in special)
    n_real = sum(map(len, rows))
    assert int(chosen.sum()) == min(math.ceil(prop * n_real), candidates)
    for row, (r, lab, m) in enumerate(zip(rows, out["labels"], out["attention_mask"])):
        assert m.tolist() == [1] * len(r) + [0] * (len(m) - len(r))
        for pos, label in enumerate(lab.tolist()):
            if label != -100:
                assert pos < len(r) and label == r[pos] and r[pos] not in special
                new = int(out["input_ids"][row, pos])
                assert new == tok.mask_token_id or new not in special


@FUZZ
@given(rows=st.lists(st.lists(st.integers(0, 50256), min_size=1, max_size=30), min_size=1, max_size=5))
def test_clm_labels_follow_attention_mask(rows):
    out = CausalLMCollator(tiny.gpt2_tokenizer())([{"input_ids": r} for r in rows])
    for r, ids, lab in zip(rows, out["input_ids"], out["labels"]):
        assert ids[:len(r)].tolist() == r == lab[:len(r)].tolist()
        assert bool((lab[len(r):] == -100).all())
