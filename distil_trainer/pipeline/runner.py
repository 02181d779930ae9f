"""The pipeline as a list of stages, and the loop that runs them: numbered headers and one-line summaries printed
by the main process, main-process-first stages run on rank 0, then on the first rank of each other node, then on
the rest (node_order.py: the data cache may be on node-local disks), the output_dir lock held for
the whole run. `main` is the entry point of the recipe scripts."""

import contextlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from ..run_lock import OutputDirInUse
from .cache_stages import CacheTeacher
from .data_stages import Binarize, TokenCounts, load_tokenizer
from .layout import STUDENT_DIR
from .model_stages import ExtractStudent, FitTeacherHead, LoadTeacher
from .node_order import each_node_first
from .onnx_latency import OnnxLatency
from .output_stages import ModelCard, PushToHub, Report, Score
from .recipe_args import ConfigError
from .stage import RunContext
from .training_stages import Distil, SaveStudent, TrainingStopped

logger = logging.getLogger(__name__)

# In the order they run; each reads only what the runner or an earlier stage set.
STAGES = (Binarize(), LoadTeacher(), TokenCounts(), FitTeacherHead(), ExtractStudent(), CacheTeacher(), Distil(),
          SaveStudent(), Score(), OnnxLatency(), ModelCard(), Report(),
          PushToHub())


class _Headers:
    """Numbered stage headers and one-line summaries, printed by the main process only."""

    def __init__(self, total, is_main):
        self.total, self.is_main, self.index = total, is_main, 0

    @contextmanager
    def stage(self, name):
        self.index += 1
        start = time.perf_counter()
        box = {"summary": ""}
        if self.is_main:
            print(f"==> [{self.index}/{self.total}] {name}", flush=True)
        yield box
        if self.is_main:
            print(f"    {name}: {box['summary']} ({time.perf_counter() - start:.1f} s)", flush=True)


def run_pipeline(model_args, data_args, training_args, recipe_args):
    """Run the whole recipe; returns a dict with the paths and figures of the run.

    The main process holds `output_dir` for the whole run (a second run on it is refused, naming this one)."""
    from accelerate import PartialState

    from ..run_lock import output_dir_lock

    lock = output_dir_lock(training_args.output_dir) if PartialState().is_main_process else contextlib.nullcontext()
    with lock:
        result = run_stages(_context(model_args, data_args, training_args, recipe_args), STAGES)
    if result.get("result_line"):  # the run's verdict, last (set by the main process only)
        print(result["result_line"], flush=True)
    return result


def _context(model_args, data_args, training_args, recipe_args):
    """The run's arguments and settings, as the stages read them."""
    from accelerate import PartialState

    state = PartialState()
    out = Path(training_args.output_dir)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once, at the end, by PushToHub
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"  # the model card reports tokens seen
    return RunContext(model_args=model_args, data_args=data_args, training_args=training_args,
                      recipe_args=recipe_args, state=state, is_main=state.is_main_process, out=out,
                      final_dir=out / STUDENT_DIR, push=push,
                      result={"output_dir": str(out), "student_dir": str(out / STUDENT_DIR)},
                      tokenizer_name=model_args.tokenizer_name or model_args.teacher_name,
                      tokenizer=load_tokenizer(model_args))


def run_stages(ctx, stages):
    """Run `stages` in order on `ctx`; returns `ctx.result`."""
    headers = _Headers(sum(1 for s in stages if s.enabled(ctx)), ctx.is_main)
    for stage in stages:
        if stage.main_process_only and not ctx.is_main:
            continue
        stage.before(ctx)
        if stage.enabled(ctx):
            _run_stage(stage, ctx, headers)
    ctx.state.wait_for_everyone()
    return ctx.result


def _run_stage(stage, ctx, headers):
    from ..model_utils import unpartitioned_loading

    _require(stage, [f for f in stage.inputs if not hasattr(ctx, f)], "reads {}, which no earlier stage set")
    logger.debug("stage %s: cache key %s", stage.name, stage.cache_key(ctx))
    with headers.stage(stage.name) as box:
        with contextlib.ExitStack() as stack:
            if stage.main_process_first:  # rank 0, then each other node's first rank, then the rest
                stack.enter_context(each_node_first(ctx.state))
            if stage.whole_models:
                stack.enter_context(unpartitioned_loading())
            summary = stage.skip(ctx)
            box["summary"] = summary if summary is not None else stage.run(ctx)
    stage.after(ctx)
    _require(stage, [f for f in stage.outputs if not hasattr(ctx, f)], "did not set {}, which it declares")


def _require(stage, absent, problem):
    """A stage list in the wrong order, or a stage that forgets an output, fails here, naming the fields."""
    if absent:
        raise RuntimeError(f"pipeline stage {stage.name!r} " + problem.format(", ".join(absent))
                           + ": check the stages' inputs/outputs and their order in STAGES.")


def main(default_config=None, argv=None):
    """Entry point of the recipe scripts: parse YAML + command line, run the pipeline, report errors in one line."""
    import sys

    from .recipe_args import parse_recipe_args

    # Our own handler: basicConfig does nothing once a library (DeepSpeed, torch.distributed) set up the root.
    package_logger = logging.getLogger("distil_trainer")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False
    try:
        return run_pipeline(*parse_recipe_args(argv, default_config))
    except (ConfigError, FileExistsError, OutputDirInUse) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    finally:
        from ..process_group import end_process_group

        end_process_group()  # the group's threads joined now: a gloo rank can abort if they outlive Python
