"""Reading a teacher's pooling from a sentence-transformers folder, and saving a student as one: the
`sentence-transformers` package loads the saved folder with `SentenceTransformer(path)` and embeds every sentence
exactly as the project's scoring (student_scores.embed_sentences with the same pooling) does."""

import json

import pytest
import torch

import tiny
from distil_trainer.pipeline.demo_inputs import demo_teacher_dir
from distil_trainer.pipeline.student_scores import embed_sentences
from distil_trainer.sentence_embedding import Pooling, read_pooling, resolve_pooling, write_sentence_transformers_files


def test_the_shipped_minilm_folder_pools_by_mean_and_normalises():
    pooling = read_pooling(demo_teacher_dir())
    assert (pooling.mode, pooling.normalize) == ("mean", True)
    assert read_pooling(tiny.REPO_ROOT) is None  # no modules.json: not a sentence-transformers folder
    assert resolve_pooling(None) == Pooling()
    assert (resolve_pooling(demo_teacher_dir(), mode="cls").mode, resolve_pooling(demo_teacher_dir(), mode="cls")
            .normalize) == ("cls", True)


def st_folder(tmp_path, modules, pooling_config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir(exist_ok=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    return tmp_path


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}


def test_both_config_formats_are_read_and_what_cannot_be_reproduced_is_refused(tmp_path):
    # sentence-transformers >= 5 writes one "pooling_mode" key; older versions the boolean keys.
    assert read_pooling(st_folder(tmp_path, [TRANSFORMER, POOLING], {"pooling_mode": "lasttoken"})).mode == "lasttoken"
    assert read_pooling(st_folder(tmp_path, [TRANSFORMER, POOLING], {"pooling_mode_cls_token": True})).mode == "cls"
    assert not read_pooling(tmp_path).normalize
    with pytest.raises(ValueError, match=r"pools with \['mean', 'max'\]"):
        read_pooling(st_folder(tmp_path, [TRANSFORMER, POOLING], {"pooling_mode": ["mean", "max"]}))
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    with pytest.raises(ValueError, match=r"module\(s\) \['Dense'\].*embed_pooling"):
        read_pooling(st_folder(tmp_path, [TRANSFORMER, POOLING, dense], {"pooling_mode": "mean"}))
    with pytest.raises(ValueError, match="embed_pooling='max'"):
        resolve_pooling(None, mode="max")



def test_a_hub_teacher_s_pooling_is_read_through_the_cache(tmp_path, monkeypatch):
    """A teacher named by Hub id (`org/name`) is read from the Hub cache as `from_pretrained` would find it (offline
    here): CLS pooling and a Normalize module, not the mean-pooling default."""
    import huggingface_hub.constants

    from distil_trainer.pipeline.objective import sentence_embedding_teacher

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--st-teacher"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    normalize = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    st_folder(repo / "snapshots" / commit, [TRANSFORMER, POOLING, normalize], {"pooling_mode_cls_token": True})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pooling = read_pooling("org/st-teacher")
    assert (pooling.mode, pooling.normalize) == ("cls", True) and "org/st-teacher" in pooling.source
    assert sentence_embedding_teacher("org/st-teacher")[0]
    assert read_pooling("org/not-cached") is None  # neither a folder nor in the cache: the default applies


SENTENCES = ["A man is playing a guitar.", "Two dogs run across a snowy field in the early morning light.",
             "Stocks fell.", "The committee will publish its findings on the proposed bridge next spring, officials "
             "said on Tuesday after a long meeting."]


@pytest.mark.parametrize("pooling", [Pooling("mean", True), Pooling("cls", False), Pooling("lasttoken", True)])
def test_a_saved_student_loads_in_sentence_transformers_and_embeds_as_the_scoring_does(tmp_path, pooling):
    st = pytest.importorskip("sentence_transformers")
    tok = tiny.bert_tokenizer()
    student = tiny.tiny_bert_mlm(layers=2, hidden=32, heads=2, seed=4).eval()  # an MLM student, as the recipes save
    student.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    write_sentence_transformers_files(tmp_path, pooling, width=32, max_seq_length=16)
    assert read_pooling(tmp_path) == Pooling(pooling.mode, pooling.normalize, read_pooling(tmp_path).source)
    model = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert model.max_seq_length == 16  # the last sentence is truncated the same way by both
    got = torch.as_tensor(model.encode(SENTENCES, convert_to_numpy=True, batch_size=2))
    expected = embed_sentences(student, tok, SENTENCES, max_length=16, pooling=pooling)
    assert torch.allclose(got, expected, atol=1e-5)
    if pooling.normalize:
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
