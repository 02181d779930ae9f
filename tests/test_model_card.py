"""The student's model card: rendered fields, metadata round trip through ModelCard.load, model-index validity."""

import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from distil_trainer.pipeline.model_card import StudentCardInfo, build_model_card, write_model_card


def _info(**overrides):
    values = dict(
        model_name="me/distilbert-tiny", teacher_name="bert-base-uncased", teacher_revision="86b5e0934494bd15c9632b12",
        architecture="distilbert", student_parameters=66_362_880, teacher_parameters=109_514_298,
        layer_map=[0, 2, 4, 7, 9, 11], loss_weights={"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0},
        temperature=2.0, datasets=["wikitext", "bookcorpus"], train_steps=12_500, tokens_seen=3_276_800_000,
        speed_ratio=1.62, speed_measurement="batch 32 x 128, CPU",
        eval_results=[
            EvalResult(task_type="text-classification", dataset_type="glue", dataset_name="GLUE RTE",
                       dataset_config="rte", dataset_split="validation", metric_type="accuracy", metric_value=0.5957),
            EvalResult(task_type="text-classification", dataset_type="glue", dataset_name="GLUE MRPC",
                       dataset_config="mrpc", dataset_split="validation", metric_type="f1", metric_value=0.8731),
        ],
    )
    values.update(overrides)
    return StudentCardInfo(**values)


def _front_matter(text):
    # Parse the card's YAML header independently of huggingface_hub.
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_metadata_holds_exactly_the_given_values():
    text = str(build_model_card(_info()))
    meta = _front_matter(text)
    d = meta["distillation"]
    assert d["teacher"] == "bert-base-uncased" and d["teacher_revision"] == "86b5e0934494bd15c9632b12"
    assert d["temperature"] == 2.0
    assert d["loss_weights"] == {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0}
    assert d["layer_map"] == {0: 0, 1: 2, 2: 4, 3: 7, 4: 9, 5: 11}
    assert d["train_steps"] == 12_500 and d["tokens_seen"] == 3_276_800_000
    assert d["student_parameters"] == 66_362_880 and d["teacher_parameters"] == 109_514_298
    assert d["parameter_ratio"] == pytest.approx(66_362_880 / 109_514_298, abs=1e-6)
    assert d["speed_ratio"] == 1.62
    assert meta["base_model"] == "bert-base-uncased"
    assert meta["datasets"] == ["wikitext", "bookcorpus"]
    assert meta["library_name"] == "transformers" and "distillation" in meta["tags"]
    # model-index in the Hub's schema: name, then results with task / dataset / metrics.
    (entry,) = meta["model-index"]
    assert entry["name"] == "me/distilbert-tiny"
    assert [(r["dataset"]["config"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in entry["results"]] == [
        ("rte", "accuracy", 0.5957), ("mrpc", "f1", 0.8731)]


def test_card_body_shows_the_numbers():
    text = build_model_card(_info()).text
    for fragment in ("bert-base-uncased", "86b5e0934494bd15c9632b12", "66,362,880", "109,514,298",
                     f"{66_362_880 / 109_514_298:.3f}", "1.62x", "batch 32 x 128, CPU", "| Temperature | 2 |",
                     "| alpha_ce | 5 |", "| alpha_mlm | 2 |", "| alpha_cos | 1 |", "| 3 | 7 |", "12,500",
                     "3,276,800,000", "wikitext, bookcorpus", "GLUE RTE", "0.5957", "0.8731"):
        assert fragment in text, fragment


def test_card_round_trips_through_model_card_load(tmp_path):
    path = write_model_card(_info(), tmp_path)
    assert path == tmp_path / "README.md"
    loaded = ModelCard.load(path)
    original = build_model_card(_info())
    assert loaded.data.to_dict() == original.data.to_dict()
    assert loaded.data.distillation["layer_map"][5] == 11
    # huggingface_hub parsed model-index back into EvalResults equal to what was given.
    assert loaded.data.model_name == "me/distilbert-tiny"
    assert loaded.data.eval_results == _info().eval_results
    name, results = model_index_to_eval_results(loaded.data.to_dict()["model-index"])
    assert name == "me/distilbert-tiny" and [r.metric_value for r in results] == [0.5957, 0.8731]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_optional_fields_are_left_out_and_local_teacher_is_not_a_base_model(tmp_path):
    card = build_model_card(_info(teacher_name=str(tmp_path), teacher_revision=None, speed_ratio=None,
                                  speed_measurement=None, eval_results=[], layer_map={1: 3, 0: 1}))
    meta = _front_matter(str(card))
    assert "model-index" not in meta and "base_model" not in meta
    assert "speed_ratio" not in meta["distillation"] and "teacher_revision" not in meta["distillation"]
    assert meta["distillation"]["layer_map"] == {0: 1, 1: 3}
    assert "## Evaluation" not in card.text and "Measured speed" not in card.text


def test_write_refuses_to_overwrite_without_flag(tmp_path):
    write_model_card(_info(), tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_model_card(_info(temperature=4.0), tmp_path)
    write_model_card(_info(temperature=4.0), tmp_path, overwrite=True)
    assert ModelCard.load(tmp_path / "README.md").data.distillation["temperature"] == 4.0


@pytest.mark.parametrize("overrides, match", [
    ({"student_parameters": 0}, "student_parameters"),
    ({"loss_weights": {"ce": 1.0}}, "alpha_"),
    ({"temperature": 0.0}, "temperature"),
    ({"speed_ratio": -1.0}, "speed_ratio"),
    ({"model_name": ""}, "model_name"),
    ({"speed_measurement": "timed by hf_" + "Ab3" * 12}, "token"),
])
def test_bad_info_is_rejected_with_a_clear_message(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model_card(_info(**overrides))


def _scores(with_stsb=True):
    models = {"teacher": {"sentence_cosine": 1.0, "mlm_loss": 8.5}, "student_init": {"sentence_cosine": 0.81234},
              "student": {"sentence_cosine": 0.93456, "mlm_loss": 9.25}}
    if with_stsb:
        for role, value in (("teacher", 0.8691), ("student_init", 0.7012), ("student", 0.8123)):
            models[role]["stsb_spearman"] = value
    return {"models": models, "stsb_source": "glue/STS-B/dev.tsv" if with_stsb else None,
            "stsb_unavailable": None if with_stsb else "STS-B was unavailable (offline); pass --stsb_file",
            "stsb_pairs": 1500 if with_stsb else 0, "heldout_sequences": 300,
            "result_line": "Result: the student keeps 93.5% of the teacher's STS-B score"}


def test_card_shows_the_scores_and_lists_stsb_in_the_model_index():
    card = build_model_card(_info(scores=_scores()))
    text = card.text
    assert "## Quality" in text and "**Result: the student keeps 93.5% of the teacher's STS-B score**" in text
    assert "| distilled student | 81.2 | 0.935 |" in text and "| teacher | 86.9 | 1.000 |" in text
    assert "1500 dev pairs from glue/STS-B/dev.tsv" in text and "300 sequences" in text
    meta = _front_matter(str(card))
    assert meta["distillation"]["scores"]["models"]["student"] == {"sentence_cosine": 0.9346, "mlm_loss": 9.25,
                                                                    "stsb_spearman": 0.8123}
    results = meta["model-index"][0]["results"]
    assert len(results) == 3  # the two given GLUE results, then the student's STS-B score
    assert results[2]["dataset"]["config"] == "stsb" and results[2]["metrics"][0]["value"] == 0.8123


def test_card_says_when_stsb_was_unavailable():
    card = build_model_card(_info(scores=_scores(with_stsb=False), eval_results=[]))
    assert "STS-B was unavailable (offline); pass --stsb_file" in card.text
    meta = _front_matter(str(card))
    assert "model-index" not in meta
    assert meta["distillation"]["scores"]["stsb_unavailable"].startswith("STS-B was unavailable")
    assert "## Quality" not in build_model_card(_info()).text  # no scores, no section


def test_scores_without_models_are_rejected():
    with pytest.raises(ValueError, match="scores must hold a 'models' mapping"):
        build_model_card(_info(scores={"stsb_source": "x"}))
