"""Batch collators for distillation: DistilBERT/XLM-style masked LM, causal LM, and plain padding.

All take features with unpadded `input_ids` (lists or tensors; an optional `attention_mask`; other keys
such as the `length` column are ignored) and return padded `input_ids`, `attention_mask` and (the LM ones)
`labels`.
"""

import hashlib
import math

import numpy as np
import torch

IGNORE_INDEX = -100


def _pad_value(tokenizer):
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0  # padding content is irrelevant: the attention mask and -100 labels hide it


def pad_batch(features, pad_id, pad_to_multiple_of=None):
    """(input_ids, attention_mask) LongTensors, right-padded to the longest sequence."""
    if len(features) == 0:
        raise ValueError("Cannot collate an empty batch.")
    ids = [torch.as_tensor(f["input_ids"], dtype=torch.long).flatten() for f in features]
    masks = [torch.as_tensor(f["attention_mask"], dtype=torch.long).flatten() if "attention_mask" in f
             else torch.ones(len(i), dtype=torch.long) for f, i in zip(features, ids)]
    width = max(len(i) for i in ids)
    if pad_to_multiple_of:
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (i, m) in enumerate(zip(ids, masks)):
        input_ids[row, :len(i)] = i
        attention_mask[row, :len(m)] = m
    return input_ids, attention_mask


def _as_counts(token_counts):
    if isinstance(token_counts, (str, bytes)) or hasattr(token_counts, "__fspath__"):
        from .token_counts import load_token_counts

        token_counts = load_token_counts(token_counts)
    counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64).flatten()
    if counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError("token_counts must be a non-empty vector of non-negative counts.")
    return counts


class MaskedLMCollator:
    """Masked-LM collator with DistilBERT/XLM masking.

    Per batch, exactly ceil(mlm_mask_prop x number of real (non-padding) tokens) positions are chosen
    without replacement, with probability proportional to max(count, 1) ** -mlm_smoothing of their token
    (special tokens and padding get 0; mlm_smoothing=0 or no counts: uniform, i.e. BERT). If fewer positions
    are eligible than that number, all eligible positions are chosen. Of the chosen positions, a share
    `word_mask` becomes the mask token, `word_keep` stays, `word_rand` becomes a random non-special token
    (each position drawn independently). Labels hold the original ids there and -100 elsewhere.
    Randomness comes from torch's global RNG (seeded by Trainer), or `generator` if given, or -- with `seed` --
    from a generator seeded by (seed, epoch, the batch's token ids): the masks then depend only on the batch and
    the epoch, not on how many batches were drawn before, so a run resumed from a checkpoint masks exactly as an
    uninterrupted one (Trainer skips, without collating, the batches it already trained on). A batch built again in
    a later epoch is masked afresh; `DistillationTrainer` calls `set_epoch` at each epoch (and refuses persistent
    DataLoader workers, which would keep epoch 0's copy of the collator).
    """

    def __init__(self, tokenizer, token_counts=None, mlm_mask_prop=0.15, word_mask=0.8, word_keep=0.1, word_rand=0.1,
                 mlm_smoothing=0.7, pad_to_multiple_of=None, generator=None, seed=None):
        for name, value in (("word_mask", word_mask), ("word_keep", word_keep), ("word_rand", word_rand)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if abs(word_mask + word_keep + word_rand - 1.0) > 1e-6:
            raise ValueError(f"word_mask + word_keep + word_rand must sum to 1, got "
                             f"{word_mask} + {word_keep} + {word_rand} = {word_mask + word_keep + word_rand}.")
        if not 0.0 < mlm_mask_prop <= 1.0:
            raise ValueError(f"mlm_mask_prop must be in (0, 1], got {mlm_mask_prop}.")
        if not 0.0 <= mlm_smoothing <= 1.0:
            raise ValueError(f"mlm_smoothing must be in [0, 1] (0.7 in DistilBERT/XLM, 0 = uniform), got {mlm_smoothing}.")
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token, so it cannot be used for masked-LM "
                             "distillation. Use the teacher's MLM tokenizer, or CausalLMCollator for causal models.")
        if token_counts is None and mlm_smoothing != 0:
            raise ValueError("mlm_smoothing > 0 weights masking by token frequency and needs token_counts (from "
                             "`distil-trainer token-counts`); pass them, or set mlm_smoothing=0 for uniform masking.")
        vocab_size = len(tokenizer)
        special = sorted({int(i) for i in tokenizer.all_special_ids if i is not None})
        if token_counts is None:
            counts = torch.ones(vocab_size, dtype=torch.float64)
        else:
            counts = _as_counts(token_counts)
            if vocab_size > counts.numel():
                raise ValueError(f"The tokenizer has {vocab_size} tokens but token_counts only {counts.numel()}: "
                                 "recount with --vocab_size equal to len(tokenizer).")
        # Computed in float64, used in float32 (as the original's fp32 probabilities).
        probs = counts.clamp(min=1) ** -mlm_smoothing
        probs[[i for i in special if i < probs.numel()]] = 0.0
        self.token_probs = probs.to(torch.float32)
        non_special = torch.ones(vocab_size, dtype=torch.bool)
        non_special[[i for i in special if i < vocab_size]] = False
        self.random_candidates = torch.nonzero(non_special).flatten()
        if word_rand > 0 and self.random_candidates.numel() == 0:
            raise ValueError("word_rand > 0 but the vocabulary has no non-special token to draw.")
        self.action_probs = torch.tensor([word_mask, word_keep, word_rand], dtype=torch.float32)
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.pad_id = _pad_value(tokenizer)
        self.mlm_mask_prop = mlm_mask_prop
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = generator
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    @property
    def uses_epoch(self):
        """Whether the masks depend on `set_epoch` (seeded masking); DataLoader workers must then see it."""
        return self.seed is not None

    def _batch_generator(self, input_ids):
        if self.seed is None:
            return self.generator
        digest = hashlib.blake2b(digest_size=8)
        digest.update(np.array([self.seed, self.epoch], dtype=np.int64).tobytes())
        digest.update(input_ids.numpy().astype(np.int64).tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))

    def __call__(self, features):
        input_ids, attention_mask = pad_batch(features, self.pad_id, self.pad_to_multiple_of)
        real = attention_mask.bool()
        real_ids = input_ids[real]
        if real_ids.numel() and (int(real_ids.max()) >= self.token_probs.numel() or int(real_ids.min()) < 0):
            raise ValueError(f"Token ids outside [0, {self.token_probs.numel()}) in the batch: the data was binarized "
                             "with another (larger) vocabulary than the tokenizer/token counts given here.")
        flat_ids = input_ids.flatten()
        probs = self.token_probs[flat_ids.clamp(min=0, max=self.token_probs.numel() - 1)] * real.flatten()
        n_target = math.ceil(self.mlm_mask_prop * int(real.sum()))
        n_target = min(n_target, int((probs > 0).sum()))
        labels = torch.full_like(flat_ids, IGNORE_INDEX)
        if n_target > 0:
            generator = self._batch_generator(input_ids)
            chosen = torch.multinomial(probs, n_target, replacement=False, generator=generator)
            labels[chosen] = flat_ids[chosen]
            action = torch.multinomial(self.action_probs, n_target, replacement=True, generator=generator)
            new_ids = flat_ids[chosen].clone()
            new_ids[action == 0] = self.mask_token_id
            n_rand = int((action == 2).sum())
            if n_rand:
                picks = torch.randint(self.random_candidates.numel(), (n_rand,), generator=generator)
                new_ids[action == 2] = self.random_candidates[picks]
            flat_ids = flat_ids.clone()
            flat_ids[chosen] = new_ids
        shape = input_ids.shape
        return {"input_ids": flat_ids.view(shape), "attention_mask": attention_mask, "labels": labels.view(shape)}


class CausalLMCollator:
    """Causal-LM collator: pads and sets labels = input_ids, with -100 where the attention mask is 0.

    Padding is decided by the attention mask, not the pad id: GPT-2's pad token is its eos token, which also
    ends every real sequence and must be learnt.
    """

    def __init__(self, tokenizer, pad_to_multiple_of=None):
        self.pad_id = _pad_value(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        input_ids, attention_mask = pad_batch(features, self.pad_id, self.pad_to_multiple_of)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "prompt_length" in features[0]:  # prompts of on-policy distillation (distil_trainer.on_policy)
            batch["prompt_length"] = torch.tensor([int(f["prompt_length"]) for f in features], dtype=torch.long)
        return batch


class PaddingCollator:
    """Pads `input_ids` and `attention_mask` and adds nothing: whole, unmasked sentences, as the sentence-embedding
    terms (alpha_embed) read them. Padding is marked by the attention mask."""

    def __init__(self, tokenizer, pad_to_multiple_of=None):
        self.pad_id = _pad_value(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        input_ids, attention_mask = pad_batch(features, self.pad_id, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
