"""run_glue.py end to end on real GLUE slices with tiny models, task distillation, and its input checks."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import run_glue  # noqa: E402

GLUE = tiny.SHARED_DATA / "glue"
FAST = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--num_train_epochs", "1",
        "--max_train_samples", "32", "--max_eval_samples", "16", "--max_seq_length", "64", "--use_cpu", "true",
        "--logging_steps", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_models")
    out = {}
    for name, num_labels, layers, seed in [("cls2", 2, 2, 5), ("cls1", 1, 2, 5), ("teacher2", 2, 3, 9),
                                           ("teacher3", 3, 3, 9)]:
        tiny.tiny_bert_classifier(num_labels=num_labels, layers=layers, seed=seed).save_pretrained(root / name)
        tiny.bert_tokenizer().save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def run(model, task, data, out, *extra):
    return run_glue.main(["--model_name_or_path", model, "--task_name", task, "--data_dir", str(GLUE / data),
                          "--output_dir", str(out), *FAST, *extra])


def test_rte_two_seeds_median(models, tmp_path):
    payload = run(models["cls2"], "rte", "RTE", tmp_path, "--seeds", "1,2")
    saved = json.loads((tmp_path / "results_glue_rte.json").read_text())
    assert saved["task"] == "rte" and saved["benchmark"] == "glue" and saved["seeds"] == [1, 2]
    assert saved["num_train_examples"] == 32 and saved["num_eval_examples"] == {"dev": 16}
    accs = [saved["per_seed"][s]["accuracy"] for s in ("1", "2")]
    assert saved["median"]["accuracy"] == pytest.approx(float(np.median(accs)))
    assert all(0 <= a <= 1 and round(a * 16) == a * 16 for a in accs)  # a fraction of 16 examples
    assert payload["teacher"] is None
    # An existing results file is not silently replaced.
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run(models["cls2"], "rte", "RTE", tmp_path)


def test_stsb_regression_and_cola_mcc(models, tmp_path):
    stsb = run(models["cls1"], "stsb", "STS-B", tmp_path / "stsb", "--eval_only", "true")
    assert set(stsb["median"]) == {"pearson", "spearmanr"}
    cola = run(models["cls2"], "cola", "CoLA", tmp_path / "cola", "--eval_only", "true")
    assert set(cola["median"]) == {"matthews_correlation"}


def test_stsb_scores_match_independent_pearson(models, tmp_path):
    """The reported Pearson equals scipy's on the model's own outputs over the same rows."""
    import torch
    from scipy.stats import pearsonr
    from transformers import AutoModelForSequenceClassification

    payload = run(models["cls1"], "stsb", "STS-B", tmp_path, "--eval_only", "true")
    rows = run_glue.read_tsv(GLUE / "STS-B" / "dev.tsv", "stsb", run_glue.TASKS["stsb"])
    model = AutoModelForSequenceClassification.from_pretrained(models["cls1"]).eval()
    tok = tiny.bert_tokenizer()
    enc = tok(rows["sentence1"][:16], rows["sentence2"][:16], truncation=True, max_length=64, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        scores = model(**enc).logits[:, 0].numpy()
    assert payload["median"]["pearson"] == pytest.approx(pearsonr(scores, rows["label"][:16])[0], abs=1e-4)


def test_mrpc_task_distillation(models, tmp_path):
    payload = run(models["cls2"], "mrpc", "MRPC", tmp_path, "--teacher", models["teacher2"], "--alpha_ce", "0.7",
                  "--alpha_task", "0.3", "--temperature", "3")
    assert payload["distillation"] == {"alpha_ce": 0.7, "alpha_task": 0.3, "alpha_mse": 0.0, "temperature": 3.0}
    assert set(payload["median"]) == {"accuracy", "f1"}
    logs = json.loads((tmp_path / "seed-42" / "log_history.json").read_text())
    logged = set().union(*logs)
    assert {"loss_ce", "loss_task"} <= logged


def test_stsb_distillation_uses_alpha_mse(models, tmp_path):
    """STS-B has one output, no distribution for L_ce: the refusal points to --alpha_mse, which the script takes."""
    with pytest.raises(ValueError, match="use alpha_mse for regression tasks such as STS-B and set alpha_ce=0"):
        run(models["cls1"], "stsb", "STS-B", tmp_path / "ce", "--teacher", models["cls1"])
    payload = run(models["cls1"], "stsb", "STS-B", tmp_path / "mse", "--teacher", models["cls1"], "--alpha_ce", "0",
                  "--alpha_mse", "2")
    assert payload["distillation"]["alpha_mse"] == 2.0 and set(payload["median"]) == {"pearson", "spearmanr"}
    logs = json.loads((tmp_path / "mse" / "seed-42" / "log_history.json").read_text())
    assert {"loss_mse", "loss_task"} <= set().union(*logs) and "loss_ce" not in set().union(*logs)


def test_mrpc_reader_matches_release_layout():
    rows = run_glue.read_tsv(GLUE / "MRPC" / "dev.tsv", "mrpc", run_glue.TASKS["mrpc"])
    assert len(rows["label"]) == 408 and set(rows["label"]) == {0, 1}
    assert rows["sentence1"][0].startswith("He said the foodservice pie business")
    cola = run_glue.read_tsv(GLUE / "CoLA" / "dev.tsv", "cola", run_glue.TASKS["cola"])
    assert len(cola["label"]) == 1043 and cola["sentence"][0] == "The sailors rode the breeze clear of the rocks."


def test_bad_inputs(models, tmp_path):
    with pytest.raises(ValueError, match="Unknown GLUE task 'rtx'.*cola, sst2, mrpc"):
        run(models["cls2"], "rtx", "RTE", tmp_path / "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="train split at .*train.tsv"):
        run_glue.main(["--model_name_or_path", models["cls2"], "--task_name", "rte", "--data_dir", str(empty),
                       "--output_dir", str(tmp_path / "b")])
    # WNLI's files hold 0/1 labels; read as RTE (entailment / not_entailment) that is a label-set mismatch.
    wnli_as_rte = tmp_path / "wnli"
    wnli_as_rte.mkdir()
    for split in ("train", "dev"):
        (wnli_as_rte / f"{split}.tsv").write_text((GLUE / "WNLI" / f"{split}.tsv").read_text())
    with pytest.raises(ValueError, match=r"labels \['0', '1'\] that GLUE rte does not use"):
        run_glue.main(["--model_name_or_path", models["cls2"], "--task_name", "rte", "--data_dir", str(wnli_as_rte),
                       "--output_dir", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="is --data_dir the folder of this task"):
        run(models["cls2"], "rte", "MRPC", tmp_path / "d")
    with pytest.raises(ValueError, match="Teacher .* predicts 3 labels but the student is trained on 2"):
        run(models["cls2"], "rte", "RTE", tmp_path / "e", "--teacher", models["teacher3"])
    with pytest.raises(ValueError, match="has a 3-label head but this task has 2"):
        run(models["teacher3"], "rte", "RTE", tmp_path / "f")
