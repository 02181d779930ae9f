"""`distil-trainer cache-teacher`: run a teacher once over a binarized dataset and cache its outputs (Arrow)."""

import sys
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--teacher", required=True, help="Teacher name, local path or GGUF file (path.gguf).")
    parser.add_argument("--data", required=True,
                        help="Binarized dataset folder (distil-trainer binarize) or a datasets.save_to_disk folder.")
    parser.add_argument("--split", default=None, help="Split to use when --data holds a DatasetDict.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer name or path (default: --teacher).")
    parser.add_argument("--output_dir", required=True, help="Cache folder to write (or reuse).")
    parser.add_argument("--top_k", type=int, default=64,
                        help="Logits stored per position for LM heads (default 64; 0 = the whole vocabulary).")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="Storage dtype of top-k logits and hidden states (default float16).")
    parser.add_argument("--positions", choices=("masked", "tokens"), default=None,
                        help="LM heads: where top-k is stored (default: masked for MLM, tokens for causal LM).")
    parser.add_argument("--hidden_layers", type=int, nargs="*", default=[],
                        help="Hidden states to store (0 = embeddings, -1 = last layer), e.g. --hidden_layers -1.")
    parser.add_argument("--head", default=None, help="Teacher head, when its config does not tell (e.g. masked_lm).")
    parser.add_argument("--epochs", type=int, default=1, help="MLM: masked copies to cache, one per training epoch "
                        "(training more epochs than copies is refused).")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="Training temperature: the top-k coverage statistic is also measured at it (default 1; "
                             "what is stored does not depend on it).")
    mlm = parser.add_argument_group("masked-LM masking (as in training)")
    mlm.add_argument("--token_counts", default=None,
                     help="Token counts .npy (distil-trainer token-counts; default: <data>/token_counts.npy if "
                          "present).")
    mlm.add_argument("--mlm_mask_prop", type=float, default=0.15)
    mlm.add_argument("--word_mask", type=float, default=0.8)
    mlm.add_argument("--word_keep", type=float, default=0.1)
    mlm.add_argument("--word_rand", type=float, default=0.1)
    mlm.add_argument("--mlm_smoothing", type=float, default=0.7)
    mlm.add_argument("--seed", type=int, default=42, help="Masking seed (default 42).")
    parser.add_argument("--batch_size", type=int, default=32, help="Teacher batch size (MLM: also the masking batch).")
    parser.add_argument("--shard_rows", type=int, default=4096, help="Rows per shard (the resume granularity).")
    parser.add_argument("--device", default=None, help="Device for the teacher (default: cuda if available).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a cache built from other inputs/settings.")


def load_data(path, split, tokenizer):
    """A binarize output (its tokenizer checked against `tokenizer`) or any save_to_disk dataset."""
    import datasets

    from ..data.binarize import is_binarized_dir, use_binarized

    if is_binarized_dir(path):
        return use_binarized(path, tokenizer).dataset
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--data {path!r} is not a folder; give a distil-trainer binarize output or a "
                                "datasets.save_to_disk folder.")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            raise ValueError(f"--data {path!r} holds the splits {list(data)}; choose one with --split.")
        data = data[split]
    return data


def mlm_collator(args, tokenizer):
    from ..data.collators import MaskedLMCollator

    counts = args.token_counts
    if counts is None and args.mlm_smoothing != 0 and (Path(args.data) / "token_counts.npy").is_file():
        counts = Path(args.data) / "token_counts.npy"
    return MaskedLMCollator(tokenizer, token_counts=counts, mlm_mask_prop=args.mlm_mask_prop,
                            word_mask=args.word_mask, word_keep=args.word_keep, word_rand=args.word_rand,
                            mlm_smoothing=args.mlm_smoothing, seed=args.seed)


def run(args):
    from ..model_utils import MASKED_LM, load_tokenizer
    from ..run_lock import OutputDirInUse
    from ..teacher_cache import build_teacher_cache
    from ..teacher_cache.build import resolve_teacher

    try:
        tokenizer = load_tokenizer(args.tokenizer or args.teacher)
        data = load_data(args.data, args.split, tokenizer)
        teacher, head = resolve_teacher(args.teacher, args.head)
        collator = mlm_collator(args, tokenizer) if head == MASKED_LM else None
        build_teacher_cache(teacher, data, args.output_dir, tokenizer, head=head, top_k=args.top_k or None,
                            positions=args.positions, dtype=args.dtype, hidden_layers=args.hidden_layers,
                            epochs=args.epochs, mlm_collator=collator, batch_size=args.batch_size,
                            shard_rows=args.shard_rows, device=args.device, overwrite=args.overwrite, verbose=True,
                            temperature=args.temperature)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, OutputDirInUse) as err:
        print(f"distil-trainer cache-teacher: error: {err}", file=sys.stderr)
        return 2
    return 0
