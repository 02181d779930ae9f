"""Causal-LM perplexity with a strided sliding window (WikiText-103 test, as DistilGPT2 reported),
optionally after fine-tuning on a training text.

    python eval/run_perplexity.py --model_name_or_path distilgpt2 --output_dir out/ppl \
        --text_file wikitext-103/wiki.test.tokens --max_length 1024 --stride 512
    # or from the Hub: --dataset_name Salesforce/wikitext --dataset_config wikitext-103-raw-v1 --split test

The text is tokenized as one sequence. Windows of --max_length tokens start every --stride tokens; each
window scores only the tokens the previous window did not (so every token after the first is scored once,
with up to max_length - stride tokens of extra context). Perplexity = exp(total NLL / scored tokens).
Writes `results_perplexity_<name>.json` to --output_dir.
"""

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


@dataclass
class PerplexityArguments:
    text_file: Optional[str] = field(default=None, metadata={"help": "Plain-text file to score (e.g. "
                                                                     "wikitext-103/wiki.test.tokens)."})
    dataset_name: str = field(default="Salesforce/wikitext", metadata={"help": "Hub dataset without --text_file."})
    dataset_config: str = field(default="wikitext-103-raw-v1", metadata={"help": "Its configuration."})
    split: str = field(default="test", metadata={"help": "Its split."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Plain-text file to fine-tune on first."})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Window length in tokens (default: the model's context size, at most 1024)."})
    stride: int = field(default=512, metadata={"help": "Tokens between window starts (<= --max_length)."})
    max_eval_tokens: Optional[int] = field(default=None, metadata={"help": "Score only the first N tokens."})
    name: Optional[str] = field(default=None, metadata={"help": "Name in the results file (default: text file stem "
                                                                "or dataset config)."})


def read_text(args):
    if args.text_file:
        with open(common.require_file(args.text_file, "text file to score"), encoding="utf-8") as f:
            return f.read()
    from datasets import load_dataset

    # The Hub's WikiText rows are lines; joined as the HF perplexity guide does.
    return "\n\n".join(load_dataset(args.dataset_name, args.dataset_config, split=args.split)["text"])


def model_context_size(config):
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 1024


def strided_nll(model, input_ids, max_length, stride, show_progress=True):
    """(sum of token NLLs, number of scored tokens) over a 1-D LongTensor with the sliding-window method."""
    import torch
    from tqdm.auto import tqdm

    if not 0 < stride <= max_length:
        raise ValueError(f"--stride ({stride}) must be between 1 and --max_length ({max_length}).")
    seq_len = int(input_ids.numel())
    if seq_len < 2:
        raise ValueError("The text has fewer than 2 tokens; nothing to score.")
    device = next(model.parameters()).device
    total, count, prev_end = 0.0, 0, 0
    starts = range(0, seq_len, stride)
    for begin in tqdm(starts, desc="Scoring windows", disable=not show_progress):
        end = min(begin + max_length, seq_len)
        window = input_ids[begin:end].to(device)
        with torch.no_grad():
            logits = model(window[None]).logits[0, :-1].double()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, window[1:, None])[:, 0]
        # Target i of this window is absolute position begin + 1 + i; score only positions not scored before.
        first_new = max(prev_end, begin + 1) - (begin + 1)
        new = log_probs[first_new:]
        total -= float(new.sum())
        count += int(new.numel())
        prev_end = end
        if end == seq_len:
            break
    return total, count


def block_dataset(tokenizer, path, block_size):
    """Training text cut into consecutive blocks of `block_size` tokens (labels = inputs; the model shifts)."""
    from datasets import Dataset

    with open(common.require_file(path, "training text file"), encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one block of {block_size}.")
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def main(argv=None):
    model_args, ppl_args, run_args, training_args = common.parse_args(
        (common.ModelArguments, PerplexityArguments, common.RunArguments), argv)
    if model_args.teacher:
        raise ValueError("run_perplexity.py fine-tunes without a teacher; distil the model first "
                         "(recipes/), then score it here.")
    name = ppl_args.name or (Path(ppl_args.text_file).stem if ppl_args.text_file else ppl_args.dataset_config)
    seeds = common.parse_seeds(run_args.seeds)
    out_path = common.results_path(training_args.output_dir, "perplexity", name)
    common.check_results_writable(out_path, run_args.overwrite_output_dir)
    if ppl_args.train_file is None and len(seeds) > 1:
        print("No --train_file: the model is scored as it is, so every seed gives the same number.")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, default_data_collator, set_seed

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    max_length = ppl_args.max_length or min(model_context_size(config), 1024)
    if max_length > model_context_size(config):
        raise ValueError(f"--max_length {max_length} exceeds the model's context size {model_context_size(config)}.")
    tokenizer = common.load_tokenizer(model_args)
    input_ids = torch.tensor(tokenizer(read_text(ppl_args))["input_ids"], dtype=torch.long)
    if ppl_args.max_eval_tokens:
        input_ids = input_ids[:ppl_args.max_eval_tokens]
    train_blocks = None
    if ppl_args.train_file and not run_args.eval_only:
        train_blocks = common.take_first(block_dataset(tokenizer, ppl_args.train_file, max_length),
                                         run_args.max_train_samples)
    print(f"Perplexity on {name}: {input_ids.numel()} tokens, windows of {max_length} every {ppl_args.stride}"
          + (f"; fine-tuning on {len(train_blocks)} blocks first" if train_blocks is not None else ""), flush=True)

    def run_one(seed):
        set_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                     trust_remote_code=model_args.trust_remote_code)
        if train_blocks is not None:
            args = common.training_args_for_seed(training_args, seed, None, None, run_args.overwrite_output_dir)
            trainer = common.build_trainer(model, None, args, train_blocks, None, default_data_collator, tokenizer)
            trainer.train()
            common.save_log_history(trainer)
            if run_args.save_models:
                trainer.save_model()
            model = trainer.model
        elif not training_args.use_cpu and torch.cuda.is_available():
            model = model.to("cuda")
        nll, count = strided_nll(model.eval(), input_ids, max_length, ppl_args.stride)
        return {"perplexity": math.exp(nll / count), "mean_nll": nll / count}

    per_seed, median = common.run_seeds(seeds, run_one)
    payload = common.results_payload("perplexity", name, model_args, None, seeds, per_seed, median, "raw",
                                     max_length=max_length, stride=ppl_args.stride,
                                     num_eval_tokens=int(input_ids.numel()),
                                     num_train_blocks=len(train_blocks) if train_blocks is not None else 0)
    common.write_json_atomic(out_path, payload)
    common.print_summary(f"Perplexity on {name}", median, out_path, scale=1.0)
    return payload


if __name__ == "__main__":
    main()
