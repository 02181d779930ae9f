"""benchmarks/mini_repro.py --smoke end to end with two seeds: five distilled variants per seed sharing one fitted
teacher head and one teacher-output cache per seed, an embedding-distilled student per seed (the shipped teacher, no
head, no cache, saved as a sentence-transformers model), GLUE fine-tuning of the teacher and every student per seed,
and the two tables with mean ± std and range over the seeds."""

import importlib.util
import json

import pytest

import tiny

SCRIPT = tiny.REPO_ROOT / "benchmarks" / "mini_repro.py"
GLUE = tiny.SHARED_DATA / "glue"


def load_script():
    spec = importlib.util.spec_from_file_location("mini_repro_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The scripts set torch's thread count and quieten loggers for their process; conftest undoes it for other tests.
pytestmark = pytest.mark.usefixtures("restore_process_state")


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"GLUE SST-2 TSVs not found in {GLUE}")
def test_smoke_run_with_two_seeds_shares_the_teacher_and_aggregates(tmp_path, capsys):
    mini_repro = load_script()
    out = tmp_path / "mini"
    seeds = (56, 57)
    result = mini_repro.main(["--smoke", "--output_dir", str(out), "--glue_dir", str(GLUE), "--seeds", "56,57",
                              "--tasks", "sst2,stsb_bi"])
    printed = capsys.readouterr().out

    markdown = (out / "tables.md").read_text()
    assert markdown == result["markdown"] and markdown in printed
    glue_part, ablation_part = markdown.split("## Ablation")
    lines = [line for line in glue_part.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| Model | Score (mean ± std) | Score range | SST-2 (acc) | "
                        "STS-B bi-encoder (Pearson/Spearman) | % of teacher | STS-B zero-shot (Spearman) |")
    rows = {line.split(" | ")[0][2:]: line[:-2].split(" | ")[1:] for line in lines[1:]}
    keys = [("teacher", mini_repro.TEACHER_LABEL), ("extracted", mini_repro.EXTRACTED_LABEL)] + [
        (k, label) for k, label, *_ in mini_repro.VARIANTS] + [("embed", mini_repro.EMBED_LABEL)]
    assert list(rows) == [label for _, label in keys]

    # Each model's SST-2 dev accuracy and STS-B bi-encoder Pearson/Spearman per seed, from its results files; the
    # score is their mean (STS-B: the mean of its two), the cells its mean, sample standard deviation and range,
    # computed here by hand.
    def read_results(key, seed, task, name):
        found = json.loads((out / "glue" / f"seed-{seed}" / key / task / name).read_text())
        assert found["num_train_examples"] == 16 and found["num_eval_examples"] == {"dev": 32}
        assert found["seeds"] == [seed]
        return {k: 100.0 * v for k, v in found["median"].items()}

    def stsb_bi(key, seed):
        found = read_results(key, seed, "stsb_bi", "results_sts_stsb.json")
        return found["pearson"], found["spearmanr"]

    def macro_score(key, seed):
        return (read_results(key, seed, "sst2", "results_glue_sst2.json")["accuracy"] + sum(stsb_bi(key, seed)) / 2) / 2

    def mean_std(a, b):
        mean = (a + b) / 2
        return mean, (((a - mean) ** 2 + (b - mean) ** 2) / (2 - 1)) ** 0.5

    teacher_mean, _ = mean_std(*(macro_score("teacher", s) for s in seeds))
    for key, label in keys:
        a, b = (macro_score(key, s) for s in seeds)
        mean, std = mean_std(a, b)
        score, extent, sst2, sts, percent, _ = rows[label]
        got_mean, got_std = (float(x) for x in score.split(" ± "))
        assert (got_mean, got_std) == (pytest.approx(mean, abs=0.051), pytest.approx(std, abs=0.051))
        assert [float(x) for x in extent.split(" to ")] == pytest.approx([min(a, b), max(a, b)], abs=0.051)
        sst2_mean = sum(read_results(key, s, "sst2", "results_glue_sst2.json")["accuracy"] for s in seeds) / 2
        assert float(sst2) == pytest.approx(sst2_mean, abs=0.051)
        pearsons, spearmans = zip(*(stsb_bi(key, s) for s in seeds))
        assert [float(x) for x in sts.split("/")] == pytest.approx([sum(pearsons) / 2, sum(spearmans) / 2], abs=0.051)
        assert float(percent) == pytest.approx(100.0 * mean / teacher_mean, abs=0.051)

    # STS-B zero-shot, recomputed here: Spearman of the mean-pooled cosine over the first 32 dev pairs, for the
    # teacher (the same in both seeds) and the two seeds' triple-loss students (mean ± sample std).
    stsb = [line.split("\t") for line in (GLUE / "STS-B" / "dev.tsv").read_text().splitlines()[1:33]]
    teacher_dir = json.loads((out / "distil" / "seed-56" / "triple" / "student" / "config.json").read_text())[
        "distillation"]["teacher"]
    assert rows[mini_repro.TEACHER_LABEL][5].split(" ± ")[0] == f"{zero_shot(teacher_dir, stsb):.1f}"
    mean, std = mean_std(*(zero_shot(out / "distil" / f"seed-{s}" / "triple" / "student", stsb) for s in seeds))
    got_mean, got_std = (float(x) for x in rows["3L student, triple loss"][5].split(" ± "))
    assert (got_mean, got_std) == (pytest.approx(mean, abs=0.051), pytest.approx(std, abs=0.051))

    # Ablation: the variant minus the triple-loss student of the same seed, mean ± std over the seeds; last, the
    # student with no distillation at all.
    ablation = [line for line in ablation_part.splitlines() if line.startswith("| ")][1:]
    assert len(ablation) == 6
    for line, key in zip(ablation, ("no_ce", "no_cos", "no_mlm", "random_init", "extracted", "embed")):
        diffs = [macro_score(key, s) - macro_score("triple", s) for s in seeds]
        mean, std = mean_std(*diffs)
        cell = line.split(" | ")[1]
        got_mean, got_std = (float(x) for x in cell.split(" ± "))
        assert (got_mean, got_std) == (pytest.approx(mean, abs=0.006), pytest.approx(std, abs=0.006))

    # One teacher pass per seed: its first variant built the cache, the four others (random init too) reused it.
    record = json.loads((out / "teacher_cache.json").read_text())
    for seed in seeds:
        entry = record[f"seed-{seed}"]
        assert entry["path"] == str(out / "teacher_cache" / f"seed-{seed}")
        assert entry["runs"] == {"triple": "built", "no_ce": "reused", "no_cos": "reused", "no_mlm": "reused",
                                 "random_init": "reused"}
        assert (out / "teacher_cache" / f"seed-{seed}" / "teacher_cache.json").exists()
        coverage = entry["topk_coverage"]  # the teacher's probability inside the cached top k (at T = 2 <= at T = 1)
        assert coverage["temperature"] == 2.0 and 0 < coverage["mass_at_temperature"] <= coverage["mass_t1"] <= 1
    assert "Top-k coverage: at the masked positions its top" in markdown
    assert printed.count("cache teacher outputs: built") == 2
    assert printed.count("cache teacher outputs: reused") == 8
    assert printed.count("(teacher outputs from the cache)") == 10  # no triple-loss variant ran the teacher

    # One teacher head, fitted once (first seed, first variant) and loaded by every other run; the random-init
    # student really is random.
    head = out / "distil" / "seed-56" / "triple" / "teacher_mlm_head"
    assert (head / "fitted_mlm_head.json").exists()
    for seed in seeds:
        for key, *_ in mini_repro.VARIANTS:
            run = out / "distil" / f"seed-{seed}" / key
            if run != head.parent:
                assert not (run / "teacher_mlm_head").exists()
                config = json.loads((run / "student" / "config.json").read_text())
                assert config["distillation"]["teacher"] == str(head)
            config = json.loads((run / "student" / "config.json").read_text())
            assert config["distillation"]["teacher_layers"] == [0, 3, 5]  # the teacher's first and last layers
        assert json.loads((out / "distil" / f"seed-{seed}" / "random_init" / "student_init" / "config.json")
                          .read_text())["distillation"]["student_init"] == "random"
    assert set(result["timings"]) >= {"total", "GLUE seed 56 teacher", "GLUE seed 57 teacher"}

    # The embedding-distilled students: from the shipped teacher (a sentence-transformers folder), no head fitted,
    # logged L_embed only, and saved as sentence-transformers models; their zero-shot cell is recomputed here.
    shipped = str(mini_repro_teacher())
    for seed in seeds:
        run = out / "distil" / f"seed-{seed}" / "embed"
        config = json.loads((run / "student" / "config.json").read_text())
        assert config["distillation"]["teacher"] == shipped and config["distillation"]["teacher_layers"] == [0, 3, 5]
        assert not (run / "teacher_mlm_head").exists()
        assert (run / "student" / "modules.json").exists() and (run / "student" / "2_Normalize").is_dir()
        logged = [r for r in json.loads((run / "student" / "training_log.json").read_text()) if "loss" in r]
        assert logged and all("loss_embed" in r and "loss_ce" not in r and "loss_mlm" not in r for r in logged)
    mean, std = mean_std(*(zero_shot(out / "distil" / f"seed-{s}" / "embed" / "student", stsb) for s in seeds))
    got_mean, got_std = (float(x) for x in rows[mini_repro.EMBED_LABEL][5].split(" ± "))
    assert (got_mean, got_std) == (pytest.approx(mean, abs=0.051), pytest.approx(std, abs=0.051))

    # The same command again reuses everything; other sizes on the same folder are refused.
    with pytest.raises(FileExistsError, match="other sizes"):
        mini_repro.main(["--smoke", "--output_dir", str(out), "--glue_dir", str(GLUE), "--seeds", "56"])


def mini_repro_teacher():
    from distil_trainer.pipeline.demo_inputs import demo_teacher_dir

    return demo_teacher_dir()


def zero_shot(folder, rows):
    """STS-B Spearman x100 of the cosine of mean-pooled last hidden states (columns 7, 8: sentences; 9: score)."""
    import torch
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    def embed(texts):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    cosine = torch.nn.functional.cosine_similarity(embed([r[7] for r in rows]), embed([r[8] for r in rows]))
    return 100.0 * spearmanr(cosine.tolist(), [float(r[9]) for r in rows]).correlation


def test_seeds_are_parsed_strictly():
    mini_repro = load_script()
    assert mini_repro.parse_seeds("56, 57,58") == [56, 57, 58]
    for bad in ("", "56,56", "a,1"):
        with pytest.raises(ValueError, match="--seeds"):
            mini_repro.parse_seeds(bad)
