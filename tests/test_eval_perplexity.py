"""Sliding-window perplexity against independent computations, and run_perplexity.py end to end."""

import json
import math
import sys

import pytest
import torch

import tiny

sys.path.insert(0, str(tiny.REPO_ROOT / "eval"))

import run_perplexity  # noqa: E402

WIKI2_TEST = tiny.SHARED_DATA / "wikitext" / "wikitext-2" / "wiki.test.tokens"


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_gpt2_lm()


@pytest.fixture(scope="module")
def ids():
    text = " ".join(tiny.real_lines(4))
    return torch.tensor(tiny.gpt2_tokenizer()(text)["input_ids"][:100])


def token_nlls(model, window):
    """-log p(window[t] | window[:t]) for t = 1..len-1, by a plain loop over softmaxes."""
    with torch.no_grad():
        logits = model(window[None]).logits[0].double()
    return [-torch.log_softmax(logits[t - 1], -1)[window[t]].item() for t in range(1, len(window))]


def test_whole_text_window_is_mean_token_nll(model, ids):
    nll, count = run_perplexity.strided_nll(model, ids, max_length=128, stride=128, show_progress=False)
    expected = token_nlls(model, ids)
    assert count == len(ids) - 1
    assert math.exp(nll / count) == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-9)


def test_strided_windows_score_only_new_tokens(model, ids):
    # 100 tokens, windows of 40 every 25: [0,40) scores 1..39; [25,65) scores 40..64 with context from 25;
    # [50,90) scores 65..89; [75,100) scores 90..99.
    nll, count = run_perplexity.strided_nll(model, ids, max_length=40, stride=25, show_progress=False)
    by_hand = token_nlls(model, ids[0:40])                 # targets 1..39
    by_hand += token_nlls(model, ids[25:65])[-25:]         # targets 40..64
    by_hand += token_nlls(model, ids[50:90])[-25:]         # targets 65..89
    by_hand += token_nlls(model, ids[75:100])[-10:]        # targets 90..99
    assert count == 99 == len(by_hand)
    assert nll == pytest.approx(sum(by_hand), rel=1e-9)
    # More context per token than disjoint windows of 40 would give, so a different number.
    disjoint, n = run_perplexity.strided_nll(model, ids, max_length=40, stride=40, show_progress=False)
    assert n == 97  # the first token of each of the 3 windows has no context and is not scored
    assert disjoint != pytest.approx(nll)


def test_stride_must_fit_window(model, ids):
    with pytest.raises(ValueError, match="--stride .* between 1 and --max_length"):
        run_perplexity.strided_nll(model, ids, max_length=10, stride=20)


def test_script_end_to_end_with_fine_tuning(model, tmp_path):
    # The head of WikiText-2 test, as released (tokenizing all of it would take most of this test's time).
    text_file = tmp_path / "wiki.test.tokens"
    text_file.write_text("".join(WIKI2_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:60]))
    model_dir = tmp_path / "gpt"
    model.save_pretrained(model_dir)
    tiny.gpt2_tokenizer().save_pretrained(model_dir)
    train = tmp_path / "train.txt"
    train.write_text("\n".join(tiny.real_lines(40)))
    payload = run_perplexity.main(["--model_name_or_path", str(model_dir), "--text_file", str(text_file),
                                   "--max_eval_tokens", "600", "--max_length", "128", "--stride", "64",
                                   "--output_dir", str(tmp_path / "out"), "--eval_only", "true"])
    saved = json.loads((tmp_path / "out" / "results_perplexity_wiki.test.json").read_text())
    assert saved["num_eval_tokens"] == 600 and saved["max_length"] == 128 and saved["stride"] == 64
    ids = torch.tensor(tiny.gpt2_tokenizer()(text_file.read_text())["input_ids"][:600])
    nll, count = run_perplexity.strided_nll(model, ids, 128, 64, show_progress=False)
    assert payload["median"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-9)
    tuned = run_perplexity.main(["--model_name_or_path", str(model_dir), "--text_file", str(text_file),
                                 "--max_eval_tokens", "600", "--max_length", "128", "--stride", "64",
                                 "--train_file", str(train), "--output_dir", str(tmp_path / "tuned"),
                                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--use_cpu", "true",
                                 "--max_train_samples", "8", "--num_train_epochs", "2"])
    assert tuned["num_train_blocks"] == 8
    assert tuned["median"]["perplexity"] < payload["median"]["perplexity"]  # fine-tuning on real text helps
