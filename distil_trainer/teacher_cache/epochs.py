"""`CachedEpochsDataset`: the rows of the cache epoch being trained, and the callback that switches epochs.

An MLM cache holds one masked copy of the data per epoch (the masks the teacher saw); training epoch e reads copy e,
and a run with more epochs than copies is refused. CLM and task caches hold one copy, reused every epoch.
"""

import math

import pyarrow.compute

import torch
from transformers import TrainerCallback


class CachedEpochsDataset(torch.utils.data.Dataset):
    """Map-style dataset over the per-epoch `datasets.Dataset`s of a cache (memory-mapped Arrow, read as numpy).

    `lengths` (tokens per row, equal in every epoch) lets `train_sampling_strategy="group_by_length"` group rows
    without reading them.
    """

    def __init__(self, epoch_datasets, masked=False):
        self.epochs = [d.with_format("numpy") for d in epoch_datasets]
        if not self.epochs:
            raise ValueError("A teacher-output cache with no epoch: rebuild it.")
        sizes = {len(d) for d in self.epochs}
        if len(sizes) != 1:
            raise ValueError(f"The cache's epochs hold different numbers of rows ({sorted(sizes)}); rebuild it.")
        # masked: one masked copy per training epoch (MLM), never reused; else one copy read every epoch.
        self.masked = bool(masked)
        self.epoch = 0
        self._lengths = None

    @property
    def num_epochs(self):
        return len(self.epochs)

    @property
    def uses_epoch(self):
        """Whether the rows depend on `set_epoch` (a DataLoader worker must see it: callbacks.py)."""
        return self.masked and self.num_epochs > 1

    @property
    def lengths(self):
        if self._lengths is None:  # read once, from the offsets of the Arrow column (no row is decoded)
            column = self.epochs[0].with_format("arrow")["input_ids"]
            self._lengths = pyarrow.compute.list_value_length(column).to_pylist()
        return self._lengths

    def set_epoch(self, epoch):
        epoch = int(epoch)
        if self.masked and epoch >= self.num_epochs:
            raise ValueError(f"Training epoch {epoch + 1} needs masked copy {epoch} of the data, but the cache holds "
                             f"{self.num_epochs}; rebuild it with epochs >= the training epochs.")
        self.epoch = epoch if self.masked else 0

    def __len__(self):
        return len(self.epochs[0])

    def __getitem__(self, index):
        return self.epochs[self.epoch][index]


class CacheEpochCallback(TrainerCallback):
    """Points a `CachedEpochsDataset` at the epoch being trained, and refuses at the start of training, before the
    first step, a run that needs more epochs than an MLM cache holds masked copies (the number of epochs is known
    only then, e.g. from max_steps): serving a copy twice would train on the same masks again."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        needed, copies = math.ceil(state.num_train_epochs), self.dataset.num_epochs
        if not self.dataset.masked or needed <= copies:
            return
        fits = ""
        if train_dataloader is not None and args.max_steps is not None and args.max_steps > 0:
            updates_per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
            fits = (f" (max_steps <= {copies * updates_per_epoch} at {updates_per_epoch} "
                    f"update{'' if updates_per_epoch == 1 else 's'} per epoch)")
        raise ValueError(f"This run trains {needed} epochs but the MLM teacher cache holds {copies} masked "
                         f"cop{'y' if copies == 1 else 'ies'} of the data, one per epoch: epoch {copies + 1} would "
                         f"train on masks already used. Rebuild the cache with epochs={needed} (cache-teacher "
                         f"--epochs {needed}), or train for at most {copies} epoch{'' if copies == 1 else 's'}"
                         f"{fits}.")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))
