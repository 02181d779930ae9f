"""Checks run before any compute is spent: is this teacher usable for this student and these loss weights?"""

import os

from .model_utils import (BARE, CAUSAL_LM, LM_HEADS, MASKED_LM, SEQUENCE_CLASSIFICATION, TASK_HEADS, head_kind,
                          hidden_size, unwrap, vocab_size)


def _name(model):
    return type(unwrap(model)).__name__


def check_student_teacher(student, teacher, args):
    """Raise ValueError naming both values and the fix when the pair cannot be trained with `args`."""
    weights = args.loss_weights
    s_head, t_head = head_kind(student), head_kind(teacher)

    if "mlm" in weights and s_head != MASKED_LM:
        raise ValueError(f"alpha_mlm={args.alpha_mlm} needs a masked-LM student, but the student is {_name(student)}; "
                         "set alpha_mlm=0 or use an *ForMaskedLM student.")
    if "clm" in weights and s_head != CAUSAL_LM:
        raise ValueError(f"alpha_clm={args.alpha_clm} needs a causal-LM student, but the student is {_name(student)}; "
                         "set alpha_clm=0 or use an *ForCausalLM / *LMHeadModel student.")
    if "task" in weights and s_head not in TASK_HEADS:
        raise ValueError(f"alpha_task={args.alpha_task} needs a task head (classification, QA, token tagging), but the "
                         f"student is {_name(student)}; set alpha_task=0.")

    s_vocab, t_vocab = vocab_size(student), vocab_size(teacher)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"Teacher and student vocabularies differ: teacher {_name(teacher)} has {t_vocab} tokens, student "
            f"{_name(student)} has {s_vocab}. Both read the same token ids, so they must share the teacher's "
            "tokenizer: build the student with vocab_size equal to the teacher's (distil-trainer extract does)."
        )

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
