"""The unit of the pipeline: a named stage with the run fields it reads and writes, the key of its cached output
and its skip-if-done rule. `runner.py` runs a list of them in order."""

from types import SimpleNamespace


class RunContext(SimpleNamespace):
    """What a run knows: its arguments and settings (set up by the runner), then the outputs of the stages run so
    far, as attributes named in the stages' `inputs` and `outputs`."""


class Stage:
    """One step of a recipe run. Subclasses set `name`, `inputs`, `outputs` and define `run`.

    The runner calls, in order: `before` (refusals due at this point, even when the stage is disabled); then, if
    `enabled`, prints the header, calls `skip` and, when it returns None, `run`; prints the summary either
    returned; calls `after`. It checks that the inputs exist before and the outputs after."""

    name = ""  # printed as "==> [i/n] <name>" and "    <name>: <summary> (<seconds> s)"
    inputs = ()  # context fields read (set by the runner or an earlier stage)
    outputs = ()  # context fields set, whether the stage runs or reuses its output
    main_process_first = False  # rank 0 builds the cached output first, then each other node's first rank (which
    # reuses it on a shared filesystem, builds its node's copy otherwise), then the rest reuse it (node_order.py)
    main_process_only = False  # the other ranks skip it: cards, reports and pushes are written once
    whole_models = False  # models are loaded unpartitioned, even under DeepSpeed ZeRO-3

    def enabled(self, ctx):
        """Whether this run has the stage at all, decided from the arguments before any stage runs."""
        return True

    def before(self, ctx):
        """Refusals and preparation due at this point of the run, before the header (also when disabled)."""

    def cache_key(self, ctx):
        """What identifies the stage's cached output (a different key: the output is rebuilt); None: uncached."""
        return None

    def skip(self, ctx):
        """Skip-if-done (or not needed): set the outputs from what is already there and return the summary;
        None: the stage runs."""
        return None

    def run(self, ctx):
        """Do the work, set the outputs, return the one-line summary."""
        raise NotImplementedError

    def after(self, ctx):
        """Checks and derived values due once the summary is printed."""
