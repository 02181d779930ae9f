"""`DistillationArguments`: `TrainingArguments` plus the Distil* loss knobs, validated at construction."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

LOSS_WEIGHT_NAMES = ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos", "alpha_task",
                     "alpha_hidden", "alpha_attn", "alpha_relation")
# The Distil* optimisation set-up (Sanh et al., 2019 and the original training command): the defaults of
# DistillationArguments. The recipes' YAML files spell out the same values.
DISTIL_OPTIMIZATION = {"learning_rate": 5e-4, "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-6,
                       "weight_decay": 0.0, "max_grad_norm": 5.0, "lr_scheduler_type": "linear", "warmup_steps": 0.05}


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments for `DistillationTrainer`.

    The defaults are DistilBERT's: the triple loss (`alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0`, temperature 2)
    and the Distil* optimisation set-up (`DISTIL_OPTIMIZATION`: Adam(W) with lr 5e-4, betas (0.9, 0.98), eps 1e-6,
    no weight decay, gradients clipped to norm 5.0, linear schedule with 5% warm-up). Every other field keeps
    `TrainingArguments`' default. Set `alpha_mlm=0` and `alpha_clm>0` for causal students (DistilGPT2), and
    `alpha_task` for task heads (GLUE, SQuAD).
    """

    # Distil* optimisation in place of transformers' fine-tuning defaults (lr 5e-5, beta2 0.999, eps 1e-8, clip 1.0,
    # no warm-up); beta1 0.9, weight decay 0 and the linear schedule are transformers' defaults already.
    learning_rate: float = field(default=DISTIL_OPTIMIZATION["learning_rate"],
                                 metadata={"help": "Peak learning rate (DistilBERT: 5e-4)."})
    adam_beta2: float = field(default=DISTIL_OPTIMIZATION["adam_beta2"],
                              metadata={"help": "Adam beta2 (DistilBERT: 0.98)."})
    adam_epsilon: float = field(default=DISTIL_OPTIMIZATION["adam_epsilon"],
                                metadata={"help": "Adam epsilon (DistilBERT: 1e-6)."})
    max_grad_norm: float = field(default=DISTIL_OPTIMIZATION["max_grad_norm"],
                                 metadata={"help": "Gradient clipping norm (DistilBERT: 5.0); 0 disables clipping."})
    warmup_steps: float = field(
        default=DISTIL_OPTIMIZATION["warmup_steps"],
        metadata={"help": "Linear warm-up: a number of steps, or a fraction of all steps if < 1 (DistilBERT: 0.05)."})

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the soft-target KL (L_ce)."})
    alpha_ce: float = field(default=5.0, metadata={"help": "Weight of the soft-target KL between teacher and student."})
    alpha_mlm: float = field(default=2.0, metadata={"help": "Weight of the student's masked-LM loss on `labels`."})
    alpha_clm: float = field(default=0.0, metadata={"help": "Weight of the student's causal-LM loss (next token)."})
    alpha_mse: float = field(default=0.0, metadata={"help": "Weight of the squared logit difference (L_mse)."})
    alpha_cos: float = field(default=1.0, metadata={"help": "Weight of the last-hidden-state cosine loss (L_cos)."})
    alpha_task: float = field(
        default=0.0,
        metadata={"help": "Weight of the student's own supervised loss on a task head (classification, QA, "
                          "token tagging); the original SQuAD distillation called it alpha_squad."},
    )
    divergence: str = field(
        default="forward_kl",
        metadata={"help": "Divergence of L_ce between the teacher's and the student's softened distributions: "
                          "'forward_kl' KL(teacher||student) (DistilBERT), 'reverse_kl' KL(student||teacher), 'jsd' "
                          "(GKD's generalised Jensen-Shannon, weight jsd_beta on the teacher) or 'tv' (total "
                          "variation).", "choices": ["forward_kl", "reverse_kl", "jsd", "tv"]},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "beta of divergence='jsd' (TRL's GKD convention): beta*KL(P_t||M) + (1-beta)*KL(P_s||M), "
                          "M = beta*P_t + (1-beta)*P_s; 0 gives the forward KL, 1 the reverse KL, as in TRL."},
    )
    logits_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Causal-LM students: compute L_ce, L_mse, L_clm and the agreement from the last hidden "
                          "states, projecting this many positions to the vocabulary at a time (teacher and student), "
                          "so no full [tokens x vocab] logit tensor exists in training. None: from the full logits."},
    )
    restrict_ce_to_mask: bool = field(
        default=False, metadata={"help": "Compute L_ce/L_mse only at masked (MLM label) positions."}
    )
    freeze_pos_embs: bool = field(default=False, metadata={"help": "Freeze the student's position embeddings."})
    freeze_token_type_embds: bool = field(
        default=False, metadata={"help": "Freeze the student's token-type embeddings (BERT, RoBERTa)."}
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the teacher's `from_pretrained` when `teacher_model` is a name, "
                          "e.g. '{\"dtype\": \"bfloat16\"}'."},
    )
    nonfinite_loss: str = field(
        default="skip",
        metadata={"help": "When a loss term is NaN/inf: 'skip' the update (counted and logged with the term) or "
                          "'stop' after saving a checkpoint of the last good weights.", "choices": ["skip", "stop"]},
    )
    max_consecutive_nonfinite: int = field(
        default=10, metadata={"help": "Stop (after saving) when this many consecutive updates were skipped."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a finished run found in output_dir instead of refusing to start."}
    )
    # ---- intermediate-layer and attention terms (TinyBERT, MiniLM/MiniLMv2); see intermediate.py ----
    alpha_hidden: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state loss between mapped layers (L_hidden, TinyBERT)."}
    )
    hidden_loss: str = field(
        default="mse", metadata={"help": "Distance of L_hidden per token: 'mse' (mean over the teacher's width) or "
                                         "'cosine' (1 - cos).", "choices": ["mse", "cosine"]}
    )
    intermediate_layer_map: str | None = field(
        default=None,
        metadata={"help": "Student layer -> teacher layer for L_hidden and L_attn, e.g. '0:0,1:2,2:4,3:6' (0 is the "
                          "embeddings); default: uniform (student layer m -> teacher layer m*N/M)."},
    )
    alpha_attn: float = field(
        default=0.0, metadata={"help": "Weight of the attention-map MSE of mapped layers (L_attn, TinyBERT); needs "
                                       "equal head counts and switches both models to eager attention."}
    )
    alpha_relation: float = field(
        default=0.0, metadata={"help": "Weight of the query/key/value relation KL between relation_teacher_layer and "
                                       "the student's last layer (L_relation, MiniLMv2)."}
    )
    relation_heads: int | None = field(
        default=None, metadata={"help": "Relation heads of L_relation; must divide the query/key/value widths of "
                                        "both models. Default: the student's attention head count."}
    )
    relation_teacher_layer: int | None = field(
        default=None, metadata={"help": "Teacher layer (1..N) whose relations the student's last layer learns; "
                                        "default: the last. MiniLMv2 used an upper-middle layer for large teachers."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in LOSS_WEIGHT_NAMES:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name}={value} is negative; loss weights must be >= 0.")
        if sum(getattr(self, name) for name in LOSS_WEIGHT_NAMES) <= 0:
            raise ValueError(
                f"All loss weights ({', '.join(LOSS_WEIGHT_NAMES)}) are 0, so there is nothing to train; "
                "set at least one to a positive value (DistilBERT used alpha_ce=5, alpha_mlm=2, alpha_cos=1)."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (DistilBERT used 2.0).")
        if self.alpha_mlm > 0 and self.alpha_clm > 0:
            raise ValueError(
                f"alpha_mlm={self.alpha_mlm} and alpha_clm={self.alpha_clm} are both set; a student is either a "
                "masked LM (set alpha_clm=0) or a causal LM (set alpha_mlm=0)."
            )
        self._check_intermediate_terms()
        self._check_divergence()
        if self.nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"nonfinite_loss={self.nonfinite_loss!r}; use 'skip' or 'stop'.")
        if isinstance(self.teacher_model_init_kwargs, str):
            import json

            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)

    def _check_divergence(self):
        from .losses import DIVERGENCES

        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r}; use one of {', '.join(DIVERGENCES)}.")
        if self.logits_chunk_size is not None and self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size={self.logits_chunk_size} must be >= 1 (or None for full logits).")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"jsd_beta={self.jsd_beta} must be in [0, 1] (0: forward KL, 1: reverse KL, GKD used "
                             "0.1 to 0.9).")

    def _check_intermediate_terms(self):
        from .intermediate import parse_layer_map

        if self.hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"hidden_loss={self.hidden_loss!r}; use 'mse' or 'cosine'.")
        if isinstance(self.intermediate_layer_map, dict):  # given in Python: keep the documented string form
            self.intermediate_layer_map = ",".join(f"{s}:{t}" for s, t in self.intermediate_layer_map.items())
        parse_layer_map(self.intermediate_layer_map)  # malformed maps fail here; ranges are checked against the models
        if self.relation_heads is not None and self.relation_heads < 1:
            raise ValueError(f"relation_heads={self.relation_heads} must be >= 1 (MiniLMv2 used 12 to 64).")
        if self.relation_teacher_layer is not None and self.relation_teacher_layer < 1:
            raise ValueError(f"relation_teacher_layer={self.relation_teacher_layer}: teacher layers are numbered "
                             "from 1 (the embeddings, 0, have no attention).")

    @property
    def loss_weights(self) -> dict:
        """{term: weight} for the terms with a positive weight, keyed without the `alpha_` prefix."""
        return {n[len("alpha_"):]: getattr(self, n) for n in LOSS_WEIGHT_NAMES if getattr(self, n) > 0}
