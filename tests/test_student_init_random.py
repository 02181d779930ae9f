"""`--student_init random`: the paper's random-initialisation ablation. The student keeps the architecture of the
chosen teacher layers but gets fresh, seeded weights from the model class's own initialisation, and trains."""

import json
import math
from pathlib import Path

import pytest
import torch

from distil_trainer.pipeline import main
from distil_trainer.pipeline.recipe_args import ConfigError, parse_recipe_args
from test_pipeline import make_corpus, make_teacher, recipe_argv

BIG_MATRICES = ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                "bert.encoder.layer.{i}.attention.self.query.weight", "bert.encoder.layer.{i}.output.dense.weight",
                "cls.predictions.transform.dense.weight")


def _tensor_names(n_layers):
    return [name.format(i=i) for name in BIG_MATRICES for i in range(n_layers) if "{i}" in name or i == 0]


def _teacher_name(student_name, layer_map):
    """Student layer i sits where teacher layer layer_map[i] was."""
    for i, t in enumerate(layer_map):
        student_name = student_name.replace(f"layer.{i}.", f"layer.@{t}.")
    return student_name.replace("@", "")


def test_random_init_student_differs_from_teacher_and_trains(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    teacher_dir = make_teacher(tmp_path / "teacher")
    teacher = BertForMaskedLM.from_pretrained(teacher_dir).state_dict()
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    common = dict(max_steps=2, freeze_pos_embs="false")

    copied = Path(main(argv=recipe_argv(tmp_path, teacher_dir, corpus, output_dir=str(tmp_path / "copied"),
                                        **common))["output_dir"])
    random = Path(main(argv=recipe_argv(tmp_path, teacher_dir, corpus, output_dir=str(tmp_path / "random"),
                                        student_init="random", **common))["output_dir"])
    init_copied = BertForMaskedLM.from_pretrained(copied / "student_init").state_dict()
    init_random = BertForMaskedLM.from_pretrained(random / "student_init").state_dict()
    assert init_copied.keys() == init_random.keys()
    for name in _tensor_names(2):
        source = teacher[_teacher_name(name, [0, 2])]
        assert torch.equal(init_copied[name], source), name  # control: the default copies the teacher layer
        assert init_random[name].shape == source.shape
        assert not torch.allclose(init_random[name], source), name
        # Not some other teacher tensor either: no teacher matrix of that shape holds these values.
        assert not any(v.shape == source.shape and torch.allclose(init_random[name], v) for v in teacher.values())

    # Independently: the model class's own initialisation of the student config, seeded with the run's seed.
    config = BertConfig.from_pretrained(random / "student_init")
    torch.manual_seed(56)
    expected = BertForMaskedLM(config).state_dict()
    for name, value in init_random.items():
        assert torch.equal(value, expected[name]), name

    record = json.loads((random / "student_init" / "config.json").read_text())["distillation"]
    assert record["student_init"] == "random" and record["teacher_layers"] == [0, 2]
    report = json.loads((random / "student_init" / "extraction_report.json").read_text())
    assert report["copied"] == {} and "bert.encoder.layer.0.attention.self.query.weight" in report[
        "randomly_initialised"]
    card = (random / "student" / "README.md").read_text()
    assert "Layer map" not in card  # nothing was copied from teacher layers

    # It trained: the saved student moved away from its random start, with finite losses.
    trained = BertForMaskedLM.from_pretrained(random / "student").state_dict()
    assert not torch.equal(trained["bert.encoder.layer.0.attention.self.query.weight"],
                           init_random["bert.encoder.layer.0.attention.self.query.weight"])
    log = json.loads((random / "student" / "training_log.json").read_text())
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def test_cached_student_init_of_the_other_kind_is_refused(tmp_path, capsys):
    teacher_dir = make_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    argv = recipe_argv(tmp_path, teacher_dir, corpus, max_steps=1)
    main(argv=argv + ["--student_init", "random"])
    with pytest.raises(SystemExit) as exit_info:
        main(argv=argv + ["--overwrite_output_dir", "true"])  # asks for teacher_layers on the random run's folder
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "student_init=random" in err and "student_init=teacher_layers" in err and "output_dir" in err



def test_cached_student_init_of_other_layers_is_refused(tmp_path, capsys):
    """A re-run in the same output_dir that asks for other layers must not train the old initial student."""
    teacher_dir = make_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    argv = recipe_argv(tmp_path, teacher_dir, corpus, max_steps=1)
    main(argv=argv)  # layers 0,2
    with pytest.raises(SystemExit) as exit_info:
        main(argv=argv + ["--student_layers", "1,3", "--overwrite_output_dir", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "student_layers=[1, 3] (it has [0, 2])" in err and "output_dir" in err

def test_unknown_student_init_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="student_init"):
        parse_recipe_args(["--teacher_name", "t", "--file_path", "f", "--output_dir", str(tmp_path),
                           "--student_init", "zeros"])
