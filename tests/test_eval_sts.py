"""run_sts.py (STS-B as a bi-encoder): the model's loss and scores against plain torch, an end-to-end run whose
reported correlations match scipy on the saved model's cosines, the teacher refusal, and its make_tables row."""

import json
import sys

import pytest
import torch

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import make_tables  # noqa: E402
import run_glue  # noqa: E402
import run_sts  # noqa: E402

STSB = tiny.SHARED_DATA / "glue" / "STS-B"
FAST = ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--num_train_epochs", "1",
        "--max_train_samples", "24", "--max_eval_samples", "20", "--max_seq_length", "32", "--use_cpu", "true",
        "--learning_rate", "1e-3", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A BertForMaskedLM folder, as distillation leaves a student."""
    path = tmp_path_factory.mktemp("sts_student")
    tiny.tiny_bert_mlm(layers=2, seed=11).save_pretrained(path)
    tiny.bert_tokenizer().save_pretrained(path)
    return str(path)


def test_forward_matches_plain_torch_on_a_padded_batch():
    from transformers import BertModel

    body = tiny.tiny_bert_mlm(layers=2, seed=12).bert.eval()
    assert isinstance(body, BertModel)
    model = run_sts.MeanPooledCosine(body)
    gen = torch.Generator().manual_seed(0)
    lengths_1, lengths_2 = [7, 4, 2], [3, 7, 5]
    # Padding positions hold random ids (not [PAD]): only the attention mask may keep them out.
    ids_1, ids_2 = torch.randint(1000, 2000, (3, 7), generator=gen), torch.randint(1000, 2000, (3, 7), generator=gen)
    mask_1 = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths_1])
    mask_2 = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths_2])
    labels = torch.tensor([4.2, 0.6, 2.5])
    with torch.no_grad():
        out = model(ids_1, mask_1, ids_2, mask_2, labels=labels)

        def embedding(ids, n):  # each sentence alone, unpadded: the plain mean over its tokens
            return body(input_ids=ids[None, :n]).last_hidden_state[0].mean(0)

        expected = torch.stack([torch.nn.functional.cosine_similarity(
            embedding(ids_1[i], lengths_1[i]), embedding(ids_2[i], lengths_2[i]), dim=0) for i in range(3)])
    assert out["logits"] == pytest.approx(expected, abs=1e-5)
    assert out["loss"].item() == pytest.approx(((expected - labels / 5) ** 2).mean().item(), abs=1e-6)
    assert "loss" not in model(ids_1, mask_1, ids_2, mask_2)


def test_end_to_end_scores_match_scipy_on_the_saved_model(student, tmp_path):
    from scipy.stats import pearsonr, spearmanr
    from transformers import AutoModel

    payload = run_sts.main(["--model_name_or_path", student, "--data_dir", str(STSB), "--output_dir", str(tmp_path),
                            "--save_models", "true", *FAST])
    saved = json.loads((tmp_path / "results_sts_stsb.json").read_text())
    assert saved["benchmark"] == "sts" and saved["task"] == "stsb" and saved["teacher"] is None
    assert saved["num_train_examples"] == 24 and saved["num_eval_examples"] == {"dev": 20}
    assert set(saved["median"]) == {"pearson", "spearmanr"} and saved["median"] == payload["median"]
    logs = json.loads((tmp_path / "seed-42" / "log_history.json").read_text())
    assert sum("loss" in row for row in logs) == 3  # 24 pairs, batch 8, 1 epoch

    body = AutoModel.from_pretrained(tmp_path / "seed-42").eval()
    initial = AutoModel.from_pretrained(student)
    assert not torch.equal(body.embeddings.word_embeddings.weight, initial.embeddings.word_embeddings.weight)
    rows = run_glue.read_tsv(STSB / "dev.tsv", "stsb", run_glue.TASKS["stsb"])
    tok = tiny.bert_tokenizer()

    def embed(text):
        ids = tok(text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
        return body(input_ids=ids).last_hidden_state[0].mean(0)

    with torch.no_grad():
        cosines = [torch.nn.functional.cosine_similarity(embed(a), embed(b), dim=0).item()
                   for a, b in zip(rows["sentence1"][:20], rows["sentence2"][:20])]
    gold = rows["label"][:20]
    assert saved["median"]["pearson"] == pytest.approx(pearsonr(cosines, gold)[0], abs=1e-4)
    assert saved["median"]["spearmanr"] == pytest.approx(spearmanr(cosines, gold)[0], abs=1e-4)


def test_refuses_a_teacher(student, tmp_path):
    with pytest.raises(ValueError, match="run_sts.py does not distil: drop --teacher"):
        run_sts.main(["--model_name_or_path", student, "--data_dir", str(STSB), "--output_dir", str(tmp_path),
                      "--teacher", student, *FAST])
    assert not (tmp_path / "results_sts_stsb.json").exists()


def test_make_tables_shows_the_sts_row():
    sts = {"benchmark": "sts", "task": "stsb", "median": {"pearson": 0.873, "spearmanr": 0.8616}}
    glue = {"benchmark": "glue", "task": "rte", "median": {"accuracy": 0.6}}
    assert make_tables.sts_task_values({("sts", "stsb"): sts}) == pytest.approx([87.3, 86.16])
    assert make_tables.sts_task_values({("glue", "rte"): glue}) is None
    markdown = make_tables.render_tables({("sts", "stsb"): sts}, {("sts", "stsb"): sts, ("glue", "rte"): glue},
                                         "Student", "MiniLM")
    expected = ("| Model | STS-B bi-encoder (Pearson/Spearman) |\n|---|---|\n"
                "| MiniLM | 87.3/86.2 |\n| Student | 87.3/86.2 |")
    assert expected in markdown and "### GLUE (dev)" in markdown
    assert "STS-B bi-encoder" not in make_tables.render_tables({("glue", "rte"): glue})
