"""A Ray Data executor that waits, instead of spinning, while it can make no progress.

Ray 2.60's StreamingExecutor runs its scheduling loop in a thread of the process that executes
the dataset (for a Train run's `streaming_split`, the SplitCoordinator actor). A step blocks in
`ray.wait(..., timeout=0.1)` only until some task has output ready; when the consumers have not
taken what is already decoded (the usual state of a training stream whose decode is faster than
the step), backpressure lets the loop read none of that output, `ray.wait` returns at once
because it is still ready, and the loop goes round without blocking: one core busy doing
bookkeeping. On a 2-core machine that core is the one the decode actor and a second torch
thread need.

`install()` wraps `StreamingExecutor._scheduling_loop_step`: after a step that changed none of
the operators' task and block counters (`progress`) and left the execution unfinished, it sleeps
`IDLE_WAIT_S`. Work that becomes possible while it sleeps (a consumer took a block, an actor
started) is dispatched at most that late, under the 0.1 s Ray itself waits on a busy step.
Idempotent.

Where it is installed: importing `rtrain.data.epoch_stream` calls `install()`. Every process that
executes the train stream unpickles that module's read function first, so it has the wrapper
before its executor starts; the driver gets it when it builds the stream.
"""

from __future__ import annotations

import functools
import logging
import time

log = logging.getLogger(__name__)

# How long an idle scheduling loop waits before it looks again.
IDLE_WAIT_S = 0.05

_MARK = "_rtrain_idle_wait"


def install() -> bool:
    """Wrap Ray Data's scheduling loop step (module doc). True if it is wrapped now or already was;
    False (and a debug line) on a Ray whose executor does not have the method this wraps."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # pragma: no cover - a Ray without Ray Data
        return False
    step = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if step is None:
        log.debug("Ray Data's StreamingExecutor has no _scheduling_loop_step: idle wait not installed")
        return False
    if getattr(step, _MARK, False):
        return True

    @functools.wraps(step)
    def scheduling_loop_step(self, topology):
        before = progress(topology)
        more = step(self, topology)
        if more and not getattr(self, "_shutdown", False) and progress(topology) == before:
            time.sleep(IDLE_WAIT_S)
        return more

    setattr(scheduling_loop_step, _MARK, True)
    StreamingExecutor._scheduling_loop_step = scheduling_loop_step
    return True


# Ray Data's per-operator counters that move whenever a step does work: blocks taken in, task
# outputs read, blocks handed on, tasks started and ended.
PROGRESS_COUNTERS = ("num_inputs_received", "num_task_outputs_generated", "num_outputs_taken",
                     "num_tasks_submitted", "num_tasks_finished")


def progress(topology) -> tuple:
    """The executor's progress counters, one tuple for all operators of `topology`."""
    return tuple(getattr(op.metrics, name, 0) for op in topology for name in PROGRESS_COUNTERS)
