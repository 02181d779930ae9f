"""Token counts: equal to a collections.Counter, saved without pickle, cached, bad vocab sizes refused."""

import json
from collections import Counter

import numpy as np
import pytest

import tiny
from distil_trainer.cli import main
from distil_trainer.data import binarize, compute_token_counts, count_tokens, load_token_counts


@pytest.fixture(scope="module")
def binarized(tmp_path_factory):
    d = tmp_path_factory.mktemp("tc")
    (d / "wiki.txt").write_text("\n".join(tiny.real_lines(150)) + "\n", encoding="utf-8")
    return binarize(d / "data", tiny.bert_tokenizer(), file_path=d / "wiki.txt", max_length=64, num_proc=2,
                    verbose=False)


def counter_vector(rows, size):
    c = Counter(t for row in rows for t in row)
    out = np.zeros(size, dtype=np.int64)
    for tok, n in c.items():
        out[tok] = n
    return out


def test_counts_equal_counter(binarized):
    from datasets import concatenate_datasets

    ds = concatenate_datasets([binarized.dataset, binarized.dataset.select(range(7)).flatten_indices()])
    assert len(ds.data.column("input_ids").chunks) >= 2  # counting crosses Arrow chunk boundaries
    counts = count_tokens(ds, 30522)
    assert counts.dtype == np.int64 and counts.shape == (30522,)
    np.testing.assert_array_equal(counts, counter_vector(ds["input_ids"], 30522))
    view = ds.select(range(3, len(ds), 2))  # an indices mapping over the shards
    np.testing.assert_array_equal(count_tokens(view, 30522), counter_vector(view["input_ids"], 30522))
    sliced = ds.shard(num_shards=3, index=1, contiguous=True)  # offsets inside Arrow chunks
    np.testing.assert_array_equal(count_tokens(sliced, 30522), counter_vector(sliced["input_ids"], 30522))


@pytest.mark.reliability(fault="vocabulary larger than the count vector", outcome="clear error with the fix (recount with --vocab_size)")
def test_vocabulary_larger_than_vector_is_refused(binarized):
    with pytest.raises(ValueError, match="vocabulary is larger"):
        count_tokens(binarized.dataset, 1000)


def test_saved_without_pickle_and_cached(binarized, tmp_path):
    out = tmp_path / "counts.npy"
    first = compute_token_counts(binarized.output_dir, out)
    assert not first.cache_hit
    loaded = np.load(out, allow_pickle=False)
    np.testing.assert_array_equal(loaded, counter_vector(binarized.dataset["input_ids"], 30522))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["vocab_size"] == 30522 and meta["total_tokens"] == binarized.stats.tokens
    mtime = out.stat().st_mtime_ns
    second = compute_token_counts(binarized.output_dir, out)
    assert second.cache_hit and out.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="another dataset or vocab_size"):
        compute_token_counts(binarized.output_dir, out, vocab_size=40000)
    third = compute_token_counts(binarized.output_dir, out, vocab_size=40000, overwrite=True)
    assert not third.cache_hit and load_token_counts(out).shape == (40000,)
    with open(out, "r+b") as f:  # damaged counts are recomputed, not used
        f.truncate(100)
    assert not compute_token_counts(binarized.output_dir, out, vocab_size=40000).cache_hit
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_and_missing_data(binarized, tmp_path, capsys):
    assert main(["token-counts", "--data_file", str(binarized.output_dir),
                 "--token_counts_dump", str(tmp_path / "c.npy")]) == 0
    assert "tokens" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="binarize"):
        compute_token_counts(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="token-counts"):
        load_token_counts(tmp_path / "none.npy")
