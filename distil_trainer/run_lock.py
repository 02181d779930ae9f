"""One run per output directory: a lock file naming the run that holds the directory.

A second run pointed at a directory in use is refused with the other run's pid, host, start time and command.

The lock is written whole or not at all: its JSON goes to a private temporary file that is then hard-linked to
the lock's name, which fails if a lock exists (atomic, also on NFS). A lock is stale, and taken over, when
- it names a process on this host that no longer exists (SIGKILL, power loss): resuming after a crash;
- its holder stopped refreshing it: a live holder touches the lock every `HEARTBEAT_S` seconds, so a lock left
  unrefreshed for `stale_after` seconds (default 10 minutes, env `DISTIL_TRAINER_LOCK_STALE_AFTER`) belongs to a
  dead run, wherever it ran -- e.g. a cluster job rescheduled onto another host;
- or the caller says so: `take_over=True` (env `DISTIL_TRAINER_TAKE_OVER_LOCK=1`) takes over a lock from another
  host at once (a live run on this host is still refused).
An empty or unreadable lock (left by a writer without hard links, between create and write) is live while it is
younger than `stale_after`.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

LOCK_NAME = ".distil_trainer.lock"
HEARTBEAT_S = 60.0
DEFAULT_STALE_AFTER_S = 600.0
STALE_AFTER_ENV = "DISTIL_TRAINER_LOCK_STALE_AFTER"
TAKE_OVER_ENV = "DISTIL_TRAINER_TAKE_OVER_LOCK"
_held = set()  # lock files this process holds (the pipeline and the trainer may both ask for one directory)


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


def _read_lock(lock):
    """(info dict or None if empty/unreadable, seconds since the lock was last written or refreshed)."""
    age = time.time() - lock.stat().st_mtime  # FileNotFoundError: released meanwhile (the caller retries)
    try:
        info = json.loads(lock.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None, age
    return (info if isinstance(info, dict) and info else None), age


def _why_stale(info, age, me, stale_after, take_over):
    """Why the lock can be taken over, or None if it belongs to a live run."""
    if info is None:
        return f"empty or unreadable for {age:.0f}s" if age > stale_after else None
    same_host = info.get("host") == me["host"]
    pid = info.get("pid")
    if same_host and isinstance(pid, int):
        if pid == os.getpid():  # not held by this process (see _held): left by an earlier run with this pid
            return f"left by an earlier process {pid} on this host"
        if not _alive(pid):
            return f"process {pid} on this host has exited"
        if age > stale_after:  # the pid was reused by another process: a live holder refreshes the lock
            return f"not refreshed for {age:.0f}s"
        return None
    if take_over:
        return f"take-over requested ({TAKE_OVER_ENV}=1)"
    if age > stale_after:
        return f"not refreshed for {age:.0f}s (> {stale_after:.0f}s)"
    return None


def _create(lock, me):
    """Create `lock` holding `me`'s JSON, atomically; False if a lock exists."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(me))
    try:
        os.link(tmp, lock)  # fails if the lock exists; the lock appears with its content
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then write (see _why_stale)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return True
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _takeover_guard(lock, stale_after):
    """Serialise take-overs, so that two runs that both judged a lock stale cannot remove each other's new lock."""
    guard = lock.with_name(lock.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > stale_after:
                guard.unlink()  # left by a run that died mid take-over
        yield False
        return
    os.close(fd)
    try:
        yield True
    finally:
        guard.unlink(missing_ok=True)


def _take_over(lock, seen, me, stale_after, take_over):
    """Remove the stale lock `seen` (its stat) unless another run replaced or refreshed it meanwhile; False when
    another run is taking it over right now."""
    with _takeover_guard(lock, stale_after) as guarded:
        if not guarded:
            return False
        try:
            now = lock.stat()
            info, age = _read_lock(lock)
        except FileNotFoundError:
            return True
        if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns) and \
                _why_stale(info, age, me, stale_after, take_over):
            lock.unlink()
        return True


class _Heartbeat:
    """Touch the lock every `HEARTBEAT_S` seconds while it is held."""

    def __init__(self, lock):
        self.lock, self.stop = lock, threading.Event()
        self.thread = threading.Thread(target=self._run, name="distil-trainer-lock-heartbeat", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.lock)

    def close(self):
        self.stop.set()
        self.thread.join()


def _settings(stale_after, take_over):
    if stale_after is None:
        stale_after = float(os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S))
    if stale_after <= HEARTBEAT_S:
        raise ValueError(f"stale_after={stale_after}s must be longer than the {HEARTBEAT_S:.0f}s heartbeat, or live "
                         f"runs would be taken for dead ({STALE_AFTER_ENV}).")
    if take_over is None:
        take_over = os.environ.get(TAKE_OVER_ENV, "").strip().lower() in ("1", "true", "yes")
    return stale_after, take_over


def acquire(path, me, stale_after, take_over, lock_name=LOCK_NAME, what=None):
    """Create the lock `lock_name` in directory `path`, taking over a stale one; raise OutputDirInUse if it is live
    (the message names `what` is held: by default the output_dir `path`)."""
    lock = path / lock_name
    for _ in range(50):  # a race lost to another run taking over is retried
        if _create(lock, me):
            return lock
        try:
            seen = lock.stat()
            info, age = _read_lock(lock)
        except FileNotFoundError:
            continue  # released meanwhile
        if _why_stale(info, age, me, stale_after, take_over):
            if not _take_over(lock, seen, me, stale_after, take_over):
                time.sleep(0.1)  # another run is taking it over: see who wins
            continue
        who = _describe(info) if info else "a run that is still writing its lock"
        raise OutputDirInUse(
            f"{what or f'output_dir {str(path)!r}'} is in use by {who}. Wait for it to finish, or choose another "
            "--output_dir. "
            f"If that run is dead on another host (e.g. a rescheduled job), set {TAKE_OVER_ENV}=1 to take the "
            f"lock over, or wait {stale_after:.0f}s after its last refresh for it to be taken over automatically.")
    raise OutputDirInUse(f"Could not acquire {lock}: other runs keep replacing it; is something else using "
                         f"{str(path)!r}?")


@contextlib.contextmanager
def output_dir_lock(output_dir, stale_after=None, take_over=None, lock_name=LOCK_NAME, what=None):
    """Hold `output_dir` for this run; re-entrant within one process. See the module docstring for take-overs.

    `lock_name`: the lock file's name in `output_dir` (another name locks something else kept there, e.g. a teacher
    cache built next to it); `what`: what the refusal says is in use (default: the output_dir)."""
    path = Path(output_dir).resolve()
    key = path / lock_name
    if key in _held:
        yield
        return
    stale_after, take_over = _settings(stale_after, take_over)
    path.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300], "heartbeat_s": HEARTBEAT_S}
    lock = acquire(path, me, stale_after, take_over, lock_name, what)
    _held.add(key)
    heartbeat = _Heartbeat(lock)
    try:
        yield
    finally:
        heartbeat.close()
        _held.discard(key)
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(lock)[0] == me:  # still ours, not a lock another run took over meanwhile
                lock.unlink()
