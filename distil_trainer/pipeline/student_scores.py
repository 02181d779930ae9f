"""Whether a student is any good, judged on what its teacher is for, beside the teacher and the student as extracted
before distillation:

- embedding quality: STS-B dev Spearman correlation between the gold similarity scores and the cosine of the two
  sentences' embeddings, pooled from the last hidden states the teacher's way (`pooling`: its sentence-transformers
  folder's pooling, mean pooling by default) -- the standard score of sentence-embedding models such as
  all-MiniLM-L6-v2;
- fidelity on held-out text (lines of the corpus the run did not train on): mean cosine of the token and the
  sentence embeddings to the teacher's; when the collator masks (the logits objective), at the masked positions (the
  run's masking, fixed seed): top-1 agreement with the teacher's MLM prediction, masked-token loss and accuracy.

STS-B comes from a GLUE STS-B dev.tsv given as `stsb_file`, else from the Hub (nyu-mll/glue, stsb, validation);
when neither is available the scores say why, and the one-line result rests on held-out fidelity.
"""

import copy
import csv
from pathlib import Path

import torch

STSB_HUB = ("nyu-mll/glue", "stsb")


# ---------- embeddings and correlation ----------

def mean_pool(hidden, attention_mask):
    """Mean of the token vectors over the real (mask 1) positions: [batch, length, dim] -> [batch, dim] (half precision upcast to float32)."""
    from ..losses import sentence_pool

    return sentence_pool(hidden, attention_mask, "mean")


def pool(hidden, attention_mask, pooling=None):
    """Sentence embeddings [batch, dim] pooled as `pooling` (a sentence_embedding.Pooling) says; mean by default."""
    from ..losses import sentence_pool

    if pooling is None:
        return mean_pool(hidden, attention_mask)
    return sentence_pool(hidden, attention_mask, pooling.mode, pooling.normalize)


@torch.no_grad()
def embed_sentences(model, tokenizer, sentences, batch_size=64, max_length=128, pooling=None):
    """Pooled last hidden states of the model's body (its LM head is not used), float32 [n, dim]; mean pooling
    unless `pooling` (a sentence_embedding.Pooling) says otherwise."""
    body = model.base_model.eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out.append(pool(hidden.float(), enc["attention_mask"], pooling))
    return torch.cat(out)


def spearman(x, y):
    """Spearman rank correlation (scipy)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).correlation)


def stsb_spearman(model, tokenizer, stsb, max_length=128, pooling=None):
    """Spearman correlation between the gold scores and the cosine of the two sentences' embeddings."""
    first = embed_sentences(model, tokenizer, stsb["sentence1"], max_length=max_length, pooling=pooling)
    second = embed_sentences(model, tokenizer, stsb["sentence2"], max_length=max_length, pooling=pooling)
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1)
    return spearman(cosine.tolist(), stsb["score"])


# ---------- STS-B ----------

# The option that gives each split as a GLUE tsv, that file's name, and how messages call the split.
STSB_SPLITS = {"validation": ("--stsb_file", "dev.tsv", "STS-B"),
               "train": ("--stsb_train_file", "train.tsv", "STS-B's training split")}


def read_stsb_tsv(path, split="validation"):
    """{"sentence1", "sentence2", "score"} lists from a GLUE STS-B tsv (columns found by header name)."""
    path = Path(path)
    if not path.is_file():
        option, tsv, _ = STSB_SPLITS[split]
        raise FileNotFoundError(f"{option} {path} does not exist; pass a GLUE STS-B {tsv} (or leave it unset to take "
                                "STS-B from the Hub).")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, [])
        try:
            columns = [header.index(c) for c in ("sentence1", "sentence2", "score")]
        except ValueError:
            raise ValueError(f"{path}: header {header} lacks sentence1/sentence2/score; is this a GLUE STS-B "
                             "tsv?") from None
        table = [row for row in rows if len(row) > max(columns)]
    return {"sentence1": [r[columns[0]] for r in table], "sentence2": [r[columns[1]] for r in table],
            "score": [float(r[columns[2]]) for r in table]}


def load_stsb(stsb_file=None, split="validation"):
    """(pairs, source, why_unavailable): an STS-B split (dev by default) from `stsb_file`, else the Hub; pairs is None
    when neither can be had (offline without a file), and `why_unavailable` then says how to get it."""
    if stsb_file:
        return read_stsb_tsv(stsb_file, split), str(stsb_file), None
    name, config = STSB_HUB
    try:
        from datasets import load_dataset

        data = load_dataset(name, config, split=split)
    except Exception as err:  # offline, no cache, no network: the run goes on without STS-B
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        option, tsv, what = STSB_SPLITS[split]
        return None, None, (f"{what} was unavailable ({reason}); pass {option} path/to/STS-B/{tsv} (GLUE) or "
                            f"run once with Hub access to cache {name} ({config}, {split}).")
    return ({"sentence1": list(data["sentence1"]), "sentence2": list(data["sentence2"]),
             "score": [float(s) for s in data["label"]]}, f"{name} ({config}, {split})", None)


# ---------- fidelity on held-out text ----------

def read_heldout(path, tokenizer, max_length, max_lines=None):
    """Token ids of the non-empty lines of `path` (truncated to `max_length`), as the collator takes them."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"heldout_file {path} holds no text; give it lines of the corpus the run does not train on.")
    return read_heldout_lines(lines[:max_lines] if max_lines else lines, tokenizer, max_length)


def read_heldout_lines(lines, tokenizer, max_length):
    """[{"input_ids"}] of each line, truncated to `max_length` tokens."""
    return [{"input_ids": ids} for ids in tokenizer(list(lines), truncation=True, max_length=max_length)["input_ids"]]


def mlm_logits_at(model, hidden):
    """The model's MLM logits for the given last hidden states [rows, dim] (its head only)."""
    if hasattr(model, "vocab_projector"):  # DistilBertForMaskedLM: its head is four modules
        x = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
        return model.vocab_projector(x)
    from .teacher_head import head_module

    return head_module(model)(hidden)


@torch.no_grad()
def heldout_fidelity(models, teacher, rows, collator, batch_size=32, pooling=None):
    """{role: {token_cosine, sentence_cosine[, top1_agreement, mlm_loss, mlm_accuracy]}} of each model in `models`
    against `teacher` on the held-out `rows`. Embeddings come from the unmasked text (sentence embeddings pooled as
    `pooling`); the MLM figures from the masked positions of the collator's masking (a copy at epoch 0: the same
    masks for every model and run), only when the collator masks (makes `labels`)."""
    collator = copy.copy(collator)
    if hasattr(collator, "set_epoch"):
        collator.set_epoch(0)
    sums = {role: {} for role in models}
    counts = {"token_cosine": 0, "sentence_cosine": 0}
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start:start + batch_size])
        masked = batch.get("labels") is not None
        ids, mask = (_unmasked(batch) if masked else batch["input_ids"]), batch["attention_mask"]
        t_hidden = _hidden(teacher, ids, mask)
        for role, model in models.items():
            hidden = t_hidden if model is teacher else _hidden(model, ids, mask)
            _add(sums[role], _embedding_sums(hidden, t_hidden, mask, pooling))
        counts["token_cosine"] += int(mask.sum())
        counts["sentence_cosine"] += len(ids)
        if masked:
            for role, figures in _mlm_sums(models, teacher, batch).items():
                _add(sums[role], figures)
            where = batch["labels"] != -100
            for key in ("top1_agreement", "mlm_loss", "mlm_accuracy"):
                counts[key] = counts.get(key, 0) + int(where.sum())
    return {role: {k: v / counts[k] for k, v in s.items()} for role, s in sums.items()}


def _add(total, figures):
    for key, value in figures.items():
        total[key] = total.get(key, 0) + value


def _embedding_sums(hidden, t_hidden, mask, pooling):
    real = mask.bool()
    return {"token_cosine": _cosine(hidden[real], t_hidden[real]).sum().item(),
            "sentence_cosine": _cosine(pool(hidden, mask, pooling), pool(t_hidden, mask, pooling)).sum().item()}


def _mlm_sums(models, teacher, batch):
    """{role: MLM figure sums} at the batch's masked positions (its labels), against the teacher's prediction."""
    mask, where = batch["attention_mask"], batch["labels"] != -100
    targets = batch["labels"][where]
    t_logits = mlm_logits_at(teacher, _hidden(teacher, batch["input_ids"], mask)[where]).float()
    sums = {}
    for role, model in models.items():
        logits = t_logits if model is teacher else mlm_logits_at(
            model, _hidden(model, batch["input_ids"], mask)[where]).float()
        sums[role] = {"top1_agreement": int((logits.argmax(-1) == t_logits.argmax(-1)).sum()),
                      "mlm_loss": torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                      "mlm_accuracy": int((logits.argmax(-1) == targets).sum())}
    return sums


def _unmasked(batch):
    """The batch's original token ids (the collator keeps them in `labels` at the masked positions)."""
    where = batch["labels"] != -100
    ids = batch["input_ids"].clone()
    ids[where] = batch["labels"][where]
    return ids


def _hidden(model, input_ids, attention_mask):
    return model.base_model.eval()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# ---------- all together ----------

def score_models(models, teacher, tokenizer, collator, stsb_file=None, heldout_rows=None, max_length=128,
                 pooling=None):
    """The scores of `models` ({role: model}, roles as in score_text.MODEL_ROLES; the teacher is one) as a JSON-ready
    dict: {"models": {role: {stsb_spearman?, fidelity...}}, "stsb_source", "stsb_unavailable", "stsb_pairs",
    "heldout_sequences", "pooling"}; sentence embeddings pooled as `pooling` (mean by default)."""
    stsb, source, why = load_stsb(stsb_file)
    scores = {"models": {role: {} for role in models}, "stsb_source": source, "stsb_unavailable": why,
              "stsb_pairs": len(stsb["score"]) if stsb else 0, "heldout_sequences": len(heldout_rows or []),
              "pooling": pooling.describe() if pooling is not None else "mean pooling"}
    if stsb:
        for role, model in models.items():
            scores["models"][role]["stsb_spearman"] = stsb_spearman(model, tokenizer, stsb, max_length, pooling)
    if heldout_rows:
        for role, figures in heldout_fidelity(models, teacher, heldout_rows, collator, pooling=pooling).items():
            scores["models"][role].update(figures)
    return scores
