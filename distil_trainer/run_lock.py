"""One run per output directory: a lock file naming the run that holds the directory.

A second run pointed at a directory in use is refused with the other run's pid, host, start time and command.
A lock left by a run that died (SIGKILL, power loss) names a process that no longer exists on this host, so the
next run takes it over -- which is what resuming after a crash needs.
"""

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".distil_trainer.lock"
_held = set()  # directories this process holds (the pipeline and the trainer may both ask)


class OutputDirInUse(RuntimeError):
    pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info):
    return (f"run pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
            f"({info.get('command', '?')})")


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """Hold `output_dir` for this run; re-entrant within one process."""
    path = Path(output_dir).resolve()
    if path in _held:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
            except (OSError, ValueError):
                other = {}
            stale = other.get("host") == me["host"] and isinstance(other.get("pid"), int) and not _alive(other["pid"])
            if stale or not other:
                lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            raise OutputDirInUse(
                f"output_dir {str(path)!r} is in use by {_describe(other)}. Wait for it to finish, or choose "
                f"another --output_dir. If that run is dead, delete {lock}.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        lock.unlink(missing_ok=True)
