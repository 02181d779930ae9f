"""Stages on the corpus: binarize it, count its tokens (and build the collator that masks with those counts)."""

from pathlib import Path

from .stage import Stage


def load_tokenizer(model_args):
    """The teacher's tokenizer (or `tokenizer_name`), with a pad token."""
    from transformers import AutoTokenizer

    from ..model_utils import resolve_gguf

    source, gguf_kwargs = resolve_gguf(model_args.tokenizer_name or model_args.teacher_name)  # a GGUF teacher too
    tokenizer = AutoTokenizer.from_pretrained(source, revision=model_args.teacher_revision,
                                              trust_remote_code=model_args.trust_remote_code, **gguf_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padding is masked out anyway
    return tokenizer


def data_key(data_args, tokenizer_name):
    """What the binarized corpus depends on: tokenizer, source, split, column, lengths, packing."""
    from ..data.cache import stable_hash

    source = data_args.file_path and str(Path(data_args.file_path).resolve())
    key = [tokenizer_name, source, data_args.dataset_name, data_args.dataset_config, data_args.dataset_split,
           data_args.text_column, data_args.max_length, data_args.pack, data_args.min_length]
    if getattr(data_args, "binarized_data", None):
        key.append(str(Path(data_args.binarized_data).resolve()))
    return stable_hash(key)[:12]


def binarized_source(data_args):
    """The folder of a `distil-trainer binarize` output to use as is: binarized_data, or a file_path that is one."""
    from ..data.binarize import is_binarized_dir

    if getattr(data_args, "binarized_data", None):
        return Path(data_args.binarized_data)
    if is_binarized_dir(data_args.file_path):
        return Path(data_args.file_path)  # reading its Arrow files as text would make nonsense
    return None


class Binarize(Stage):
    name = "binarize"
    inputs = ("tokenizer", "tokenizer_name")
    outputs = ("data_dir", "binarized", "train_dataset")
    main_process_first = True

    def cache_key(self, ctx):
        return data_key(ctx.data_args, ctx.tokenizer_name)

    def before(self, ctx):
        """Given binarized data is checked by every rank, before any waits on another: a refusal stops them all."""
        from ..data.binarize import use_binarized
        from .recipe_args import ConfigError

        ctx.given_data = binarized_source(ctx.data_args)
        if ctx.given_data is not None:
            try:
                ctx.binarized = use_binarized(ctx.given_data, ctx.tokenizer, max_length=ctx.data_args.max_length)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(str(err)) from None

    def run(self, ctx):
        from ..data import binarize

        d = ctx.data_args
        if ctx.given_data is not None:  # made by `distil-trainer binarize`: used as is, never rebuilt
            ctx.data_dir = ctx.given_data
            return (f"{len(ctx.binarized.dataset)} sequences, {ctx.binarized.stats.tokens} tokens (given, tokenizer "
                    f"checked) in {ctx.data_dir}")
        ctx.data_dir = Path(d.data_cache_dir or ctx.out / "data") / f"binarized-{self.cache_key(ctx)}"
        ctx.binarized = binarize(ctx.data_dir, ctx.tokenizer, file_path=d.file_path, dataset_name=d.dataset_name,
                                 dataset_config=d.dataset_config, split=d.dataset_split, text_column=d.text_column,
                                 streaming=d.streaming, max_length=d.max_length, min_length=d.min_length,
                                 pack=d.pack, num_proc=d.num_proc,
                                 overwrite=True, verbose=ctx.is_main)  # a derived cache: rebuilt when its inputs change
        st = ctx.binarized.stats
        return (f"{len(ctx.binarized.dataset)} sequences, {st.tokens} tokens "
                f"({'cache reused' if ctx.binarized.cache_hit else 'built'}) in {ctx.data_dir}")

    def after(self, ctx):
        dataset, limit = ctx.binarized.dataset, ctx.data_args.max_train_samples
        ctx.train_dataset = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


class TokenCounts(Stage):
    """Masked LM only: the counts weight which tokens are masked (mlm_smoothing)."""

    name = "token counts"
    inputs = ("data_dir", "tokenizer", "masked_lm")
    outputs = ("counts", "collator")
    main_process_first = True

    def cache_key(self, ctx):
        return ctx.data_dir.name  # counted from the binarized corpus, saved beside it

    def skip(self, ctx):
        from .objective import EMBEDDING, objective

        if objective(ctx) == EMBEDDING:
            ctx.counts = None
            return "skipped (not needed: the embedding objective reads whole, unmasked sentences)"
        if ctx.masked_lm and ctx.data_args.mlm_smoothing > 0:
            return None
        ctx.counts = None
        return "skipped (not needed: causal LM or uniform masking)"

    def run(self, ctx):
        from ..data import compute_token_counts

        counted = compute_token_counts(ctx.data_dir, vocab_size=len(ctx.tokenizer), overwrite=True)
        ctx.counts = counts = counted.counts
        return (f"{int((counts > 0).sum())} distinct tokens of {len(counts)} "
                f"({'cache reused' if counted.cache_hit else 'counted'}) in {counted.path}")

    def after(self, ctx):
        from ..data.collators import CausalLMCollator, MaskedLMCollator, PaddingCollator
        from .objective import EMBEDDING, objective

        d = ctx.data_args
        if objective(ctx) == EMBEDDING:
            ctx.collator = PaddingCollator(ctx.tokenizer)
        elif ctx.masked_lm:
            ctx.collator = MaskedLMCollator(ctx.tokenizer, token_counts=ctx.counts, mlm_mask_prop=d.mlm_mask_prop,
                                            word_mask=d.word_mask, word_keep=d.word_keep, word_rand=d.word_rand,
                                            mlm_smoothing=d.mlm_smoothing, seed=ctx.training_args.seed)
        else:
            ctx.collator = CausalLMCollator(ctx.tokenizer)
