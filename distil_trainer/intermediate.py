"""What the intermediate-layer terms need from the models: layer maps, width projections, the queries/keys/values
of one attention layer (read through forward hooks), and eager attention for attention maps.

Layers are numbered as in `output_hidden_states`: 0 is the embeddings, i (1..N) the output of transformer layer i.
Attention maps exist for layers 1..N only.
"""

import contextlib
import logging

import torch
from torch import nn

from . import losses
from .model_utils import hidden_size, unwrap

logger = logging.getLogger(__name__)

# Last name component of the query/key/value projections: BERT/RoBERTa, DistilBERT, Llama/Mistral/Qwen/OPT/BART.
QKV_MODULE_NAMES = {"query": ("query", "q_lin", "q_proj"),
                    "key": ("key", "k_lin", "k_proj"),
                    "value": ("value", "v_lin", "v_proj")}
# GPT-2: one projection whose output is [queries | keys | values].
FUSED_QKV_MODULE_NAMES = ("c_attn",)
# Cross-attention blocks (encoder-decoder models) are not self-attention: never read.
_CROSS_ATTENTION_PARTS = ("crossattention", "encoder_attn", "cross_attn")
RELATION_KINDS = ("query", "key", "value")
# Name of the width projections inside the student while it trains (in checkpoints, never in the export).
PROJECTIONS_NAME = "distillation_projections"


def num_layers(model) -> int:
    return unwrap(model).config.get_text_config().num_hidden_layers


# ---- layer maps ----

def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict:
    """TinyBERT's uniform map: embeddings to embeddings, student layer m to teacher layer floor(m * N / M),
    so the last student layer learns from the last teacher layer."""
    if student_layers > teacher_layers:
        raise ValueError(f"A uniform layer map needs a student with at most the teacher's layers; the student has "
                         f"{student_layers}, the teacher {teacher_layers}. Give intermediate_layer_map explicitly.")
    return {m: m * teacher_layers // student_layers for m in range(student_layers + 1)}


def parse_layer_map(spec) -> dict | None:
    """`"0:0,1:2,2:4"` or `{0: 0, 1: 2}` -> {student layer: teacher layer}; None stays None (uniform)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = []
        for item in str(spec).split(","):
            left, sep, right = item.partition(":")
            if not sep:
                raise ValueError(f"intermediate_layer_map item {item.strip()!r} is not 'student:teacher'; write "
                                 "e.g. intermediate_layer_map='0:0,1:2,2:4,3:6' (0 is the embeddings).")
            pairs.append((left, right))
    try:
        mapping = {int(s): int(t) for s, t in pairs}
    except ValueError as err:
        raise ValueError(f"intermediate_layer_map {spec!r} must map integers to integers, "
                         "e.g. '0:0,1:2,2:4,3:6'.") from err
    if len(mapping) != len(pairs):
        raise ValueError(f"intermediate_layer_map {spec!r} maps a student layer twice.")
    return mapping


def resolve_layer_map(spec, student_layers: int, teacher_layers: int) -> dict:
    """The layer map to train with, checked against both models' layer counts."""
    mapping = parse_layer_map(spec)
    if mapping is None:
        return uniform_layer_map(student_layers, teacher_layers)
    for s, t in mapping.items():
        if not 0 <= s <= student_layers or not 0 <= t <= teacher_layers:
            raise ValueError(f"intermediate_layer_map entry {s}:{t} is out of range: the student has layers "
                             f"0..{student_layers} and the teacher 0..{teacher_layers} (0 is the embeddings).")
    return dict(sorted(mapping.items()))


def attention_layer_pairs(layer_map: dict) -> list:
    """(student, teacher) indices into `output.attentions` for the mapped transformer layers (not embeddings)."""
    return [(s - 1, t - 1) for s, t in layer_map.items() if s >= 1 and t >= 1]


# ---- width projections ----

class HiddenProjections(nn.Module):
    """One learned linear map (student width -> teacher width) per mapped student layer, trained with the student.

    With equal widths there is nothing to learn and `project` returns the hidden states unchanged.
    """

    def __init__(self, student_width: int, teacher_width: int, student_layers):
        super().__init__()
        self.maps = nn.ModuleDict()
        if student_width != teacher_width:
            for layer in student_layers:
                self.maps[str(layer)] = nn.Linear(student_width, teacher_width)

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        key = str(layer)
        return self.maps[key](hidden) if key in self.maps else hidden


def make_projections(student, teacher, layer_map: dict) -> HiddenProjections:
    return HiddenProjections(hidden_size(student), hidden_size(teacher), layer_map.keys())


def attach_projections(student, projections: HiddenProjections) -> None:
    """Make the projections a submodule of the student (`distillation_projections`).

    As a submodule the optimizer holds them, DDP and DeepSpeed (tested: 2 CPU processes, ZeRO-3) train and
    synchronise them like the student's own weights, and checkpoints save them and a resume restores them.
    `save_pretrained` leaves them out (they are listed in the student's `_keys_to_ignore_on_save`), so the exported
    student is the plain student; `saving_projections` keeps them in checkpoints.
    """
    inner = unwrap(student)
    attached = getattr(inner, PROJECTIONS_NAME, None)
    if attached is None:
        inner.add_module(PROJECTIONS_NAME, projections)
    elif attached is not projections:  # a second set (the embedding terms' beside the hidden-state maps): merged
        clash = sorted(set(attached.maps) & set(projections.maps))
        if clash:
            raise ValueError(f"Width projections {clash} are attached to the student twice.")
        attached.maps.update(projections.maps)
    keys = {f"{PROJECTIONS_NAME}.{k}" for k in getattr(inner, PROJECTIONS_NAME).state_dict()}
    inner._keys_to_ignore_on_save = set(inner._keys_to_ignore_on_save or ()) | keys


@contextlib.contextmanager
def saving_projections(student):
    """Within this block, `save_pretrained` of the student also writes its projections (for checkpoints)."""
    inner = unwrap(student)
    before = inner._keys_to_ignore_on_save
    if before:
        inner._keys_to_ignore_on_save = {k for k in before if not k.startswith(PROJECTIONS_NAME + ".")}
    try:
        yield
    finally:
        inner._keys_to_ignore_on_save = before


# ---- queries, keys and values through hooks ----

def _is_self_attention(name: str) -> bool:
    return not any(part in name.split(".") for part in _CROSS_ATTENTION_PARTS)


def attention_projections(model) -> list:
    """Per transformer layer, in order: {"query": module, "key": module, "value": module} or {"fused": module}."""
    inner = unwrap(model)
    found = {kind: [] for kind in (*QKV_MODULE_NAMES, "fused")}
    for name, module in inner.named_modules():
        last = name.rsplit(".", 1)[-1]
        if not _is_self_attention(name):
            continue
        for kind, names in QKV_MODULE_NAMES.items():
            if last in names:
                found[kind].append(module)
        if last in FUSED_QKV_MODULE_NAMES:
            found["fused"].append(module)
    layers = num_layers(inner)
    if all(len(found[k]) == layers for k in QKV_MODULE_NAMES):
        return [{k: found[k][i] for k in QKV_MODULE_NAMES} for i in range(layers)]
    if len(found["fused"]) == layers:
        return [{"fused": m} for m in found["fused"]]
    looked_for = sorted({n for names in QKV_MODULE_NAMES.values() for n in names} | set(FUSED_QKV_MODULE_NAMES))
    raise ValueError(
        f"Could not find one query, key and value projection per layer in {type(inner).__name__} ({layers} layers; "
        f"found {', '.join(f'{len(v)} {k}' for k, v in found.items())}). The relation loss reads modules named "
        f"{', '.join(looked_for)}; set alpha_relation=0 for this architecture."
    )


@contextlib.contextmanager
def forward_hook(module, hook, **options):
    """`hook` on `module` for the duration of the block only: the trainer's hooks exist during its own forwards and
    are never left on a model the user gets back (or saves, exports, evaluates elsewhere) after training."""
    handle = module.register_forward_hook(hook, **options)
    try:
        yield
    finally:
        handle.remove()


class QKVCapture:
    """Forward hooks on the query/key/value projections of one layer (1-based) that keep their outputs
    ([batch, positions, width]) while `recording()` is active; they are registered for that block only.

    Hooks see the full outputs under DeepSpeed ZeRO-3 too (parameters are gathered before the module runs), and
    they record nothing outside `recording()`, e.g. when gradient checkpointing re-runs a layer during backward.
    """

    def __init__(self, model, layer: int):
        projections = attention_projections(model)
        if not 1 <= layer <= len(projections):
            raise ValueError(f"Layer {layer} has no self-attention: {type(unwrap(model)).__name__} has layers "
                             f"1..{len(projections)}.")
        self.modules = projections[layer - 1]
        self.outputs = {}

    def _hook(self, kind):
        def hook(module, args, output):
            output = output[0] if isinstance(output, tuple) else output
            if kind == "fused":
                self.outputs.update(zip(RELATION_KINDS, output.chunk(3, dim=-1)))
            else:
                self.outputs[kind] = output
        return hook

    @contextlib.contextmanager
    def recording(self):
        self.outputs = {}
        with contextlib.ExitStack() as hooks:
            for kind, module in self.modules.items():
                hooks.enter_context(forward_hook(module, self._hook(kind)))
            yield self.outputs


# ---- attention implementation ----

def require_eager_attention(model, role: str) -> str | None:
    """Switch `model` to eager attention, the only implementation that returns attention weights.

    Returns the implementation it replaced (None when it was eager already); raises when it cannot be switched,
    rather than training on one implementation and reading weights from another.
    """
    inner = unwrap(model)
    current = inner.config._attn_implementation
    if current == "eager":
        return None
    reason = ""
    try:
        inner.set_attn_implementation("eager")
    except (ValueError, ImportError, NotImplementedError) as err:
        reason = f": {err}"
    if inner.config._attn_implementation != "eager":
        raise ValueError(
            f"alpha_attn > 0 needs attention weights, which only eager attention returns, but the {role} "
            f"{type(inner).__name__} uses {current!r} and could not be switched to eager{reason}. Load it with "
            "attn_implementation='eager', or set alpha_attn=0."
        )
    return current


# ---- the three terms for one student/teacher pair ----

def _projection_widths(model, layer: int) -> dict:
    """{query/key/value: output width} of a layer's projections, read from module metadata (valid under ZeRO-3)."""
    modules = attention_projections(model)[layer - 1]
    if "fused" in modules:
        width = getattr(modules["fused"], "nf", None)
        return {k: width // 3 for k in RELATION_KINDS} if width else {}
    return {k: getattr(m, "out_features", None) for k, m in modules.items() if getattr(m, "out_features", None)}


class IntermediateTerms:
    """Set-up, item counts and per-batch sums of L_hidden, L_attn and L_relation.

    Items (the trainer divides sums by their count over the whole optimizer step): L_hidden, a non-padding token of
    one mapped layer; L_attn, a (query, key) pair of non-padding tokens of one mapped layer; L_relation, a
    non-padding token, whose value is the sum of its query-query, key-key and value-value KL (as in MiniLMv2).
    """

    def __init__(self, student, teacher, args):
        weights = args.loss_weights
        self.hidden, self.attn, self.relation = ("hidden" in weights), ("attn" in weights), ("relation" in weights)
        self.metric = args.hidden_loss
        s_layers, t_layers = num_layers(student), num_layers(teacher)
        self.layer_map = {}
        if self.hidden or self.attn:
            self.layer_map = resolve_layer_map(args.intermediate_layer_map, s_layers, t_layers)
        self.attention_pairs = attention_layer_pairs(self.layer_map) if self.attn else []
        self.hidden_layers = len(self.layer_map) if self.hidden else 0
        self.projections = None  # none when the widths are equal
        self._student, self._student_layers = None, s_layers
        if self.hidden and hidden_size(student) != hidden_size(teacher):
            dtype = next(unwrap(student).parameters()).dtype
            with torch.random.fork_rng(devices=[]):  # initialised from args.seed, the caller's RNG left alone
                torch.manual_seed(args.seed)
                self.projections = make_projections(student, teacher, self.layer_map).to(dtype=dtype)
        if self.attn:
            self._setup_attention(student, teacher)
        self.student_qkv = self.teacher_qkv = None
        if self.relation:
            self._setup_relation(student, teacher, args, s_layers, t_layers)

    @property
    def needs_hidden_states(self):
        return self.hidden

    def _setup_attention(self, student, teacher):
        s_heads = unwrap(student).config.get_text_config().num_attention_heads
        t_heads = unwrap(teacher).config.get_text_config().num_attention_heads
        if s_heads != t_heads:
            raise ValueError(f"alpha_attn compares attention maps head by head, but the student has {s_heads} heads "
                             f"and the teacher {t_heads}. Set alpha_attn=0 and use alpha_relation (any head count).")
        if not self.attention_pairs:
            raise ValueError(f"alpha_attn > 0 but the layer map {self.layer_map} maps no transformer layer "
                             "(layer 0, the embeddings, has no attention).")
        for model, role in ((student, "student"), (teacher, "teacher")):
            replaced = require_eager_attention(model, role)
            if replaced is not None:
                logger.warning("alpha_attn > 0 reads attention weights, which only eager attention returns: the "
                               "%s now trains with eager attention instead of %r (same result, more memory).",
                               role, replaced)

    def _setup_relation(self, student, teacher, args, s_layers, t_layers):
        self.teacher_layer = args.relation_teacher_layer or t_layers
        if self.teacher_layer > t_layers:
            raise ValueError(f"relation_teacher_layer={self.teacher_layer} but the teacher has layers 1..{t_layers}.")
        self.relation_heads = args.relation_heads or unwrap(student).config.get_text_config().num_attention_heads
        for model, layer, role in ((student, s_layers, "student"), (teacher, self.teacher_layer, "teacher")):
            for kind, width in _projection_widths(model, layer).items():
                if width % self.relation_heads:
                    raise ValueError(f"relation_heads={self.relation_heads} does not divide the {role}'s {kind} width "
                                     f"{width} (layer {layer}); choose relation_heads dividing every query/key/value "
                                     "width of both models.")
        self.student_qkv = QKVCapture(student, s_layers)
        self.teacher_qkv = QKVCapture(teacher, self.teacher_layer)

    def attach_projections(self, student):
        """Before Trainer places and wraps the student: the projections train, synchronise and checkpoint with it.

        They also run inside the student's forward call: during the trainer's student forwards (`recording`), a
        forward hook appends the projected hidden states of the mapped layers to its `hidden_states`. DDP counts a
        parameter used outside forward as unused and fails when its gradient arrives; FSDP holds only shards of it
        there.
        """
        if self.projections is not None:
            attach_projections(student, self.projections)
            self._student = unwrap(student)

    def _project_in_forward(self, module, args, output):
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            output.hidden_states = tuple(hidden) + tuple(self.projections.project(s, hidden[s])
                                                         for s in self.layer_map)
        return output

    # ---- per batch ----

    def forward_options(self) -> dict:
        return {"output_attentions": True} if self.attn else {}

    @contextlib.contextmanager
    def recording(self, role: str):
        """Around a model's forward: yields the queries/keys/values L_relation reads ({} when it is off) and, for
        the student, appends the projected hidden states."""
        capture = self.student_qkv if role == "student" else self.teacher_qkv
        projecting = role == "student" and self._student is not None
        with forward_hook(self._student, self._project_in_forward) if projecting else contextlib.nullcontext(), \
                capture.recording() if capture is not None else contextlib.nullcontext({}) as qkv:
            yield qkv

    def item_counts(self, tokens: torch.Tensor) -> dict:
        """{term: items in this micro-batch} from the [B, L] non-padding mask."""
        per_example = tokens.sum(-1)
        return {"hidden": per_example.sum() * self.hidden_layers,
                "attn": per_example.pow(2).sum() * len(self.attention_pairs),
                "relation": per_example.sum()}

    def term_sums(self, student_out, teacher_out, student_qkv, teacher_qkv, tokens, training) -> dict:
        sums = {}
        if self.hidden:
            hidden = student_out.hidden_states
            if self.projections is None:
                projected = [hidden[s] for s in self.layer_map]
            else:  # appended by _project_in_forward after the student's own hidden states
                if len(hidden) != self._student_layers + 1 + len(self.layer_map):
                    raise RuntimeError(f"The student returned {len(hidden)} hidden states; expected its "
                                       f"{self._student_layers + 1} and {len(self.layer_map)} projected ones.")
                projected = hidden[-len(self.layer_map):]
            sums["hidden"] = sum(
                losses.hidden_state_distance(h_s, teacher_out.hidden_states[t], mask=tokens, metric=self.metric,
                                             reduction="sum")
                for h_s, t in zip(projected, self.layer_map.values()))
        if self.attn:
            for out, role in ((student_out, "student"), (teacher_out, "teacher")):
                if not out.attentions or any(a is None for a in out.attentions):
                    raise RuntimeError(f"The {role} returned no attention weights although alpha_attn > 0: its "
                                       "attention implementation was changed after the trainer set it to eager.")
            sums["attn"] = sum(losses.attention_mse(student_out.attentions[s], teacher_out.attentions[t], mask=tokens,
                                                    reduction="sum")
                               for s, t in self.attention_pairs)
        if self.relation:
            if set(student_qkv) != set(RELATION_KINDS) or set(teacher_qkv) != set(RELATION_KINDS):
                raise RuntimeError("The query/key/value hooks recorded nothing in this forward (student: "
                                   f"{sorted(student_qkv)}, teacher: {sorted(teacher_qkv)}): the hooked projection "
                                   "modules were replaced or bypassed after the trainer was built.")
            if training and torch.is_grad_enabled() and not student_qkv["query"].requires_grad:
                raise RuntimeError("The student's queries/keys/values carry no gradient, so alpha_relation cannot "
                                   "train it: with activation (gradient) checkpointing keep the default "
                                   "activation_checkpointing_kwargs={'use_reentrant': False}.")
            sums["relation"] = sum(losses.relation_kl(student_qkv[k], teacher_qkv[k], self.relation_heads, mask=tokens,
                                                      reduction="sum")
                                   for k in RELATION_KINDS)
        return sums
