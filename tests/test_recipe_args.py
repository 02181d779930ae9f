"""Recipe configuration: YAML defaults, command-line overrides, and one-line errors for bad configuration."""

import pytest

from distil_trainer.pipeline.recipe_args import ConfigError, parse_recipe_args

MINIMAL = "teacher_name: some/teacher\nfile_path: corpus.txt\noutput_dir: {out}\n"


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(out=tmp_path / "out"))
    return str(path)


def test_yaml_values_and_command_line_overrides(tmp_path):
    config = write(tmp_path, MINIMAL + "alpha_ce: 3.0\nlearning_rate: 1.0e-4\nstudent_layers: '0,2'\n")
    model, data, training, recipe = parse_recipe_args(["--config", config, "--alpha_ce", "4.5"])
    assert model.teacher_name == "some/teacher" and model.student_layers == "0,2"
    assert data.file_path == "corpus.txt"
    assert training.alpha_ce == 4.5  # the command line wins
    assert training.learning_rate == 1e-4
    assert recipe.config == config


def test_shipped_recipe_configs_parse_with_the_paper_settings():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    for name, lm_term in (("distilbert", "alpha_mlm"), ("distilbert-cased", "alpha_mlm"),
                          ("distilbert-german", "alpha_mlm"), ("distilroberta", "alpha_mlm"),
                          ("distilgpt2", "alpha_clm")):
        model, data, training, _ = parse_recipe_args([], default_config=str(configs / f"{name}.yaml"))
        assert (training.alpha_ce, getattr(training, lm_term), training.alpha_cos) == (5.0, 2.0, 1.0)
        assert training.temperature == 2.0 and training.learning_rate == 5e-4
        assert (training.adam_beta1, training.adam_beta2, training.adam_epsilon) == (0.9, 0.98, 1e-6)
        assert training.warmup_steps == 0.05 and training.max_grad_norm == 5.0 and training.weight_decay == 0.0
        assert training.seed == 56 and training.num_train_epochs == 3 and training.freeze_pos_embs
        assert training.per_device_train_batch_size * training.gradient_accumulation_steps * 8 == 4096
        assert model.student_layers == "0,2,4,7,9,11"
        assert Path(model.student_reference_config).is_file()
    # DistilmBERT ships no corpus: the user must choose one, and is told so.
    with pytest.raises(ConfigError, match="set exactly one of file_path"):
        parse_recipe_args([], default_config=str(configs / "distilmbert.yaml"))


@pytest.mark.parametrize("name, teacher, reference, vocab_size", [
    ("distilbert-cased", "bert-base-cased", "distilbert-base-cased.json", 28996),
    ("distilbert-german", "bert-base-german-dbmdz-cased", "distilbert-base-german-cased.json", 31102),
])
def test_cased_and_german_distilbert_recipes(name, teacher, reference, vocab_size):
    """The two other DistilBERTs of the original release: their teachers, and the student sizes to check against."""
    import json
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    model, _, _, _ = parse_recipe_args([], default_config=str(configs / f"{name}.yaml"))
    assert model.teacher_name == teacher and model.student_type == "distilbert"
    assert Path(model.student_reference_config) == configs / "students" / reference
    sizes = json.loads(Path(model.student_reference_config).read_text())
    assert sizes["vocab_size"] == vocab_size
    assert (sizes["n_layers"], sizes["dim"], sizes["n_heads"], sizes["hidden_dim"]) == (6, 768, 12, 3072)
    assert (configs.parent / f"{name}.py").is_file()


@pytest.mark.parametrize("extra, message", [
    ("alpha_cee: 1.0\n", "unknown key 'alpha_cee'; did you mean 'alpha_ce'?"),
    ("learning_rate: fast\n", "recipe.yaml: learning_rate: invalid float value: 'fast'"),
    ("temperature: -1\n", "temperature=-1.0 must be > 0"),
])
@pytest.mark.reliability(fault="unknown YAML key, wrong type, bad value", outcome="one line naming the key (closest valid key for a typo)")
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, extra, message):
    config = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as err:
        parse_recipe_args(["--config", config])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_command_line_option_suggests_the_closest(tmp_path):
    config = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="unknown option '--temprature'; did you mean '--temperature'"):
        parse_recipe_args(["--config", config, "--temprature", "3"])


@pytest.mark.reliability(fault="missing required setting", outcome="one line naming the setting")
def test_missing_required_field(tmp_path):
    config = write(tmp_path, "file_path: corpus.txt\noutput_dir: x\n")
    with pytest.raises(ConfigError, match="the following arguments are required: --teacher_name"):
        parse_recipe_args(["--config", config])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_recipe_args(["--config", str(tmp_path / "nope.yaml")])


def test_a_corpus_on_the_command_line_replaces_the_recipes(tmp_path):
    config = write(tmp_path, "teacher_name: t\ndataset_name: wikimedia/wikipedia\ndataset_config: 20231101.en\n"
                             "output_dir: {out}\n")
    _, data, _, _ = parse_recipe_args(["--config", config, "--file_path", "mine.txt"])
    assert (data.file_path, data.dataset_name, data.dataset_config) == ("mine.txt", None, None)
    config = write(tmp_path, MINIMAL)
    _, data, _, _ = parse_recipe_args(["--config", config, "--dataset_name", "some/corpus"])
    assert (data.file_path, data.dataset_name) == (None, "some/corpus")
