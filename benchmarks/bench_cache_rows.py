"""Step time of a masked-LM student trained from a teacher-output cache, its LM head run on the masked rows only (the
fused head path, what `DistillationTrainer` does by default) against full logits over every token
(`logits_chunk_size=0`), on the same batches.

    python benchmarks/bench_cache_rows.py --teacher_cache runs/mini_repro/teacher_cache/seed-56 \
        --student runs/mini_repro/distil/seed-56/triple/student_init

The student folder needs its tokenizer (the recipe's student_init has it). Each batch is run both ways in turn
(forward, loss, backward), so the machine's load drifts over both alike. The losses of the two ways must agree: the
head terms read no other row. Prints the seconds per step of each way and their ratio.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_cache", required=True, help="A masked-LM teacher-output cache folder.")
    p.add_argument("--student", required=True, help="Masked-LM student folder (model and tokenizer).")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2, help="Passes over the batches, each batch both ways per pass.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--weights", default="ce=5,mlm=2,cos=1", help="Loss weights (the demo's).")
    return p


def make_trainer(args, output_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from distil_trainer import DistillationArguments, DistillationTrainer

    weights = {f"alpha_{k}": float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    student = AutoModelForMaskedLM.from_pretrained(args.student)
    training_args = DistillationArguments(
        output_dir=output_dir, report_to=[], use_cpu=True, max_steps=1, per_device_train_batch_size=args.batch_size,
        temperature=2.0, restrict_ce_to_mask=True, remove_unused_columns=False, save_strategy="no",
        train_sampling_strategy="group_by_length", **weights)
    trainer = DistillationTrainer(model=student, args=training_args, teacher_cache=args.teacher_cache,
                                  processing_class=AutoTokenizer.from_pretrained(args.student))
    if trainer._chunk_size is None:
        raise ValueError(f"{args.student} with {args.teacher_cache}: the trainer projects every token anyway "
                         "(a head the fused path cannot project); nothing to compare.")
    return trainer, student


def timed_step(trainer, student, batch, chunk_size):
    """(seconds, loss) of one forward, loss and backward; chunk_size None: full logits."""
    import torch

    trainer._chunk_size = chunk_size
    torch.manual_seed(0)  # the same dropout masks both ways
    start = time.perf_counter()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    student.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main(argv=None):
    import tempfile

    import torch

    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, student = make_trainer(args, tmp)
        batches = [b for _, b in zip(range(args.batches), trainer.get_train_dataloader())]
    student.train()
    seconds = {True: [], False: []}
    worst = 0.0
    fused_chunk = trainer._chunk_size
    for _ in range(args.rounds):
        for batch in batches:
            (rows_time, rows_loss), (all_time, all_loss) = (timed_step(trainer, student, batch, mode)
                                                            for mode in (fused_chunk, None))
            seconds[True].append(rows_time)
            seconds[False].append(all_time)
            worst = max(worst, abs(rows_loss - all_loss) / max(abs(all_loss), 1e-12))
    rows, every = statistics.median(seconds[True]), statistics.median(seconds[False])
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    print(f"batches {len(batches)} x {args.rounds} rounds, shapes {shapes}, threads {torch.get_num_threads()}")
    print(f"loss agreement: largest relative difference {worst:.2e}")
    print(f"head on the masked rows: {rows:.3f} s/step (median)")
    print(f"head on every token:     {every:.3f} s/step (median)")
    print(f"ratio every token / masked rows: {every / rows:.2f}")
    return {"rows_only": rows, "every_token": every, "loss_rel_diff": worst}


if __name__ == "__main__":
    main()
