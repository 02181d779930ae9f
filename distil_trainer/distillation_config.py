"""`DistillationArguments`: `TrainingArguments` plus the Distil* loss knobs, validated at construction."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

LOSS_WEIGHT_NAMES = ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos", "alpha_task")


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments for `DistillationTrainer`.

    The defaults of the loss weights are the original DistilBERT triple loss
    (`alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0`, temperature 2). Set `alpha_mlm=0` and `alpha_clm>0`
    for causal students (DistilGPT2), and `alpha_task` for task heads (GLUE, SQuAD).
    """

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
        if self.nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"nonfinite_loss={self.nonfinite_loss!r}; use 'skip' or 'stop'.")
        if isinstance(self.teacher_model_init_kwargs, str):
            import json

            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)

    @property
    def loss_weights(self) -> dict:
        """{term: weight} for the terms with a positive weight, keyed without the `alpha_` prefix."""
        return {n[len("alpha_"):]: getattr(self, n) for n in LOSS_WEIGHT_NAMES if getattr(self, n) > 0}
