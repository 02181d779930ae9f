"""Choosing the student's layers by measurement: block influence and angular distances against a plain-torch
computation from `output_hidden_states`, the choice rules, iterative removal, every family (GGUF included), the
CLI end to end, and what the report and the model card say."""

import copy
import json
import math

import pytest
import torch

import tiny
import tiny_gguf
from distil_trainer.cli import main
from distil_trainer.extraction import CalibrationSet, extract_student, load_calibration
from distil_trainer.extraction.depth import best_block, drop_lowest

FAMILIES = {
    "bert": (tiny.tiny_bert_mlm, tiny.bert_tokenizer),
    "roberta": (tiny.tiny_roberta_mlm, tiny.roberta_tokenizer),
    "distilbert": (tiny.tiny_distilbert_mlm, tiny.bert_tokenizer),
    "gpt2": (tiny.tiny_gpt2_lm, tiny.gpt2_tokenizer),
    "llama": (tiny.tiny_llama_lm, tiny.gpt2_tokenizer),
}


def perturbed(model, seed=7, scale=0.3):
    """Noise on every weight, so that blocks change their input by different, non-trivial amounts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def calibration(tokenizer, n=10):
    """Real lines of different lengths (so batches are padded), at most 40 tokens each."""
    return CalibrationSet([tokenizer(line)["input_ids"][:40] for line in tiny.real_lines(n)], pad_id=0)


def reference_states(model, ids):
    """Boundary states of one unpadded sequence from output_hidden_states; the final norm (GPT-2 ln_f, Llama norm)
    replaced by the identity, so the last entry is the last block's own output."""
    plain = copy.deepcopy(model)
    if hasattr(plain, "transformer") and hasattr(plain.transformer, "ln_f"):
        plain.transformer.ln_f = torch.nn.Identity()
    if hasattr(plain, "model") and hasattr(plain.model, "norm"):
        plain.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return plain(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def reference_distances(model, cal, span, angular=False):
    """Mean over every token of every sequence (each run alone, no padding) of 1 - cos or arccos(cos) / pi
    between hidden_states[l] and hidden_states[l + span]."""
    sums, count = None, 0
    for ids in cal.sequences:
        hs = reference_states(model, ids)
        per_start = []
        for start in range(len(hs) - span):
            x, y = hs[start][0].double(), hs[start + span][0].double()
            cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
            per_start.append((torch.arccos(cos.clamp(-1, 1)) / math.pi if angular else 1 - cos).sum())
        sums = torch.stack(per_start) if sums is None else sums + torch.stack(per_start)
        count += len(ids)
    return (sums / count).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_influence_matches_plain_torch(family):
    build, tokenizer = FAMILIES[family]
    teacher = perturbed(build(layers=5, attn_implementation="eager"))
    cal = calibration(tokenizer())
    assert len({len(s) for s in cal.sequences}) > 1, "sequences of different lengths: batches are padded"
    _, report = extract_student(teacher, strategy="block_influence", num_layers=3, calibration=cal,
                                return_report=True, progress=False)
    want = reference_distances(teacher, cal, 1)
    got = report.layer_choice["scores"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert len({round(x, 6) for x in want}) == 5, "the layers must score differently for the test to mean much"
    # Of the middle layers 1..3, the two lowest go; the first and last stay.
    assert report.teacher_layers == [0, max([1, 2, 3], key=lambda i: want[i]), 4]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_angular_distances_match_plain_torch(family):
    build, tokenizer = FAMILIES[family]
    teacher = perturbed(build(layers=6, attn_implementation="eager"))
    cal = calibration(tokenizer(), n=6)
    _, report = extract_student(teacher, strategy="angular", num_layers=4, calibration=cal, return_report=True,
                                progress=False)
    choice = report.layer_choice
    blocks = reference_distances(teacher, cal, 2, angular=True)
    assert [choice["block_distances"][s] for s in range(5)] == pytest.approx(blocks, rel=1e-4, abs=1e-6)
    assert choice["scores"] == pytest.approx(reference_distances(teacher, cal, 1, angular=True), rel=1e-4, abs=1e-6)
    start = min(range(1, 4), key=lambda s: blocks[s])  # runs of 2 that spare layers 0 and 5
    assert report.teacher_layers == [i for i in range(6) if i not in (start, start + 1)]


def test_choice_rules():
    scores = [0.5, 0.1, 0.3, 0.05, 0.9, 0.2]
    assert drop_lowest(scores, 3) == ([0, 4, 5], [3, 1, 2])
    assert drop_lowest(scores, 3, keep_ends=False) == ([0, 2, 4], [3, 1, 5])
    assert drop_lowest([0.2, 0.1, 0.1, 0.1, 0.3], 3) == ([0, 3, 4], [1, 2])  # ties: the earlier layer goes first
    assert drop_lowest(scores, 6) == ([0, 1, 2, 3, 4, 5], [])
    with pytest.raises(ValueError, match="at least 2 layers.*keep_ends"):
        drop_lowest(scores, 1)
    assert drop_lowest(scores, 1, keep_ends=False)[0] == [4]
    distances = [0.01, 0.5, 0.2, 0.3, 0.02]  # starts 0..4 of runs of 2 in 6 layers
    assert best_block(distances, 6, 2) == 2  # 0 and 4 would drop an end
    assert best_block(distances, 6, 2, keep_ends=False) == 0
    with pytest.raises(ValueError, match="No run of 5 layers"):
        best_block([0.1, 0.2], 6, 5)


def identity_blocks(model, layers):
    """Make blocks pass their input through unchanged (attention and MLP outputs zeroed: residual only)."""
    with torch.no_grad():
        for i in layers:
            if hasattr(model, "model"):
                block = model.model.layers[i]
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            else:
                block = model.transformer.h[i]
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.zero_()
                    proj.bias.zero_()
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_block_that_changes_nothing_is_dropped_first(family):
    build, tokenizer = FAMILIES[family]
    teacher = identity_blocks(perturbed(build(layers=5)), [2])
    student, report = extract_student(teacher, strategy="block_influence", num_layers=4,
                                      calibration=calibration(tokenizer(), n=4), return_report=True, progress=False)
    assert report.layer_choice["scores"][2] == pytest.approx(0.0, abs=1e-6)
    assert report.teacher_layers == [0, 1, 3, 4] and student.config.num_hidden_layers == 4
    assert report.layer_choice["reasons"][2].startswith("dropped")
    assert report.layer_choice["reasons"][0] == "kept: first layer (keep_ends)"


def test_angular_drops_the_contiguous_run_that_changes_least():
    teacher = identity_blocks(perturbed(tiny.tiny_llama_lm(layers=6)), [3, 4])
    cal = calibration(tiny.gpt2_tokenizer(), n=4)
    _, report = extract_student(teacher, strategy="angular", num_layers=4, calibration=cal, return_report=True,
                                progress=False)
    assert report.teacher_layers == [0, 1, 2, 5]
    assert report.layer_choice["block_distances"][3] == pytest.approx(0.0, abs=1e-3)


def test_ends_can_be_dropped_when_asked():
    teacher = identity_blocks(perturbed(tiny.tiny_llama_lm(layers=4)), [0])
    cal = calibration(tiny.gpt2_tokenizer(), n=4)
    kept = extract_student(teacher, strategy="block_influence", num_layers=3, calibration=cal, return_report=True,
                           progress=False)[1].teacher_layers
    assert 0 in kept
    kept = extract_student(teacher, strategy="block_influence", num_layers=3, calibration=cal, keep_ends=False,
                           return_report=True, progress=False)[1].teacher_layers
    assert kept == [1, 2, 3]


def test_iterative_measures_again_after_each_removal():
    teacher = perturbed(tiny.tiny_llama_lm(layers=6, attn_implementation="eager"), scale=0.5)
    cal = calibration(tiny.gpt2_tokenizer(), n=4)
    _, report = extract_student(teacher, strategy="block_influence", num_layers=3, calibration=cal, iterative=True,
                                return_report=True, progress=False)
    # Independent loop: the student of the remaining layers, scored from its own hidden states, lowest middle goes.
    kept, dropped_order = list(range(6)), []
    while len(kept) > 3:
        current = extract_student(teacher, layers=kept)
        scores = dict(zip(kept, reference_distances(current, cal, 1)))
        victim = min((layer for layer in kept if layer not in (0, 5)), key=lambda layer: (scores[layer], layer))
        dropped_order.append(victim)
        kept.remove(victim)
    rounds = report.layer_choice["rounds"]
    assert [r["dropped"] for r in rounds] == dropped_order + [None]
    assert report.teacher_layers == kept and report.layer_choice["iterative"] is True
    second_round = extract_student(teacher, layers=[i for i in range(6) if i != dropped_order[0]])
    want = reference_distances(second_round, cal, 1)
    assert list(rounds[1]["scores"].values()) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_gguf_teacher(tmp_path):
    pytest.importorskip("gguf")
    from distil_trainer.extraction import load_teacher

    tiny_gguf.write_tiny_llama_gguf(tmp_path / "t.gguf", layers=4)
    teacher, _ = load_teacher(str(tmp_path / "t.gguf"))
    assert type(teacher).__name__ == "LlamaForCausalLM"
    cal = CalibrationSet([[5, 9, 12, 30, 7, 3], [8, 8, 2]], pad_id=0)
    _, report = extract_student(teacher, strategy="block_influence", num_layers=3, calibration=cal,
                                return_report=True, progress=False)
    assert report.layer_choice["scores"] == pytest.approx(reference_distances(teacher, cal, 1), rel=1e-4, abs=1e-6)


def test_calibration_sources(tmp_path):
    tok = tiny.bert_tokenizer()
    text = tmp_path / "cal.txt"
    lines = tiny.real_lines(30)
    text.write_text("\n\n".join(lines) + "\n")
    cal = load_calibration(text, tok, num_tokens=300, max_length=32)
    assert cal.num_tokens == 300 and all(len(s) <= 32 for s in cal.sequences)
    assert cal.sequences[0] == tok(lines[0], truncation=True, max_length=32)["input_ids"]

    from distil_trainer.data.binarize import binarize

    binarize(tmp_path / "bin", tok, file_path=str(text), max_length=64, verbose=False)
    from_folder = load_calibration(tmp_path / "bin", tok, num_tokens=100)
    assert from_folder.num_tokens == 100 and "binarized" in from_folder.source
    with pytest.raises(FileNotFoundError, match="Calibration file"):
        load_calibration(tmp_path / "missing.txt", tok)
    with pytest.raises(ValueError, match="does not match the teacher's tokenizer"):
        load_calibration(tmp_path / "bin", tiny.gpt2_tokenizer())


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="block_influence"), "calibration text: pass calibration="),
    (dict(hidden_size=16), "width pruning measures the teacher"),
    (dict(strategy="uniform", keep_ends=False, calibration=[[1, 2, 3]]), "apply to the measured strategies"),
    (dict(strategy="angular", iterative=True, calibration=[[1, 2, 3]]), "iterative applies to strategy"),
    (dict(strategy="block_influence", num_layers=1, calibration=[[1, 2, 3]]), "at least 2 layers"),
    (dict(strategy="block_influence", layers=[0, 1], calibration=[[1, 2, 3]]), "not both"),
])
def test_bad_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract_student(tiny.tiny_llama_lm(layers=4), progress=False, **kwargs)


@pytest.fixture
def gguf_teacher(tmp_path):
    pytest.importorskip("gguf")
    teacher, corpus, _ = tiny_gguf.write_decoder_benchmark_inputs(tmp_path)
    return teacher, corpus


@pytest.mark.parametrize("extra,strategy", [([], "block_influence"), (["--iterative"], "block_influence"),
                                            (["--keep_ends", "false"], "angular")])
def test_cli_measured_strategy(gguf_teacher, tmp_path, capsys, extra, strategy):
    teacher, corpus = gguf_teacher
    out = tmp_path / "student"
    code = main(["extract", "--model_name", str(teacher), "--strategy", strategy, "--num_layers", "2",
                 "--calibration_file", str(corpus), "--calibration_tokens", "200", "--dump_checkpoint", str(out),
                 "--no_progress", *extra])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "extraction_report.json").read_text())
    choice = report["layer_choice"]
    assert len(choice["scores"]) == 4 and len(choice["kept"]) == 2 and choice["strategy"] == strategy
    assert choice["calibration"].startswith("200 tokens") and choice["iterative"] == ("--iterative" in extra)
    assert set(choice["reasons"]) == {"0", "1", "2", "3"}
    config = json.loads((out / "config.json").read_text())
    assert config["distillation"]["layer_choice"]["kept"] == choice["kept"] == report["teacher_layers"]
    assert config["num_hidden_layers"] == 2
    for i in range(4):
        assert f"layer   {i}: {choice['scores'][i]:.4f}" in printed


def test_cli_width_pruning(gguf_teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher, corpus = gguf_teacher
    out = tmp_path / "narrow"
    code = main(["extract", "--model_name", str(teacher), "--hidden_size", "24", "--num_attention_heads", "2",
                 "--intermediate_size", "40", "--calibration_file", str(corpus), "--dump_checkpoint", str(out),
                 "--no_progress"])
    assert code == 0, capsys.readouterr().err
    student = AutoModelForCausalLM.from_pretrained(out)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
            c.num_hidden_layers) == (24, 2, 1, 8, 40, 4)
    assert c.distillation["width"]["sizes"]["hidden_size"] == [32, 24]
    report = json.loads((out / "extraction_report.json").read_text())
    assert len(report["width"]["kept"]["hidden"]) == 24 and len(report["width"]["kept"]["neurons"]["0"]) == 40


def test_cli_needs_a_calibration_file(gguf_teacher, tmp_path, capsys):
    teacher, _ = gguf_teacher
    code = main(["extract", "--model_name", str(teacher), "--strategy", "angular", "--dump_checkpoint",
                 str(tmp_path / "s")])
    assert code == 2 and "--calibration_file PATH" in capsys.readouterr().err


def test_report_and_model_card_list_every_layer():
    from distil_trainer.pipeline.model_card import StudentCardInfo, build_model_card

    teacher = perturbed(tiny.tiny_llama_lm(layers=5))
    student, report = extract_student(teacher, strategy="block_influence", num_layers=3, hidden_size=24,
                                      calibration=calibration(tiny.gpt2_tokenizer(), n=4), return_report=True,
                                      progress=False)
    summary = report.summary()
    scores = report.layer_choice["scores"]
    for i, score in enumerate(scores):
        assert f"layer   {i}: {score:.4f}  {report.layer_choice['reasons'][i]}" in summary
    assert "hidden_size 32 -> 24" in summary
    record = student.config.distillation
    card = str(build_model_card(StudentCardInfo(
        model_name="s", teacher_name="t", student_parameters=10, teacher_parameters=20,
        layer_map=record["teacher_layers"], student_choice={k: record[k] for k in ("layer_choice", "width")})))
    kept = set(report.teacher_layers)
    for i, score in enumerate(scores):
        row = (f"| {i} | {score:.4f} | {'yes' if i in kept else 'no'} | "
               f"{report.layer_choice['reasons'][i]} |")
        assert row in card
    assert "strategy `block_influence`" in card and "| hidden_size | 32 | 24 |" in card
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data.to_dict()["distillation"]["student_choice"]
    assert meta["layer_choice"]["kept"] == report.teacher_layers and meta["width"]["sizes"]["hidden_size"] == [32, 24]
