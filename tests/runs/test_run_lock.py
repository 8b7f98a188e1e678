"""One writer per run / sweep directory (rtrain.runs.run_lock), with real processes; no Ray.

A holder is a real `python -c` process that takes the lock through the module and sleeps. A
second `fit(..., resume=True)`, `python -m rtrain.fit --resume --name X` or sweep driver is refused
with one line naming the holder's host and pid, before Ray starts; a SIGKILLed holder's lock, one
whose pid is now another process and a stale heartbeat from another host are taken over; Ctrl-C
releases the lock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtrain.config import config_from_dict, dump_config
from rtrain.runs import run_lock
from rtrain.training.runner import FitError, fit

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLDER = """
import sys, time
from rtrain.runs import run_lock
with run_lock.hold(sys.argv[1], command="holder-under-test", heartbeat_s=0.2):
    print("locked", flush=True)
    time.sleep(600)
"""


def _start_holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


@pytest.fixture
def holders():
    started: list[subprocess.Popen] = []

    def start(directory: Path) -> subprocess.Popen:
        started.append(_start_holder(directory))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _run_config(storage: Path) -> dict:
    # Shards that do not exist: everything checked here happens before the data is looked at.
    return {"model": {"name": "compact_n"},
            "data": {"train": str(storage / "no-train"), "val": str(storage / "no-val")},
            "run": {"storage": str(storage), "address": "127.0.0.1:9"}}


def _make_run(storage: Path, name: str) -> Path:
    out = storage / name
    dump_config(config_from_dict(_run_config(storage)), out / "config.yaml")
    return out


def _ray_started() -> bool:
    """Whether the code under test touched Ray (see `no_ray`): the suite may share one Ray session."""
    return bool(_RAY_CALLS)


_RAY_CALLS: list[str] = []


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Record any attempt to start or query Ray, so 'refused before Ray' holds whatever ran before."""
    import ray

    _RAY_CALLS.clear()

    def touched(name):
        def record(*args, **kwargs):
            _RAY_CALLS.append(name)
            raise RuntimeError(f"ray.{name} called before the lock check")
        return record

    monkeypatch.setattr(ray, "init", touched("init"))
    monkeypatch.setattr(ray, "is_initialized", touched("is_initialized"))


def test_second_fit_resume_is_refused_naming_host_and_pid_before_ray(holders, tmp_path):
    out = _make_run(tmp_path, "X")
    holder = holders(out)
    with pytest.raises(FitError) as info:
        fit(_run_config(tmp_path), name="X", resume=True, plots=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "holder-under-test" in msg
    assert msg.startswith(f"{out}: this run is in use by")
    assert not _ray_started()
    assert json.loads((out / run_lock.LOCK_FILE).read_text())["pid"] == holder.pid  # untouched


def test_cli_resume_is_refused_with_one_line_and_exit_2(holders, tmp_path):
    out = _make_run(tmp_path, "X")
    holder = holders(out)
    done = subprocess.run([sys.executable, "-m", "rtrain.fit", "--resume", "--name", "X", "--storage",
                           str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("rtrain.fit: error: ") and "in use by" in lines[-1]
    assert f"pid {holder.pid} on {socket.gethostname()}" in lines[-1]
    assert "Ray" not in done.stderr.replace("rtrain", "")  # nothing of Ray started or joined


def test_sigkilled_holder_is_taken_over_and_released_on_the_next_error(holders, tmp_path, caplog):
    out = _make_run(tmp_path, "X")
    holder = holders(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (out / run_lock.LOCK_FILE).is_file()  # a killed driver leaves its lock behind
    with caplog.at_level(logging.WARNING, logger="rtrain.runs.run_lock"), pytest.raises(FitError) as info:
        fit(_run_config(tmp_path), name="X", resume=True, plots=False)
    # Past the lock: the next check (the shards) is what stops it, and the lock is released.
    assert "shard directory not found" in str(info.value)
    taken = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert len(taken) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in taken[0]
    assert f"pid {holder.pid} is not running" in taken[0]
    assert not (out / run_lock.LOCK_FILE).exists()
    assert not _ray_started()


def test_ctrl_c_releases_the_lock(holders, tmp_path):
    holder = holders(tmp_path / "run")
    assert (tmp_path / "run" / run_lock.LOCK_FILE).is_file()
    holder.send_signal(signal.SIGINT)
    holder.wait(timeout=10)
    assert holder.returncode != 0 and "KeyboardInterrupt" in holder.stderr.read()
    assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()
    run_lock.acquire(tmp_path / "run").release()


def test_exception_and_normal_exit_release_and_heartbeat_is_refreshed(tmp_path):
    with pytest.raises(ValueError), run_lock.hold(tmp_path, heartbeat_s=0.1):
        raise ValueError("boom")
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    lock = run_lock.acquire(tmp_path, heartbeat_s=0.1)
    first = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
    assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
    assert {"start_time", "heartbeat", "command"} <= first.keys()
    time.sleep(0.6)
    later = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
    assert later["heartbeat"] > first["heartbeat"] and later["token"] == first["token"]
    lock.release()
    lock.release()  # idempotent
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def _foreign_lock(directory: Path, heartbeat: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / run_lock.LOCK_FILE).write_text(json.dumps({
        "host": "node-7.other", "pid": 4242, "start_time": 1, "heartbeat": heartbeat,
        "command": "python -m rtrain.fit --name X", "token": "t"}))


def test_another_hosts_lock_fresh_is_refused_stale_is_taken_over(tmp_path, caplog):
    _foreign_lock(tmp_path, heartbeat=time.time() - 5)
    refused = r"in use by pid 4242 on node-7\.other .*heartbeat 5 s ago"
    with pytest.raises(run_lock.RunLockError, match=refused):
        run_lock.acquire(tmp_path, stale_s=60)
    _foreign_lock(tmp_path, heartbeat=time.time() - 120)
    with caplog.at_level(logging.WARNING, logger="rtrain.runs.run_lock"):
        lock = run_lock.acquire(tmp_path, stale_s=60)
    assert "taking over the lock of pid 4242 on node-7.other" in caplog.text
    assert "heartbeat is 120 s old" in caplog.text
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_same_host_pid_alive_but_another_process_is_taken_over(tmp_path, caplog):
    info = run_lock._new_info("an old driver")
    info["start_time"] -= 1  # this pid is alive, but it is not the process that took the lock
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="rtrain.runs.run_lock"):
        run_lock.acquire(tmp_path).release()
    assert f"pid {os.getpid()} is now another process" in caplog.text


def test_same_hostname_in_another_pid_namespace_goes_by_the_heartbeat(tmp_path):
    """A container sharing the hostname (host networking): its pids mean nothing here."""
    info = {**run_lock._new_info("a driver in another container"), "pid": 999_999_999,
            "pid_ns": "pid:[1]", "start_time": 1}
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(info))
    with pytest.raises(run_lock.RunLockError, match="in use by pid 999999999"):
        run_lock.acquire(tmp_path)  # that pid is not alive here, but the heartbeat is fresh
    info["heartbeat"] = time.time() - 3600
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(info))
    run_lock.acquire(tmp_path).release()


TAKER = """
import sys, time
from rtrain.runs import run_lock
try:
    lock = run_lock.acquire(sys.argv[1])
except run_lock.RunLockError:
    print("refused", flush=True)
else:
    print("got", flush=True)
    time.sleep(4)
"""


def test_of_several_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    _foreign_lock(tmp_path, heartbeat=time.time() - 3600)
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ENV, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    answers = sorted(o.strip() for o, _ in outs)
    assert answers == ["got", "refused", "refused", "refused"], outs
    assert not (tmp_path / run_lock.LOCK_FILE).exists()  # the winner released it at exit


def test_sweep_driver_is_refused_while_another_holds_the_sweep(holders, tmp_path):
    from rtrain.search.driver import resolve_sweep_dir, run_sweep
    from rtrain.search.spec import SweepError

    sweep = tmp_path / "S"
    sweep.mkdir()
    (sweep / "sweep.yaml").write_text("{}\n")  # never read: the lock is checked first
    holder = holders(sweep)
    with pytest.raises(SweepError) as info:
        run_sweep(None, name="S", storage=tmp_path, resume=True)
    assert "\n" not in str(info.value) and f"pid {holder.pid} on {socket.gethostname()}" in str(info.value)
    assert str(info.value).startswith(f"{sweep}: this sweep is in use by")
    assert not _ray_started()
    # A new sweep's directory that holds only a dead driver's lock is not "a sweep that exists".
    fresh = tmp_path / "T"
    fresh.mkdir()
    _foreign_lock(fresh, heartbeat=0.0)
    assert resolve_sweep_dir(object(), tmp_path, "T", resume=False) == fresh


def test_an_unreadable_lock_file_is_taken_over_once_it_is_old(tmp_path, caplog):
    """A half-written or garbage RUN/.lock (a crash mid-write, a stray file) never blocks the run
    for good: fresh, it may still be being written and is waited on; old, it is taken over."""
    path = tmp_path / run_lock.LOCK_FILE
    path.write_bytes(b"\x00{not json")
    old = time.time() - 10 * run_lock.UNREADABLE_GRACE_S
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="rtrain.runs.run_lock"):
        lock = run_lock.acquire(tmp_path)
    assert "taking over the lock of an unreadable lock (10 bytes)" in caplog.text
    assert "the lock file is unreadable" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
