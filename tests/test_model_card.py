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
