"""Binarization: the original sequence rules, special-token wrapping, caching, atomicity and bad input."""

import os
from pathlib import Path

import pytest

import tiny
from distil_trainer.cli import main
from distil_trainer.data import METADATA_FILE, binarize, load_binarized
from distil_trainer.data.sequence_rules import DROPPED_SHORT, DROPPED_UNK, KEPT, SequenceRules, apply_rules

BEGIN, END, UNK = 1, 2, 3


def write_lines(path, lines):
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("text") / "wiki.txt", [""] + tiny.real_lines(120) + ["", "short line"])


# ---- the rules on hand-made sequences -------------------------------------------------------------------------
def test_boundary_lengths_11_12_max_and_max_plus_one():
    rules = SequenceRules(begin_id=BEGIN, end_id=END, max_length=20, unk_id=UNK)
    inner = lambda n: list(range(10, 10 + n))  # noqa: E731
    # wrapped lengths: 11 (dropped), 12 (kept), 20 = max (kept whole), 21 = max+1 (split), 40 (split in 3)
    out = apply_rules([inner(9), inner(10), inner(18), inner(19), inner(38)], rules)
    assert out["length"] == [11, 12, 20, 20, 3, 20, 20, 4]
    assert out["status"] == [DROPPED_SHORT, KEPT, KEPT, KEPT, DROPPED_SHORT, KEPT, KEPT, DROPPED_SHORT]
    assert out["from_split"] == [False, False, False, True, True, True, True, True]
    assert out["input_ids"][3] == [BEGIN] + inner(18) + [END]
    assert out["input_ids"][4] == [BEGIN, 10 + 18, END]
    assert out["input_ids"][7] == [BEGIN, 10 + 36, 10 + 37, END]
    for seq, length in zip(out["input_ids"], out["length"]):
        assert seq[0] == BEGIN and seq[-1] == END and len(seq) == length <= 20


def test_unknown_share_half_is_dropped():
    rules = SequenceRules(begin_id=BEGIN, end_id=END, max_length=64, unk_id=UNK)
    six_unk = [UNK] * 6 + [50] * 4  # wrapped: 12 tokens, 6 unknown = 50%
    five_unk = [UNK] * 5 + [50] * 5  # 5/12 < 50%
    assert apply_rules([six_unk, five_unk], rules)["status"] == [DROPPED_UNK, KEPT]
    no_rule = SequenceRules(begin_id=BEGIN, end_id=END, max_length=64, unk_id=None)
    assert apply_rules([six_unk], no_rule)["status"] == [KEPT]


def test_rules_validation():
    with pytest.raises(ValueError, match="max_length"):
        SequenceRules(begin_id=1, end_id=2, max_length=2)
    with pytest.raises(ValueError, match="min_length"):
        SequenceRules(begin_id=1, end_id=2, max_length=10, min_length=12)


# ---- real tokenizers ------------------------------------------------------------------------------------------
def _independent_kept(tok, lines, max_length, begin, end):
    """What binarize keeps, computed in a plain loop (unk rule irrelevant on WikiText): the original's length and
    unknown-token thresholds, but chunks cut from the unwrapped sequence, which is not what the original did
    (see test_long_sequences_are_split_unlike_the_original and docs/differences.md)."""
    kept = []
    for line in lines:
        # split_special_tokens: a literal "<unk>" or "[SEP]" in the corpus is text, never a control token
        ids = tok(line.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        step = max_length - 2
        chunks = [ids] if len(ids) + 2 <= max_length else [ids[i:i + step] for i in range(0, len(ids), step)]
        kept += [[begin, *c, end] for c in chunks if len(c) + 2 >= 12]
    return kept


@pytest.mark.parametrize("name,begin,end", [("bert", 101, 102), ("roberta", 50257, 50258), ("gpt2", 50256, 50256)])
def test_wrapping_and_rules_match_plain_loop(tmp_path, wiki_file, name, begin, end):
    tok = getattr(tiny, f"{name}_tokenizer")()
    res = binarize(tmp_path / "out", tok, file_path=wiki_file, max_length=64, verbose=False)
    rows = res.dataset["input_ids"]
    lines = Path(wiki_file).read_text(encoding="utf-8").split("\n")[:-1]
    assert rows == _independent_kept(tok, lines, 64, begin, end)
    assert res.dataset["length"] == [len(r) for r in rows]
    if name == "bert":  # BERT's own wrapping agrees
        assert rows[0] == tok(lines[1])["input_ids"][:64] or len(tok(lines[1])["input_ids"]) > 64
    s = res.stats
    assert s.sequences_read == len(lines) and s.kept == len(rows) and s.tokens == sum(map(len, rows))
    assert s.sequences_split > 0 and s.dropped_short >= 3  # two empty lines and "short line"


@pytest.mark.reliability(fault="cache built with another tokenizer", outcome="never reused: a different fingerprint is refused or rebuilt")
def test_cache_reused_then_invalidated(tmp_path, wiki_file):
    out = tmp_path / "out"
    first = binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    arrow = sorted(out.glob("*.arrow"))
    inodes = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in arrow]
    second = binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in arrow] == inodes
    assert second.dataset["input_ids"] == first.dataset["input_ids"]

    with pytest.raises(ValueError, match="different tokenizer.*--overwrite"):
        binarize(out, tiny.roberta_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    with pytest.raises(ValueError, match="different options"):
        binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=32, verbose=False)
    third = binarize(out, tiny.roberta_tokenizer(), file_path=wiki_file, max_length=64, overwrite=True, verbose=False)
    assert not third.cache_hit and third.dataset[0]["input_ids"][0] == 50257

    changed = write_lines(tmp_path / "changed.txt", tiny.real_lines(30))
    other = tmp_path / "other"
    binarize(other, tiny.bert_tokenizer(), file_path=changed, max_length=64, verbose=False)
    with open(changed, "a", encoding="utf-8") as f:
        f.write("one more line of text that is long enough to be kept by the rules of the original\n")
    with pytest.raises(ValueError, match="different input"):
        binarize(other, tiny.bert_tokenizer(), file_path=changed, max_length=64, verbose=False)


@pytest.mark.reliability(fault="truncated Arrow cache file", outcome="detected by checksum; binarize rebuilds it, the loader refuses it with a message")
def test_truncated_cache_is_rebuilt_and_refused_by_loader(tmp_path, wiki_file, caplog):
    out = tmp_path / "out"
    first = binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    expected = list(first.dataset["input_ids"])  # a plain copy: the file is truncated under its memory map below
    del first
    arrow = sorted(out.glob("*.arrow"))[0]
    with open(arrow, "r+b") as f:
        f.truncate(arrow.stat().st_size // 2)
    with pytest.raises(ValueError, match="damaged.*truncated"):
        load_binarized(out)
    again = binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    assert not again.cache_hit and again.dataset["input_ids"] == expected
    assert "damaged" in caplog.text
    # same size, flipped bytes: caught by the checksum (verify_checksums=True hashes whatever the file's mtime)
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.seek(size - 64)
        f.write(b"\xff" * 16)
    assert not binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verify_checksums=True,
                        verbose=False).cache_hit


def _count_hashes(monkeypatch):
    from distil_trainer.data import cache

    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    return hashed


def test_cache_hit_hashes_only_files_that_changed(tmp_path, wiki_file, monkeypatch):
    out = tmp_path / "out"
    binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    hashed = _count_hashes(monkeypatch)
    assert binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False).cache_hit
    assert hashed == []  # untouched: sizes and modification times match, nothing is read
    # A later write that keeps the size (bytes flipped in place) gives the file another mtime: it is hashed.
    arrow = sorted(out.glob("*.arrow"))[0]
    st = arrow.stat()
    with open(arrow, "r+b") as f:
        f.seek(st.st_size - 64)
        f.write(b"\xff" * 16)
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a write one second later, whatever the clock
    again = binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    assert not again.cache_hit  # detected, rebuilt
    # Checking hashed that one file; the rebuild then hashed each file it wrote, for the new metadata.
    assert hashed[0] == arrow.name and len(hashed) == 1 + len(again.metadata["files"])


def test_same_size_same_mtime_damage_needs_full_verify(tmp_path, wiki_file):
    # The documented limit of the default check: damage that keeps size and mtime (bit rot, or a write undone with
    # utime) is only caught by hashing every file (verify_checksums=True, --full_verify).
    out = tmp_path / "out"
    binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    arrow = sorted(out.glob("*.arrow"))[0]
    st = arrow.stat()
    with open(arrow, "r+b") as f:
        f.seek(st.st_size - 64)
        f.write(b"\xff" * 16)
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        load_binarized(out, verify_checksums=True)
    load_binarized(out)  # sizes and mtimes match: not read
    assert not binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verify_checksums=True,
                        verbose=False).cache_hit


def test_metadata_without_mtimes_is_hashed(tmp_path, wiki_file, monkeypatch):
    # Outputs written before mtimes were recorded are checked by their hashes.
    import json

    out = tmp_path / "out"
    binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    meta = json.loads((out / METADATA_FILE).read_text())
    for info in meta["files"].values():
        del info["mtime_ns"]
    (out / METADATA_FILE).write_text(json.dumps(meta))
    hashed = _count_hashes(monkeypatch)
    assert binarize(out, tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False).cache_hit
    assert sorted(hashed) == sorted(meta["files"])


@pytest.mark.reliability(fault="crash in the middle of binarization", outcome="nothing published; the next run starts clean")
def test_crash_mid_way_leaves_no_output(tmp_path, wiki_file, monkeypatch):
    import datasets

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        binarize(tmp_path / "out", tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    assert os.listdir(tmp_path) == []


def test_metadata_beside_data(tmp_path, wiki_file):
    res = binarize(tmp_path / "out", tiny.bert_tokenizer(), file_path=wiki_file, max_length=64, verbose=False)
    meta = res.metadata
    assert (tmp_path / "out" / METADATA_FILE).is_file()
    assert meta["num_rows"] == len(res.dataset) and meta["tokenizer"]["vocab_size"] == 30522
    assert set(meta["files"]) >= {"state.json", "dataset_info.json"}


def test_folder_input_and_streaming_hub_path_agree(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = tiny.real_lines(40)
    write_lines(folder / "a.txt", lines[:20])
    write_lines(folder / "b.txt", lines[20:])
    (folder / ".hidden").write_text("ignored\n")
    tok = tiny.bert_tokenizer()
    from_folder = binarize(tmp_path / "o1", tok, file_path=folder, max_length=64, num_proc=2, verbose=False)
    streamed = binarize(tmp_path / "o2", tok, dataset_name=str(folder), streaming=True, max_length=64, verbose=False)
    assert from_folder.dataset["input_ids"] == streamed.dataset["input_ids"] == _independent_kept(
        tok, lines, 64, 101, 102)
    assert streamed.stats.sequences_read == 40


def test_pack_blocks_concatenate_kept_sequences(tmp_path, wiki_file):
    tok = tiny.gpt2_tokenizer()
    plain = binarize(tmp_path / "plain", tok, file_path=wiki_file, max_length=1024, verbose=False)
    packed = binarize(tmp_path / "packed", tok, file_path=wiki_file, max_length=1024, pack=64, batch_size=10_000,
                      verbose=False)
    flat = [t for seq in plain.dataset["input_ids"] for t in seq]
    blocks = packed.dataset["input_ids"]
    assert len(blocks) == len(flat) // 64 and all(len(b) == 64 for b in blocks)
    assert [t for b in blocks for t in b] == flat[:len(blocks) * 64]
    assert set(packed.dataset["length"]) == {64}


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.reliability(fault="missing or empty corpus file", outcome="clear error naming the file before any work")
def test_missing_and_empty_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        binarize(tmp_path / "o", tiny.bert_tokenizer(), file_path=tmp_path / "nope.txt", max_length=64, verbose=False)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="input is empty"):
        binarize(tmp_path / "o", tiny.bert_tokenizer(), file_path=tmp_path / "empty.txt", max_length=64, verbose=False)
    write_lines(tmp_path / "blank.txt", ["", "  ", "\t"])
    with pytest.raises(ValueError, match="No sequence survived"):
        binarize(tmp_path / "o", tiny.bert_tokenizer(), file_path=tmp_path / "blank.txt", max_length=64, verbose=False)
    with pytest.raises(ValueError, match="exactly one input"):
        binarize(tmp_path / "o", tiny.bert_tokenizer(), max_length=64, verbose=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.reliability(fault="undecodable bytes in the corpus", outcome="replaced with U+FFFD, counted, first file and line reported")
def test_undecodable_bytes_counted_with_first_location(tmp_path):
    good = tiny.real_lines(5)
    raw = ("\n".join(good[:2]) + "\n").encode() + b"bad \xff\xfe bytes " + good[2].encode() + b"\n" + \
        ("\n".join(good[3:]) + "\n").encode() + b"\xc3 again " + good[0].encode() + b"\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    res = binarize(tmp_path / "o", tiny.bert_tokenizer(), file_path=path, max_length=128, verbose=False)
    assert res.stats.lines_with_bad_bytes == 2
    assert res.stats.first_bad_line == [str(path), 3]
    assert res.stats.sequences_read == 6


@pytest.mark.reliability(fault="a 1 MB line", outcome="split into model-sized chunks, no crash")
def test_one_megabyte_line_is_split(tmp_path):
    line = " ".join(tiny.real_lines(200))
    line = (line + " ") * (1_000_000 // len(line) + 1)
    path = write_lines(tmp_path / "long.txt", [line[:1_000_000]])
    res = binarize(tmp_path / "o", tiny.bert_tokenizer(), file_path=path, max_length=128, verbose=False)
    assert res.stats.sequences_split == 1 and res.stats.kept > 1000
    assert max(res.dataset["length"]) == 128


@pytest.mark.reliability(fault="tokenizer without the needed special tokens", outcome="clear error naming the missing tokens")
def test_tokenizer_without_begin_end_tokens(tmp_path, wiki_file):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tiny.bert_tokenizer().backend_tokenizer)
    with pytest.raises(ValueError, match="no cls/bos or sep/eos"):
        binarize(tmp_path / "o", bare, file_path=wiki_file, max_length=64, verbose=False)


def test_cli_prints_summary(tmp_path, wiki_file, capsys):
    args = ["binarize", "--file_path", wiki_file, "--tokenizer_name", str(tiny.minilm_dir()),
            "--dump_file", str(tmp_path / "o"), "--max_length", "64", "--num_proc", "2"]
    assert main(args) == 0
    assert "built" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cache hit" in out and "sequences read" in out and "dropped short" in out


# bert and roberta both wrapped in the tokenizer's cls/sep tokens (they differed only in the tokenizer class).
@pytest.mark.parametrize("tokenizer_type,ok", [("bert", True), ("roberta", True), ("gpt2", False)])
def test_cli_accepts_the_original_tokenizer_type_flag(tmp_path, wiki_file, capsys, tokenizer_type, ok):
    # The original binarized_data.py took --tokenizer_type; it is accepted and checked against the tokenizer.
    args = ["binarize", "--file_path", wiki_file, "--tokenizer_type", tokenizer_type, "--tokenizer_name",
            str(tiny.minilm_dir()), "--dump_file", str(tmp_path / "o"), "--max_length", "64"]
    assert main(args) == (0 if ok else 2)
    if not ok:
        err = capsys.readouterr().err
        assert f"--tokenizer_type {tokenizer_type} wraps sequences" in err and "['[CLS]', '[SEP]']" in err
        assert not (tmp_path / "o").exists()


def test_tokenizer_type_gpt2_matches_gpt2s_tokenizer(tmp_path, wiki_file):
    from distil_trainer.data.binarize import check_tokenizer_type

    check_tokenizer_type(tiny.gpt2_tokenizer(), "gpt2")
    check_tokenizer_type(tiny.roberta_tokenizer(), "roberta")
    with pytest.raises(ValueError, match="bert wraps sequences in the tokenizer's cls_token/sep_token"):
        check_tokenizer_type(tiny.gpt2_tokenizer(), "bert")


def _original_divide_into_chunks(wrapped, max_len, cls, sep):
    """The original LmSeqsDataset.divide_into_chunks for one sequence: it cut the *wrapped* sequence into
    pieces of max_len - 2 and re-added whichever of [CLS]/[SEP] a piece lacked."""
    if len(wrapped) <= max_len:
        return [wrapped]
    chunks = []
    for i in range(0, len(wrapped), max_len - 2):
        sub = wrapped[i:i + max_len - 2]
        if sub[0] != cls:
            sub = [cls, *sub]
        if sub[-1] != sep:
            sub = [*sub, sep]
        chunks.append(sub)
    return chunks


def test_long_sequences_are_split_unlike_the_original():
    # A documented difference (docs/differences.md): binarize cuts the unwrapped sequence,
    # so every chunk but the last is max_length long; the original cut the wrapped one, so its first chunk was one
    # token shorter and its boundaries fall one token earlier. Both keep every token, in order.
    rules = SequenceRules(begin_id=BEGIN, end_id=END, max_length=20, min_length=1, unk_id=UNK)
    inner = list(range(10, 48))  # 38 tokens: 40 wrapped, twice the maximum
    ours = apply_rules([inner], rules)["input_ids"]
    original = _original_divide_into_chunks([BEGIN, *inner, END], 20, BEGIN, END)
    assert [len(c) for c in ours] == [20, 20, 4]
    assert [len(c) for c in original] == [19, 20, 5]
    for chunks in (ours, original):
        assert all(c[0] == BEGIN and c[-1] == END for c in chunks)
        assert [t for c in chunks for t in c[1:-1]] == inner


def test_cli_full_verify_hashes_every_file(tmp_path, wiki_file, monkeypatch, capsys):
    args = ["binarize", "--file_path", wiki_file, "--tokenizer_name", str(tiny.minilm_dir()),
            "--dump_file", str(tmp_path / "o"), "--max_length", "64"]
    assert main(args) == 0
    hashed = _count_hashes(monkeypatch)
    assert main(args) == 0 and hashed == []
    assert main(args + ["--full_verify"]) == 0
    assert sorted(hashed) == sorted(load_binarized(tmp_path / "o")[1]["files"])
    assert "cache hit" in capsys.readouterr().out
