"""Data pipeline: binarization (text -> cached Arrow token ids), token counts, and batch collators.

Length grouping uses the Trainer's own sampler: binarized datasets carry a `length` column, so pass
`train_sampling_strategy="group_by_length"` and `length_column_name="length"` (the default name) to the
training arguments. transformers 5 drops dataset columns the model's forward does not accept *before*
building the sampler, so also pass `remove_unused_columns=False` (the collators here ignore `length`);
otherwise the sampler recomputes lengths by reading every example.
"""

from .binarize import LENGTH_COLUMN, METADATA_FILE, BinarizeResult, BinarizeStats, binarize, load_binarized
from .collators import CausalLMCollator, MaskedLMCollator, PaddingCollator
from .token_counts import TokenCountsResult, compute_token_counts, count_tokens, load_token_counts

__all__ = [
    "LENGTH_COLUMN", "METADATA_FILE", "BinarizeResult", "BinarizeStats", "binarize", "load_binarized",
    "CausalLMCollator", "MaskedLMCollator", "PaddingCollator",
    "TokenCountsResult", "compute_token_counts", "count_tokens", "load_token_counts",
]
