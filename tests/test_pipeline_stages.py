"""The pipeline's stage machinery, without models: the stage list is consistent (every input is set by the runner
or an earlier stage), and the runner numbers headers, applies skip-if-done, keeps main-only stages off the other
ranks, and names a stage that reads what nothing set."""

import pytest

from distil_trainer.pipeline import STAGES, run_stages
from distil_trainer.pipeline.stage import RunContext, Stage

# What runner._context sets before the first stage.
RUNNER_FIELDS = {"model_args", "data_args", "training_args", "recipe_args", "state", "is_main", "out", "final_dir",
                 "push", "result", "tokenizer", "tokenizer_name"}


def test_every_stage_reads_only_what_is_set_before_it():
    available = set(RUNNER_FIELDS)
    for stage in STAGES:
        assert stage.name and set(stage.inputs) <= available, (stage.name, set(stage.inputs) - available)
        available |= set(stage.outputs)


def test_stage_order_is_the_documented_one():
    assert [s.name for s in STAGES] == ["binarize", "load teacher", "token counts", "fit teacher MLM head",
                                        "extract student", "cache teacher outputs", "distil", "save student", "score",
                                        "onnx latency", "model card", "report", "push to hub"]


class _State:
    """The global main process of a single-process run (each_node_first reads these two flags)."""

    is_main_process = is_local_main_process = True

    def __init__(self):
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("wait")


def _stage(name, inputs=(), outputs=(), done=False, enabled=True, main_only=False, first=False, log=None):
    class _S(Stage):
        def enabled(self, ctx):
            return enabled

        def skip(self, ctx):
            if done:
                for f in outputs:
                    setattr(ctx, f, "cached")
                return "reused"
            return None

        def run(self, ctx):
            log.append(name)
            for f in outputs:
                setattr(ctx, f, "built")
            return "built"

    s = _S()
    s.name, s.inputs, s.outputs, s.main_process_only, s.main_process_first = name, inputs, outputs, main_only, first
    return s


def _ctx(is_main=True):
    return RunContext(is_main=is_main, state=_State(), result={"ok": True})


def test_runner_numbers_enabled_stages_and_applies_skip_rules(capsys):
    log, ctx = [], _ctx()
    stages = [_stage("a", outputs=("x",), done=True, log=log, first=True),
              _stage("off", enabled=False, log=log),
              _stage("b", inputs=("x",), outputs=("y",), log=log),
              _stage("card", inputs=("y",), main_only=True, log=log)]
    assert run_stages(ctx, stages) == {"ok": True}
    assert log == ["b", "card"] and ctx.x == "cached" and ctx.y == "built"
    lines = [line for line in capsys.readouterr().out.splitlines()]
    assert [line for line in lines if line.startswith("==>")] == ["==> [1/3] a", "==> [2/3] b", "==> [3/3] card"]
    assert lines[1].startswith("    a: reused (") and lines[3].startswith("    b: built (")
    # Rank 0 builds first, then releases the two later waves (other nodes' first ranks, then the rest);
    # the runner's own barrier follows.
    assert ctx.state.calls == ["wait", "wait", "wait"]


def test_other_ranks_skip_main_only_stages_and_print_nothing(capsys):
    log, ctx = [], _ctx(is_main=False)
    run_stages(ctx, [_stage("a", outputs=("x",), log=log), _stage("card", main_only=True, log=log)])
    assert log == ["a"] and capsys.readouterr().out == ""


def test_a_stage_reading_what_nothing_set_is_named():
    with pytest.raises(RuntimeError, match="'b' reads x, which no earlier stage set"):
        run_stages(_ctx(), [_stage("b", inputs=("x",), log=[])])


def test_a_stage_not_setting_its_outputs_is_named():
    class Forgetful(Stage):
        name, outputs = "f", ("z",)

        def run(self, ctx):
            return "done"

    with pytest.raises(RuntimeError, match="'f' did not set z"):
        run_stages(_ctx(), [Forgetful()])
