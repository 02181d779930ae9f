"""Who builds a cached output first when several processes need it: one process per node, in turn.

`accelerate`'s `main_process_first` lets the global main process build and then releases every other rank at
once. On a cluster whose nodes do not share the cache folder (node-local disks), all the ranks of every other
node then find nothing and build and publish the same folder at the same moment. Here the ranks go in three
waves: the global main process; then the first process of each other node (on a shared filesystem it finds the
output built and reuses it; on a node-local disk it builds that node's copy); then every other rank, which reuses
its node's copy.
"""

import contextlib

WAVES = 3


def wave(state):
    """0: the global main process, 1: the first process of another node, 2: any other process."""
    if state.is_main_process:
        return 0
    return 1 if state.is_local_main_process else 2


@contextlib.contextmanager
def each_node_first(state):
    """Run the body in waves (see the module docstring). Every rank passes the same number of barriers."""
    mine = wave(state)
    for _ in range(mine):
        state.wait_for_everyone()
    yield
    for _ in range(WAVES - 1 - mine):
        state.wait_for_everyone()
