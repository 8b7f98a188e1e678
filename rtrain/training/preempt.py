"""Preemption: stop requests (SIGTERM, a Ray node drain), mid-epoch checkpoints, the driver's grace.

A pause is what the training loop does between two steps: write a checkpoint (CHECKPOINT) and
go on, or write one and end the run (STOP). Codes are ordered (NONE < CHECKPOINT < STOP) so that
ranks agree on one by a MAX all-reduce; the engine folds this into the all-reduce it already
makes at the top of every step under DDP (`rtrain.training.engine.train_one_epoch(pause=...)`), so asking
costs no extra host sync. A pause happens only at steps where every worker's batches end on a
stream block edge (`rtrain.data.epoch_stream.pause_every`), the points a resume continues from exactly.

Worker side, `PauseRequests`: `code()` is two attribute reads and a clock read. A daemon thread
polls its `sources` (each `() -> reason or None`: the run's EpochClock actor, which the driver
tells about its SIGTERM; Ray Train's node-drain notice, `drain_source`) every `poll_s`;
`request(reason)` is the direct way in. `checkpoint_every_s` > 0 asks for a
CHECKPOINT once that long passed since the last `checkpointed()`.

A SIGTERM to a Ray Train worker process (`install_worker_sigterm`): Ray's own handler would exit
the process (a worker death, restarted from the last checkpoint). Python runs signal handlers
in the main thread only, which in a Train worker is the actor's task loop, not the training
thread; so the handler is installed by a task on the worker's own actor (`__ray_call__`), and
turns the first SIGTERM into a STOP request of the process's active `PauseRequests` (the
others agree on it at the next pause point); a second SIGTERM goes to Ray's handler.

Driver side, `DriverStop` (a context manager around `trainer.fit()`, main thread only): a
SIGTERM sets a flag; a thread tells the workers (`tell`, e.g. `tell_clock`: the EpochClock's
`request_stop`), then waits `grace_s` for the run to end. The run's workers checkpoint and
return, and the caller reports the preemption.
Past `grace_s` (or on a second SIGTERM) the thread calls `on_timeout` (it logs which checkpoint
is kept) and ends the process with `rtrain.errors.PREEMPTED`: nothing else bounds a wait on a
worker group stuck in a collective, and an orchestrator's SIGKILL follows soon anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from rtrain.errors import PREEMPTED

logger = logging.getLogger(__name__)

NONE, CHECKPOINT, STOP = 0, 1, 2


class PauseRequests:
    """One worker's view of pause requests (module doc). Thread-safe; `close()` ends the poller."""

    def __init__(self, checkpoint_every_s: float = 0.0, sources: Sequence[Callable[[], str | None]] = (),
                 poll_s: float = 1.0) -> None:
        self.checkpoint_every_s = float(checkpoint_every_s)
        self.reason: str | None = None
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._last = time.monotonic()
        self._sources = list(sources)
        self._thread = None
        if self._sources:
            self._thread = threading.Thread(target=self._poll, args=(float(poll_s),), daemon=True,
                                            name="rtrain-pause-poll")
            self._thread.start()

    def request(self, reason: str) -> None:
        """Ask for a STOP (idempotent; the first reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self._stop.set()

    def code(self) -> int:
        """NONE, CHECKPOINT (the mid-epoch interval has passed) or STOP (requested)."""
        if self._stop.is_set():
            return STOP
        if self.checkpoint_every_s > 0 and time.monotonic() - self._last >= self.checkpoint_every_s:
            return CHECKPOINT
        return NONE

    def checkpointed(self) -> None:
        """A checkpoint was just written: the mid-epoch interval starts again."""
        self._last = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self, every: float) -> None:
        while not self._closed.wait(every):
            for source in self._sources:
                try:
                    reason = source()
                except Exception as exc:  # noqa: BLE001 - e.g. the clock died with its run: keep training
                    logger.debug("pause source %r failed: %s", source, exc)
                    continue
                if reason:
                    self.request(reason)
            if self._stop.is_set():
                return


_ACTIVE: list[PauseRequests] = []  # this process's running loop's requests (a worker runs one)
_RAY_HANDLER: list = []  # the SIGTERM handler that was there before ours


_RECEIVED: list[int] = []  # SIGTERMs this process got


def _on_worker_sigterm(signum, frame) -> None:
    _RECEIVED.append(signum)
    active = _ACTIVE[-1] if _ACTIVE else None
    if active is None or len(_RECEIVED) > 1:  # not training, or the second one: Ray's exit
        previous = _RAY_HANDLER[-1] if _RAY_HANDLER else signal.SIG_DFL
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, previous)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    active.request(f"SIGTERM to a worker process (pid {os.getpid()})")


def _install_here(_actor=None) -> bool:
    """Runs on the worker's main thread (an actor task): put `_on_worker_sigterm` in place."""
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_worker_sigterm:
        _RAY_HANDLER.append(current)
        signal.signal(signal.SIGTERM, _on_worker_sigterm)
    return True


def install_worker_sigterm(pauses: PauseRequests, timeout_s: float = 30.0) -> bool:
    """Inside a Ray Train worker: SIGTERM to this process requests a STOP of `pauses` (module doc).
    Returns False (with a warning) where the handler cannot be installed; call `uninstall_worker`
    with the same `pauses` when the loop ends."""
    _ACTIVE.append(pauses)
    if threading.current_thread() is threading.main_thread():
        return _install_here()
    try:
        import ray

        actor = ray.get_runtime_context().current_actor
        return bool(ray.get(actor.__ray_call__.remote(_install_here), timeout=timeout_s))
    except Exception as exc:  # noqa: BLE001 - then a worker SIGTERM stays a worker death (restart)
        logger.warning("a SIGTERM to this worker will end it without a checkpoint: %s", exc)
        return False


def uninstall_worker(pauses: PauseRequests) -> None:
    if pauses in _ACTIVE:
        _ACTIVE.remove(pauses)


def clock_source(clock) -> Callable[[], str | None]:
    """A `PauseRequests` source: the stop the driver put on the run's EpochClock actor."""
    import ray

    def ask() -> str | None:
        return ray.get(clock.stop_requested.remote(), timeout=10)

    return ask


def drain_source() -> Callable[[], str | None] | None:
    """A `PauseRequests` source: Ray Train's notice that a node of the worker group is draining
    (a spot reclaim or an autoscaler's scale-down through Ray's drain API), or None where this
    Ray has no such notice.

    It reads this worker's own copy of the notice, which Ray's PreemptionWatcher sets on every
    worker. The public `ray.train.get_preemption_info()` is a collective (a broadcast from rank 0
    through the same barrier `ray.train.report` uses), which must not run from a polling thread;
    the ranks agree through the pause all-reduce instead."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context
    except ImportError:
        return None

    def ask() -> str | None:
        info = get_train_context().preemption_context.preemption_info
        if info is None:
            return None
        return f"Ray is draining node(s) of ranks {info.preempted_ranks}"

    return ask


def tell_clock(clock, timeout_s: float = 10.0) -> Callable[[str], None]:
    """A `DriverStop` tell: puts the stop on the run's EpochClock, which the workers poll."""
    import ray

    def tell(reason: str) -> None:
        ray.get(clock.request_stop.remote(reason), timeout=timeout_s)

    return tell


class DriverStop:
    """SIGTERM handling for the driver while a run trains (module doc).

    tell: (reason) -> None, passes the stop on to the workers (`tell_clock(clock)`). grace_s: how
    long to wait for the workers' checkpoint. on_timeout: called (from a thread) before the
    process exits without one.
    `requested` holds the reason once a SIGTERM came. Without the main thread it does nothing.
    """

    def __init__(self, tell: Callable[[str], None], grace_s: float, on_timeout: Callable[[], None],
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.tell, self.grace_s, self.on_timeout, self.exit_fn = tell, float(grace_s), on_timeout, exit_fn
        self.requested: str | None = None
        self._signalled = threading.Event()
        self._again = threading.Event()
        self._done = threading.Event()
        self._previous = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DriverStop:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("SIGTERM is not handled (rtrain.fit runs outside the main thread)")
            return self
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="rtrain-driver-stop")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _on_signal(self, signum, frame) -> None:  # the main thread; keep it tiny
        if self._signalled.is_set():
            self._again.set()
        self.requested = self.requested or "SIGTERM to the driver"
        self._signalled.set()

    def _watch(self) -> None:
        while not self._signalled.wait(0.5):
            if self._done.is_set():
                return
        if self._done.is_set():
            return
        logger.warning("rtrain: SIGTERM: stopping at the next step boundary with a checkpoint "
                       "(waiting up to %.0f s, run.grace_s)", self.grace_s)
        try:
            self.tell(self.requested)
        except Exception as exc:  # noqa: BLE001 - the workers cannot be told: the grace runs out below
            logger.error("could not tell the workers to stop: %s", exc)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and not self._done.is_set() and not self._again.is_set():
            time.sleep(0.1)
        if self._done.is_set():
            return
        try:
            self.on_timeout()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for handler in logging.getLogger().handlers + logging.getLogger("rtrain").handlers:
                handler.flush()
            self.exit_fn(PREEMPTED)
