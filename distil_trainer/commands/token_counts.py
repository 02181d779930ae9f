"""`distil-trainer token-counts`: token frequencies of a binarized dataset (for MLM masking smoothing)."""


def add_arguments(parser):
    parser.add_argument("--data_file", required=True, help="Binarized dataset directory (distil-trainer binarize).")
    parser.add_argument("--token_counts_dump", default=None,
                        help="Output .npy file (default: <data_file>/token_counts.npy).")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="Length of the count vector (default: the binarizing tokenizer's size).")
    parser.add_argument("--overwrite", action="store_true", help="Replace counts made for another dataset/size.")


def run(args):
    import numpy as np

    from ..data.token_counts import compute_token_counts

    result = compute_token_counts(args.data_file, args.token_counts_dump, vocab_size=args.vocab_size,
                                  overwrite=args.overwrite)
    counts = result.counts
    print(f"token counts ({'cache hit' if result.cache_hit else 'computed'}): {result.path}\n"
          f"  vocab size        {len(counts):>12,}\n"
          f"  tokens            {int(counts.sum()):>12,}\n"
          f"  distinct tokens   {int(np.count_nonzero(counts)):>12,}\n"
          f"  time              {result.seconds:>11.2f}s")
    return 0
