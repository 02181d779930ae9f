"""benchmarks/bench_pruning.py at tiny sizes, so it cannot rot: a tiny Llama GGUF stands in for SmolLM2 and a
tiny 6-layer BERT for all-MiniLM-L6-v2. Every student is built, healed and scored; the width-pruned decoder has the
importance student's parameter count. Never timings."""

import importlib.util
import math

import pytest

import tiny
import tiny_gguf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_process_state")]


def write_stsb(path, lines, n=24):
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    rows += [f"{i}\tg\tf\ty\t{i}\ts\ts\t{lines[i]}\t{lines[i + 1]}\t{i % 6}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_bench_pruning_smoke(tmp_path):
    pytest.importorskip("gguf", reason="the decoder teacher is a GGUF file")
    teacher, corpus, eval_file = tiny_gguf.write_decoder_benchmark_inputs(tmp_path)
    encoder = tmp_path / "bert"
    tiny.tiny_bert_mlm(layers=6).save_pretrained(encoder)
    tiny.bert_tokenizer().save_pretrained(encoder)
    lines = tiny.real_lines(120)
    (tmp_path / "encoder.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    stsb = write_stsb(tmp_path / "stsb.tsv", lines)
    spec = importlib.util.spec_from_file_location("bench_pruning_under_test",
                                                  tiny.REPO_ROOT / "benchmarks" / "bench_pruning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--output_dir", str(tmp_path / "out"), "--teacher", str(teacher), "--corpus",
                         str(corpus), "--eval_file", str(eval_file), "--student_layers", "3", "--width_hidden", "28",
                         "--minilm_teacher", str(encoder), "--minilm_corpus", str(tmp_path / "encoder.txt"),
                         "--minilm_shape", "4,24,2,40", "--stsb_file", str(stsb)])

    rows = result["results"]["smollm2"]["rows"]
    assert list(rows) == ["teacher", "stride", "importance", "width", "stride_kl", "importance_kl",
                          "importance_clm", "width_kl"]
    assert all(math.isfinite(r["ppl"]) and r["tokens_per_second"] > 0 for r in rows.values())
    assert rows["importance"]["parameters"] == rows["stride"]["parameters"] < rows["teacher"]["parameters"]
    assert abs(rows["width"]["parameters"] - rows["importance"]["parameters"]) < 0.01 * rows["importance"]["parameters"]
    assert "loss_ce" in rows["importance_kl"]["history"][-1] and "loss_ce" not in rows["importance_clm"]["history"][-1]
    # The same initial student for both healing runs of (b): the first step's loss differs only by the objective.
    assert rows["importance_kl"]["history"][0]["loss_ce"] > 0

    minilm = result["results"]["minilm"]
    assert list(minilm["depth"]) == ["teacher", "block_influence", "angular", "0,2,4", "0,3,5"]
    assert all(-1 <= r["stsb_spearman"] <= 1 for r in minilm["depth"].values())
    assert list(minilm["width"]) == ["teacher", "student_init", "pruned_init", "random", "pruned"]
    markdown = result["markdown"]
    assert "| 3-layer student (no training) |" in markdown and "the issue's target" in markdown
