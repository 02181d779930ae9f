"""What `DistillationTrainer(teacher_cache=...)` needs of a teacher-output cache: the checks run before any compute,
the default dataset and collator, the columns to keep, the teacher outputs of a batch, and a masked-LM student's
head terms on the rows they read."""

import dataclasses
import logging
import os

from .. import losses
from ..checks import check_chunked_head
from ..model_utils import LM_HEADS, MASKED_LM, head_kind, hidden_size, unwrap, vocab_size
from .collator import CACHED_MASK_KEY, HIDDEN_PREFIX, CachedTeacherCollator
from .epochs import CacheEpochCallback, CachedEpochsDataset
from .outputs import cached_teacher_output, topk_kl_sums
from .store import LOW_TOPK_MASS

logger = logging.getLogger(__name__)

TEACHER_COLUMNS = ("teacher_positions", "teacher_topk_ids", "teacher_topk_logits", "teacher_logsumexp",
                   "teacher_logits", "teacher_start_logits", "teacher_end_logits", CACHED_MASK_KEY)


def open_cache(teacher_cache):
    """A `TeacherCache` from itself or from its directory."""
    if isinstance(teacher_cache, (str, os.PathLike)):
        from .store import load_teacher_cache

        return load_teacher_cache(str(teacher_cache))
    return teacher_cache


def warn_low_coverage(cache):
    mass = cache.stats.get("topk_mass_mean")
    if mass is not None and mass < LOW_TOPK_MASS:
        logger.warning("The teacher cache's top %d logits hold on average only %.0f%% of the teacher's probability: "
                       "L_ce from it trains on the top k renormalised, a much sharper target than the teacher's own "
                       "distribution. Rebuild with a larger top_k, or train with the teacher online.",
                       cache.identity["top_k"], 100 * mass)


class CacheTraining:
    """A teacher-output cache checked against the student, the arguments and the tokenizer (ValueError naming the
    problem and the fix otherwise)."""

    def __init__(self, teacher_cache, student, args, tokenizer=None):
        self.cache = open_cache(teacher_cache)
        identity = self.cache.identity
        self.head, self.vocab_size = identity["head"], identity.get("vocab_size")
        self.top_k = identity.get("top_k") or self.vocab_size  # LM: None stores the whole vocabulary
        self.hidden_layers = list(identity.get("hidden_layers") or [])
        self.positions = identity.get("positions")
        self.is_lm = self.head in LM_HEADS
        _check_arguments(args, identity, self.is_lm)
        self._check_student(student, args)
        _check_tokenizer(tokenizer, identity)
        weights = args.loss_weights
        if "ce" in weights:
            warn_low_coverage(self.cache)
        # Every logit is stored (k = V): L_mse and the other divergences read them scattered back to dense logits.
        self.dense = self.is_lm and self.top_k >= self.vocab_size and (
            "mse" in weights or args.divergence != "forward_kl")
        student_vocab = vocab_size(student) if self.is_lm else None
        # Logit terms compare the cache's vocabulary range; a student padded wider is cut to it.
        self.shared_vocab = self.vocab_size if self.is_lm and student_vocab > self.vocab_size else None
        # A masked-LM student's L_ce (top-k) and L_mlm read its logits only at the masked and cached positions:
        # projecting those rows alone skips most of the [tokens x vocab] head, the larger part of a small student's
        # step. The trainer turns it off where the head is sharded (FSDP, ZeRO-3).
        self.rows_only = not self.dense and "mse" not in weights and _projects_its_own_head(student, args)

    def _check_student(self, student, args):
        student_head = head_kind(student)
        if student_head != self.head:
            raise ValueError(f"The teacher cache holds {self.head} outputs but the student {type(unwrap(student)).__name__}"
                             f" is {student_head}; use a student with the cache's head, or build a cache for it.")
        if self.is_lm and vocab_size(student) < self.vocab_size:
            raise ValueError(f"The teacher cache's logits span {self.vocab_size} tokens but the student's only "
                             f"{vocab_size(student)}; give the student the tokenizer's whole vocabulary.")
        if "cos" in args.loss_weights:
            teacher = self.cache.identity["teacher"]
            if teacher["num_hidden_layers"] not in self.hidden_layers:
                raise ValueError(f"alpha_cos={args.alpha_cos} compares the teacher's last hidden states, which the "
                                 f"cache does not hold (hidden_layers={self.hidden_layers}). Rebuild it with "
                                 "hidden_layers=[-1] (cache-teacher --hidden_layers -1), or set alpha_cos=0.")
            if hidden_size(student) != teacher["hidden_size"]:
                raise ValueError(f"alpha_cos={args.alpha_cos} compares hidden states of equal width, but the cached "
                                 f"teacher states are {teacher['hidden_size']} wide and the student's "
                                 f"{hidden_size(student)}; set alpha_cos=0 for a narrower student.")

    def columns(self):
        """Dataset/batch columns the Trainer must keep for the cached teacher terms."""
        return [*TEACHER_COLUMNS, *(f"{HIDDEN_PREFIX}{i}" for i in self.hidden_layers)]

    def train_dataset(self):
        return self.cache.train_dataset()

    def collator(self, tokenizer):
        return CachedTeacherCollator(tokenizer, self.head, top_k=self.top_k)

    def epoch_callback(self, dataset):
        return CacheEpochCallback(dataset) if isinstance(dataset, CachedEpochsDataset) else None

    def teacher_output(self, inputs):
        return cached_teacher_output(inputs, self.vocab_size, dense=self.dense)

    def topk_sums(self, student_logits, teacher_out, temperature, mask):
        return topk_kl_sums(student_logits, teacher_out, temperature, mask, self.shared_vocab)

    def row_head_sums(self, student, features, teacher_out, labels, kl_mask, weights, temperature):
        """({"ce", "mlm": sums}, agreement) with the student's LM head run only on the rows the terms read.

        `features`: [B, L, D], what the head projects (a forward under `chunked_head.features_only`); `kl_mask`:
        [B, L], the positions of L_ce; `labels`: [B, L], those of L_mlm (-100 elsewhere)."""
        rows = kl_mask | (labels != -100) if labels is not None else kl_mask
        logits = unwrap(student).get_output_embeddings()(features[rows])  # [rows, V]
        sums, agreement = {}, None
        if "ce" in weights:
            teacher_rows = dataclasses.replace(teacher_out, topk_ids=teacher_out.topk_ids[rows],
                                               topk_logits=teacher_out.topk_logits[rows])
            sums, agreement = self.topk_sums(logits, teacher_rows, temperature, kl_mask[rows])
        if "mlm" in weights:
            sums["mlm"] = losses.masked_lm_loss(logits, labels[rows], reduction="sum")
        return sums, agreement


def _projects_its_own_head(student, args):
    """A masked LM whose logits are its output embedding applied to the features its forward passes it."""
    if head_kind(student) != MASKED_LM:
        return False
    try:
        check_chunked_head(student, student, args)  # the conditions of projecting the head's features outside it
    except ValueError:
        return False
    return True


def _check_arguments(args, identity, is_lm):
    """Refuse the terms and settings a cache cannot give."""
    w = args.loss_weights
    not_yet = [f"alpha_{t}={w[t]}" for t in ("hidden", "attn", "relation") if t in w]
    if not_yet:
        raise ValueError(f"{', '.join(not_yet)}: intermediate-layer terms cannot be trained from a teacher cache yet "
                         "(it stores no attention maps or queries/keys/values); train with the teacher model, or "
                         "set these weights to 0.")
    if args.lmbda > 0 or args.seq_kd:
        raise ValueError(f"lmbda={args.lmbda}, seq_kd={args.seq_kd}: on-policy and sequence-level distillation score "
                         "text generated during training, which no cache holds; train with the teacher model, or set "
                         "lmbda=0 and seq_kd=False.")
    if args.logits_chunk_size is not None:
        raise ValueError(f"logits_chunk_size={args.logits_chunk_size} projects the teacher's hidden states with its "
                         "LM head, which a cache does not have; the cache's top-k needs no [tokens x vocab] teacher "
                         "tensor anyway. Set logits_chunk_size=None.")
    top_k, vocab = identity.get("top_k"), identity.get("vocab_size")
    if is_lm and top_k is not None and vocab is not None and top_k < vocab:
        partial = ([f"alpha_mse={args.alpha_mse}"] if "mse" in w else []) + (
            [f"divergence={args.divergence!r}"] if args.divergence != "forward_kl" else [])
        if partial:
            raise ValueError(f"{' and '.join(partial)} need all {vocab} teacher logits, but the cache holds the top "
                             f"{top_k}; only the forward KL is defined from a top-k (README \"Training from the "
                             "cache\"). Set alpha_mse=0 and divergence='forward_kl', or rebuild with top_k="
                             f"{vocab} and dtype='float32'.")
    if identity.get("positions") == "masked" and not args.restrict_ce_to_mask and ("ce" in w or "mse" in w):
        raise ValueError("The teacher cache holds logits at the masked positions only (positions='masked'), but "
                         "restrict_ce_to_mask=False takes L_ce at every token. Set restrict_ce_to_mask=True, or "
                         "rebuild the cache with positions='tokens'.")


def _check_tokenizer(tokenizer, identity):
    if tokenizer is None:
        logger.warning("No processing_class given: the data's tokenizer is not compared with the teacher cache's.")
        return
    from ..data.cache import tokenizer_identity

    expected, got = identity.get("tokenizer") or {}, tokenizer_identity(tokenizer)
    # Where the tokenizer was loaded from does not change its output: compared are its content fields only.
    differing = [k for k in sorted((set(expected) | set(got)) - {"name_or_path"}) if expected.get(k) != got.get(k)]
    if differing:
        raise ValueError(f"The tokenizer (processing_class) differs from the one the teacher cache was built with "
                         f"(fields: {', '.join(differing)}; cache: {expected.get('name_or_path')!r}, given: "
                         f"{got.get('name_or_path')!r}). Pass the cache's tokenizer, or rebuild the cache with this one.")
