"""DistillationTrainer behaviour: training on real text, saving and reloading, the frozen teacher, freezing flags,
logging, and the errors raised before compute is spent."""

import glob
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

import tiny
from distil_trainer import DistillationArguments, DistillationTrainer


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=5)
    return DistillationArguments(**{**base, **kw})


def tokenized_lines(tokenizer, n, max_length=48):
    enc = tokenizer(tiny.real_lines(n), truncation=True, max_length=max_length)
    return Dataset.from_dict(dict(enc))


def premasked(tokenizer, n, seed=123):
    """An evaluation set with fixed masks, so that losses before and after training are comparable."""
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    torch.manual_seed(seed)
    batch = collate([dict(x) for x in tokenized_lines(tokenizer, n)])
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def test_thirty_steps_on_real_text_lower_the_loss_and_the_student_reloads(tmp_path):
    tok = tiny.bert_tokenizer()
    teacher, student = tiny.tiny_bert_mlm(), tiny.tiny_distilbert_mlm()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = args_for(tmp_path, max_steps=30, per_device_eval_batch_size=16)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=tokenized_lines(tok, 160), eval_dataset=premasked(tok, 32),
                                  data_collator=DataCollatorForLanguageModeling(tok), processing_class=tok)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before

    # Every term and the agreement were logged at each logging step.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6
    for entry in logged:
        assert {"loss_ce", "loss_mlm", "loss_cos", "teacher_agreement"} <= entry.keys()
        weighted = 5 * entry["loss_ce"] + 2 * entry["loss_mlm"] + entry["loss_cos"]
        assert entry["loss"] == pytest.approx(weighted, rel=0.05)  # token-weighted vs step-weighted means

    # The teacher was never updated and stays frozen in eval mode.
    assert not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k

    trainer.save_model()
    reloaded = AutoModelForMaskedLM.from_pretrained(args.output_dir)
    assert os.path.exists(os.path.join(args.output_dir, "model.safetensors"))
    for k, v in student.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_terms_reach_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = tiny.bert_tokenizer()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = args_for(tmp_path, max_steps=4, logging_steps=2, report_to=["tensorboard"])
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(), args=args,
                                  train_dataset=tokenized_lines(tok, 32),
                                  data_collator=DataCollatorForLanguageModeling(tok))
    trainer.train()
    events = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss_ce", "train/loss_mlm", "train/loss_cos", "train/teacher_agreement"} <= tags


def test_hidden_states_requested_only_when_a_term_needs_them(tmp_path):
    tok = tiny.bert_tokenizer()
    seen = []
    student = tiny.tiny_distilbert_mlm()
    student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("output_hidden_states")),
                                      with_kwargs=True)
    batch = DataCollatorForLanguageModeling(tok)([dict(x) for x in tokenized_lines(tok, 4)])
    for alpha_cos, expected in ((0.0, None), (1.0, True)):
        trainer = DistillationTrainer(model=student, teacher_model=tiny.tiny_bert_mlm(),
                                      args=args_for(tmp_path, alpha_cos=alpha_cos))
        seen.clear()
        trainer.compute_loss(student, dict(batch))
        assert seen == [expected]


def test_teacher_loaded_by_path_with_init_kwargs(tmp_path):
    tok = tiny.bert_tokenizer()
    tiny.tiny_bert_mlm().save_pretrained(tmp_path / "teacher")
    args = args_for(tmp_path, max_steps=2, teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=str(tmp_path / "teacher"),
                                  args=args, train_dataset=tokenized_lines(tok, 16),
                                  data_collator=DataCollatorForLanguageModeling(tok))
    assert trainer.teacher.dtype == torch.bfloat16
    assert type(trainer.teacher).__name__ == "BertForMaskedLM"
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


@pytest.mark.reliability(fault="teacher name that cannot be loaded (offline)", outcome="one error naming the teacher and the ways to fix it")
def test_missing_teacher_path_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="Could not load the teacher 'no/such-teacher'"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model="no/such-teacher",
                            args=args_for(tmp_path))


# ---- freezing ----

def _freeze_case(family):
    if family == "bert":
        tok = tiny.bert_tokenizer()
        return tok, tiny.tiny_bert_mlm(), tiny.tiny_bert_mlm(layers=2, seed=8), {}
    if family == "distilbert":
        tok = tiny.bert_tokenizer()
        return tok, tiny.tiny_bert_mlm(), tiny.tiny_distilbert_mlm(), {}
    if family == "roberta":
        tok = tiny.roberta_tokenizer()
        return tok, tiny.tiny_roberta_mlm(), tiny.tiny_roberta_mlm(layers=2, seed=8), {}
    tok = tiny.gpt2_tokenizer()
    return tok, tiny.tiny_gpt2_lm(), tiny.tiny_gpt2_lm(layers=2, seed=8), dict(alpha_mlm=0.0, alpha_clm=2.0)


FROZEN_NAMES = {
    "bert": ["bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"],
    "distilbert": ["distilbert.embeddings.position_embeddings.weight"],
    "roberta": ["roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight"],
    "gpt2": ["transformer.wpe.weight"],
}


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "gpt2"])
def test_frozen_embeddings_are_unchanged_by_training(family, tmp_path):
    tok, teacher, student, weights = _freeze_case(family)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    if family == "gpt2":
        collate = DataCollatorForLanguageModeling(tok, mlm=False)
    else:
        collate = DataCollatorForLanguageModeling(tok)
    args = args_for(tmp_path, max_steps=3, freeze_pos_embs=True, freeze_token_type_embds=True, **weights)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tokenized_lines(tok, 24),
                        data_collator=collate).train()
    after = student.state_dict()
    for name in FROZEN_NAMES[family]:
        assert torch.equal(before[name], after[name]), name
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 10  # the rest of the student did train


def test_freezing_positions_of_a_rotary_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no learned position embeddings"):
        DistillationTrainer(model=tiny.tiny_llama_lm(layers=2), teacher_model=tiny.tiny_llama_lm(),
                            args=args_for(tmp_path, alpha_mlm=0.0, alpha_clm=1.0, freeze_pos_embs=True))


# ---- errors before compute is spent ----

@pytest.mark.reliability(fault="teacher/student vocabularies differ", outcome="refused before training, both sizes named")
def test_vocabulary_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"teacher BertForMaskedLM has 30522 tokens, student DistilBertForMaskedLM "
                                         r"has 1000"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(vocab_size=1000), teacher_model=tiny.tiny_bert_mlm(),
                            args=args_for(tmp_path))


def test_cosine_with_different_widths(tmp_path):
    with pytest.raises(ValueError, match=r"teacher's hidden size is 64 and the student's is 32.*alpha_cos=0"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(hidden=32), teacher_model=tiny.tiny_bert_mlm(hidden=64),
                            args=args_for(tmp_path))


def test_different_widths_are_fine_without_cosine(tmp_path):
    DistillationTrainer(model=tiny.tiny_distilbert_mlm(hidden=32), teacher_model=tiny.tiny_bert_mlm(hidden=64),
                        args=args_for(tmp_path, alpha_cos=0.0))


def test_soft_targets_need_teacher_logits(tmp_path):
    from transformers import BertConfig, BertModel

    bare = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"alpha_ce=5.0 needs teacher logits, but the teacher BertModel has no head"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=bare, args=args_for(tmp_path))
    # Terms that need no teacher head are accepted with the same bare teacher.
    DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=bare,
                        args=args_for(tmp_path, alpha_ce=0.0))


def test_mlm_without_labels_in_the_batch(tmp_path):
    tok = tiny.bert_tokenizer()
    student = tiny.tiny_distilbert_mlm()
    trainer = DistillationTrainer(model=student, teacher_model=tiny.tiny_bert_mlm(), args=args_for(tmp_path))
    batch = tok(tiny.real_lines(2), padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"alpha_mlm=2.0 but the batch has no 'labels'"):
        trainer.compute_loss(student, dict(batch))


@pytest.mark.reliability(fault="training into a finished run's directory", outcome="refused without --overwrite_output_dir; the old model is untouched")
def test_finished_run_is_not_overwritten(tmp_path):
    tok = tiny.bert_tokenizer()
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous run")
    kwargs = dict(teacher_model=tiny.tiny_bert_mlm(), train_dataset=tokenized_lines(tok, 8),
                  data_collator=DataCollatorForLanguageModeling(tok))
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(), args=args_for(tmp_path, max_steps=1), **kwargs)
    with pytest.raises(FileExistsError, match="already holds a finished run.*--overwrite_output_dir"):
        trainer.train()
    assert (out / "model.safetensors").read_bytes() == b"previous run"
    trainer = DistillationTrainer(model=tiny.tiny_distilbert_mlm(),
                                  args=args_for(tmp_path, max_steps=1, overwrite_output_dir=True), **kwargs)
    trainer.train()


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha_ce=-1.0), "alpha_ce=-1.0 is negative"),
    (dict(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0), "All loss weights"),
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(alpha_clm=1.0), "alpha_mlm=2.0 and alpha_clm=1.0 are both set"),
])
def test_arguments_are_validated_at_construction(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DistillationArguments(output_dir=str(tmp_path), **kwargs)


def test_head_mismatches(tmp_path):
    with pytest.raises(ValueError, match="alpha_clm=1.0 needs a causal-LM student"):
        DistillationTrainer(model=tiny.tiny_distilbert_mlm(), teacher_model=tiny.tiny_bert_mlm(),
                            args=args_for(tmp_path, alpha_mlm=0.0, alpha_clm=1.0))
    with pytest.raises(ValueError, match="num_labels=3, student has num_labels=2"):
        DistillationTrainer(model=tiny.tiny_bert_classifier(num_labels=2), teacher_model=tiny.tiny_bert_classifier(),
                            args=args_for(tmp_path, alpha_mlm=0.0, alpha_cos=0.0, alpha_task=1.0))
