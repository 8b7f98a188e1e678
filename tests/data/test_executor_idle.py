"""rtrain.data.executor_idle against a real Ray Data execution: a consumer that stops taking
batches leaves the executor backpressured, and its scheduling loop then waits between steps
instead of going round without a pause (Ray 2.60 ran ~730 steps in 2 idle seconds here; with the
wait at most one step per IDLE_WAIT_S)."""

from __future__ import annotations

import time

import pytest

from rtrain.data import executor_idle


@pytest.mark.ray
def test_a_backpressured_executor_waits_between_steps_instead_of_spinning(ray_session, monkeypatch):
    import ray.data
    from ray.data import ExecutionResources
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    class Identity:  # defined here: Ray pickles it by value, the workers cannot import tests/
        def __call__(self, batch):
            return batch

    assert executor_idle.install() and executor_idle.install()  # idempotent
    steps: list[float] = []
    step = StreamingExecutor._scheduling_loop_step

    def counting(self, topology):
        steps.append(time.monotonic())
        return step(self, topology)

    monkeypatch.setattr(StreamingExecutor, "_scheduling_loop_step", counting)
    ds = ray.data.range_tensor(4000, shape=(64, 64), override_num_blocks=400).map_batches(
        Identity, batch_size=10, compute=ray.data.ActorPoolStrategy(size=1))  # as the decode pool
    ds.context.enable_progress_bars = False
    # A small budget: the executor stops reading task outputs long before the data runs out.
    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=4 * 1024**2)
    it = iter(ds.iter_batches(batch_size=10))
    next(it)  # the consumer takes one batch, then stops
    time.sleep(3.0)  # the pipeline fills its budget
    start = time.monotonic()
    time.sleep(2.0)
    idle_steps = sum(1 for t in steps if start <= t < start + 2.0)
    assert 0 < idle_steps <= 2.0 / executor_idle.IDLE_WAIT_S + 10, idle_steps
    assert len(next(it)["data"]) == 10  # and it still serves the consumer when it comes back
    del it

