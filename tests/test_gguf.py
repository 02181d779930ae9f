"""GGUF teachers (llama.cpp's format): a `.gguf` path or `folder::file.gguf` is taken wherever a teacher name is,
and loads through transformers' own GGUF path. Tested on tiny Llama GGUF files written with the `gguf` package
(tests/tiny_gguf.py) whose tensors are known, tied and untied embeddings both."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import tiny_gguf
from distil_trainer import DistillationArguments, DistillationTrainer
from distil_trainer.extraction import extract_student, load_teacher
from distil_trainer.model_utils import resolve_gguf


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """{tied: (path of the .gguf file, the model written into it)}"""
    root = tmp_path_factory.mktemp("gguf")
    return {tied: (root / f"tiny-{'tied' if tied else 'untied'}.gguf",
                   tiny_gguf.write_tiny_llama_gguf(root / f"tiny-{'tied' if tied else 'untied'}.gguf",
                                                   tie_word_embeddings=tied, seed=int(tied)))
            for tied in (True, False)}


def test_resolve_names():
    assert resolve_gguf("some/dir/model.Q4_1.gguf") == ("some/dir", {"gguf_file": "model.Q4_1.gguf"})
    assert resolve_gguf("model.gguf") == (".", {"gguf_file": "model.gguf"})
    assert resolve_gguf("org/repo::model.gguf") == ("org/repo", {"gguf_file": "model.gguf"})
    assert resolve_gguf("bert-base-uncased") == ("bert-base-uncased", {})
    with pytest.raises(ValueError, match="must be a .gguf file name"):
        resolve_gguf("org/repo::model.bin")


def test_missing_gguf_package_is_named(monkeypatch, tmp_path):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(ImportError, match=r"needs the gguf package .*pip install gguf"):
        load_teacher(str(tmp_path / "model.gguf"))
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, alpha_mlm=0.0, alpha_cos=0.0,
                                 alpha_ce=1.0)
    with pytest.raises(ImportError, match="pip install gguf"):
        DistillationTrainer(model=tiny_gguf_student(), teacher_model=str(tmp_path / "model.gguf"), args=args)


def tiny_gguf_student():
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    return LlamaForCausalLM(tiny_gguf.tiny_llama_config(layers=2)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_loads_the_written_model(gguf_files, tied):
    path, written = gguf_files[tied]
    for name in (str(path), f"{path.parent}::{path.name}"):
        teacher, missing = load_teacher(name)
        assert type(teacher).__name__ == "LlamaForCausalLM" and missing == []
        assert teacher.config.tie_word_embeddings is tied
        ids = torch.tensor([[5, 70, 200, 3, 99, 260]])
        with torch.no_grad():
            assert torch.equal(teacher(ids).logits, written(ids).logits)


def test_trainer_takes_a_gguf_teacher(gguf_files, tmp_path):
    """teacher_model="x.gguf": the trainer's L_ce is the KL to the written model's own distribution."""
    path, written = gguf_files[True]
    student = tiny_gguf_student()
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, alpha_mlm=0.0, alpha_cos=0.0,
                                 alpha_ce=1.0, temperature=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=str(path), args=args)
    inputs = {"input_ids": torch.tensor([[5, 70, 200, 3], [99, 260, 8, 41]]), "attention_mask": torch.ones(2, 4)}
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        p_t = written(**inputs).logits.double().softmax(-1)
        log_p_s = student(**inputs).logits.double().log_softmax(-1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_extract_cli_builds_a_llama_student(gguf_files, tied, tmp_path):
    path, written = gguf_files[tied]
    out = tmp_path / "student"
    proc = subprocess.run([sys.executable, "-m", "distil_trainer.cli", "extract", "--model_name",
                           f"{path.parent}::{path.name}", "--layers", "0,3", "--dump_checkpoint", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(out)
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 2
    assert student.config.tie_word_embeddings is tied
    # De-quantized weights: the saved student is a plain float model that Trainer can fine-tune.
    assert getattr(student.config, "quantization_config", None) is None and not getattr(student, "is_quantized", False)
    theirs, ours = written.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 3)):
        for key in [k for k in theirs if k.startswith(f"model.layers.{old}.")]:
            assert torch.equal(ours[key.replace(f"layers.{old}.", f"layers.{new}.")], theirs[key]), key
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[key], theirs[key]), key
    tied_now = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied_now is tied
    # The teacher's tokenizer, rebuilt from the GGUF metadata, is saved beside the student.
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "the cat was on the mat"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) == written.config.vocab_size


def test_extract_student_from_a_gguf_name(gguf_files):
    path, written = gguf_files[True]
    student, report = extract_student(str(path), layers=[1, 2], return_report=True)
    assert report.randomly_initialised == [] and student.config.num_hidden_layers == 2
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, written.model.layers[1].self_attn.q_proj.weight)


def test_gguf_teacher_gives_a_trainable_run(gguf_files, tmp_path):
    """A few optimizer steps of CLM + L_ce (JSD) with a GGUF teacher and its own tokenizer: finite, decreasing loss."""
    path, _ = gguf_files[True]
    from distil_trainer.data import CausalLMCollator
    from distil_trainer.model_utils import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["the cat was on the mat", "in the house of the king", "to be and to see", "as it was in the end"] * 4
    data = Dataset.from_list([tokenizer(t) for t in texts])
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, alpha_mlm=0.0, alpha_cos=0.0,
                                 alpha_ce=1.0, alpha_clm=1.0, max_steps=6, per_device_train_batch_size=8,
                                 learning_rate=1e-2, logging_steps=1, save_strategy="no", divergence="jsd")
    trainer = DistillationTrainer(model=tiny_gguf_student(), teacher_model=str(path), args=args, train_dataset=data,
                                  data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer)
    trainer.train()
    logged = [(e["loss"], e["loss_ce"]) for e in trainer.state.log_history if "loss_ce" in e]
    assert len(logged) == 6 and torch.isfinite(torch.tensor(logged)).all()
    assert logged[-1][0] < logged[0][0]


def test_recipe_pipeline_with_a_gguf_teacher(gguf_files, tmp_path):
    """The recipes take `teacher_name: folder::file.gguf`: tokenizer, teacher and student all come from the file."""
    from distil_trainer.pipeline import main
    from test_pipeline import make_corpus, recipe_argv

    path, written = gguf_files[False]
    corpus = make_corpus(tmp_path / "corpus.txt", n=60)
    argv = recipe_argv(tmp_path, f"{path.parent}::{path.name}", corpus, student_layers="0,3", max_steps=2,
                       alpha_mlm=0.0, alpha_clm=1.0, freeze_pos_embs="false", divergence="reverse_kl")
    result = main(argv=argv)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(Path(result["student_dir"]))
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 2
    assert student.config.vocab_size == written.config.vocab_size
    assert (Path(result["student_dir"]) / "tokenizer.json").exists()
