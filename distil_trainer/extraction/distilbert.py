"""BERT teacher -> DistilBERT student (``DistilBertForMaskedLM``), the layout of the original DistilBERT.

DistilBERT has no token-type embeddings. BERT adds ``token_type_embeddings[0]`` at every position when all
token_type_ids are 0, so that vector is folded into each position embedding: exact for single-segment input
(sentence-pair segment information, token type 1, is lost -- as in the original DistilBERT).

Compatibility: DistilBERT's feed-forward and MLM head take the activation by name from the same table as BERT
(``hidden_act`` -> ``activation``), and its LayerNorms hard-code eps 1e-12 (transformers 5 source), so a teacher
with another ``layer_norm_eps``, non-absolute positions or decoder settings is refused.
"""

import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM

from .blocks import check_overrides
from .copying import load_into_student
from .report import ExtractionReport

# DistilBERT's LayerNorms use this eps, hard-coded in transformers/models/distilbert/modeling_distilbert.py.
DISTILBERT_LAYER_NORM_EPS = 1e-12
SUPPORTED_TEACHERS = ("BertModel", "BertForMaskedLM", "BertForPreTraining")

# DistilBERT block sub-module <- BERT layer sub-module (each with .weight and .bias).
BLOCK_MAP = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
# DistilBertForMaskedLM head tensor <- BERT MLM head tensor (under `cls.predictions.`).
HEAD_MAP = {
    "vocab_transform.weight": "transform.dense.weight",
    "vocab_transform.bias": "transform.dense.bias",
    "vocab_layer_norm.weight": "transform.LayerNorm.weight",
    "vocab_layer_norm.bias": "transform.LayerNorm.bias",
    "vocab_projector.weight": "decoder.weight",
    "vocab_projector.bias": "bias",
}


def check_bert_teacher(teacher):
    """Refuse teachers whose computation DistilBERT cannot reproduce, naming the setting and the fix."""
    cfg = teacher.config
    name = type(teacher).__name__
    if cfg.model_type != "bert" or name not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"student_type='distilbert' needs a BERT teacher ({', '.join(SUPPORTED_TEACHERS)}); got {name} "
            f"(model_type {cfg.model_type!r}). Use student_type='same' to keep the teacher's architecture."
        )
    problems = []
    if abs(cfg.layer_norm_eps - DISTILBERT_LAYER_NORM_EPS) > 1e-15:
        problems.append(f"layer_norm_eps={cfg.layer_norm_eps} (DistilBERT hard-codes {DISTILBERT_LAYER_NORM_EPS})")
    if not isinstance(cfg.hidden_act, str):
        problems.append(f"hidden_act={cfg.hidden_act!r} is not a named activation DistilBERT can be configured with")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={cfg.position_embedding_type!r} (DistilBERT: absolute only)")
    if cfg.is_decoder or cfg.add_cross_attention:
        problems.append("is_decoder/add_cross_attention set (DistilBERT is an encoder only)")
    if problems:
        raise ValueError(
            "This BERT teacher cannot be converted to DistilBERT exactly: " + "; ".join(problems)
            + ". Use student_type='same' for a BERT student instead."
        )


def distilbert_config(bert_config, num_layers, overrides=None):
    values = dict(
        vocab_size=bert_config.vocab_size,
        max_position_embeddings=bert_config.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=num_layers,
        n_heads=bert_config.num_attention_heads,
        dim=bert_config.hidden_size,
        hidden_dim=bert_config.intermediate_size,
        dropout=bert_config.hidden_dropout_prob,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        activation=bert_config.hidden_act,
        initializer_range=bert_config.initializer_range,
        pad_token_id=bert_config.pad_token_id,
        tie_word_embeddings=bert_config.tie_word_embeddings,
    )
    config = DistilBertConfig(**values)
    check_overrides(config, overrides)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def extract_distilbert(teacher, layers, overrides=None, teacher_missing_keys=()):
    """(student, report): a DistilBertForMaskedLM holding the BERT teacher's selected layers."""
    check_bert_teacher(teacher)
    config = distilbert_config(teacher.config, len(layers), overrides)
    student = DistilBertForMaskedLM._from_config(
        config, attn_implementation=teacher.config._attn_implementation, dtype=teacher.dtype
    )
    source = teacher.state_dict()
    base = "bert." if type(teacher).__name__ != "BertModel" else ""
    missing = set(teacher_missing_keys)
    sources = {}  # student name -> teacher name
    emb = "distilbert.embeddings."
    sources[emb + "word_embeddings.weight"] = base + "embeddings.word_embeddings.weight"
    for part in ("weight", "bias"):
        sources[f"{emb}LayerNorm.{part}"] = f"{base}embeddings.LayerNorm.{part}"
    for new, old in enumerate(layers):
        for student_mod, teacher_mod in BLOCK_MAP.items():
            for part in ("weight", "bias"):
                sources[f"distilbert.transformer.layer.{new}.{student_mod}.{part}"] = (
                    f"{base}encoder.layer.{old}.{teacher_mod}.{part}"
                )
    for student_name, teacher_name in HEAD_MAP.items():
        sources[student_name] = "cls.predictions." + teacher_name
    if config.tie_word_embeddings:  # the projector *is* the word embedding matrix
        sources["vocab_projector.weight"] = sources[emb + "word_embeddings.weight"]

    tensors, copied, random_keys = {}, {}, []
    for student_name, teacher_name in sources.items():
        if teacher_name in source and teacher_name not in missing:
            tensors[student_name], copied[student_name] = source[teacher_name], teacher_name
        else:
            random_keys.append(student_name)

    position = base + "embeddings.position_embeddings.weight"
    token_type = base + "embeddings.token_type_embeddings.weight"
    fold = source[token_type][0] if token_type in source else torch.zeros_like(source[position][0])
    tensors[emb + "position_embeddings.weight"] = source[position] + fold
    copied[emb + "position_embeddings.weight"] = f"{position} + {token_type}[0]"

    load_into_student(student, tensors, random_keys)
    student.eval()
    used = {n for n in sources.values() if n in source} | {position, token_type}
    used_storage = {source[n].data_ptr() for n in used if n in source}  # tied aliases count as used
    block_prefix = base + "encoder.layer."
    unused = sorted(
        n for n in source
        if n not in used and source[n].data_ptr() not in used_storage and not n.startswith(block_prefix)
    )
    report = ExtractionReport(
        teacher="", teacher_layers=list(layers), strategy=None, student_type="distilbert",
        copied=copied, randomly_initialised=sorted(random_keys), teacher_unused=unused,
    )
    return student, report
