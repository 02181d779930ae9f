"""`distil-trainer binarize`: tokenize a corpus into a cached, memory-mapped Arrow dataset."""

import sys


def add_arguments(parser):
    src = parser.add_argument_group("input (one of --file_path or --dataset_name)")
    src.add_argument("--file_path", help="Text file with one sequence per line, or a folder of such files.")
    src.add_argument("--dataset_name", help="Hub dataset name (or local dataset folder) for datasets.load_dataset.")
    src.add_argument("--dataset_config", default=None, help="Dataset configuration name.")
    src.add_argument("--split", default="train", help="Dataset split (default: train).")
    src.add_argument("--text_column", default="text", help="Column holding the text (default: text).")
    src.add_argument("--streaming", action="store_true", help="Stream the Hub dataset (corpora larger than disk).")
    parser.add_argument("--tokenizer_name", required=True, help="Tokenizer name or path (AutoTokenizer).")
    parser.add_argument("--tokenizer_type", choices=("bert", "roberta", "gpt2"), default=None,
                        help="Accepted for compatibility with the original script: the begin/end tokens always come "
                             "from --tokenizer_name; given, it is checked that they are the ones this type used "
                             "([CLS]/[SEP], <s>/</s>, <|endoftext|>).")
    parser.add_argument("--dump_file", required=True, help="Output directory (also the cache).")
    parser.add_argument("--max_length", type=int, default=None,
                        help="Longest sequence; longer ones are split (default: tokenizer.model_max_length).")
    parser.add_argument("--min_length", type=int, default=12, help="Shorter sequences are dropped (default: 12).")
    parser.add_argument("--max_unk_share", type=float, default=0.5,
                        help="Sequences with this share of unknown tokens or more are dropped (default: 0.5).")
    parser.add_argument("--pack", type=int, default=None, metavar="BLOCK_SIZE",
                        help="Pack sequences into blocks of this many tokens (causal LM).")
    parser.add_argument("--num_proc", type=int, default=None, help="Tokenization processes.")
    parser.add_argument("--batch_size", type=int, default=1000, help="Sequences per tokenization batch.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing output built from another input/tokenizer/options.")
    verify = parser.add_mutually_exclusive_group()
    verify.add_argument("--full_verify", action="store_true",
                        help="On a cache hit, hash every file (default: only files whose size or modification time "
                             "changed since they were written).")
    verify.add_argument("--no_verify_checksums", action="store_true",
                        help="On a cache hit, check file sizes only.")


def run(args):
    from ..data.binarize import binarize, check_tokenizer_type, load_tokenizer

    verify = True if args.full_verify else (False if args.no_verify_checksums else "changed")
    try:
        tokenizer = load_tokenizer(args.tokenizer_name)
        if args.tokenizer_type is not None:
            check_tokenizer_type(tokenizer, args.tokenizer_type)
        binarize(args.dump_file, tokenizer, file_path=args.file_path, dataset_name=args.dataset_name,
                 dataset_config=args.dataset_config, split=args.split, text_column=args.text_column,
                 streaming=args.streaming, max_length=args.max_length, min_length=args.min_length,
                 max_unk_share=args.max_unk_share, pack=args.pack, num_proc=args.num_proc,
                 batch_size=args.batch_size, overwrite=args.overwrite, verify_checksums=verify, verbose=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"distil-trainer binarize: error: {err}", file=sys.stderr)
        return 2
    return 0
