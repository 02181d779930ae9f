"""What an export buys and costs, measured: CPU latency of PyTorch against ONNX Runtime (fp32 and int8) side by side
in one run, and how far int8 moves an embedding model's sentence embeddings.

Latency: every runner gets the same batch of fixed shape (`batch_size` texts truncated and padded to
`sequence_length` tokens) and `warmup` untimed calls; then, for `rounds` rounds, each runner is timed once per round
in an order that rotates from round to round, so a slow moment of a shared machine is spread over all of them. The
figures are the median wall-clock milliseconds per batch (`*_ms`, what a user waits) and the median process CPU
milliseconds (`*_cpu_ms`: with one thread, steadier on a machine shared with other jobs, since time spent waiting for
a core is not counted; with several threads it adds up their work and is no latency). PyTorch runs the exported
function itself (tasks.ExportModule) under torch.inference_mode; both libraries use `threads` intra-op threads.
"""

import statistics
import time

import numpy as np
import torch

from .runtime import INT8_FILE, load_session, read_manifest, sentence_embeddings, session_feed
from .tasks import ExportModule

BACKENDS = ("pytorch", "onnx_fp32", "onnx_int8")


def fixed_shape_batch(tokenizer, texts, batch_size, sequence_length, names):
    """{input name: int64 tensor [batch_size, sequence_length]}: `texts` (cycled when fewer than `batch_size`)
    truncated to `sequence_length` tokens and padded at the end to it."""
    if not texts:
        raise ValueError("Latency needs at least one text to build its batch from.")
    rows = [texts[i % len(texts)] for i in range(batch_size)]
    encoded = tokenizer(rows, truncation=True, max_length=sequence_length)["input_ids"]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    ids = torch.full((batch_size, sequence_length), pad_id, dtype=torch.long)
    mask = torch.zeros((batch_size, sequence_length), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: tensors[name] for name in names}


def _runners(role, model, onnx_dir, batch_of, threads):
    """{(role, backend): zero-argument callable} for one model and its export folder."""
    manifest = read_manifest(onnx_dir)
    if manifest["model_type"] != model.config.model_type:
        raise ValueError(f"{onnx_dir} holds a {manifest['model_type']} export, but the {role!r} model is a "
                         f"{model.config.model_type}; pass the folder exported from this model.")
    batch = batch_of(manifest["inputs"])
    module = ExportModule(model, manifest["task"], manifest["inputs"])
    args = tuple(batch.values())

    def pytorch():
        with torch.inference_mode():
            module(*args)

    runners = {(role, "pytorch"): pytorch}
    for backend, int8 in (("onnx_fp32", False), ("onnx_int8", True)):
        if int8 and INT8_FILE not in manifest["files"].values():
            continue
        session = load_session(onnx_dir, int8=int8, threads=threads)
        feed = session_feed(session, batch)  # converted once, as PyTorch's tensors are built once
        runners[(role, backend)] = (lambda s, f: lambda: s.run(None, f))(session, feed)
    return runners


def _time_rounds(runners, warmup, rounds):
    """{key: [(wall ms, process CPU ms) per call]} over `rounds` rounds, each runner once per round, the order
    rotating."""
    keys = list(runners)
    for key in keys:
        for _ in range(warmup):
            runners[key]()
    times = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            runners[key]()
            times[key].append(((time.perf_counter() - wall) * 1000.0, (time.process_time() - cpu) * 1000.0))
    return times


def _figures(times, role):
    out = {}
    for clock, index in (("ms", 0), ("cpu_ms", 1)):
        for backend in BACKENDS:
            calls = times.get((role, backend))
            out[f"{backend}_{clock}"] = statistics.median(c[index] for c in calls) if calls else None
    for backend in ("onnx_fp32", "onnx_int8"):
        out[f"{backend}_speedup"] = out["pytorch_ms"] / out[f"{backend}_ms"] if out[f"{backend}_ms"] else None
    return out


def measure_latencies_side_by_side(entries, tokenizer, texts, *, batch_size=8, sequence_length=128, threads=1,
                                   warmup=3, rounds=20):
    """CPU latency of several models, each in PyTorch and in ONNX Runtime fp32 (and int8 when its folder has
    model.int8.onnx), all measured in the same rounds. `entries`: {role: (model, onnx_dir)}, e.g.
    {"teacher": (teacher, "teacher-onnx"), "student": (student, "student-onnx")}; the models share `tokenizer`.

    Returns {"setup": {batch_size, sequence_length, threads, warmup, rounds, how}, "models": {role: {pytorch_ms,
    onnx_fp32_ms, onnx_int8_ms, pytorch_cpu_ms, onnx_fp32_cpu_ms, onnx_int8_cpu_ms, onnx_fp32_speedup,
    onnx_int8_speedup}}} (int8 figures None without an int8 graph; speedup = PyTorch wall ms / ONNX Runtime wall
    ms)."""
    if batch_size < 1 or sequence_length < 1 or rounds < 1 or warmup < 0 or threads < 1:
        raise ValueError("batch_size, sequence_length, rounds and threads must be >= 1 and warmup >= 0.")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runners = {}
        for role, (model, onnx_dir) in entries.items():
            runners.update(_runners(role, model, onnx_dir, lambda names: fixed_shape_batch(
                tokenizer, texts, batch_size, sequence_length, names), threads))
        times = _time_rounds(runners, warmup, rounds)
    finally:
        torch.set_num_threads(previous_threads)
    how = (f"CPU, {threads} thread(s), one batch of {batch_size} x {sequence_length} tokens; median of {rounds} "
           f"rounds after {warmup} warm-up calls, PyTorch (inference_mode) and ONNX Runtime (CPUExecutionProvider) "
           "alternating within each round")
    setup = {"batch_size": batch_size, "sequence_length": sequence_length, "threads": threads, "warmup": warmup,
             "rounds": rounds, "how": how}
    return {"setup": setup, "models": {role: _figures(times, role) for role in entries}}


def measure_latencies(model, tokenizer, texts, onnx_dir, **options):
    """CPU latency of one model in PyTorch and ONNX Runtime (fp32, and int8 when exported): the figures of
    `measure_latencies_side_by_side` for it, flattened with the setup into one dict."""
    result = measure_latencies_side_by_side({"model": (model, onnx_dir)}, tokenizer, texts, **options)
    return {**result["setup"], **result["models"]["model"]}


def int8_embedding_change(onnx_dir, tokenizer, texts, batch_size=64, max_length=128):
    """How far int8 moves an exported embedding model: over the sentence embeddings of `texts` from the fp32 and
    the int8 graph, {texts, max_abs_diff, mean_cosine, min_cosine} (cosine of each text's two embeddings)."""
    fp32 = sentence_embeddings(load_session(onnx_dir), tokenizer, texts, batch_size, max_length)
    int8 = sentence_embeddings(load_session(onnx_dir, int8=True), tokenizer, texts, batch_size, max_length)
    cosine = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1)).clip(min=1e-12)
    return {"texts": len(texts), "max_abs_diff": float(np.abs(fp32 - int8).max()),
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}
