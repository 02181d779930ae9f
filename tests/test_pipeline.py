"""The recipe pipeline end to end on tiny offline models and real text: every stage's output, the model card,
the report, stage caching, and the refusal to overwrite a finished run."""

import json
from pathlib import Path

import pytest
import torch

import tiny
from distil_trainer.pipeline import main

REPO = Path(__file__).resolve().parents[1]


def make_teacher(path, family="bert", dropout=0.0):
    """A tiny teacher saved with its tokenizer (no dropout by default, so runs compare exactly)."""
    if family == "bert":
        model = tiny.tiny_bert_mlm(layers=4, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        tok = tiny.bert_tokenizer()
    else:
        model = tiny.tiny_gpt2_lm(layers=4, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        tok = tiny.gpt2_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_corpus(path, n=200):
    path.write_text("\n".join(tiny.real_lines(n)) + "\n")
    return str(path)


def recipe_argv(tmp_path, teacher, corpus, **overrides):
    settings = dict(teacher_name=teacher, file_path=corpus, output_dir=str(tmp_path / "run"),
                    student_layers="0,2", max_length=64, max_steps=6, per_device_train_batch_size=4,
                    logging_steps=2, save_steps=2, learning_rate=1e-3, report_to="none", use_cpu="true",
                    seed=56, disable_tqdm="true", freeze_pos_embs="true")
    settings.update(overrides)
    argv = []
    for k, v in settings.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "bert")


def test_distilbert_style_pipeline(tmp_path, bert_teacher, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt")
    argv = recipe_argv(tmp_path, bert_teacher, corpus, student_type="distilbert", report="true")
    result = main(argv=argv)
    out = Path(result["output_dir"])
    student_dir = out / "student"

    # The student: DistilBERT, initialised from teacher layers 0 and 2, trained, reloadable, with a model card.
    config = json.loads((student_dir / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["n_layers"] == 2
    assert config["distillation"]["teacher_layers"] == [0, 2]
    assert (student_dir / "model.safetensors").exists() and (student_dir / "tokenizer.json").exists()
    from transformers import AutoModelForMaskedLM

    trained = AutoModelForMaskedLM.from_pretrained(student_dir)
    initial = AutoModelForMaskedLM.from_pretrained(out / "student_init")
    assert not torch.equal(trained.distilbert.transformer.layer[0].attention.q_lin.weight,
                           initial.distilbert.transformer.layer[0].attention.q_lin.weight)
    # Frozen position embeddings stayed as extracted.
    assert torch.equal(trained.distilbert.embeddings.position_embeddings.weight,
                       initial.distilbert.embeddings.position_embeddings.weight)

    card = (student_dir / "README.md").read_text()
    for expected in ("alpha_ce", "Temperature", "Layer map", "Training steps", "Tokens seen", "6"):
        assert expected in card
    assert result["student_parameters"] < result["teacher_parameters"]
    assert (out / "report.md").exists() and (out / "loss_curve.png").stat().st_size > 1000
    assert list(out.glob("data/binarized-*/token_counts.npy"))

    printed = capsys.readouterr().out
    for stage in ("binarize", "token counts", "load teacher", "extract student", "distil", "save student",
                  "model card", "report"):
        assert f"{stage}: " in printed

    # Run again: every stage is reused, nothing is retrained or overwritten.
    before = (student_dir / "model.safetensors").read_bytes()
    main(argv=argv)
    printed = capsys.readouterr().out
    assert "cache reused" in printed and "reused " in printed
    assert "distil: skipped" in printed
    assert (student_dir / "model.safetensors").read_bytes() == before


@pytest.mark.reliability(fault="teacher without an MLM head with alpha_ce > 0", outcome="refused with the two fixes, or the head is fitted with the body frozen when asked")
def test_teacher_without_mlm_head_is_refused_unless_fitted(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    teacher_dir = tmp_path / "bare"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(teacher_dir)
    tiny.bert_tokenizer().save_pretrained(teacher_dir)
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    # A bare checkpoint is a sentence-embedding teacher to distillation_objective=auto (test_pipeline_objective.py);
    # the logits objective asks for an MLM head.
    argv = recipe_argv(tmp_path, str(teacher_dir), corpus, student_layers="0", max_steps=2,
                       distillation_objective="logits")
    with pytest.raises(SystemExit):
        main(argv=argv)
    assert "has no pretrained LM head" in capsys.readouterr().err

    result = main(argv=argv + ["--fit_teacher_mlm_head_steps", "3"])
    head_dir = Path(result["teacher_head"])
    fitted = json.loads((head_dir / "fitted_mlm_head.json").read_text())
    assert fitted["steps"] == 3
    # Only the head changed: the body equals the shipped teacher.
    from transformers import BertForMaskedLM

    shipped = BertModel.from_pretrained(teacher_dir).state_dict()
    with_head = BertForMaskedLM.from_pretrained(head_dir)
    for name, value in with_head.bert.state_dict().items():
        if name in shipped:
            assert torch.equal(value, shipped[name]), name
    report = json.loads((Path(result["output_dir"]) / "student_init" / "extraction_report.json").read_text())
    assert report["randomly_initialised"] == []  # the student copied the fitted head


def test_gpt2_pipeline_uses_the_causal_loss(tmp_path):
    teacher = make_teacher(tmp_path / "gpt2", family="gpt2")
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    argv = recipe_argv(tmp_path, teacher, corpus, alpha_mlm=0.0, alpha_clm=2.0, max_steps=2)
    result = main(argv=argv)
    log = json.loads((Path(result["student_dir"]) / "training_log.json").read_text())
    assert "loss_clm" in log[0] and "loss_mlm" not in log[0]
    config = json.loads((Path(result["student_dir"]) / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2


def _stsb_file(path, n=30):
    """The first `n` pairs of the real GLUE STS-B dev set, in its own layout."""
    source = tiny.SHARED_DATA / "glue" / "STS-B" / "dev.tsv"
    lines = source.read_text(encoding="utf-8-sig").splitlines()
    path.write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
    return str(path)


def test_scored_run_puts_the_scores_in_report_card_and_last_line(tmp_path, bert_teacher, capsys):
    import yaml

    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(tiny.real_lines(100)[80:]) + "\n")  # lines the corpus does not hold
    argv = recipe_argv(tmp_path, bert_teacher, corpus, max_steps=2, report="true", score="true",
                       stsb_file=_stsb_file(tmp_path / "stsb.tsv"), heldout_file=str(heldout))
    result = main(argv=argv)
    out = Path(result["output_dir"])
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert set(scores["models"]) == {"teacher", "student_init", "student"}
    assert scores["stsb_pairs"] == 30 and scores["heldout_sequences"] == 20
    teacher = scores["models"]["teacher"]
    assert teacher["sentence_cosine"] == pytest.approx(1.0, abs=1e-5) and teacher["top1_agreement"] == 1.0
    for figures in scores["models"].values():
        assert set(figures) == {"stsb_spearman", "token_cosine", "sentence_cosine", "top1_agreement", "mlm_loss",
                                "mlm_accuracy"}

    printed = capsys.readouterr().out.strip().splitlines()
    line = printed[-1]
    assert line.startswith("Result: the student keeps") and "of the teacher's STS-B score" in line
    assert line == result["result_line"]
    report = (out / "report.md").read_text()
    card = (out / "student" / "README.md").read_text()
    student_stsb = f"{100 * scores['models']['student']['stsb_spearman']:.1f}"
    for text in (report, card):
        assert "## Quality" in text and line in text and "30 dev pairs" in text
        assert f"| distilled student | {student_stsb} |" in text
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["distillation"]["scores"]["models"]["student"]["stsb_spearman"] == pytest.approx(
        scores["models"]["student"]["stsb_spearman"], abs=1e-4)
    results = meta["model-index"][0]["results"]
    assert results[0]["dataset"]["name"] == "GLUE STS-B" and results[0]["metrics"][0]["type"] == "spearmanr"

    # Run again: the scores are reused (same weights, same STS-B and held-out files).
    main(argv=argv)
    assert "score: reused" in capsys.readouterr().out


def test_score_refuses_the_training_corpus_as_heldout_text(tmp_path, bert_teacher, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt", n=40)
    argv = recipe_argv(tmp_path, bert_teacher, corpus, max_steps=1, score="true", heldout_file=corpus)
    with pytest.raises(SystemExit):
        main(argv=argv)
    assert "is the training corpus" in capsys.readouterr().err


def test_min_length_reaches_the_binarizer_and_its_cache_key(tmp_path, bert_teacher, capsys):
    """Short sentences (what STS-B holds) survive a lower min_length; the default keeps DistilBERT's 12 tokens."""
    tokenizer = tiny.bert_tokenizer()
    lines = [line for line in tiny.real_lines(200) if len(tokenizer(line)["input_ids"]) <= 64][:40]  # no splits
    short = [" ".join(line.split()[:3]) for line in lines[:20]]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(short + lines[20:]) + "\n")
    lengths = [len(tokenizer(line)["input_ids"]) for line in short + lines[20:]]
    expected = {12: sum(n >= 12 for n in lengths), 4: sum(n >= 4 for n in lengths)}
    assert expected[4] > expected[12]  # the corpus tells the two apart
    for min_length in (12, 4):
        argv = recipe_argv(tmp_path, bert_teacher, str(corpus), max_steps=1, min_length=min_length,
                           output_dir=str(tmp_path / f"run{min_length}"))
        main(argv=argv)
        assert f"binarize: {expected[min_length]} sequences" in capsys.readouterr().out
