"""What the sentence-embedding terms (L_embed, L_embed_relation) need from the models: the teacher's pooling, the
student's pooled (and, for other widths, projected) sentence embedding, and a width projection that is learned or
PCA-initialised from the teacher's embeddings of the corpus.

The projection is an `intermediate.HiddenProjections` map under the key "embed": it joins the student as the same
`distillation_projections` submodule as the hidden-state projections, so it trains, synchronises and is checkpointed
like them and is left out of the exported student.
"""

import contextlib
import logging

import torch

from . import losses
from .intermediate import HiddenProjections, attach_projections, num_layers
from .model_utils import hidden_size, unwrap
from .sentence_embedding import model_source, resolve_pooling

logger = logging.getLogger(__name__)

EMBED_KEY = "embed"  # the projection's key inside distillation_projections
EMBED_TERMS = ("embed", "embed_relation")
# Output fields one of which carries the sentence embedding's graph (an exact 0) out of the student's forward.
_ANCHOR_FIELDS = ("logits", "last_hidden_state")


def refuse_teacher_cache(args):
    """A teacher-output cache holds no sentence embeddings: the terms need the teacher model."""
    w = args.loss_weights
    on = [f"alpha_{t}={w[t]}" for t in EMBED_TERMS if t in w]
    if on:
        raise ValueError(f"{', '.join(on)}: the sentence-embedding terms cannot be trained from a teacher cache (it "
                         "stores the teacher's hidden states at the cached positions only, not its pooled sentence "
                         "embeddings); train with the teacher model, or set these weights to 0.")


class EmbeddingTerms:
    """Set-up, item counts and per-batch sums of L_embed and L_embed_relation. The item is a sentence (an example):
    the trainer divides the sums by the number of sentences of the whole optimizer step."""

    def __init__(self, student, teacher, args, train_dataset=None, pad_token_id=None):
        weights = args.loss_weights
        self.embed, self.relation = "embed" in weights, "embed_relation" in weights
        self.active = self.embed or self.relation
        self.args, self.projections, self.pooling = args, None, None
        self._student_embedding = None
        if not self.active:
            return
        self._last_layer = num_layers(student)  # L_hidden's projected states may follow it in `hidden_states`
        self.pooling = resolve_pooling(model_source(teacher), args.embed_pooling, args.embed_normalize)
        logger.info("Sentence embeddings for alpha_embed/alpha_embed_relation: %s", self.pooling.describe())
        s_width, t_width = hidden_size(student), hidden_size(teacher)
        if self.embed and s_width != t_width:
            dtype = next(unwrap(student).parameters()).dtype
            with torch.random.fork_rng(devices=[]):  # initialised from args.seed, the caller's RNG left alone
                torch.manual_seed(args.seed)
                self.projections = HiddenProjections(s_width, t_width, [EMBED_KEY]).to(dtype=dtype)
            if args.embed_projection_init == "pca":
                self._init_from_pca(teacher, train_dataset, pad_token_id, s_width)

    def _init_from_pca(self, teacher, dataset, pad_token_id, s_width):
        rows = min(len(dataset), self.args.embed_pca_samples) if dataset is not None else 0
        if rows < s_width:
            raise ValueError(f"embed_projection_init='pca' takes the student's {s_width} dimensions from the teacher's "
                             f"embeddings of the first embed_pca_samples training sentences, but only {rows} are "
                             f"available; raise embed_pca_samples to at least {s_width} or use "
                             "embed_projection_init='random'.")
        embeddings = teacher_embeddings(teacher, dataset.select(range(rows)) if hasattr(dataset, "select")
                                        else [dataset[i] for i in range(rows)], self.pooling, pad_token_id)
        linear = self.projections.maps[EMBED_KEY]
        weight, bias = pca_projection(embeddings, s_width)
        with torch.no_grad():
            linear.weight.copy_(weight.to(linear.weight.dtype))
            linear.bias.copy_(bias.to(linear.bias.dtype))
        logger.info("Embedding projection %d -> %d initialised from the PCA of %d teacher sentence embeddings.",
                    s_width, embeddings.shape[1], rows)

    def attach_projections(self, student):
        """Before Trainer wraps the student: the projection trains, synchronises and is checkpointed with it."""
        if self.projections is not None:
            attach_projections(student, self.projections)

    def _embed_in_forward(self, module, args, kwargs, output):
        hidden = getattr(output, "hidden_states", None)
        if hidden is None:
            raise RuntimeError("The student returned no hidden states although alpha_embed/alpha_embed_relation > 0.")
        pooled = losses.sentence_pool(hidden[self._last_layer], kwargs.get("attention_mask"), self.pooling.mode)
        if self.projections is not None:
            pooled = self.projections.project(EMBED_KEY, pooled.to(self.projections.maps[EMBED_KEY].weight.dtype))
        pooled = losses._fp32(pooled)  # a projection under autocast returns half precision
        self._student_embedding = torch.nn.functional.normalize(pooled, dim=-1) if self.pooling.normalize else pooled
        if self.projections is not None:
            # DDP finds the parameters a forward used by walking back from its outputs: add an empty slice of the
            # projection's output (exactly 0) to one of them, so its gradient is expected, not "ready twice".
            anchor = next(k for k in _ANCHOR_FIELDS if output.get(k) is not None)
            output[anchor] = output[anchor] + self._student_embedding.reshape(-1)[:0].sum().to(output[anchor].dtype)
        return output

    @contextlib.contextmanager
    def recording(self, student):
        """Around the student's forward: a forward hook computes its pooled (and projected) sentence embedding inside
        the forward call, where DDP sees the projection used, and keeps it for `term_sums`; removed afterwards."""
        self._student_embedding = None
        handle = (unwrap(student).register_forward_hook(self._embed_in_forward, with_kwargs=True)
                  if self.active else None)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def item_counts(self, batch_size) -> dict:
        return {"embed": batch_size, "embed_relation": batch_size}

    def term_sums(self, teacher_out, tokens) -> dict:
        """{term: sum over the micro-batch's sentences} from the teacher's last hidden state and the student's
        embedding recorded in its forward; `tokens` [B, L] is the non-padding mask."""
        if not self.active:
            return {}
        student = self._student_embedding
        if student is None:
            raise RuntimeError("The student's sentence embedding was not recorded in its forward: the student was "
                               "replaced or wrapped after the trainer was built.")
        t_hidden = teacher_out.hidden_states[-1]
        teacher = losses.sentence_pool(t_hidden, tokens, self.pooling.mode, self.pooling.normalize)
        sums = {}
        if self.embed:
            sums["embed"] = losses.embedding_distance(student, teacher, self.args.embed_loss, reduction="sum")
        if self.relation:
            sums["embed_relation"] = losses.embedding_relation_kl(student, teacher,
                                                                  self.args.embed_relation_temperature, reduction="sum")
        return sums


@torch.no_grad()
def teacher_embeddings(teacher, rows, pooling, pad_token_id=None, batch_size=32):
    """The teacher's pooled sentence embeddings [N, D] (float32) of tokenized rows ({"input_ids"}), right-padded."""
    model = unwrap(teacher)
    was_training = model.training
    model.eval()
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            ids = [list(rows[i]["input_ids"]) for i in range(start, min(start + batch_size, len(rows)))]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            out.append(losses.sentence_pool(hidden, mask, pooling.mode, pooling.normalize).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def pca_projection(embeddings, width):
    """(weight [D, width], bias [D]) of a linear map from `width` coordinates to the embeddings' space: the mean plus
    the top `width` principal directions, so a student embedding equal to a sentence's PCA coordinates maps back to
    that sentence's best rank-`width` reconstruction."""
    mean = embeddings.mean(0)
    _, _, vh = torch.linalg.svd(embeddings - mean, full_matrices=False)
    return vh[:width].t().contiguous(), mean
