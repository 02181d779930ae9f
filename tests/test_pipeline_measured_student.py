"""The recipes take a student chosen by measurement: the SmolLM2 recipe (tiny GGUF teacher) with block-influence
layers and width pruning, an encoder recipe with angular layers and hidden-state terms mapped to the kept layers;
the model card lists every layer's score and the widths."""

import json
from pathlib import Path

import pytest

import tiny_gguf
from distil_trainer.pipeline import main
from test_pipeline import make_corpus, make_teacher, recipe_argv
from test_recipe_args import _smollm2_recipe


def test_smollm2_recipe_heals_a_measured_narrower_student(tmp_path):
    pytest.importorskip("gguf")
    recipe = _smollm2_recipe()
    tiny_gguf.write_tiny_llama_gguf(tmp_path / "tiny.gguf", tie_word_embeddings=True)
    corpus = make_corpus(tmp_path / "corpus.txt", n=60)
    overrides = dict(teacher_name=f"{tmp_path}::tiny.gguf", file_path=corpus, output_dir=tmp_path / "run",
                     layer_strategy="block_influence", student_num_layers=3, calibration_tokens=300,
                     student_hidden_size=24, student_intermediate_size=48, max_length=32, pack=32, max_steps=2,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, logits_chunk_size=16,
                     logging_steps=1, save_steps=2, report_to="none", report="false", use_cpu="true",
                     disable_tqdm="true")
    argv = [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    result = main(default_config=recipe.CONFIG, argv=recipe.recipe_argv(argv))
    student_dir = Path(result["student_dir"])
    config = json.loads((student_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (3, 24, 48)
    record = config["distillation"]
    choice = record["layer_choice"]
    assert choice["strategy"] == "block_influence" and len(choice["scores"]) == 4 and choice["kept"][0] == 0
    assert choice["calibration"].startswith("300 tokens") and "training data" in choice["calibration"]
    card = (student_dir / "README.md").read_text()
    assert "### How the layers were chosen" in card and "| hidden_size | 32 | 24 |" in card
    for i, score in enumerate(choice["scores"]):
        assert f"| {i} | {score:.4f} | {'yes' if i in choice['kept'] else 'no'} |" in card
    log = json.loads((student_dir / "training_log.json").read_text())
    assert any("loss_ce" in e for e in log)


def test_encoder_recipe_with_angular_layers_maps_hidden_terms_to_the_kept_layers(tmp_path):
    teacher = make_teacher(tmp_path / "bert")
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(Path(corpus).read_text().split("\n", 40)[-1])
    argv = recipe_argv(tmp_path, teacher, corpus, student_layers="", layer_strategy="angular",
                       student_num_layers=2, keep_ends="false", calibration_file=calibration,
                       calibration_tokens=200, alpha_hidden=1.0, max_steps=2)
    result = main(argv=argv)
    config = json.loads((Path(result["student_dir"]) / "config.json").read_text())
    choice = config["distillation"]["layer_choice"]
    assert choice["strategy"] == "angular" and choice["keep_ends"] is False and len(choice["kept"]) == 2
    assert str(calibration) in choice["calibration"]
    start = min(range(3), key=lambda s: choice["block_distances"][str(s)])
    assert choice["kept"] == [i for i in range(4) if i not in (start, start + 1)]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert any("loss_hidden" in e for e in state["log_history"])
    # Student layer m learns from the output of the teacher layer it was copied from (hidden state index + 1).
    kept = choice["kept"]
    args = json.loads((checkpoint / "training_args.json").read_text())
    assert args["intermediate_layer_map"] == f"0:0,1:{kept[0] + 1},2:{kept[1] + 1}"
