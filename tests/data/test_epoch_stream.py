"""The training stream's order: per-epoch shuffles of compact rows, whole batches, exact resume."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
from fit_configs import stream_shards

from rtrain.data.epoch_stream import EPOCH_COLUMN, StreamPlan, emit_items, plan_epoch, read_window


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return stream_shards(tmp_path_factory.mktemp("stream"))


def _ids(plan: StreamPlan, epoch: int) -> list[int]:
    windows = (read_window(plan, epoch, w) for w in range(plan.windows_per_epoch))
    return [i for table in windows for i in table["image_id"].to_pylist()]


def test_every_epoch_is_whole_global_batches_of_distinct_rows_in_a_new_order(shards):
    plan = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, seed=7, window_rows=16)
    assert len(plan.files) == 3 and plan.num_rows == 50
    assert plan.rows_per_epoch == 48 and plan.steps_per_epoch == 6 and plan.windows_per_epoch == 3
    orders = [_ids(plan, e) for e in range(4)]
    for ids in orders:
        assert len(ids) == 48 and len(set(ids)) == 48  # two rows left out, never one seen twice
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert _ids(plan, 2) == orders[2]  # ... that is a function of (seed, epoch) alone
    other_seed = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, seed=8, window_rows=16)
    assert _ids(other_seed, 2) != orders[2]
    # a row's batch neighbours (its mosaic partners) change from epoch to epoch
    def neighbours(order, row):
        k = order.index(row) // 4
        return set(order[4 * k: 4 * k + 4])

    row = orders[0][0]
    assert len({frozenset(neighbours(o, row)) for o in orders if row in o}) > 1
    for windows in (plan_epoch(plan, e) for e in range(4)):
        sizes = [sum(b - a for _, a, b in w) for w in windows]
        assert sizes == [16, 16, 16]


def test_a_dataset_smaller_than_a_global_batch_is_repeated_to_fill_one(shards):
    plan = StreamPlan.from_shards(shards, batch_rows=32, world_size=2, seed=0)
    assert plan.rows_per_epoch == 64 and plan.steps_per_epoch == 1
    counts = Counter(_ids(plan, 0))
    assert sum(counts.values()) == 64 and len(counts) == 50 and max(counts.values()) == 2


def test_items_before_the_start_epoch_read_nothing_and_blocks_are_one_batch(shards):
    plan = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, seed=7, window_rows=16)
    items = {"id": np.arange(2 * plan.windows_per_epoch, 4 * plan.windows_per_epoch)}  # epochs 2, 3
    blocks = list(emit_items(items, plan=plan, clock=3))
    assert len(blocks) == 12 and all(b.num_rows == 4 for b in blocks)
    assert set(b[EPOCH_COLUMN].to_pylist()[0] for b in blocks) == {3}
    assert [i for b in blocks for i in b["image_id"].to_pylist()] == _ids(plan, 3)


@pytest.mark.ray
@pytest.mark.slow
def test_preserve_order_deals_each_worker_the_same_rows_from_any_start_epoch(ray_session, shards):
    """Under preserve_order worker r gets batches r, r + W, ... of every epoch, so a group that
    restarts at epoch s sees exactly the rows the uninterrupted run saw from epoch s on."""
    from rtrain.data.batches import make_epoch_clock
    from rtrain.data.epoch_stream import build_train_stream, set_start_epoch

    plan = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, seed=7, window_rows=16)

    def run(start: int) -> dict[int, list[list[int]]]:
        clock = make_epoch_clock()
        set_start_epoch(clock, start)
        ds = build_train_stream(plan, epochs=3, clock=clock)
        ds.context.execution_options.preserve_order = True
        splits = ds.streaming_split(2, equal=True)
        got: dict[int, list[list[int]]] = {0: [], 1: []}

        def consume(rank: int) -> None:
            for batch in splits[rank].iter_batches(batch_size=4, batch_format="numpy"):
                got[rank].append(batch["image_id"].tolist())

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        return got

    full, resumed = run(0), run(1)
    for rank in range(2):
        want = [b for e in range(3) for b in np.reshape(_ids(plan, e), (-1, 4)).tolist()][rank::2]
        assert full[rank] == want
        assert resumed[rank] == want[plan.steps_per_epoch:]
