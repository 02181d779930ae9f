"""Multi-node runs whose data cache is on node-local disks: each node builds its copy once, with one process,
while the other ranks wait. Ranks are simulated by threads with accelerate's barrier semantics; the stage is the
pipeline's real Binarize, run through the runner's real `_run_stage`."""

import threading
from contextlib import contextmanager

import tiny
from distil_trainer.pipeline import runner
from distil_trainer.pipeline.data_stages import Binarize
from distil_trainer.pipeline.node_order import each_node_first, wave
from distil_trainer.pipeline.recipe_args import DataArguments
from distil_trainer.pipeline.stage import RunContext

NODES, PER_NODE = 2, 2


class ThreadRankState:
    """What the runner uses of accelerate's PartialState, for one simulated rank."""

    def __init__(self, rank, barrier):
        self.process_index, self.local_process_index = rank, rank % PER_NODE
        self.is_main_process, self.is_local_main_process = rank == 0, rank % PER_NODE == 0
        self.barrier = barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=300)

    @contextmanager
    def main_process_first(self):  # accelerate's: rank 0, then all the others at once
        if not self.is_main_process:
            self.wait_for_everyone()
        yield
        if self.is_main_process:
            self.wait_for_everyone()


def run_ranks(tmp_path, corpus):
    barrier = threading.Barrier(NODES * PER_NODE)
    events, results, errors = [], {}, []
    lock = threading.Lock()

    class Recorded(Binarize):
        def run(self, ctx):
            with lock:
                events.append(("start", ctx.rank))
            try:
                return super().run(ctx)
            finally:
                with lock:
                    events.append(("end", ctx.rank))

    def rank_main(rank):
        try:
            node_disk = tmp_path / f"node{rank // PER_NODE}"  # the same path on every node, a different disk
            data_args = DataArguments(data_cache_dir=str(node_disk / "cache"), file_path=str(corpus), max_length=64)
            state = ThreadRankState(rank, barrier)
            ctx = RunContext(rank=rank, state=state, is_main=state.is_main_process, data_args=data_args,
                             out=node_disk / "run", tokenizer=tiny.bert_tokenizer(), tokenizer_name="bert")
            stage = Recorded()
            stage.before(ctx)
            runner._run_stage(stage, ctx, runner._Headers(1, False))
            results[rank] = ctx.binarized.cache_hit
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(NODES * PER_NODE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return events, results


def test_each_node_builds_its_copy_once(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.real_lines(200)) + "\n")
    events, cache_hits = run_ranks(tmp_path, corpus)
    # One build per node, by its first rank; every other rank reuses its node's copy.
    assert cache_hits == {0: False, 1: True, 2: False, 3: True}
    # In waves: rank 0; then node 1's first rank (2); then the rest, which start only after both finished.
    order = list(events)
    assert order[:2] == [("start", 0), ("end", 0)]
    assert order[2:4] == [("start", 2), ("end", 2)]
    assert sorted(order[4:]) == [("end", 1), ("end", 3), ("start", 1), ("start", 3)]


def test_waves_and_barrier_counts():
    barrier_calls = []

    class State:
        def __init__(self, main, local_main):
            self.is_main_process, self.is_local_main_process = main, local_main

        def wait_for_everyone(self):
            barrier_calls[-1] += 1

    for main, local_main, expected_wave in ((True, True, 0), (False, True, 1), (False, False, 2)):
        state = State(main, local_main)
        assert wave(state) == expected_wave
        barrier_calls.append(0)
        with each_node_first(state):
            assert barrier_calls[-1] == expected_wave  # the waves before this one
        assert barrier_calls[-1] == 2  # every rank passes the same barriers, or the run would hang
