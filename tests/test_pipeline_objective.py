"""The recipes' objective follows the teacher: a sentence-embedding teacher (a sentence-transformers folder, or a
checkpoint without a head) is distilled on its sentence embeddings by default -- no MLM head fitted, whole unmasked
sentences, L_embed logged, the student saved as a sentence-transformers model that embeds as the run's scores do and
a model card saying how -- while `distillation_objective: logits` keeps the triple loss."""

import json
from pathlib import Path

import pytest
import torch

import tiny
from distil_trainer.pipeline import main
from test_pipeline import _stsb_file, make_corpus, make_teacher, recipe_argv


def st_teacher(path, normalize=True):
    """The tiny BERT teacher as a sentence-transformers folder: mean pooling (+ Normalize)."""
    make_teacher(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode_mean_tokens": True}))
    return str(path)


def test_a_sentence_transformers_teacher_is_distilled_on_its_embeddings(tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    teacher = st_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus.txt", n=80)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(tiny.real_lines(100)[80:]) + "\n")
    argv = recipe_argv(tmp_path, teacher, corpus, max_steps=3, score="true", report="true",
                       fit_teacher_mlm_head_steps=5, stsb_file=_stsb_file(tmp_path / "stsb.tsv"),
                       heldout_file=str(heldout))
    result = main(argv=argv)
    printed = capsys.readouterr()
    assert "distillation objective: embedding (auto: the teacher is a sentence-transformers model" in printed.out
    assert "fit teacher MLM head" not in printed.out and "teacher_head" not in result  # no head fitted
    student = Path(result["student_dir"])
    log = [r for r in json.loads((student / "training_log.json").read_text()) if "loss" in r]
    assert all("loss_embed" in r and "loss_ce" not in r and "loss_mlm" not in r for r in log)
    assert "loss_cos" in log[0]  # alpha_cos stays as configured (1.0 by default)
    args = json.loads((student / "training_args.json").read_text())
    assert (args["alpha_ce"], args["alpha_mlm"], args["alpha_embed"]) == (0.0, 0.0, 1.0)

    # Scores: sentence embeddings only (the collator masks nothing), the line compares with the extracted student.
    scores = json.loads((Path(result["output_dir"]) / "scores.json").read_text())["scores"]
    assert set(scores["models"]["student"]) == {"stsb_spearman", "token_cosine", "sentence_cosine"}
    assert "distillation added" in result["result_line"] and "over the extracted student" in result["result_line"]

    # The student is a sentence-transformers model embedding as the scoring does (mean pooling, normalised).
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from distil_trainer.pipeline.student_scores import embed_sentences
    from distil_trainer.sentence_embedding import read_pooling

    assert (student / "modules.json").exists() and (student / "2_Normalize").is_dir()
    pooling = read_pooling(student)
    assert (pooling.mode, pooling.normalize) == ("mean", True)
    assert json.loads((student / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    sentences = tiny.real_lines(6)
    got = torch.as_tensor(st.SentenceTransformer(str(student), device="cpu").encode(sentences))
    expected = embed_sentences(AutoModelForMaskedLM.from_pretrained(student), AutoTokenizer.from_pretrained(student),
                               sentences, max_length=64, pooling=pooling)
    assert torch.allclose(got, expected, atol=1e-5)
    card = (student / "README.md").read_text()
    assert 'SentenceTransformer("' in card and "library_name: sentence-transformers" in card


def test_a_bare_checkpoint_is_an_embedding_teacher_and_logits_stays_an_option(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    teacher_dir = tmp_path / "bare"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(teacher_dir)
    tiny.bert_tokenizer().save_pretrained(teacher_dir)
    corpus = make_corpus(tmp_path / "corpus.txt", n=60)
    result = main(argv=recipe_argv(tmp_path, str(teacher_dir), corpus, student_layers="0", max_steps=2))
    assert ("distillation objective: embedding (auto: the teacher is a checkpoint without an LM head (architectures "
            "['BertModel'])") in capsys.readouterr().out
    assert (Path(result["student_dir"]) / "modules.json").exists()
    # The triple loss with a fitted head stays an option; no sentence-transformers files then.
    result = main(argv=recipe_argv(tmp_path, str(teacher_dir), corpus, student_layers="0", max_steps=2,
                                   output_dir=str(tmp_path / "logits"), distillation_objective="logits",
                                   fit_teacher_mlm_head_steps=2))
    log = json.loads((Path(result["student_dir"]) / "training_log.json").read_text())
    assert "loss_ce" in log[0] and "loss_embed" not in log[0] and "teacher_head" in result
    assert not (Path(result["student_dir"]) / "modules.json").exists()


def test_the_embedding_objective_refuses_a_teacher_cache(tmp_path, capsys):
    teacher = st_teacher(tmp_path / "teacher", normalize=False)
    corpus = make_corpus(tmp_path / "corpus.txt", n=40)
    with pytest.raises(SystemExit):
        main(argv=recipe_argv(tmp_path, teacher, corpus, max_steps=1, teacher_cache=str(tmp_path / "cache")))
    assert "teacher_cache: the embedding objective compares pooled sentence embeddings" in capsys.readouterr().err


def test_the_demo_corpus_as_sentences_keeps_the_held_out_sections_apart(tmp_path):
    from distil_trainer.pipeline import demo_inputs

    assert demo_inputs.split_sentences("Paris is the capital of France. It has 2.1 million people! Too short. "
                                       "\"Quoted\" text starts this one.") == [
        "Paris is the capital of France.", "It has 2.1 million people!", "\"Quoted\" text starts this one."]
    train, heldout = demo_inputs.demo_corpus_split(tmp_path, 300, sentences=True)
    sections = demo_inputs._lead_sections()
    expected_heldout = [s for line in sections[-300:] for s in demo_inputs.split_sentences(line)]
    assert heldout.read_text().splitlines() == expected_heldout
    train_lines = train.read_text().splitlines()
    assert train_lines[:3] == demo_inputs.split_sentences(sections[0])[:3]
    assert len(train_lines) > 2 * len(sections) and not set(expected_heldout) & set(train_lines[-50:])


STSB_TRAIN_TSV = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                  "0\tmain-captions\tMSRvid\t2012test\t1\tnone\tnone\tA plane is taking off.\tAn air plane is taking "
                  "off.\t5.000\n"
                  "1\tmain-captions\tMSRvid\t2012test\t4\tnone\tnone\tA man is  playing a flute.\tA plane is taking "
                  "off.\t0.200\n")


def test_stsb_transfer_sentences_are_the_unique_sentences_without_scores(tmp_path):
    from distil_trainer.pipeline import demo_inputs

    (tmp_path / "train.tsv").write_text(STSB_TRAIN_TSV)
    path, source, why = demo_inputs.stsb_transfer_sentences(tmp_path / "out", tmp_path / "train.tsv")
    # In the split's order, white space collapsed, each sentence once, no score anywhere.
    assert path.read_text().splitlines() == ["A plane is taking off.", "An air plane is taking off.",
                                             "A man is playing a flute."]
    assert source == str(tmp_path / "train.tsv") and why is None
    before = path.stat().st_mtime_ns
    demo_inputs.stsb_transfer_sentences(tmp_path / "out", tmp_path / "train.tsv")
    assert path.stat().st_mtime_ns == before  # unchanged text is not rewritten: the binarized cache stays valid
    with pytest.raises(FileNotFoundError, match="--stsb_train_file .* does not exist; pass a GLUE STS-B train.tsv"):
        demo_inputs.stsb_transfer_sentences(tmp_path / "out", tmp_path / "missing.tsv")


def _demo_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_recipe", Path(__file__).parents[1] / "recipes" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_trains_on_stsb_train_sentences_and_falls_back_to_wikipedia_offline(tmp_path, monkeypatch):
    demo = _demo_recipe()
    options, rest = demo.demo_arguments(["--stsb_train_file", "t.tsv", "--max_steps", "3"])
    assert (options.transfer_sentences, options.stsb_train_file, rest) == ("auto", "t.tsv", ["--max_steps", "3"])
    (tmp_path / "train.tsv").write_text(STSB_TRAIN_TSV)
    wikipedia = tmp_path / "wiki.txt"
    chosen = demo.training_sentences("auto", tmp_path / "train.tsv", tmp_path, wikipedia)
    assert chosen.name == "transfer_stsb_train_sentences.txt"
    assert demo.training_sentences("wikipedia", tmp_path / "train.tsv", tmp_path, wikipedia) == wikipedia
    # Offline with no file (the tests' environment): auto falls back, stsb_train stops with the fix.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert demo.training_sentences("auto", None, tmp_path, wikipedia) == wikipedia
    with pytest.raises(SystemExit, match="pass --stsb_train_file path/to/STS-B/train.tsv"):
        demo.training_sentences("stsb_train", None, tmp_path, wikipedia)
