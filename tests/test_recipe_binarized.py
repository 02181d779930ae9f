"""Recipes take a folder made by `distil-trainer binarize` (binarized_data, or a file_path that is one), and refuse
one made with another tokenizer than the teacher's, or with longer sequences than the run's max_length."""

from pathlib import Path
from types import SimpleNamespace

import pytest

import tiny
from distil_trainer.cli import main as cli
from distil_trainer.pipeline import main
from distil_trainer.pipeline.data_stages import Binarize
from distil_trainer.pipeline.recipe_args import ConfigError, parse_recipe_args
from test_pipeline import make_corpus, make_teacher, recipe_argv


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("binarized")
    teacher = make_teacher(root / "teacher")
    corpus = make_corpus(root / "corpus.txt")
    return root, teacher, corpus


def binarize_cli(corpus, tokenizer_dir, out, max_length=64):
    args = ["binarize", "--file_path", corpus, "--tokenizer_name", str(tokenizer_dir), "--dump_file", str(out),
            "--max_length", str(max_length)]
    assert cli(args) == 0
    return out


def argv_with_data(tmp_path, teacher, key, folder, **overrides):
    argv = recipe_argv(tmp_path, teacher, "unused", **overrides)
    i = argv.index("--file_path")
    return argv[:i] + [f"--{key}", str(folder)] + argv[i + 2:]


def before(argv):
    """Parse like a recipe and run the Binarize stage's checks, as every rank does."""
    from distil_trainer.pipeline.data_stages import load_tokenizer

    model_args, data_args, _, _ = parse_recipe_args(argv)
    ctx = SimpleNamespace(data_args=data_args, tokenizer=load_tokenizer(model_args))
    Binarize().before(ctx)
    return ctx


def test_recipe_trains_on_a_binarized_folder(setup, tmp_path, capsys):
    root, teacher, corpus = setup
    folder = binarize_cli(corpus, teacher, tmp_path / "data")
    result = main(argv=argv_with_data(tmp_path, teacher, "binarized_data", folder))
    out = Path(result["output_dir"])
    assert (out / "student" / "model.safetensors").exists()
    assert not (out / "data").exists()  # nothing re-binarized
    assert (folder / "token_counts.npy").exists()  # counted beside the given data
    assert f"(given, tokenizer checked) in {folder}" in capsys.readouterr().out


def test_a_binarized_folder_given_as_file_path_is_used_as_such(setup, tmp_path):
    root, teacher, corpus = setup
    folder = binarize_cli(corpus, teacher, tmp_path / "data")
    ctx = before(argv_with_data(tmp_path, teacher, "file_path", folder))
    assert ctx.given_data == folder and ctx.binarized.cache_hit and len(ctx.binarized.dataset) > 0


def test_another_tokenizer_is_refused(setup, tmp_path, capsys):
    root, teacher, corpus = setup
    gpt2_dir = tmp_path / "gpt2-tokenizer"
    tiny.gpt2_tokenizer().save_pretrained(gpt2_dir)
    folder = binarize_cli(corpus, gpt2_dir, tmp_path / "gpt2-data")
    with pytest.raises(ConfigError, match=r"does not match the teacher's tokenizer: it was binarized with the "
                                          r"tokenizer .*gpt2-tokenizer.* \(50257 tokens\), whose backend_sha256, "
                                          r"vocab_size, begin/end/unk token ids differ"):
        before(argv_with_data(tmp_path, teacher, "binarized_data", folder))
    with pytest.raises(SystemExit) as stop:  # the recipe: one line, exit status 2, before any work
        main(argv=argv_with_data(tmp_path, teacher, "binarized_data", folder))
    assert stop.value.code == 2
    assert "Binarize the corpus again with the teacher's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("student*"))


def test_same_tokenizer_from_another_path_is_accepted(setup, tmp_path):
    # Only what shapes the ids is compared, not the name or path the tokenizer was loaded from.
    root, teacher, corpus = setup
    copy = tmp_path / "same-tokenizer-elsewhere"
    tiny.bert_tokenizer().save_pretrained(copy)
    folder = binarize_cli(corpus, copy, tmp_path / "data")
    assert before(argv_with_data(tmp_path, teacher, "binarized_data", folder)).binarized.cache_hit


def test_longer_sequences_than_max_length_are_refused(setup, tmp_path):
    root, teacher, corpus = setup
    folder = binarize_cli(corpus, teacher, tmp_path / "data", max_length=128)
    with pytest.raises(ConfigError, match="sequences of up to 128 tokens, longer than max_length=64"):
        before(argv_with_data(tmp_path, teacher, "binarized_data", folder))


def test_exactly_one_corpus_and_command_line_replaces_the_yaml_corpus(tmp_path):
    config = tmp_path / "r.yaml"
    config.write_text(f"teacher_name: t\nfile_path: corpus.txt\noutput_dir: {tmp_path / 'o'}\n")
    _, data, _, _ = parse_recipe_args(["--config", str(config), "--binarized_data", "data/bert"])
    assert (data.file_path, data.dataset_name, data.binarized_data) == (None, None, "data/bert")
    with pytest.raises(ConfigError, match="set exactly one of file_path .*binarized_data"):
        parse_recipe_args(["--config", str(config), "--binarized_data", "data/bert", "--file_path", "c.txt"])
