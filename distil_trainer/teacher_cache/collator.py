"""`CachedTeacherCollator`: pads rows of a teacher-output cache into a batch with dense teacher tensors.

A cache row holds what the teacher saw (`input_ids`, already masked for MLM), the targets, and the teacher's
outputs (see docs/teacher_cache.md, "Teacher-output cache"). The batch gets the usual padded student inputs and
targets, and:
`teacher_topk_ids` [B, L, k] long / `teacher_topk_logits` [B, L, k] float32 / `teacher_cached_mask` [B, L] bool
(LM caches: the positions that have top-k), `teacher_logits` (classification: [B, C]; token classification:
[B, L, C]), `teacher_start_logits` / `teacher_end_logits` [B, L] (QA) and `teacher_hidden.<i>` [B, L, H] float32.
"""

import numpy as np
import torch

from ..data.collators import IGNORE_INDEX, _pad_value, pad_batch
from ..model_utils import CAUSAL_LM, LM_HEADS, MASKED_LM, TOKEN_CLASSIFICATION

HIDDEN_PREFIX = "teacher_hidden."
CACHED_MASK_KEY = "teacher_cached_mask"
# Per-position teacher columns padded to [B, L, ...] with zeros (the masks keep padding out of every term).
_POSITION_COLUMNS = ("teacher_start_logits", "teacher_end_logits")
_EXAMPLE_LABELS = ("start_positions", "end_positions")


def _array(value, dtype):
    return np.asarray(value, dtype=dtype)


def _pad_rows(values, width, fill, dtype):
    """[B, width, ...] tensor from per-row arrays of [n_i, ...], padded with `fill`."""
    arrays = [_array(v, dtype) for v in values]
    tail = next((a.shape[1:] for a in arrays if a.size), arrays[0].shape[1:])
    out = np.full((len(arrays), width, *tail), fill, dtype=dtype)
    for row, a in enumerate(arrays):
        if a.size:
            out[row, :a.shape[0]] = a
    return torch.from_numpy(out)


class CachedTeacherCollator:
    """Collates teacher-output cache rows for `DistillationTrainer(teacher_cache=...)`.

    Args:
        tokenizer: the data's tokenizer (for the pad id), or the pad id itself; padding content is hidden by the
            attention mask, so 0 serves when there is none.
        head: the cache's head ("masked_lm", "causal_lm", "sequence_classification", "question_answering",
            "token_classification").
        top_k: k of an LM cache, for a batch in which no row has a cached position.
    """

    def __init__(self, tokenizer=None, head=MASKED_LM, top_k=None, pad_to_multiple_of=None):
        self.pad_id = tokenizer if isinstance(tokenizer, int) else (0 if tokenizer is None else _pad_value(tokenizer))
        self.head = head
        self.top_k = top_k
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        input_ids, attention_mask = pad_batch(features, self.pad_id, self.pad_to_multiple_of)
        width = input_ids.shape[1]
        first = features[0]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in ("token_type_ids", "distillation_mask"):
            if key in first:
                batch[key] = _pad_rows([f[key] for f in features], width, 0, np.int64)
        batch.update(self._labels(features, input_ids, attention_mask))
        if self.head in LM_HEADS:
            batch.update(self._topk(features, width))
        elif "teacher_logits" in first:
            logits = [f["teacher_logits"] for f in features]
            batch["teacher_logits"] = (_pad_rows(logits, width, 0.0, np.float32) if self.head == TOKEN_CLASSIFICATION
                                       else torch.from_numpy(np.stack([_array(x, np.float32) for x in logits])))
        for key in _POSITION_COLUMNS:
            if key in first:
                batch[key] = _pad_rows([f[key] for f in features], width, 0.0, np.float32)
        for key in sorted(k for k in first if k.startswith(HIDDEN_PREFIX)):
            batch[key] = _pad_rows([f[key] for f in features], width, 0.0, np.float32)
        return batch

    def _labels(self, features, input_ids, attention_mask):
        first = features[0]
        if self.head == CAUSAL_LM:  # as CausalLMCollator: every real token is a target
            return {"labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)}
        out = {}
        label_key = "labels" if "labels" in first else ("label" if "label" in first else None)
        if label_key is not None:
            values = [f[label_key] for f in features]
            if self.head in (MASKED_LM, TOKEN_CLASSIFICATION):  # per token, padded with -100
                out["labels"] = _pad_rows(values, input_ids.shape[1], IGNORE_INDEX, np.int64)
            else:  # one per example (a float for regression), as transformers' DataCollatorWithPadding makes it
                out["labels"] = torch.as_tensor(np.asarray(values))
        for key in _EXAMPLE_LABELS:
            if key in first:
                out[key] = torch.as_tensor(np.asarray([f[key] for f in features]), dtype=torch.long)
        return out

    def _topk(self, features, width):
        if "teacher_topk_ids" not in features[0]:
            raise ValueError("The batch has no 'teacher_topk_ids': these rows are not from an LM teacher-output cache. "
                             "Train on cache.train_dataset() (the default when train_dataset is not given).")
        ids = [_array(f["teacher_topk_ids"], np.int64) for f in features]
        k = next((a.shape[-1] for a in ids if a.size), self.top_k or 1)
        batch_size = len(features)
        topk_ids = torch.zeros(batch_size, width, k, dtype=torch.long)
        topk_logits = torch.zeros(batch_size, width, k, dtype=torch.float32)
        cached = torch.zeros(batch_size, width, dtype=torch.bool)
        for row, f in enumerate(features):
            positions = torch.from_numpy(_array(f["teacher_positions"], np.int64))
            if positions.numel() == 0:
                continue
            topk_ids[row, positions] = torch.from_numpy(ids[row].reshape(-1, k))
            topk_logits[row, positions] = torch.from_numpy(_array(f["teacher_topk_logits"], np.float32).reshape(-1, k))
            cached[row, positions] = True
        return {"teacher_topk_ids": topk_ids, "teacher_topk_logits": topk_logits, CACHED_MASK_KEY: cached}
