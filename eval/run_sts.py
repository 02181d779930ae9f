"""Fine-tune and evaluate a sentence-embedding model on STS-B as a bi-encoder (the sentence-transformers protocol).

    python eval/run_sts.py --model_name_or_path runs/demo/student --output_dir out/sts \
        --seeds 42,43,44,45,46 --num_train_epochs 3 --learning_rate 1e-4

Each sentence is encoded on its own; its embedding is the attention-masked mean of the last hidden states, the
prediction is the cosine of the two embeddings and the training loss the squared error between that cosine and
score / 5. Why not run_glue.py's stsb: a cross-encoder reads both sentences together, which is not how embedding
models (all-MiniLM-L6-v2 and its students) are used. Data: the Hub (`nyu-mll/glue`, stsb) or, with --data_dir,
GLUE's STS-B train.tsv and dev.tsv. Writes `results_sts_stsb.json` (dev Pearson / Spearman, per seed and median).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import run_glue  # noqa: E402
import torch  # noqa: E402

from distil_trainer.pipeline.student_scores import mean_pool  # noqa: E402

TASK = run_glue.TASKS["stsb"]
SIDES = (("sentence1", "_1"), ("sentence2", "_2"))  # text column -> suffix of its tokenized columns


@dataclass
class StsDataArguments:
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder with GLUE's STS-B train.tsv and dev.tsv "
                                                                    "(e.g. glue_data/STS-B); default: the Hub."})
    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "Hub dataset (config stsb) when --data_dir "
                                                                        "is not given."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate each sentence to this many tokens."})


class MeanPooledCosine(torch.nn.Module):
    """A transformer body scoring a sentence pair by the cosine of the two mean-pooled sentence embeddings."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def embed(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids_1, attention_mask_1, input_ids_2, attention_mask_2, labels=None):
        cosine = torch.nn.functional.cosine_similarity(
            self.embed(input_ids_1, attention_mask_1), self.embed(input_ids_2, attention_mask_2), dim=-1)
        out = {"logits": cosine}
        if labels is not None:  # gold scores are 0..5, a cosine at most 1
            out = {"loss": torch.nn.functional.mse_loss(cosine.float(), labels.float() / 5.0), **out}
        return out


def tokenize(dataset, tokenizer, max_length):
    def encode(batch):
        out = {"labels": [float(v) for v in batch["label"]]}
        for column, suffix in SIDES:
            enc = tokenizer(batch[column], truncation=True, max_length=max_length)
            out.update({f"input_ids{suffix}": enc["input_ids"], f"attention_mask{suffix}": enc["attention_mask"]})
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


class PairCollator:
    """Pads each sentence of the pair on its own (the two sides have different lengths); labels stay float."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features):
        batch = {"labels": torch.tensor([f["labels"] for f in features], dtype=torch.float32)}
        for _, suffix in SIDES:
            padded = self.tokenizer.pad([{"input_ids": f[f"input_ids{suffix}"],
                                          "attention_mask": f[f"attention_mask{suffix}"]} for f in features],
                                        return_tensors="pt")
            batch.update({f"input_ids{suffix}": padded["input_ids"],
                          f"attention_mask{suffix}": padded["attention_mask"]})
        return batch


def main(argv=None):
    model_args, data_args, run_args, training_args = common.parse_args(
        (common.ModelArguments, StsDataArguments, common.RunArguments), argv)
    if model_args.teacher:
        raise ValueError("run_sts.py does not distil: drop --teacher (task distillation on STS-B as a cross-encoder "
                         "is run_glue.py --task_name stsb --teacher ... --alpha_ce 0 --alpha_mse 1).")
    seeds = common.parse_seeds(run_args.seeds)
    out_path = common.results_path(training_args.output_dir, "sts", "stsb")
    common.check_results_writable(out_path, run_args.overwrite_output_dir)

    from transformers import AutoModel, Trainer, set_seed

    need_train = not run_args.eval_only
    if data_args.data_dir:
        raw = run_glue.load_local(data_args.data_dir, "stsb", TASK, need_train)
    else:
        raw = run_glue.load_hub(data_args.dataset_name, "stsb", TASK, need_train)
    if "train" in raw:
        raw["train"] = common.take_first(raw["train"], run_args.max_train_samples)
    raw["dev"] = common.take_first(raw["dev"], run_args.max_eval_samples)
    tokenizer = common.load_tokenizer(model_args)
    encoded = {split: tokenize(ds, tokenizer, data_args.max_seq_length) for split, ds in raw.items()}
    compute_metrics = common.classification_metrics(common.load_metric("glue", "stsb"), regression=True)
    print(f"STS-B bi-encoder: {len(raw.get('train', []))} training pairs, {len(raw['dev'])} dev", flush=True)

    def run_one(seed):
        set_seed(seed)
        body = AutoModel.from_pretrained(model_args.model_name_or_path,
                                         trust_remote_code=model_args.trust_remote_code)
        args = common.training_args_for_seed(training_args, seed, None, None, run_args.overwrite_output_dir)
        trainer = Trainer(model=MeanPooledCosine(body), args=args, train_dataset=encoded.get("train"),
                          eval_dataset=encoded["dev"], data_collator=PairCollator(tokenizer),
                          processing_class=tokenizer, compute_metrics=compute_metrics)
        if need_train:
            trainer.train()
            common.save_log_history(trainer)
            if run_args.save_models:  # the body alone, loadable with AutoModel (no wrapper code needed)
                body.save_pretrained(args.output_dir)
                tokenizer.save_pretrained(args.output_dir)
        metrics = trainer.evaluate(metric_key_prefix="eval")
        return {name: metrics[f"eval_{name}"] for name in ("pearson", "spearmanr")}

    per_seed, median = common.run_seeds(seeds, run_one)
    payload = common.results_payload("sts", "stsb", model_args, None, seeds, per_seed, median, "fraction",
                                     protocol="bi-encoder, mean pooling, cosine",
                                     num_train_examples=len(raw.get("train", [])),
                                     num_eval_examples={"dev": len(raw["dev"])})
    common.write_json_atomic(out_path, payload)
    common.print_summary("STS-B bi-encoder", median, out_path)
    return payload


if __name__ == "__main__":
    main()
