"""Calibration text: the few thousand tokens on which layer and width importance are measured.

A calibration set is a list of token-id sequences (each at most `max_length` tokens), taken in order from a plain
text file (one sequence per non-empty line, tokenized with the teacher's tokenizer and its special tokens), from a
folder written by `distil-trainer binarize` (the recipe's corpus), or from any dataset with an ``input_ids``
column, until `num_tokens` tokens are collected; every source's sequences are cut to `max_length`. Batches are
right-padded; the measurements read the non-padding positions only.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CALIBRATION_TOKENS = 4096
DEFAULT_CALIBRATION_MAX_LENGTH = 256
DEFAULT_CALIBRATION_BATCH_SIZE = 8


@dataclass
class CalibrationSet:
    sequences: list  # lists of token ids, in the order they were read
    pad_id: int = 0  # any id: padded positions are masked out of every measurement
    source: str = "token ids"

    def __post_init__(self):
        self.sequences = [list(map(int, s)) for s in self.sequences if len(s) > 0]
        if not self.sequences:
            raise ValueError(f"The calibration text ({self.source}) holds no tokens; give a file with some text "
                             "(a few thousand tokens are enough).")

    @property
    def num_tokens(self):
        return sum(len(s) for s in self.sequences)

    def describe(self):
        return f"{self.num_tokens:,} tokens in {len(self.sequences)} sequences from {self.source}"

    def batches(self, batch_size=DEFAULT_CALIBRATION_BATCH_SIZE):
        """{"input_ids", "attention_mask"} batches of `batch_size` sequences, right-padded with `pad_id`."""
        for start in range(0, len(self.sequences), batch_size):
            chunk = self.sequences[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    def num_batches(self, batch_size=DEFAULT_CALIBRATION_BATCH_SIZE):
        return -(-len(self.sequences) // batch_size)


def _take(sequences, num_tokens, max_length):
    """Sequences (each cut to `max_length`) in order until `num_tokens` tokens are collected; the last one is cut so
    that the total is exactly `num_tokens` when the source has that many."""
    out, total = [], 0
    for seq in sequences:
        seq = list(seq)[:max_length]
        if not seq:
            continue
        seq = seq[:num_tokens - total]
        out.append(seq)
        total += len(seq)
        if total >= num_tokens:
            break
    return out


def _pad_id(tokenizer):
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def _text_lines(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def _from_text(path, tokenizer, num_tokens, max_length):
    if tokenizer is None:
        raise ValueError(f"Calibration text {str(path)!r} needs the teacher's tokenizer to be read; pass tokenizer=.")

    def encoded():
        for line in _text_lines(path):
            yield tokenizer(line, truncation=True, max_length=max_length)["input_ids"]

    return _take(encoded(), num_tokens, max_length)


def _from_binarized(path, tokenizer, num_tokens, max_length):
    from ..data.binarize import load_binarized, tokenizer_mismatch

    dataset, meta = load_binarized(path)
    if tokenizer is not None:
        problem = tokenizer_mismatch(meta, tokenizer)
        if problem:
            raise ValueError(f"Calibration data {str(path)!r} does not match the teacher's tokenizer: {problem}. "
                             "Give a plain text file instead, or binarize the text with the teacher's tokenizer.")
    return _from_dataset(dataset, num_tokens, max_length)


def _from_dataset(dataset, num_tokens, max_length):
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The calibration dataset has no input_ids column (columns: {dataset.column_names}).")
    return _take((row["input_ids"] for row in dataset), num_tokens, max_length)


def load_calibration(source, tokenizer=None, num_tokens=DEFAULT_CALIBRATION_TOKENS,
                     max_length=DEFAULT_CALIBRATION_MAX_LENGTH):
    """A :class:`CalibrationSet` of the first `num_tokens` tokens of `source`.

    `source`: a plain text file (one sequence per non-empty line; needs `tokenizer`), a folder written by
    `distil-trainer binarize` (checked against `tokenizer` when given), a ``datasets.Dataset`` with ``input_ids``,
    or a list of token-id lists. Each sequence is cut to `max_length` tokens.
    """
    from ..data.binarize import is_binarized_dir

    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"calibration_tokens must be a positive number of tokens (got {num_tokens!r}).")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"The calibration max_length must be at least 2 tokens (got {max_length!r}).")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if is_binarized_dir(path):
            sequences, name = _from_binarized(path, tokenizer, num_tokens, max_length), f"binarized data {path}"
        elif path.is_file():
            sequences, name = _from_text(path, tokenizer, num_tokens, max_length), str(path)
        else:
            raise FileNotFoundError(f"Calibration file {str(path)!r} does not exist (nor is it a folder made by "
                                    "distil-trainer binarize); pass a plain text file or such a folder.")
    elif hasattr(source, "column_names"):
        sequences, name = _from_dataset(source, num_tokens, max_length), "the training data"
    else:
        sequences, name = _take(source, num_tokens, max_length), "token ids"
    return CalibrationSet(sequences, pad_id=_pad_id(tokenizer), source=name)
