"""One shard of a teacher-output cache: batches of rows through the teacher, and the Arrow table of what is stored
(see the column list in docs/teacher_cache.md, "Teacher-output cache")."""

import numpy as np
import torch

from ..data.collators import IGNORE_INDEX, pad_batch
from ..model_utils import (LM_HEADS, QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TASK_HEADS, TOKEN_CLASSIFICATION,
                           forward_arguments)

DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}
TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TASK_LABEL_COLUMNS = ("labels", "label", "start_positions", "end_positions")
DISTILLATION_MASK = "distillation_mask"
_INT32_MAX = 2**31 - 1


# ---- one batch through the teacher ----------------------------------------------------------------------------
def _padded(rows, column, width, value=0):
    out = torch.full((len(rows[column]), width), value, dtype=torch.long)
    for i, seq in enumerate(rows[column]):
        out[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def _teacher_batch(rows, plan, pad_id, epoch):
    """(inputs for the teacher, labels or None, row lengths) for a dict of column lists."""
    features = [{"input_ids": ids} for ids in rows["input_ids"]]
    labels = None
    if plan.collator is not None:
        plan.collator.set_epoch(epoch)
        collated = plan.collator(features)
        input_ids, attention_mask, labels = collated["input_ids"], collated["attention_mask"], collated["labels"]
    else:
        input_ids, attention_mask = pad_batch(features, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    for column in ("token_type_ids", DISTILLATION_MASK):
        if column in rows:
            batch[column] = _padded(rows, column, input_ids.shape[1])
    return batch, labels, [len(ids) for ids in rows["input_ids"]]


def _stored_positions(batch, labels, plan):
    if plan.positions == "masked":
        return labels != IGNORE_INDEX
    mask = batch["attention_mask"].bool()
    if DISTILLATION_MASK in batch:  # CLM data that marks which tokens are distilled (e.g. a continuation)
        mask &= batch[DISTILLATION_MASK].bool()
    return mask


def _run_teacher(teacher, accepted, batch, plan, device):
    inputs = {k: v.to(device) for k, v in batch.items() if k in TEACHER_INPUTS and k in accepted}
    if plan.hidden_layers:
        inputs["output_hidden_states"] = True
    return teacher(**inputs)


class ShardColumns:
    """Per-row numpy arrays of one shard, column by column, turned into an Arrow table at the end."""

    def __init__(self):
        self.columns = {}
        self.positions = 0
        self.topk_mass_sum = 0.0  # teacher probability inside the stored top k, summed over positions (T = 1)
        self.topk_mass_sum_at_t = 0.0  # the same at the plan's coverage temperature (the training temperature)

    def add(self, name, per_row):
        self.columns.setdefault(name, []).extend(per_row)

    def table(self, copied):
        import pyarrow as pa

        arrays = {name: _list_array(rows) for name, rows in self.columns.items()}
        for name in copied.column_names:
            arrays[name] = copied.column(name)
        return pa.table(arrays)


def _list_array(rows):
    """An Arrow list column from per-row numpy arrays of shape (n,) (list) or (n, m) (list of lists)."""
    import pyarrow as pa

    flat = np.concatenate([r.reshape(-1) for r in rows])
    if len(flat) > _INT32_MAX:
        raise ValueError(f"A shard column holds {len(flat)} values, more than Arrow lists index; lower shard_rows.")
    values = pa.array(flat)
    if rows[0].ndim == 2:
        width = rows[0].shape[1]
        values = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32)), values)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _split_rows(tensor, lengths):
    return [tensor[i, :n].numpy() for i, n in enumerate(lengths)]


def _add_lm_outputs(out, logits, mask, plan):
    torch_dtype, _ = DTYPES[plan.dtype]
    counts = mask.sum(1).tolist()
    selected = logits[mask.to(logits.device)][:, :plan.vocab_size].float()  # row-major: row by row, ascending
    logsumexp = torch.logsumexp(selected, dim=-1)
    top = torch.topk(selected, plan.top_k, dim=-1, sorted=True)
    out.positions += int(selected.shape[0])
    mass = float(torch.exp(torch.logsumexp(top.values, -1) - logsumexp).sum())
    out.topk_mass_sum += mass
    t = plan.coverage_temperature
    out.topk_mass_sum_at_t += mass if t == 1 else _topk_mass_sum(selected, top.values, t)
    bounds = np.cumsum([0] + counts)
    ids = top.indices.to(torch.int32).cpu().numpy()
    vals = top.values.to(torch_dtype).cpu().numpy()
    lse = logsumexp.cpu().numpy().astype(np.float32)
    rows = range(len(counts))
    out.add("teacher_positions", [torch.nonzero(mask[i]).flatten().to(torch.int32).numpy() for i in rows])
    out.add("teacher_topk_ids", [ids[bounds[i]:bounds[i + 1]] for i in rows])
    out.add("teacher_topk_logits", [vals[bounds[i]:bounds[i + 1]] for i in rows])
    out.add("teacher_logsumexp", [lse[bounds[i]:bounds[i + 1]] for i in rows])


def _topk_mass_sum(logits, topk_values, temperature):
    """Sum over rows of softmax(logits / T)'s mass on the top k: what L_ce's renormalised target keeps at T (the
    top k by logit is the top k at any T > 0)."""
    t = float(temperature)
    return float(torch.exp(torch.logsumexp(topk_values / t, -1) - torch.logsumexp(logits / t, -1)).sum())


def _add_task_outputs(out, result, head, lengths):
    if head == SEQUENCE_CLASSIFICATION:
        logits = result.logits.float().cpu()
        out.add("teacher_logits", [logits[i].numpy() for i in range(len(lengths))])
    elif head == TOKEN_CLASSIFICATION:
        out.add("teacher_logits", _split_rows(result.logits.float().cpu(), lengths))
    elif head == QUESTION_ANSWERING:
        out.add("teacher_start_logits", _split_rows(result.start_logits.float().cpu(), lengths))
        out.add("teacher_end_logits", _split_rows(result.end_logits.float().cpu(), lengths))


def compute_shard(teacher, dataset, start, end, plan, epoch, pad_id, device, progress=None):
    """The Arrow table of rows [start, end) of `dataset` for `epoch`, and its ShardColumns (for the statistics)."""
    accepted = forward_arguments(teacher)
    out = ShardColumns()
    for b0 in range(start, end, plan.batch_size):
        rows = dataset[b0:min(b0 + plan.batch_size, end)]
        batch, labels, lengths = _teacher_batch(rows, plan, pad_id, epoch)
        with torch.no_grad():
            result = _run_teacher(teacher, accepted, batch, plan, device)
        out.add("input_ids", _split_rows(batch["input_ids"].to(torch.int32), lengths))
        if "token_type_ids" in batch:
            out.add("token_type_ids", _split_rows(batch["token_type_ids"].to(torch.int32), lengths))
        if labels is not None:
            out.add("labels", _split_rows(labels.to(torch.int32), lengths))
        if DISTILLATION_MASK in batch:
            out.add(DISTILLATION_MASK, _split_rows(batch[DISTILLATION_MASK].to(torch.int8), lengths))
        if plan.head in LM_HEADS:
            _add_lm_outputs(out, result.logits, _stored_positions(batch, labels, plan), plan)
        else:
            _add_task_outputs(out, result, plan.head, lengths)
        for layer in plan.hidden_layers:
            states = result.hidden_states[layer].to(DTYPES[plan.dtype][0]).cpu()
            out.add(f"teacher_hidden.{layer}", _split_rows(states, lengths))
        if progress is not None:
            progress.update(len(lengths))
    copied = [c for c in TASK_LABEL_COLUMNS if c in dataset.column_names] if plan.head in TASK_HEADS else []
    source = dataset.select_columns(copied).with_format("arrow")[start:end] if copied else None
    return out.table(source if source is not None else _empty_table()), out


def _empty_table():
    import pyarrow as pa

    return pa.table({})
