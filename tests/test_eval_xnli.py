"""run_xnli.py: train on an English slice, evaluate zero-shot on German and Spanish dev files."""

import json
import sys

import numpy as np
import pytest

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import run_xnli  # noqa: E402

XNLI = tiny.SHARED_DATA / "xnli"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("xnli_model")
    tiny.tiny_bert_classifier(num_labels=3).save_pretrained(root)
    tiny.bert_tokenizer().save_pretrained(root)
    return str(root)


def test_reader_maps_string_labels():
    rows = run_xnli.read_xnli_tsv(XNLI / "dev-en.tsv")
    assert len(rows["label"]) == 2490 and set(rows["label"]) == {0, 1, 2}
    assert rows["premise"][0] == "And he said, Mama, I'm home." and rows["label"][0] == 1  # neutral
    assert rows["label"][1] == 2  # contradiction


def test_en_to_de_es_zero_shot(model_dir, tmp_path):
    payload = run_xnli.main(["--model_name_or_path", model_dir, "--data_dir", str(XNLI), "--train_file",
                             str(XNLI / "dev-en.tsv"), "--eval_languages", "de,es", "--max_train_samples", "32",
                             "--max_eval_samples", "16", "--output_dir", str(tmp_path), "--seeds", "3",
                             "--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--use_cpu", "true"])
    saved = json.loads((tmp_path / "results_xnli_dev.json").read_text())
    assert saved["languages"] == ["de", "es"]
    median = saved["median"]
    assert set(median) == {"accuracy_de", "accuracy_es", "accuracy_avg"}
    assert median["accuracy_avg"] == pytest.approx(np.mean([median["accuracy_de"], median["accuracy_es"]]))
    assert payload["num_eval_examples"] == {"de": 16, "es": 16}


def test_bad_inputs(model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dev-de.tsv").write_text("a premise\ta hypothesis\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not an XNLI label"):
        run_xnli.main(["--model_name_or_path", model_dir, "--data_dir", str(bad), "--eval_only", "true",
                       "--output_dir", str(tmp_path / "a")])
    with pytest.raises(FileNotFoundError, match="XNLI TSV at .*dev-fr.tsv"):
        run_xnli.main(["--model_name_or_path", model_dir, "--data_dir", str(XNLI), "--eval_only", "true",
                       "--eval_languages", "fr", "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="needs --train_file"):
        run_xnli.main(["--model_name_or_path", model_dir, "--data_dir", str(XNLI), "--output_dir",
                       str(tmp_path / "c")])
