"""DistillationArguments defaults to DistilBERT's whole set-up: the triple loss and the Distil* optimisation."""

from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer
from distil_trainer.distillation_config import DISTIL_OPTIMIZATION

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
# Sanh et al. (2019) and the original training command, written out here independently of the code.
DISTILBERT = {"learning_rate": 5e-4, "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-6,
              "weight_decay": 0.0, "max_grad_norm": 5.0, "warmup_steps": 0.05,
              "temperature": 2.0, "alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0, "alpha_clm": 0.0,
              "alpha_mse": 0.0, "alpha_task": 0.0}


def test_defaults_are_distilberts(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[])
    assert {k: getattr(args, k) for k in DISTILBERT} == DISTILBERT
    assert args.lr_scheduler_type == "linear"
    # Not vacuous: these are not transformers' own defaults.
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert (plain.learning_rate, plain.adam_beta2, plain.max_grad_norm, plain.warmup_steps) != (5e-4, 0.98, 5.0, 0.05)


@pytest.mark.parametrize("recipe", ["distilbert", "distilroberta", "distilgpt2", "distilmbert"])
def test_recipes_spell_out_the_same_setup(recipe):
    config = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    assert {k: config.get(k, DISTIL_OPTIMIZATION[k]) for k in DISTIL_OPTIMIZATION} == DISTIL_OPTIMIZATION


def test_trainer_builds_distils_optimizer_and_schedule(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, optim="adamw_torch")
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=200)
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6 and group["weight_decay"] == 0.0
    # Linear warm-up over 5% of the steps (10 of 200) to 5e-4, then linear decay to 0.
    lrs = []
    for _ in range(200):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [5e-4 * s / 10 if s < 10 else 5e-4 * (200 - s) / 190 for s in range(200)]
    assert lrs == pytest.approx(expected, abs=1e-12)
