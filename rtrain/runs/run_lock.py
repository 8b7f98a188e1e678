"""One writer per run directory (or sweep directory): the lock file RUN/.lock.

    lock = acquire(run_dir, what="run")      # RunLockError (one line) while another process holds it
    ...                                      # heartbeat thread refreshes the lock meanwhile
    lock.release()                           # or: with hold(run_dir): ...

RUN/.lock is JSON {"host", "pid", "start_time", "boot_id", "pid_ns", "heartbeat", "command", "token"},
created with O_CREAT | O_EXCL, so of two drivers that start together exactly one gets it.
A lock whose holder is gone is taken over with a one-line warning naming the old holder:

- same host (same hostname and pid namespace): the pid is not alive, or it is alive but is
  another process (its start time in /proc differs, or the machine rebooted: another boot id);
- another host (or another container with the same hostname): its heartbeat, refreshed by the
  holder every `heartbeat_s` (10 s), is older than `stale_s` (60 s, env RTRAIN_LOCK_STALE_S).
  The clocks of the two hosts must agree to well within that.

The lock is released on a normal exit, on an exception and on Ctrl-C (the `with` block, and an
atexit hook for a lock that was never released); a SIGKILLed holder leaves it for the takeover.
No Ray here: `rtrain.training.runner.fit` and the sweep driver take the lock before Ray starts.

In a bucket (RUN = s3://bucket/runs/NAME) there is no O_EXCL create and no rename, so RUN/.lock is
a lease (`BucketLease`): the same JSON, read first (a live holder refuses, a gone one is taken
over with the same warning), then written, then read back after `LEASE_SETTLE_S` (2 s): only the
process whose token is still there holds it. Of two drivers that start together both write, and
both read back the last writer's token, so one proceeds and the other is refused. This relies on
the bucket's read-after-write consistency (S3 has it) and on each driver's check-then-write taking
far less than the settle time. Holders on other hosts are judged by their heartbeat, as on disk.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from rtrain import storage

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LEASE_SETTLE_S = 2.0  # a bucket lease: wait this long after writing it before reading it back
HEARTBEAT_S = 10.0
STALE_S = float(os.environ.get("RTRAIN_LOCK_STALE_S", "60"))
UNREADABLE_GRACE_S = 5.0  # a lock file that does not parse is being written, until it is this old


class RunLockError(RuntimeError):
    """The directory is in use by another live process (or the lock cannot be taken): one line."""


def _proc_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot (/proc/PID/stat field 22); None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]"): containers sharing a hostname differ here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe(info: dict) -> str:
    """`pid P on HOST (command ...)` for messages."""
    command = str(info.get("command") or "?")
    if len(command) > 120:
        command = command[:117] + "..."
    return f"pid {info.get('pid')} on {info.get('host')} ({command})"


def holder_gone(info: dict, *, stale_s: float = STALE_S, now: float | None = None) -> str | None:
    """Why the holder of a lock with `info` is gone (a short reason), or None while it may be alive."""
    now = time.time() if now is None else now
    ns, holder_ns = _pid_namespace(), info.get("pid_ns")
    if info.get("host") == socket.gethostname() and (ns is None or holder_ns is None or ns == holder_ns):
        pid = info.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return "no valid pid"
        boot = _boot_id()
        if info.get("boot_id") and boot and info["boot_id"] != boot:
            return "the host rebooted since"
        if not _pid_alive(pid):
            return f"pid {pid} is not running"
        started = _proc_start_time(pid)
        if info.get("start_time") is not None and started is not None and started != info["start_time"]:
            return f"pid {pid} is now another process"
        return None
    beat = info.get("heartbeat")
    if not isinstance(beat, int | float):
        return "no heartbeat"
    age = now - float(beat)
    return f"its heartbeat is {age:.0f} s old (stale after {stale_s:.0f} s)" if age > stale_s else None


def _read(path: Path) -> tuple[bytes, dict | None]:
    """The lock's bytes and parsed JSON (None if it does not parse); FileNotFoundError if absent."""
    data = b""
    for _ in range(5):  # a heartbeat rewriting the file in place can be caught half-way
        data = path.read_bytes()
        try:
            info = json.loads(data)
            if isinstance(info, dict):
                return data, info
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        time.sleep(0.05)
    return data, None


class _Held:
    """What a held lock on disk and a lease in a bucket share: the heartbeat thread, `held`,
    an idempotent `release()` (the subclass's `_remove_if_ours`), the `with` block."""

    def __init__(self, path, info: dict, heartbeat_s: float, kind: str) -> None:
        self.path = path
        self.info = info
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._io = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"run-{kind}-heartbeat {path}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @property
    def held(self) -> bool:
        return not self._stop.is_set()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._io:
                if self._stop.is_set():
                    return
                try:
                    self.refresh()
                except FileNotFoundError:  # moved aside for a moment by a process checking it; retry
                    continue
                except OSError as exc:  # a full disk, a bucket out of reach: still ours, older heartbeat
                    logger.warning("%s: heartbeat not written (%s)", self.path, exc.strerror or exc)

    def refresh(self) -> None:
        raise NotImplementedError

    def _remove_if_ours(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        with self._io:
            if self._stop.is_set():
                return
            self._stop.set()
            self._remove_if_ours()
        atexit.unregister(self.release)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(_Held):
    """A held RUN/.lock; `release()` (idempotent) removes it if it is still this holder's."""

    def __init__(self, path: Path, info: dict, heartbeat_s: float) -> None:
        super().__init__(path, info, heartbeat_s, "lock")

    def _ours(self) -> bool:
        try:
            _, info = _read(self.path)
        except OSError:
            return False
        return info is not None and info.get("token") == self.info["token"]

    def refresh(self) -> None:
        """Write a new heartbeat into the lock, in place (never re-creating a lock that is gone)."""
        with open(self.path, "r+b") as fh:
            try:
                current = json.loads(fh.read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return
            if current.get("token") != self.info["token"]:
                logger.warning("%s: the lock is now held by %s; this process no longer holds it", self.path,
                               describe(current))
                self._stop.set()
                return
            self.info["heartbeat"] = time.time()
            fh.seek(0)
            fh.write(json.dumps(self.info).encode())
            fh.truncate()

    def _remove_if_ours(self) -> None:
        if self._ours():
            self.path.unlink(missing_ok=True)


class BucketLease(_Held):
    """A held RUN/.lock in a bucket (see the module doc): heartbeat thread, `release()` (idempotent)."""

    def __init__(self, uri: str, info: dict, heartbeat_s: float) -> None:
        super().__init__(uri, info, heartbeat_s, "lease")

    def refresh(self) -> None:
        """Write a new heartbeat, unless the lease is gone or another process holds it now."""
        current = _read_lease(self.path)
        if not current or current.get("token") != self.info["token"]:
            logger.warning("%s: the lease is now held by %s; this process no longer holds it", self.path,
                           describe(current) if current else "nobody")
            self._stop.set()
            return
        self.info["heartbeat"] = time.time()
        storage.write_bytes(self.path, json.dumps(self.info).encode())

    def _remove_if_ours(self) -> None:
        try:
            current = _read_lease(self.path)
            if current and current.get("token") == self.info["token"]:
                storage.remove(self.path)
        except OSError as exc:
            logger.warning("%s: lease not removed (%s); it goes stale after %.0f s", self.path, exc,
                           STALE_S)


def _read_lease(uri: str) -> dict | None:
    """The lease's JSON; None when there is none, {} when it does not parse (an object is whole, so
    that is garbage, not a write in progress)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def acquire_lease(directory: str, *, what: str = "run", command: str | None = None,
                  heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                  settle_s: float = LEASE_SETTLE_S) -> BucketLease:
    """Take the lease DIRECTORY/.lock in a bucket (module doc); RunLockError naming a live holder."""
    uri = storage.join(directory, LOCK_FILE)
    info = _new_info(command)
    for _ in range(5):
        try:
            holder = _read_lease(uri)
            if holder is not None:
                why = holder_gone(holder, stale_s=stale_s) if holder else "the lease is unreadable"
                who = describe(holder) if holder else "an unreadable lease"
                if why is None:
                    beat = holder.get("heartbeat")
                    ago = time.time() - beat if isinstance(beat, int | float) else None
                    beat_text = f", heartbeat {ago:.0f} s ago" if ago is not None else ""
                    raise RunLockError(
                        f"{directory}: this {what} is in use by {who}{beat_text}; two writers would mix "
                        "its metrics and checkpoints: wait for it to end or stop it (a dead holder is "
                        "taken over)")
                logger.warning("%s: taking over the lease of %s: %s", uri, who, why)
            info["heartbeat"] = time.time()
            storage.write_bytes(uri, json.dumps(info).encode())
            time.sleep(settle_s)
            now = _read_lease(uri)
        except OSError as exc:
            raise RunLockError(f"{uri}: cannot take the {what} lease ({exc})") from None
        if now and now.get("token") == info["token"]:
            return BucketLease(uri, info, heartbeat_s)
    raise RunLockError(f"{uri}: could not take the {what} lease (other processes keep taking it)")


def _new_info(command: str | None) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": _proc_start_time(pid),
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "heartbeat": time.time(), "since": time.time(),
            "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
            "token": uuid.uuid4().hex}


def _create(path: Path, info: dict) -> bool:
    """Create the lock with O_CREAT | O_EXCL; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(info).encode())
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _move_aside_if_unchanged(path: Path, seen: bytes) -> bool:
    """Remove the lock if it still holds `seen` (True); put it back if it changed meanwhile (False).

    The rename is atomic: of two processes taking over the same stale lock, one moves it aside,
    the other finds no file (or the winner's new one, which it puts back unchanged).
    """
    aside = path.with_name(f"{path.name}.takeover-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    try:
        if aside.read_bytes() == seen:
            return True
        try:
            os.link(aside, path)  # not rename: never replace a lock that appeared meanwhile
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


def acquire(directory: str | os.PathLike, *, what: str = "run", command: str | None = None,
            heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> RunLock:
    """Take DIRECTORY/.lock (creating DIRECTORY); RunLockError naming the holder while it is alive.

    DIRECTORY in a bucket (s3://...): `acquire_lease`."""
    if storage.is_bucket(directory):
        return acquire_lease(str(directory), what=what, command=command, heartbeat_s=heartbeat_s,
                             stale_s=stale_s)
    directory = Path(directory)
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunLockError(f"{directory}: cannot create the {what} directory "
                           f"({exc.strerror or exc})") from None
    info = _new_info(command)
    for _ in range(20):
        try:
            if _create(path, info):
                return RunLock(path, info, heartbeat_s)
            seen, holder = _read(path)
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # released or moved aside meanwhile: try again
            continue
        except OSError as exc:
            raise RunLockError(f"{path}: cannot take the {what} lock ({exc.strerror or exc})") from None
        if holder is None:
            if age < UNREADABLE_GRACE_S:
                time.sleep(0.2)
                continue
            why, who = "the lock file is unreadable", f"an unreadable lock ({len(seen)} bytes)"
        else:
            why, who = holder_gone(holder, stale_s=stale_s), describe(holder)
            if why is None:
                beat = holder.get("heartbeat")
                beat_text = (f", heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, int | float)
                             else "")
                raise RunLockError(
                    f"{directory}: this {what} is in use by {who}{beat_text}; two writers would mix its "
                    "metrics and checkpoints: wait for it to end or stop it (a dead holder is taken over)"
                )
        if _move_aside_if_unchanged(path, seen):
            logger.warning("%s: taking over the lock of %s: %s", path, who, why)
    raise RunLockError(f"{path}: could not take the {what} lock (other processes keep taking it)")


@contextmanager
def hold(directory: str | os.PathLike, *, error: type[Exception] | None = None, **kwargs):
    """`acquire(directory, **kwargs)` for the `with` block; released however the block ends.
    `error`: raise this type (same one line) instead of RunLockError when the lock is not taken."""
    try:
        lock = acquire(directory, **kwargs)
    except RunLockError as exc:
        if error is None:
            raise
        raise error(str(exc)) from None
    try:
        yield lock
    finally:
        lock.release()


__all__ = ["LOCK_FILE", "BucketLease", "RunLock", "RunLockError", "acquire", "acquire_lease", "describe",
           "hold", "holder_gone"]
