"""benchmarks/probe_pruned_starts.py: its least-squares re-fit against torch.linalg.lstsq on the activations
themselves, and the whole probe at tiny sizes (a tiny Llama GGUF for SmolLM2) so that it cannot rot."""

import importlib.util
import math

import pytest
import torch

import tiny
import tiny_gguf

pytestmark = pytest.mark.usefixtures("restore_process_state")


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_under_test",
                                                  tiny.REPO_ROOT / "benchmarks" / "probe_pruned_starts.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def test_refit_solves_the_least_squares_problem_on_the_activations():
    from transformers import LlamaConfig, LlamaForCausalLM

    probe = load_probe()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    teacher = LlamaForCausalLM(config).eval()
    kept = {0: [1, 4, 5, 9, 20], 1: list(range(0, 24, 2))}
    student = LlamaForCausalLM(config).eval()  # only its down projections are written, sliced to the kept neurons
    for i, layer in enumerate(student.model.layers):
        layer.mlp.down_proj = torch.nn.Linear(len(kept[i]), 16, bias=False)
    calibration = [torch.randint(0, 50, (12,)).tolist() for _ in range(6)]

    from distil_trainer.extraction import CalibrationSet

    grams = probe.mlp_grams(teacher, CalibrationSet(calibration))
    probe.refit_down_projections(student, teacher, kept, grams, ridge=0.0)

    captured = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, args, i=i: captured.__setitem__(i, args[0][:, 1:].reshape(-1, args[0].shape[-1]).double()))
        for i, layer in enumerate(teacher.model.layers)]
    with torch.no_grad():
        teacher(torch.tensor(calibration))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(teacher.model.layers):
        a = captured[i]  # every position but the first, as the probe's Gram leaves it out
        target = a @ layer.mlp.down_proj.weight.double().T
        expected = torch.linalg.lstsq(a[:, kept[i]], target).solution.T
        torch.testing.assert_close(student.model.layers[i].mlp.down_proj.weight.double(), expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_probe_runs_at_tiny_sizes(tmp_path):
    pytest.importorskip("gguf", reason="the decoder teacher is a GGUF file")
    probe = load_probe()
    teacher_file, corpus, eval_file = tiny_gguf.write_decoder_benchmark_inputs(tmp_path)
    teacher = probe.smol_bench.load_teacher_and_tokenizer(str(teacher_file))[0]
    target = probe.bench_pruning.parameter_count(teacher, intermediate_size=32)
    rows = probe.main(["--output_dir", str(tmp_path / "out"), "--teacher", str(teacher_file), "--corpus", str(corpus),
                       "--eval_file", str(eval_file), "--eval_tokens", "256", "--eval_window", "64",
                       "--starts", "mlp,mlp_refit,depth3,hidden28", "--target_parameters", str(target),
                       "--calibration_tokens", "128", "--refit_tokens", "256", "--block", "16", "--batch", "2",
                       "--heal_steps", "2"])
    assert list(rows) == ["teacher", "mlp", "mlp_refit", "depth3", "hidden28"]
    assert rows["mlp"]["intermediate_size"] == rows["mlp_refit"]["intermediate_size"] == 32
    assert rows["depth3"]["layers"] == 3 and rows["depth3"]["intermediate_size"] > 32
    for key in ("mlp", "mlp_refit", "depth3", "hidden28"):
        assert abs(rows[key]["parameters"] - target) <= 0.02 * target
        assert math.isfinite(rows[key]["ppl"]) and math.isfinite(rows[key]["healed_ppl"])
    assert rows["mlp_refit"]["ppl"] != rows["mlp"]["ppl"]  # the re-fit changed the weights
