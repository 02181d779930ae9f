"""What `DistillationTrainer(teacher_cache=...)` needs of a teacher-output cache: the checks run before any compute,
the default dataset and collator, the columns to keep, and the teacher outputs of a batch (for the fused LM-head path,
as `TeacherRows`: the student's head then projects only the rows its terms read)."""

import logging
import os

from ..fused_head import TeacherRows
from ..model_utils import LM_HEADS, head_kind, hidden_size, unwrap, vocab_size
from .collator import CACHED_MASK_KEY, HIDDEN_PREFIX, CachedTeacherCollator
from .epochs import CacheEpochCallback, CachedEpochsDataset
from .outputs import cached_teacher_output, topk_kl_sums, within_range
from .store import LOW_TOPK_MASS, topk_coverage

logger = logging.getLogger(__name__)

TEACHER_COLUMNS = ("teacher_positions", "teacher_topk_ids", "teacher_topk_logits", "teacher_logsumexp",
                   "teacher_logits", "teacher_start_logits", "teacher_end_logits", CACHED_MASK_KEY)


def open_cache(teacher_cache):
    """A `TeacherCache` from itself or from its directory."""
    if isinstance(teacher_cache, (str, os.PathLike)):
        from .store import load_teacher_cache

        return load_teacher_cache(str(teacher_cache))
    return teacher_cache


def warn_low_coverage(cache, temperature=None):
    mass, measured_at = topk_coverage(cache.stats, temperature)
    if mass is not None and mass < LOW_TOPK_MASS:
        logger.warning("The teacher cache's top %d logits hold on average only %.0f%% of the teacher's probability "
                       "(at T = %g): L_ce from it trains on the top k renormalised, a much sharper target than the "
                       "teacher's own distribution. Rebuild with a larger top_k, or train with the teacher online.",
                       cache.identity["top_k"], 100 * mass, measured_at)


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
            warn_low_coverage(self.cache, args.temperature)
        # Every logit is stored (k = V): L_mse and the other divergences read them scattered back to dense logits.
        self.dense = self.is_lm and self.top_k >= self.vocab_size and (
            "mse" in weights or args.divergence != "forward_kl")
        # Leading vocabulary entries the logit terms compare, as online (checks.shared_vocab_size): all when the
        # student's head has the cache's width, else the narrower of the two.
        self.shared_vocab = _shared_vocab(vocab_size(student), self.vocab_size, identity) if self.is_lm else None

    def _check_student(self, student, args):
        student_head = head_kind(student)
        if student_head != self.head:
            raise ValueError(f"The teacher cache holds {self.head} outputs but the student {type(unwrap(student)).__name__}"
                             f" is {student_head}; use a student with the cache's head, or build a cache for it.")
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
        return topk_kl_sums(student_logits, teacher_out, temperature, mask, self.shared_vocab,
                            teacher_wider=self.shared_vocab is not None and self.shared_vocab < self.vocab_size)

    def teacher_rows(self, teacher_out):
        """The cached teacher logits as the fused LM-head path reads them (`fused_head.TeacherRows`): the top k
        (restricted to the student's range when the cache spans more entries), or dense logits."""
        if teacher_out.topk_ids is None:
            return TeacherRows(logits=teacher_out.logits)
        ids, logits = teacher_out.topk_ids, teacher_out.topk_logits
        if self.shared_vocab is not None and self.shared_vocab < self.vocab_size:
            ids, logits = within_range(ids, logits, self.shared_vocab)
        return TeacherRows(topk_ids=ids, topk_logits=logits)


def _shared_vocab(student_vocab, cache_vocab, identity):
    """None (every entry) when the student's head is as wide as the cache's, else the narrower width, which must
    hold every token of the tokenizer (the rows past it are padding no text maps to)."""
    if student_vocab == cache_vocab:
        return None
    shared = min(student_vocab, cache_vocab)
    tokens = (identity.get("tokenizer") or {}).get("vocab_size")
    if tokens is not None and tokens > shared:
        raise ValueError(f"The teacher cache's logits span {cache_vocab} entries and the student's head {student_vocab}"
                         f": the narrower leaves out ids of the cache's tokenizer ({tokens} tokens). Give the student "
                         f"at least {tokens} vocabulary rows (the teacher's {cache_vocab}, as distil-trainer extract "
                         "does).")
    logger.info("Student head (%d rows) and teacher cache (%d) are padded apart; comparing logits over the first %d "
                "entries, as online.", student_vocab, cache_vocab, shared)
    return shared


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
    top_k, vocab = identity.get("top_k"), identity.get("vocab_size")
    if is_lm and top_k is not None and vocab is not None and top_k < vocab:
        partial = ([f"alpha_mse={args.alpha_mse}"] if "mse" in w else []) + (
            [f"divergence={args.divergence!r}"] if args.divergence != "forward_kl" else [])
        if partial:
            raise ValueError(f"{' and '.join(partial)} need all {vocab} teacher logits, but the cache holds the top "
                             f"{top_k}; only the forward KL is defined from a top-k (docs/teacher_cache.md, \"Training "
                             "from the cache\"). Set alpha_mse=0 and divergence='forward_kl', or rebuild with top_k="
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
