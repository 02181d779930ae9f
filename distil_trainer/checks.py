"""Checks run before any compute is spent: is this teacher usable for this student and these loss weights?"""

import logging
import os

import torch

from .model_utils import (BARE, CAUSAL_LM, LM_HEADS, MASKED_LM, SEQUENCE_CLASSIFICATION, TASK_HEADS,
                          head_kind, hidden_size, load_tokenizer, unwrap, vocab_size)

logger = logging.getLogger(__name__)


def _name(model):
    return type(unwrap(model)).__name__


def check_student_teacher(student, teacher, args, tokenizer=None, teacher_tokenizer=None):
    """Raise ValueError naming both values and the fix when the pair cannot be trained with `args`.

    Returns the number of leading vocabulary entries the logit terms compare (see `shared_vocab_size`): None when
    both models have the same vocabulary size.
    """
    weights = args.loss_weights
    s_head, t_head = head_kind(student), head_kind(teacher)

    check_student_terms(student, args)
    shared_vocab = shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer)

    logit_terms = [f"alpha_{k}={weights[k]}" for k in ("ce", "mse") if k in weights]
    if logit_terms:
        if t_head == BARE:
            raise ValueError(
                f"{', '.join(logit_terms)} needs teacher logits, but the teacher {_name(teacher)} has no head and "
                "produces only hidden states. Load the teacher with its head (e.g. AutoModelForMaskedLM), or set "
                "alpha_ce=0 and alpha_mse=0 and train with the terms that need no head (alpha_cos, alpha_mlm)."
            )
        same_family = (s_head == t_head) or (s_head in LM_HEADS and t_head in LM_HEADS)
        if not same_family:
            raise ValueError(f"Teacher logits ({_name(teacher)}, {t_head}) and student logits ({_name(student)}, "
                             f"{s_head}) are not comparable for {', '.join(logit_terms)}; use the same kind of head.")
        if s_head in TASK_HEADS:
            s_labels, t_labels = unwrap(student).config.num_labels, unwrap(teacher).config.num_labels
            if s_labels != t_labels:
                raise ValueError(f"Teacher {_name(teacher)} has num_labels={t_labels}, student has num_labels="
                                 f"{s_labels}; build the student with the teacher's label set.")
            if s_head == SEQUENCE_CLASSIFICATION and s_labels == 1 and "ce" in weights:
                raise ValueError("alpha_ce>0 on a single-output (regression) head has no distribution to match; "
                                 "use alpha_mse for regression tasks such as STS-B and set alpha_ce=0.")

    if "cos" in weights:
        s_width, t_width = hidden_size(student), hidden_size(teacher)
        if s_width != t_width:
            raise ValueError(
                f"alpha_cos={args.alpha_cos} compares hidden states, but the teacher's hidden size is {t_width} and the "
                f"student's is {s_width}. Set alpha_cos=0, or give the student the teacher's width."
            )
    return shared_vocab


def check_student_terms(student, args):
    """Raise ValueError when a weighted term needs another kind of student head (alpha_mlm, alpha_clm, alpha_task)."""
    weights = args.loss_weights
    s_head = head_kind(student)
    if "mlm" in weights and s_head != MASKED_LM:
        raise ValueError(f"alpha_mlm={args.alpha_mlm} needs a masked-LM student, but the student is {_name(student)}; "
                         "set alpha_mlm=0 or use an *ForMaskedLM student.")
    if "clm" in weights and s_head != CAUSAL_LM:
        raise ValueError(f"alpha_clm={args.alpha_clm} needs a causal-LM student, but the student is {_name(student)}; "
                         "set alpha_clm=0 or use an *ForCausalLM / *LMHeadModel student.")
    if "task" in weights and s_head not in TASK_HEADS:
        raise ValueError(f"alpha_task={args.alpha_task} needs a task head (classification, QA, token tagging), but the "
                         f"student is {_name(student)}; set alpha_task=0.")


def _tokenizer_name(tokenizer):
    return f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'!r} ({len(tokenizer)} tokens)"


def shared_vocab_size(student, teacher, tokenizer=None, teacher_tokenizer=None):
    """How many leading vocabulary entries teacher and student logits are compared over (None: all, same size).

    Models of one tokenizer often pad their vocabularies to different sizes (Qwen2.5: 151,936 rows for the small
    models, 152,064 for the large ones): the rows past the tokenizer's length are tokens no text maps to, so the
    logits are compared over the shared leading range. That is only sound when both models use the same tokenizer,
    so both must be given (`tokenizer`: the one the data is tokenized with, `teacher_tokenizer`: the teacher's, or
    its name/path to load it from), have the same vocabulary, and fit in the shared range.
    """
    s_vocab, t_vocab = vocab_size(student), vocab_size(teacher)
    if s_vocab is None or t_vocab is None or s_vocab == t_vocab:
        return None
    if isinstance(teacher_tokenizer, str):
        teacher_tokenizer = load_tokenizer(teacher_tokenizer)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor: its text tokenizer
    teacher_tokenizer = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    sizes = f"teacher {_name(teacher)} has {t_vocab} tokens, student {_name(student)} has {s_vocab}"
    if tokenizer is None or teacher_tokenizer is None:
        raise ValueError(
            f"Teacher and student vocabularies differ: {sizes}. If both use one tokenizer and only pad the vocabulary "
            "differently, pass that tokenizer as processing_class= and the teacher's as teacher_processing_class= "
            "(given a teacher name, it is loaded from there): the logits are then compared over the shared range. "
            "Otherwise build the student with the teacher's tokenizer and vocab_size (distil-trainer extract does).")
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"Teacher and student use different tokenizers: the data's (student) tokenizer is "
            f"{_tokenizer_name(tokenizer)}, the teacher's is {_tokenizer_name(teacher_tokenizer)}, and {sizes}. "
            "Their token ids do not mean the same tokens, so their logits cannot be compared; distil a student that "
            "uses the teacher's tokenizer.")
    shared = min(s_vocab, t_vocab)
    if len(tokenizer) > shared:
        raise ValueError(
            f"The tokenizer {_tokenizer_name(tokenizer)} has ids past the smaller vocabulary ({sizes}); resize that "
            f"model's embeddings to at least {len(tokenizer)} rows.")
    logger.info("Teacher and student vocabularies differ (%s); comparing logits over the shared first %d entries "
                "of tokenizer %s.", sizes, shared, _tokenizer_name(tokenizer))
    return shared


# Files that `Trainer.save_model` leaves at the top of output_dir when a run has finished.
_FINISHED_RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_output_dir(args, resume_from_checkpoint=None):
    """Refuse to train into a directory that holds a finished run, unless the user asked to overwrite it."""
    if args.overwrite_output_dir or resume_from_checkpoint or not os.path.isdir(args.output_dir):
        return
    found = [f for f in _FINISHED_RUN_FILES if os.path.exists(os.path.join(args.output_dir, f))]
    if found:
        raise FileExistsError(
            f"output_dir {args.output_dir!r} already holds a finished run ({found[0]}). Pass "
            "--overwrite_output_dir to replace it, or choose another --output_dir."
        )


def check_chunked_head(student, teacher, args):
    """The fused LM-head path projects the models' LM-head features with their output embeddings itself: refuse
    models where that would not give their logits, naming the model and the fix."""
    fix = "set logits_chunk_size=0 to compute the terms from full logits."
    if head_kind(student) not in LM_HEADS:
        raise ValueError(f"logits_chunk_size={args.logits_chunk_size} needs a causal-LM or masked-LM student, but the "
                         f"student is {_name(student)}; {fix}")
    uses_teacher = any(k in args.loss_weights for k in ("ce", "mse"))
    for role, model in (("student", student), ("teacher", teacher)) if uses_teacher else (("student", student),):
        inner = unwrap(model)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if head_kind(model) not in LM_HEADS or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(f"logits_chunk_size needs the {role} {_name(model)} to be a causal or masked LM whose "
                             f"LM head ends in an output embedding with a weight (get_output_embeddings()); {fix}")
        config = inner.config.get_text_config()
        scaled = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
                  if getattr(config, k, None) not in (None, 1, 1.0)]
        if scaled:
            raise ValueError(f"The {role} {_name(model)} transforms its LM head's output ({', '.join(scaled)}), which "
                             f"the chunked projection does not reproduce; {fix}")
