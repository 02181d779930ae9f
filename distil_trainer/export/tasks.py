"""What an export contains: which families and heads are supported, the graph's inputs and outputs, and the
plain-tensor module that is traced.

The traced module takes the token tensors as plain arguments (ONNX graphs have positional inputs) and returns a
tuple of tensors, one per named output, so the PyTorch side of every parity check and latency measurement runs the very
function that was exported.
"""

import torch

from ..model_utils import (
    BARE,
    CAUSAL_LM,
    MASKED_LM,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    head_kind,
    unwrap,
    uses_token_type_ids,
)

EMBEDDING = "embedding"
AUTO = "auto"
TASKS = (EMBEDDING, MASKED_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING, CAUSAL_LM)

# The families the parity tests cover (tests/test_export.py); others are refused rather than exported untested.
ENCODER_TYPES = ("bert", "distilbert", "roberta")
DECODER_TYPES = ("gpt2", "llama")

# Output names per task, and for each output whether it has a sequence axis (dynamic in the graph) besides batch.
OUTPUTS = {
    EMBEDDING: ("last_hidden_state", "sentence_embedding"),
    MASKED_LM: ("logits",),
    SEQUENCE_CLASSIFICATION: ("logits",),
    TOKEN_CLASSIFICATION: ("logits",),
    QUESTION_ANSWERING: ("start_logits", "end_logits"),
    CAUSAL_LM: ("logits",),
}
SENTENCE_LEVEL_OUTPUTS = {(EMBEDDING, "sentence_embedding"), (SEQUENCE_CLASSIFICATION, "logits")}


def has_sequence_axis(task, output_name):
    """Whether `output_name` of `task` is per token ([batch, sequence, ...]) rather than per sequence."""
    return (task, output_name) not in SENTENCE_LEVEL_OUTPUTS


def check_model_type(model_type):
    """Raise ValueError naming the supported families when `model_type` is not one of them."""
    if model_type not in ENCODER_TYPES + DECODER_TYPES:
        raise ValueError(
            f"ONNX export does not support model_type {model_type!r}. Supported: encoders "
            f"{', '.join(ENCODER_TYPES)} (task heads, masked LM, embeddings) and decoders "
            f"{', '.join(DECODER_TYPES)} (causal LM); these are the families its parity tests cover.")


def resolve_task(model, task=AUTO):
    """The export task for `model`: its own head when `task` is "auto" (a bare encoder exports as an embedding
    model), else `task`, checked against the family (decoders export as causal LMs only)."""
    model = unwrap(model)
    model_type = model.config.model_type
    check_model_type(model_type)
    head = head_kind(model)
    if task == AUTO:
        task = EMBEDDING if head == BARE else head
    if task not in TASKS:
        raise ValueError(f"Unknown export task {task!r}; choose one of: {AUTO}, {', '.join(TASKS)}.")
    if model_type in DECODER_TYPES and task != CAUSAL_LM:
        raise ValueError(f"{type(model).__name__} is a decoder: it exports as {CAUSAL_LM} only (plain logits), "
                         f"not {task}. Load it with AutoModelForCausalLM.")
    if model_type in ENCODER_TYPES and task == CAUSAL_LM:
        raise ValueError(f"{type(model).__name__} is an encoder; choose a task among: "
                         f"{', '.join(t for t in TASKS if t != CAUSAL_LM)}.")
    if task not in (EMBEDDING, head):
        raise ValueError(f"{type(model).__name__} has a {head} head, not a {task} head; export it as {head} "
                         f"(the default) or as {EMBEDDING} (its encoder's hidden states).")
    return task


def input_names(model):
    """The graph's inputs: token ids and attention mask, plus segment ids for models that read them (BERT)."""
    names = ["input_ids", "attention_mask"]
    if uses_token_type_ids(model):
        names.append("token_type_ids")
    return names


def mean_pool(hidden, attention_mask):
    """Mean of the token vectors over the real (mask 1) positions -- sentence-transformers' mean pooling, without
    its optional normalisation (cosine similarities are the same either way)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class ExportModule(torch.nn.Module):
    """`model` as the exported graph computes it: the token tensors named in `names` (in that order) in, a tuple of
    the task's outputs out."""

    def __init__(self, model, task, names):
        super().__init__()
        self.model = unwrap(model)
        self.task = task
        self.names = list(names)
        # The wrapper too: torch.onnx's tracing exporter restores the wrapper's own mode after export, recursively,
        # and a wrapper left in training mode would switch the model's dropout back on.
        self.eval()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {name: inputs[name] for name in self.names}
        if self.task == EMBEDDING:
            hidden = self.model.base_model(**inputs, return_dict=True).last_hidden_state
            return hidden, mean_pool(hidden, inputs["attention_mask"])
        if self.task == CAUSAL_LM:
            inputs["use_cache"] = False  # whole-sequence logits; no past key/values in or out of the graph
        out = self.model(**inputs, return_dict=True)
        if self.task == QUESTION_ANSWERING:
            return out.start_logits, out.end_logits
        return (out.logits,)


def export_module(model, task=AUTO):
    """(ExportModule, task, input names, output names) for `model`."""
    task = resolve_task(model, task)
    names = input_names(model)
    return ExportModule(model, task, names), task, names, OUTPUTS[task]
