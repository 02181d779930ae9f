"""`DistillationTrainer`: `transformers.Trainer` whose loss is the teacher-student objective.

The loss terms are the pure functions of `losses.py`. What this class adds is the plumbing around them:
a frozen teacher placed like the student, the position masks each term averages over, denominators that make
gradient accumulation and data parallelism exact, and per-term logging.
"""

import contextlib
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer

from . import chunked_head, logit_terms, losses
from .atomic import write_text_atomic
from .callbacks import (CollatorEpochCallback, NonFiniteLossGuard, check_epoch_reaches_workers,
                        nonfinite_parameters)
from .checks import check_output_dir, check_student_teacher, check_student_terms
from .distillation_config import DistillationArguments
from .embedding import EmbeddingTerms, refuse_teacher_cache
from .intermediate import IntermediateTerms, saving_projections
from .on_policy import PROMPT_LENGTH_KEY, make_on_policy
from .process_group import end_process_group_at_exit
from .run_lock import output_dir_lock
from .teacher_cache.collator import CACHED_MASK_KEY
from .teacher_cache.training import CacheTraining
from .model_utils import (CAUSAL_LM, LM_HEADS, QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION,
                          forward_arguments, freeze_position_embeddings, freeze_teacher, freeze_token_type_embeddings,
                          head_kind, load_teacher, prepare_teacher_for_deepspeed, unwrap, uses_token_type_ids)

logger = logging.getLogger(__name__)

# Batch keys that are targets, never model inputs for the teacher.
TARGET_KEYS = ("labels", "start_positions", "end_positions")
# Optional batch key: 0/1 per position, restricting where the token-level (or QA span) KL/MSE is taken.
DISTILLATION_MASK_KEY = "distillation_mask"
TERMS = ("ce", "mlm", "clm", "mse", "cos", "task", "hidden", "attn", "relation", "embed", "embed_relation")
STAGING_DIR = ".checkpoint-staging"
_TEACHER_TERMS = ("ce", "mse", "cos", "hidden", "attn", "relation", "embed", "embed_relation")
# Terms read from the models' logits; without any, masked/causal LMs run with their LM head passed through.
_LOGIT_TERMS = ("ce", "mse", "mlm", "clm", "task")


@dataclass
class MicroBatchPlan:
    """What the loss of one micro-batch averages over, computed once when its optimizer step is fetched: the
    position masks of the token-level terms and each term's item count."""

    input_ids: torch.Tensor  # identifies the micro-batch when compute_loss receives it
    masks: dict
    counts: torch.Tensor  # [len(TERMS)]


class DistillationTrainer(Trainer):
    """Trainer for knowledge distillation.

    Args:
        model: the student.
        teacher_model: the teacher, as a model or as a Hub name / local path / GGUF file (`file.gguf` or
            `folder::file.gguf`), loaded with the Auto class matching the student's head and
            `args.teacher_model_init_kwargs`, e.g. `{"dtype": "bfloat16"}`.
        args: `DistillationArguments`.
        teacher_processing_class: the teacher's tokenizer, needed only when the two vocabularies have different
            sizes (compared over their shared range if it is the tokenizer of the data); loaded from the teacher's
            name when the teacher is given as one.
        teacher_cache: in place of `teacher_model`, a teacher-output cache (`TeacherCache` or its directory, see
            `teacher_cache/`): no teacher is loaded, its outputs are read from the cache's rows. `train_dataset`
            defaults to the cache's rows and `data_collator` to `CachedTeacherCollator`.
        Other arguments are those of `transformers.Trainer`.
    """

    # compute_loss divides each term by its item count over the whole optimizer step (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, teacher_model=None, args=None, teacher_processing_class=None, teacher_cache=None,
                 **kwargs):
        if not isinstance(args, DistillationArguments):
            raise TypeError(f"args must be DistillationArguments, got {type(args).__name__}.")
        if model is None:
            raise ValueError("DistillationTrainer needs the student as model=.")
        self._student_head = head_kind(model)
        self._cache = None
        if teacher_cache is not None:
            self._init_from_cache(model, teacher_model, teacher_cache, args, kwargs)
            return
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model= (a model, a Hub name or a local path) or "
                             "teacher_cache= (a teacher-output cache).")
        if isinstance(teacher_model, (str, os.PathLike)):
            # Its tokenizer is loaded from the same place only if the vocabulary sizes differ (shared_vocab_size).
            teacher_processing_class = teacher_processing_class or str(teacher_model)
            teacher_model = load_teacher(str(teacher_model), self._student_head, args.teacher_model_init_kwargs,
                                         seed=args.seed)
        elif args.teacher_model_init_kwargs:
            logger.warning("teacher_model_init_kwargs is ignored: teacher_model was given already loaded.")
        # Leading vocabulary entries the logit terms compare: None (all) unless the two vocabularies are padded
        # differently around one tokenizer.
        self._shared_vocab = check_student_teacher(model, teacher_model, args, kwargs.get("processing_class"),
                                                   teacher_processing_class)
        # L_hidden/L_attn/L_relation: eager attention, hooks, and width projections that join the student.
        self._intermediate = IntermediateTerms(model, teacher_model, args)
        self._intermediate.attach_projections(model)
        # L_embed/L_embed_relation: the teacher's pooling, the student's pooled embedding (projected to other widths).
        self._embedding = EmbeddingTerms(model, teacher_model, args, kwargs.get("train_dataset"),
                                         getattr(kwargs.get("processing_class"), "pad_token_id", None))
        self._embedding.attach_projections(model)
        # lmbda / seq_kd: micro-batches whose continuations are generated before the loss (on_policy.py).
        self._on_policy = make_on_policy(args, model, kwargs.get("processing_class"), self._student_head == CAUSAL_LM)
        # Freeze before the optimizer is built, so frozen tensors are not even handed to it.
        if args.freeze_pos_embs:
            logger.info("Frozen: %s", freeze_position_embeddings(model))
        if args.freeze_token_type_embds:
            logger.info("Frozen: %s", freeze_token_type_embeddings(model))
        # Each model is handed the batch columns its own forward takes (read before Trainer picks the columns
        # to keep): a BERT teacher gets the token_type_ids that a DistilBERT student's forward rejects.
        self._student_inputs = forward_arguments(model)
        self._teacher_inputs = forward_arguments(teacher_model)
        self._warn_missing_segments = uses_token_type_ids(teacher_model) and self._student_head in (
            SEQUENCE_CLASSIFICATION, QUESTION_ANSWERING)

        super().__init__(model=model, args=args, **kwargs)
        self._init_common(teacher_model)
        self.teacher = freeze_teacher(teacher_model)
        if self.is_deepspeed_enabled:
            self.teacher = prepare_teacher_for_deepspeed(self.teacher, self.accelerator)
            logger.info("Teacher: DeepSpeed inference engine, ZeRO stage %s",
                        self.teacher.zero_optimization_stage())
        elif not getattr(self.teacher, "hf_device_map", None):  # a teacher dispatched over devices stays put
            # Not wrapped in DDP/FSDP: it has no gradients to synchronise, each rank runs its own replica.
            self.teacher.to(self.args.device)

    def _init_from_cache(self, model, teacher_model, teacher_cache, args, kwargs):
        """No teacher: its outputs come from a teacher-output cache, checked here before any compute."""
        if teacher_model is not None:
            raise ValueError("Give teacher_model= or teacher_cache=, not both: a cached run loads no teacher.")
        check_student_terms(model, args)
        refuse_teacher_cache(args)
        self._embedding = EmbeddingTerms(model, model, args)  # refused above: off
        tokenizer = kwargs.get("processing_class")
        self._cache = CacheTraining(teacher_cache, model, args, tokenizer)
        self._shared_vocab = self._cache.shared_vocab
        self._intermediate = IntermediateTerms(model, model, args)  # its terms are refused from a cache: all off
        self._on_policy = None
        for flag, freeze in ((args.freeze_pos_embs, freeze_position_embeddings),
                             (args.freeze_token_type_embds, freeze_token_type_embeddings)):
            if flag:
                logger.info("Frozen: %s", freeze(model))
        self._student_inputs, self._teacher_inputs = forward_arguments(model), set()
        self._warn_missing_segments = False
        if kwargs.get("train_dataset") is None:
            kwargs["train_dataset"] = self._cache.train_dataset()
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self._cache.collator(tokenizer)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = None
        epoch_callback = self._cache.epoch_callback(self.train_dataset)
        if epoch_callback is not None:
            self.add_callback(epoch_callback)
        self._init_common(None)

    def _init_common(self, teacher_model):
        w = self.args.loss_weights
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled
                                           and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        # Rows per chunk of the fused LM-head path in training (chunked_head), or None: full logits.
        self._chunk_size = chunked_head.training_chunk_size(self.model, teacher_model, self.args, sharded,
                                                            self.args.device.type)
        self._need_hidden = "cos" in w or self._intermediate.needs_hidden_states or self._embedding.active
        # Sentence embeddings and no logit term: the LM heads are passed through (no [tokens x vocab] projection).
        self._headless = self._embedding.active and not any(t in w for t in _LOGIT_TERMS)
        self._step_plans = []  # the MicroBatchPlan of each micro-batch of the current optimizer step
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            end_process_group_at_exit(self)  # else a gloo rank can abort at interpreter exit (process_group.py)
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(CollatorEpochCallback(self.data_collator))
        check_epoch_reaches_workers(self.args, self.data_collator, self.train_dataset)
        self.terms = TERMS
        self._nonfinite_flags = torch.zeros(len(TERMS), device=self.args.device)
        self.nonfinite_steps, self.nonfinite_terms, self.stopped_on_nonfinite = 0, {}, False
        self.add_callback(NonFiniteLossGuard(self))
        self._weights = w
        self._step_counts = None  # item counts per term over the current optimizer step, all ranks
        self._staging_checkpoint = False
        self._log_sums = defaultdict(float)
        self._log_counts = defaultdict(float)

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the columns only the teacher takes (token_type_ids for a BERT teacher of a DistilBERT student), the
        # distillation mask, and the stored lengths that group_by_length sampling reads (otherwise transformers
        # drops the column and re-measures every example). The student's forward filters them out again.
        teacher_only = sorted(self._teacher_inputs - set(self._signature_columns))
        cached = self._cache.columns() if self._cache is not None else []
        for column in (*teacher_only, *cached, DISTILLATION_MASK_KEY, PROMPT_LENGTH_KEY, self.args.length_column_name):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)  # a teacher cache's rows: read from its Arrow offsets
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths)
        return super()._get_train_sampler(train_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Without targets Trainer calls model(**inputs) itself, bypassing compute_loss: give the student only the
        # columns its forward takes (the batch may carry the teacher's token_type_ids or a distillation mask).
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        return_loss = inputs.get("return_loss")
        loss_without_labels = not self.label_names and (self.can_return_loss if return_loss is None else return_loss)
        if not (has_labels or loss_without_labels):
            inputs = {k: v for k, v in inputs.items() if k in self._student_inputs}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ---- checkpoints: written under a staging name, renamed into place when complete ----

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, made atomic: a crash or a full disk mid-save leaves no half-written
        `checkpoint-N` for a resume to pick up, and the older checkpoints stay as they were."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        bad = nonfinite_parameters(self.model, self.accelerator)
        if bad:  # a resume would start from them: never write such a checkpoint, whatever asked for it
            raise RuntimeError(
                f"Not writing {name}: {len(bad)} student parameters hold NaN/inf ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}). The earlier checkpoints are intact and a re-run resumes from the "
                "last one; if this recurs, lower the learning rate or set max_grad_norm > 0.")
        staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left by a crash during an earlier save
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = False
        self.accelerator.wait_for_everyone()  # every rank has written its files (RNG state, shards)
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)  # the same step saved again (a run restarted with overwrite)
            os.replace(staged, final)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                self.state.best_model_checkpoint = best if os.path.exists(best) else None
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint=None, **kwargs):
        check_output_dir(self.args, resume_from_checkpoint)
        lock = output_dir_lock(self.args.output_dir) if self.args.should_save else contextlib.nullcontext()
        with lock:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        # Checkpoints keep the width projections (for resume); the exported student leaves them out.
        with saving_projections(self.model) if self._staging_checkpoint else contextlib.nullcontext():
            super()._save(output_dir, state_dict)
        # Trainer pickles the arguments into training_args.bin, Hub token included. Keep them as JSON instead,
        # where to_json_string masks every *_token field.
        output_dir = output_dir or self.args.output_dir
        pickled = os.path.join(output_dir, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        write_text_atomic(os.path.join(output_dir, "training_args.json"), self.args.to_json_string())

    # ---- which positions and how many items each term averages over: once per micro-batch ----

    def _position_masks(self, inputs):
        """Boolean masks of the positions the token-level terms use: "tokens" (non-padding) and "logits" (L_ce /
        L_mse: also within the distillation mask, the masked positions with restrict_ce_to_mask, the cached ones)."""
        ids = inputs.get("input_ids")
        attention = inputs.get("attention_mask")
        tokens = attention.bool() if attention is not None else torch.ones_like(ids, dtype=torch.bool)
        logits_mask = tokens
        if inputs.get(DISTILLATION_MASK_KEY) is not None:
            logits_mask = logits_mask & inputs[DISTILLATION_MASK_KEY].bool()
        if self.args.restrict_ce_to_mask and self._student_head in LM_HEADS:
            logits_mask = logits_mask & (inputs["labels"] != -100)
        if inputs.get(CACHED_MASK_KEY) is not None:  # an LM teacher cache: the positions it holds logits for
            logits_mask = logits_mask & inputs[CACHED_MASK_KEY]
        return {"tokens": tokens, "logits": logits_mask}

    def _plan(self, inputs):
        """`MicroBatchPlan` of a micro-batch: its position masks and each term's item count (the denominators)."""
        masks = self._position_masks(inputs)
        batch_size = inputs["input_ids"].shape[0]
        per_example = self._student_head in (SEQUENCE_CLASSIFICATION, QUESTION_ANSWERING)
        labels = inputs.get("labels")
        logit_items = batch_size if per_example else masks["logits"].sum()
        counts = {
            "ce": logit_items, "mse": logit_items,
            "cos": masks["tokens"].sum(),
            "mlm": (labels != -100).sum() if labels is not None else 0,
            "clm": (labels[..., 1:] != -100).sum() if labels is not None else 0,
            "task": (labels != -100).sum() if self._student_head == TOKEN_CLASSIFICATION else batch_size,
            **self._intermediate.item_counts(masks["tokens"]),
            **self._embedding.item_counts(batch_size),
        }
        # Stacked on the batch's device without .item(): no host-device sync per micro-batch on GPUs.
        device = inputs["input_ids"].device
        counts = torch.stack([torch.as_tensor(counts[t], dtype=torch.float64, device=device) for t in TERMS])
        return MicroBatchPlan(inputs["input_ids"], masks, counts)

    def _plan_of(self, inputs):
        """The plan get_batch_samples made for this micro-batch (found by its input_ids tensor), else a new one."""
        for k, plan in enumerate(self._step_plans):
            if plan.input_ids is inputs.get("input_ids"):
                return self._step_plans.pop(k)
        return self._plan(inputs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and self._on_policy is not None:  # before the counts: they are those of the new batches
            batch_samples = self._on_policy(batch_samples, unwrap(self.model), unwrap(self.teacher),
                                            self.state.global_step, self.accelerator.process_index)
        self._step_plans = [self._plan(b) for b in batch_samples]
        if batch_samples:
            counts = sum(plan.counts.cpu() for plan in self._step_plans).to(device)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            self._step_counts = counts
        return batch_samples, num_items_in_batch

    # ---- the models' outputs ----

    def _check_batch(self, inputs):
        if ("mlm" in self._weights or "clm" in self._weights) and inputs.get("labels") is None:
            term = "alpha_mlm" if "mlm" in self._weights else "alpha_clm"
            raise ValueError(
                f"{term}={self._weights[term[6:]]} but the batch has no 'labels'. Use a collator that makes them "
                "(distil_trainer.data's MLM or CLM collator), or set the weight to 0."
            )

    def _check_segments(self, inputs):
        """Warn once when a teacher that reads segment ids gets none on a (likely) sentence-pair task."""
        if self._warn_missing_segments and "token_type_ids" not in inputs:
            self._warn_missing_segments = False
            logger.warning(
                "The teacher %s reads token_type_ids but the batch has none, so it sees every token as segment 0. "
                "For sentence pairs and QA, tokenize with return_token_type_ids=True (a DistilBERT tokenizer then "
                "makes them too).", type(unwrap(self.teacher)).__name__)

    def _forward(self, model, inputs, keep, output_hidden_states, features_only=False):
        model_inputs = {k: v for k, v in inputs.items() if k in keep}
        if output_hidden_states:
            model_inputs["output_hidden_states"] = True
        model_inputs.update(self._intermediate.forward_options())
        # features_only: the forward returns what the LM head projects, not logits (the fused head path)
        with chunked_head.features_only(model) if features_only else contextlib.nullcontext():
            return model(**model_inputs)

    def _student_output(self, model, inputs, fused):
        """(student output, its recorded queries/keys/values); its LM losses are computed here, so it gets its
        targets only for a task loss."""
        w = self._weights
        keep = self._student_inputs - (set() if "task" in w else set(TARGET_KEYS))
        headless = fused or (self._headless and _has_lm_head(model))
        with self._intermediate.recording("student") as qkv, self._embedding.recording(model):
            return self._forward(model, inputs, keep, self._need_hidden, headless), qkv

    def _teacher_output(self, inputs, fused):
        """(teacher output or a cache's `CachedTeacherOutput`, its queries/keys/values); None when no term uses it."""
        if self._cache is not None:
            return self._cache.teacher_output(inputs), {}
        if not any(t in self._weights for t in _TEACHER_TERMS):
            return None, {}
        self._check_segments(inputs)
        # A teacher with no LM head (a bare body, for L_cos) has no head features to give: a plain forward.
        headless = (fused or self._headless) and _has_lm_head(self.teacher)
        with torch.no_grad(), self.accelerator.autocast(), self._intermediate.recording("teacher") as qkv:
            out = self._forward(self.teacher, inputs, self._teacher_inputs - set(TARGET_KEYS), self._need_hidden,
                                headless)
        return out, qkv

    # ---- the loss ----

    def _term_sums(self, inputs, plan, student_out, teacher_out, fused):
        """{term: sum over its items in this micro-batch} of the weighted terms outside the fused head path, and
        the top-1 agreement when they include L_ce / L_mse."""
        w, masks = self._weights, plan.masks
        sums, agreement = {}, None
        if not fused:
            if teacher_out is not None and ("ce" in w or "mse" in w):
                sums, agreement = logit_terms.teacher_logit_sums(self._student_head, w, self.args, masks["logits"],
                                                                 student_out, teacher_out, self._shared_vocab,
                                                                 self._cache)
            if "mlm" in w or "clm" in w:
                sums.update(logit_terms.lm_loss_sums(w, student_out.logits, inputs["labels"]))
        if "cos" in w:
            sums["cos"] = losses.hidden_cosine(student_out.hidden_states[-1], teacher_out.hidden_states[-1],
                                               mask=masks["tokens"], reduction="sum")
        if "task" in w:
            # The model's own loss is a mean over its items (examples, or labelled tokens for tagging): undo it.
            sums["task"] = student_out.loss * plan.counts[TERMS.index("task")].to(student_out.loss.dtype)
        return sums, agreement

    def _fused_head_loss(self, model, inputs, plan, student_out, teacher_out, coefficient):
        """(weighted loss, detached sums, agreement) of L_ce, L_mse and L_clm/L_mlm from the heads' features, a chunk
        of positions at a time with each chunk's gradient taken in the forward (`chunked_head`)."""
        w = self._weights
        teacher_terms = [t for t in ("ce", "mse") if t in w and teacher_out is not None]
        terms = teacher_terms + [t for t in ("clm", "mlm") if t in w]
        teacher_rows = None
        if teacher_terms:
            teacher_rows = (self._cache.teacher_rows(teacher_out) if self._cache is not None
                            else chunked_head.online_teacher_rows(self.teacher, teacher_out))
        return chunked_head.head_loss(model, student_out, teacher_rows, inputs.get("labels"), plan.masks["logits"],
                                      {t: coefficient(t) for t in terms}, self.args, self._shared_vocab,
                                      self._chunk_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._check_batch(inputs)
        w = self._weights
        plan = self._plan_of(inputs) if model.training else self._plan(inputs)
        fused = self._chunk_size is not None and model.training  # evaluation keeps full logits
        student_out, student_qkv = self._student_output(model, inputs, fused)
        teacher_out, teacher_qkv = self._teacher_output(inputs, fused)

        sums, agreement = self._term_sums(inputs, plan, student_out, teacher_out, fused)
        sums.update(self._intermediate.term_sums(student_out, teacher_out, student_qkv, teacher_qkv,
                                                 plan.masks["tokens"], model.training))
        sums.update(self._embedding.term_sums(teacher_out, plan.masks["tokens"]))

        if model.training and self._step_counts is not None:
            # Each micro-batch contributes sum / (items in the whole step, all ranks); DDP then averages the
            # gradients over ranks, so multiply back by their number.
            counts, scale = self._step_counts.to(plan.counts.device), self.accelerator.num_processes
        else:
            counts, scale = plan.counts, 1

        def coefficient(term):  # weight x scale / item count: what multiplies the term's sum in the loss
            return w[term] * scale / counts[TERMS.index(term)].clamp(min=1)

        loss = sum(sums[t] * coefficient(t).to(sums[t].device, sums[t].dtype) for t in sums)
        if fused:  # the head terms' coefficients are known before their forward, which takes their gradients
            head_loss, head_sums, agreement = self._fused_head_loss(
                model, inputs, plan, student_out, teacher_out, lambda t: coefficient(t).float())
            loss = loss + head_loss
            sums.update(head_sums)  # detached: for the logs and the non-finite flags
        elif self._headless and _has_lm_head(model):
            # No term reads the head's features, yet its transform ran: an empty slice of them (exactly 0) keeps its
            # parameters on the loss's graph, as DDP expects of everything the forward's outputs reach.
            loss = loss + student_out.logits.reshape(-1)[:0].sum().to(loss.dtype)

        if model.training:
            self._accumulate_logs(sums, plan.counts, agreement)
            # Flag non-finite terms without a device sync; NonFiniteLossGuard decides once per optimizer step.
            for t, value in sums.items():
                self._nonfinite_flags[TERMS.index(t)] += (~torch.isfinite(value.detach())).float().to(
                    self._nonfinite_flags.device)
        if return_outputs:
            extras = ("hidden_states", "attentions")
            if any(student_out.get(k) is not None for k in extras):
                # Keep hidden states and attention maps out of what prediction_step gathers as "logits".
                student_out = type(student_out)(**{k: v for k, v in student_out.items() if k not in extras})
            return loss, student_out
        return loss

    # ---- logging ----

    def _accumulate_logs(self, sums, counts, agreement):
        for t, value in sums.items():
            # A non-finite (skipped) micro-batch is left out of the logged means; torch.where avoids a device sync.
            value = value.detach().float()
            finite = torch.isfinite(value)
            self._log_sums[t] += torch.where(finite, value, torch.zeros_like(value))
            self._log_counts[t] += torch.where(finite, counts[TERMS.index(t)].float(), torch.zeros_like(value))
        if agreement is not None:
            self._log_sums["agreement"] += agreement[0].detach().float()
            self._log_counts["agreement"] += agreement[1]

    def log(self, logs, start_time=None):
        # "loss" marks the periodic training log, which every rank reaches at the same step.
        if "loss" in logs and self._log_counts:
            keys = sorted(self._log_counts)
            stats = torch.stack([torch.as_tensor(self._log_sums[k], dtype=torch.float64, device=self.args.device)
                                 for k in keys]
                                + [torch.as_tensor(self._log_counts[k], dtype=torch.float64, device=self.args.device)
                                   for k in keys])
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            for i, k in enumerate(keys):
                value = (stats[i] / stats[len(keys) + i].clamp(min=1)).item()
                logs["teacher_agreement" if k == "agreement" else f"loss_{k}"] = round(value, 6)
            self._log_sums.clear()
            self._log_counts.clear()
        if "loss" in logs and self.nonfinite_steps:
            logs["nonfinite_steps_skipped"] = self.nonfinite_steps
            for t, n in self.nonfinite_terms.items():
                logs[f"nonfinite_{t}"] = n
        super().log(logs, start_time)


def _has_lm_head(model):
    """A masked or causal LM whose LM head is an output embedding (what `chunked_head.features_only` passes through)."""
    return head_kind(model) in LM_HEADS and unwrap(model).get_output_embeddings() is not None
