"""Atomic outputs get the modes a plain open()/mkdir() would give them (the umask), not mkstemp's private 0600,
so other users of a shared cache or output folder can read them."""

import os
import stat

import pytest

import tiny
from distil_trainer.atomic import atomic_directory, current_umask, write_text_atomic
from distil_trainer.data import METADATA_FILE, binarize, compute_token_counts


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_text_file_mode_follows_the_umask(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the umask gives an ordinary file
    write_text_atomic(tmp_path / "atomic.txt", "x")
    assert mode(tmp_path / "atomic.txt") == mode(plain) == 0o666 & ~umask


def test_replacing_a_file_keeps_the_umask_mode(tmp_path, umask):
    target = tmp_path / "card.md"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o666 & ~umask


def test_directory_mode_follows_the_umask(tmp_path, umask):
    with atomic_directory(tmp_path / "student") as d:
        (d / "weights").write_text("w")
    assert mode(tmp_path / "student") == 0o777 & ~umask


def test_shared_data_cache_is_readable_by_others(tmp_path):
    # umask 022, the usual one: every file of a binarized folder and its token counts is world-readable, so
    # another user's run reuses the cache instead of rebuilding over it.
    old = os.umask(0o022)
    try:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(tiny.real_lines(40)) + "\n")
        out = tmp_path / "data"
        binarize(out, tiny.bert_tokenizer(), file_path=corpus, max_length=64, verbose=False)
        compute_token_counts(out)
    finally:
        os.umask(old)
    assert mode(out / METADATA_FILE) == 0o644
    for path in out.rglob("*"):
        assert mode(path) & 0o044 == 0o044, path
