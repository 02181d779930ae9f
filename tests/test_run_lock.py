"""The output-directory lock: written whole, an empty lock is live while fresh, and locks of dead runs on other
hosts are taken over after a missed heartbeat or on request. (The basic refuse/take-over of a killed run on this
host is in test_faults.py.)"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from distil_trainer import run_lock
from distil_trainer.run_lock import LOCK_NAME, OutputDirInUse, output_dir_lock

HOUR_AGO = time.time() - 3600


def write_lock(directory, info, mtime=None):
    lock = directory / LOCK_NAME
    lock.write_text(json.dumps(info) if isinstance(info, dict) else info)
    if mtime is not None:
        os.utime(lock, (mtime, mtime))
    return lock


def holds_me(directory):
    info = json.loads((directory / LOCK_NAME).read_text())
    return info["pid"] == os.getpid() and info["host"] == socket.gethostname()


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(run_lock.TAKE_OVER_ENV, raising=False)
    monkeypatch.delenv(run_lock.STALE_AFTER_ENV, raising=False)


@pytest.mark.reliability(fault="a run finds the lock of another run that is still writing it (empty file)",
                         outcome="treated as live: refused, never two holders")
def test_fresh_empty_lock_is_live(tmp_path):
    write_lock(tmp_path, "")
    with pytest.raises(OutputDirInUse, match="still writing its lock"):
        with output_dir_lock(tmp_path):
            pass
    assert (tmp_path / LOCK_NAME).read_text() == ""  # left alone


def test_old_empty_lock_is_taken_over(tmp_path):
    write_lock(tmp_path, "", mtime=HOUR_AGO)
    with output_dir_lock(tmp_path):
        assert holds_me(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_appears_with_its_content(tmp_path, monkeypatch):
    # The lock is published by a hard link of a complete file: at the moment it appears it already holds the JSON.
    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append(json.loads(open(src).read()))
        assert not os.path.exists(dst)
        return real_link(src, dst)

    monkeypatch.setattr(run_lock.os, "link", link)
    with output_dir_lock(tmp_path):
        assert seen and seen[0]["pid"] == os.getpid()
        assert holds_me(tmp_path)
    assert sorted(os.listdir(tmp_path)) == []  # no temporary file left behind


def test_filesystem_without_hard_links_still_locks(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "link", no_links)
    with output_dir_lock(tmp_path):
        assert holds_me(tmp_path)
        with pytest.raises(OutputDirInUse):  # what another process would meet
            run_lock.acquire(tmp_path.resolve(), {"pid": 1, "host": "elsewhere"}, 600.0, False)
    assert not (tmp_path / LOCK_NAME).exists()


OTHER_HOST = {"pid": 4242, "host": "node-that-died.cluster", "started": "2026-01-01 00:00:00", "command": "recipe"}


def test_fresh_lock_of_another_host_is_refused_with_the_way_out(tmp_path):
    write_lock(tmp_path, OTHER_HOST)
    with pytest.raises(OutputDirInUse, match=r"run pid 4242 on node-that-died\.cluster.*"
                                             rf"{run_lock.TAKE_OVER_ENV}=1.*wait 600s"):
        with output_dir_lock(tmp_path):
            pass


@pytest.mark.reliability(fault="a job rescheduled onto another host finds the lock of its dead predecessor",
                         outcome="taken over once the lock missed its heartbeat (10 min), or at once with "
                                 "DISTIL_TRAINER_TAKE_OVER_LOCK=1")
def test_unrefreshed_lock_of_another_host_is_taken_over(tmp_path):
    write_lock(tmp_path, OTHER_HOST, mtime=HOUR_AGO)
    with output_dir_lock(tmp_path):
        assert holds_me(tmp_path)


def test_take_over_flag_and_env(tmp_path, monkeypatch):
    write_lock(tmp_path, OTHER_HOST)
    with output_dir_lock(tmp_path, take_over=True):
        assert holds_me(tmp_path)
    write_lock(tmp_path, OTHER_HOST)
    monkeypatch.setenv(run_lock.TAKE_OVER_ENV, "1")
    with output_dir_lock(tmp_path):
        assert holds_me(tmp_path)
    write_lock(tmp_path, OTHER_HOST, mtime=time.time() - 120)
    monkeypatch.delenv(run_lock.TAKE_OVER_ENV)
    monkeypatch.setenv(run_lock.STALE_AFTER_ENV, "90")
    with output_dir_lock(tmp_path):
        assert holds_me(tmp_path)
    with pytest.raises(ValueError, match="heartbeat"):
        with output_dir_lock(tmp_path, stale_after=30):
            pass


def test_take_over_never_steals_from_a_live_run_on_this_host(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, {"pid": holder.pid, "host": socket.gethostname()})
        with pytest.raises(OutputDirInUse, match=f"run pid {holder.pid}"):
            with output_dir_lock(tmp_path, take_over=True):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_own_pid_from_an_earlier_run_is_stale(tmp_path):
    # A restarted container often gets the same hostname and pid as the run it replaces.
    write_lock(tmp_path, {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"})
    with output_dir_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["started"] != "earlier"


def test_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with output_dir_lock(tmp_path, stale_after=600):
        lock = tmp_path / LOCK_NAME
        os.utime(lock, (HOUR_AGO, HOUR_AGO))
        for _ in range(400):  # until the heartbeat touched it (no timing assertion: just wait for it)
            if lock.stat().st_mtime > HOUR_AGO + 1:
                break
            time.sleep(0.05)
        assert lock.stat().st_mtime > HOUR_AGO + 1


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    with output_dir_lock(tmp_path):
        (tmp_path / LOCK_NAME).unlink()
        write_lock(tmp_path, OTHER_HOST)  # another host took it over (e.g. with the take-over flag)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == OTHER_HOST["host"]


RACER = """
import sys, time
from distil_trainer.run_lock import OutputDirInUse, output_dir_lock
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    with output_dir_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(4)
except OutputDirInUse:
    print("refused", flush=True)
"""


@pytest.mark.slow
def test_racing_take_overs_leave_one_holder(tmp_path):
    # Six runs find the same stale lock (a dead pid on this host) at the same moment: exactly one may hold it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, {"pid": dead.pid, "host": socket.gethostname()})
    start = time.time() + 5
    runs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                             text=True) for _ in range(6)]
    outputs = [r.communicate(timeout=120)[0].strip() for r in runs]
    assert sorted(outputs) == ["held"] + ["refused"] * 5
