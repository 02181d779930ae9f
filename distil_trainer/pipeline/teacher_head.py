"""Fit a masked-LM head onto a teacher that ships without one (e.g. sentence-embedding BERTs such as
all-MiniLM-L6-v2), so that the soft-target term has teacher logits to match.

The body stays frozen, so the teacher's representations are exactly those it shipped with; its outputs therefore
need computing only once. The fit (1) runs the body once over the corpus with the run's MLM masking (a fixed
seed) and keeps, in memory, the last hidden states at the masked positions and their original token ids; (2) trains
only the head on those rows, in large batches, until its loss on a held-out slice of the rows has not improved for
`patience` evaluations (or `max_steps` updates), keeping the best head; (3) records masked-token loss and accuracy
(train and held-out) in fit_log.json beside the saved teacher.

Decoder: "tied" trains the head's transform (dense + LayerNorm) and output bias, with the decoder tied to the frozen
word embeddings; "untied" also trains a decoder of its own, initialised from the word embeddings (the input
embeddings stay frozen; the saved teacher has tie_word_embeddings=False and the student copies that decoder).
"""

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..atomic import atomic_directory, write_text_atomic

logger = logging.getLogger(__name__)
MARKER = "fitted_mlm_head.json"
FIT_LOG = "fit_log.json"
DECODERS = ("tied", "untied")


def head_module(model):
    """The MLM head: the one child module of `model` besides its body (BERT `cls`, RoBERTa `lm_head`)."""
    body = model.base_model
    heads = [m for m in model.children() if m is not body and any(True for _ in m.parameters())]
    if len(heads) != 1:
        raise ValueError(f"{type(model).__name__} has {len(heads)} head modules besides its body; fitting a teacher "
                         "MLM head needs exactly one (BERT's cls, RoBERTa's lm_head).")
    return heads[0]


def trainable_head_parameters(model):
    """(name, parameter) of the MLM head that are trained: those not shared with the body."""
    body = {id(p) for p in model.base_model.parameters()}
    head = [(n, p) for n, p in model.named_parameters() if id(p) not in body]
    if not head:
        raise ValueError(f"{type(model).__name__} has no head parameters separate from its body.")
    return head


def untied_copy(model):
    """`model` with tie_word_embeddings=False and a decoder of its own, initialised from the word embeddings
    (a fresh instance, so transformers' record of tied weights follows the new config)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.tie_word_embeddings = False
    untied = type(model)(config).to(model.dtype)
    state = model.state_dict()
    decoder = model.get_output_embeddings()
    state[_param_name(model, decoder.weight)] = model.get_input_embeddings().weight.detach().clone()
    if decoder.bias is not None:
        state[_param_name(model, decoder.bias)] = decoder.bias.detach().clone()
    missing, unexpected = untied.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"untying the decoder of {type(model).__name__} left missing {missing} / unexpected "
                           f"{unexpected} tensors.")
    return untied.eval()


def _param_name(model, param):
    """The name under which `param` is registered as the output-embedding module's own tensor."""
    decoder = model.get_output_embeddings()
    prefix = next(n for n, m in model.named_modules(remove_duplicate=False) if m is decoder)
    own = next(n for n, p in decoder.named_parameters(remove_duplicate=False) if p is param)
    return f"{prefix}.{own}"


@torch.no_grad()
def masked_rows(model, dataset, collator, batch_size=32):
    """(hidden, targets): the body's last hidden state at every masked position of `dataset` (masked by
    `collator`), float32 [rows, hidden], and the original token ids there, int64 [rows]. Sequences are batched by
    length (less padding); a seeded collator makes the masks a function of each batch's tokens."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    hidden, targets = [], []
    body = model.base_model.eval()
    for start in range(0, len(order), batch_size):
        batch = collator([{"input_ids": dataset[i]["input_ids"]} for i in order[start:start + batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        states = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        where = batch["labels"] != -100
        hidden.append(states[where].float())
        targets.append(batch["labels"][where])
    return torch.cat(hidden), torch.cat(targets)


def heldout_split(n_rows, seed, share=0.05, least=256, most=4096):
    """(train_index, heldout_index): a seeded random slice of the rows held out for early stopping."""
    size = min(max(least, int(n_rows * share)), most, n_rows // 5)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return order[size:], order[:size]


@torch.no_grad()
def head_metrics(head, hidden, targets, chunk=2048):
    """(mean cross-entropy, top-1 accuracy) of `head` on the rows."""
    loss, correct = 0.0, 0
    for start in range(0, len(targets), chunk):
        logits = head(hidden[start:start + chunk]).float()
        y = targets[start:start + chunk]
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    return loss / len(targets), correct / len(targets)


def train_head(head, params, hidden, targets, train_index, heldout_index, max_steps, batch_size=256,
               learning_rate=1e-2, eval_every=25, patience=4, seed=0, bf16=False):
    """Adam on `params` (the head's trainable tensors) over shuffled training rows; evaluate the held-out rows every
    `eval_every` steps and stop once `patience` evaluations in a row did not improve on the best, which is kept.
    Returns (log, best_step, stopped_early)."""
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    warmup = max(1, min(max_steps // 20, 50))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    held_h, held_y = hidden[heldout_index], targets[heldout_index]
    order, cursor = train_index[torch.randperm(len(train_index), generator=generator)], 0
    held_loss, held_acc = head_metrics(head, held_h, held_y)  # the starting point, kept if nothing beats it
    log = [{"step": 0, "heldout_loss": held_loss, "heldout_accuracy": held_acc}]
    best_loss, best_step, best_state, bad, running = held_loss, 0, _copy(params), 0, []
    for step in range(1, max_steps + 1):
        if cursor + batch_size > len(order):  # a new epoch over the training rows
            order, cursor = train_index[torch.randperm(len(train_index), generator=generator)], 0
        rows = order[cursor:cursor + batch_size]
        cursor += batch_size
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16 and hidden.is_cpu):
            logits = head(hidden[rows])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if step % eval_every and step != max_steps:
            continue
        held_loss, held_acc = head_metrics(head, held_h, held_y)
        log.append({"step": step, "train_loss": sum(running) / len(running), "heldout_loss": held_loss,
                    "heldout_accuracy": held_acc})
        running = []
        logger.info("teacher MLM head step %d: train loss %.3f, held-out loss %.3f, accuracy %.3f", step,
                    log[-1]["train_loss"], held_loss, held_acc)
        if held_loss < best_loss - 1e-4:
            best_loss, best_step, best_state, bad = held_loss, step, _copy(params), 0
        else:
            bad += 1
            if bad >= patience:
                break
    _restore(params, best_state)
    return log, best_step, bad >= patience


def _copy(params):
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params, values):
    for p, v in zip(params, values):
        p.copy_(v)


def fit_mlm_head(teacher, train_dataset, data_collator, output_dir, steps, identity, decoder="tied", batch_size=256,
                 learning_rate=1e-2, eval_every=25, patience=4, seed=0, save=True):
    """Fit the head for at most `steps` updates (early stopping as in `train_head`) and save the teacher, with
    fit_log.json, to `output_dir` (when `save`: the main process); reuse a saved one whose `identity` matches.
    Returns (teacher, reused)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
    output_dir = Path(output_dir)
    marker = output_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()) == identity:
        logger.info("Reusing the fitted teacher MLM head in %s", output_dir)
        return type(teacher).from_pretrained(output_dir).eval(), True

    start = time.perf_counter()
    model = untied_copy(teacher) if decoder == "untied" else teacher
    home = model.device
    model.to("cuda" if torch.cuda.is_available() else home)  # a GPU does the body pass and the fit much faster
    for p in model.parameters():
        p.requires_grad_(False)
    hidden, targets = masked_rows(model, train_dataset, data_collator)
    body_seconds = time.perf_counter() - start
    train_index, heldout_index = heldout_split(len(targets), seed)
    head = head_module(model).train()
    named = trainable_head_parameters(model)
    for _, p in named:
        p.requires_grad_(True)
    logger.info("Fitting the teacher MLM head (%s decoder; %s) on %d masked positions (%d held out), at most %d "
                "steps", decoder, [n for n, _ in named], len(train_index), len(heldout_index), steps)
    _start_from_unigram(model, targets[train_index])
    torch.manual_seed(seed)
    log, best_step, early = train_head(head, [p for _, p in named], hidden, targets, train_index, heldout_index,
                                       steps, batch_size, learning_rate, eval_every, patience, seed,
                                       bf16=_fast_bf16())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _sync_output_bias(model)
    model.to(home)
    hidden, targets = hidden.to(home), targets.to(home)
    summary = _summary(model, hidden, targets, train_index, heldout_index, decoder, log, best_step, early,
                       body_seconds, time.perf_counter() - start - body_seconds)
    logger.info("Teacher MLM head fitted: held-out masked-token loss %.3f, accuracy %.3f (uniform guess %.3f)",
                summary["heldout_loss"], summary["heldout_accuracy"], summary["uniform_loss"])
    if save:
        with atomic_directory(output_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            write_text_atomic(tmp / FIT_LOG, json.dumps({"summary": summary, "log": log}, indent=2))
            write_text_atomic(tmp / MARKER, json.dumps(identity, indent=2, sort_keys=True))
    return model, False


@torch.no_grad()
def _start_from_unigram(model, targets):
    """Output bias = log frequency of the target tokens (add-one smoothed): the head starts as the best
    context-free guess instead of a uniform one."""
    counts = torch.bincount(targets, minlength=model.config.vocab_size).float() + 1.0
    bias = model.get_output_embeddings().bias
    bias.copy_((counts / counts.sum()).log().to(bias.dtype))


def _fast_bf16():
    """bf16 autocast for the head's matrix products where the CPU does bf16 natively (about twice as fast)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def _sync_output_bias(model):
    """Untied BERT keeps the decoder's bias and `predictions.bias` as two tensors; the forward pass uses the first,
    DistilBERT extraction copies the second: make them equal."""
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    decoder = model.get_output_embeddings()
    if predictions is not None and decoder.bias is not None and predictions.bias is not decoder.bias:
        predictions.bias.copy_(decoder.bias)


def _summary(model, hidden, targets, train_index, heldout_index, decoder, log, best_step, early, body_s, train_s):
    head = head_module(model)
    sample = train_index[:len(heldout_index)]  # as many training rows as held-out ones
    train_loss, train_acc = head_metrics(head, hidden[sample], targets[sample])
    held_loss, held_acc = head_metrics(head, hidden[heldout_index], targets[heldout_index])
    return {"decoder": decoder, "masked_rows": len(targets), "heldout_rows": len(heldout_index),
            "steps": log[-1]["step"] if log else 0, "best_step": best_step, "stopped_early": early,
            "train_loss": train_loss, "train_accuracy": train_acc, "heldout_loss": held_loss,
            "heldout_accuracy": held_acc, "uniform_loss": math.log(model.config.vocab_size),
            "body_seconds": round(body_s, 1), "train_seconds": round(train_s, 1)}


def fit_summary(output_dir):
    """The summary of a fitted head (fit_log.json's "summary": masked-token loss and accuracy, train and held
    out, decoder, steps); None if unknown."""
    path = Path(output_dir) / FIT_LOG
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record.get("summary") if isinstance(record, dict) else None
