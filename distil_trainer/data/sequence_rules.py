"""The original DistilBERT sequence rules, as batched functions for `datasets.map`.

Every sequence is wrapped in the tokenizer's begin/end special tokens. Then, as in the original
`LmSeqsDataset`, in this order:
1. sequences longer than `max_length` are split into chunks of `max_length - 2` inner tokens, each
   re-wrapped in begin/end;
2. sequences shorter than `min_length` (12: the original kept `lengths > 11`) are dropped;
3. sequences whose unknown-token share is >= `max_unk_share` (0.5) are dropped.
Dropped rows are not removed here but marked in a `status` column, so that statistics can be read
from the result with Arrow (map workers cannot report counts back) and rows filtered afterwards.
"""

from dataclasses import asdict, dataclass

KEPT, DROPPED_SHORT, DROPPED_UNK = 0, 1, 2
STATUS_COLUMN, SPLIT_COLUMN, CHUNK_COLUMN = "status", "from_split", "chunk"
HELPER_COLUMNS = [STATUS_COLUMN, SPLIT_COLUMN, CHUNK_COLUMN]


@dataclass(frozen=True)
class SequenceRules:
    begin_id: int
    end_id: int
    max_length: int
    min_length: int = 12
    unk_id: int | None = None  # None: no unknown-token rule (e.g. GPT-2's byte-level BPE has no unknowns)
    max_unk_share: float = 0.5

    def __post_init__(self):
        if self.max_length < 3:
            raise ValueError(f"max_length must be at least 3 (begin + one token + end), got {self.max_length}.")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is larger than max_length ({self.max_length}): every "
                             "sequence would be dropped. Lower min_length or raise max_length.")
        if not 0.0 < self.max_unk_share <= 1.0:
            raise ValueError(f"max_unk_share must be in (0, 1], got {self.max_unk_share}.")

    def as_dict(self):
        return asdict(self)


def wrap(inner_ids, rules):
    return [rules.begin_id, *inner_ids, rules.end_id]


def split_long(inner_ids, rules):
    """Wrapped chunks of at most `max_length` tokens: [begin, <= max_length - 2 inner tokens, end]."""
    if len(inner_ids) + 2 <= rules.max_length:
        return [wrap(inner_ids, rules)]
    step = rules.max_length - 2
    return [wrap(inner_ids[i:i + step], rules) for i in range(0, len(inner_ids), step)]


def status_of(seq, rules):
    if len(seq) < rules.min_length:
        return DROPPED_SHORT
    if rules.unk_id is not None and seq.count(rules.unk_id) / len(seq) >= rules.max_unk_share:
        return DROPPED_UNK
    return KEPT


def apply_rules(inner_sequences, rules):
    """Columns (input_ids, length, status, from_split, chunk) for a batch of unwrapped token-id lists."""
    out = {"input_ids": [], "length": [], STATUS_COLUMN: [], SPLIT_COLUMN: [], CHUNK_COLUMN: []}
    for inner in inner_sequences:
        chunks = split_long(inner, rules)
        for index, seq in enumerate(chunks):
            out["input_ids"].append(seq)
            out["length"].append(len(seq))
            out[STATUS_COLUMN].append(status_of(seq, rules))
            out[SPLIT_COLUMN].append(len(chunks) > 1)
            out[CHUNK_COLUMN].append(index)
    return out


def encode_batch(batch, tokenizer, rules, text_column):
    """`datasets.map` function: text -> wrapped, split, rule-marked token ids."""
    texts = [t.strip() if isinstance(t, str) else "" for t in batch[text_column]]
    # split_special_tokens: a literal "[SEP]" or "<mask>" in the corpus is text, not a control token.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                        split_special_tokens=True, verbose=False)["input_ids"]
    return apply_rules(encoded, rules)


def pack_batch(batch, block_size):
    """Concatenate the batch's sequences (each keeping its begin/end tokens) and cut blocks of `block_size`.

    The tail shorter than a block is dropped per batch (as `run_clm`'s `group_texts`), so with the default
    batch of 1000 sequences at most one partial block is lost per 1000 sequences.
    """
    flat = [tok for seq in batch["input_ids"] for tok in seq]
    usable = len(flat) - len(flat) % block_size
    blocks = [flat[i:i + block_size] for i in range(0, usable, block_size)]
    return {"input_ids": blocks, "length": [block_size] * len(blocks)}
