"""Training's reads of shards in a bucket (moto's S3 server on 127.0.0.1, no Ray): the shard list,
the stream plan and every window of the train stream equal those of the same shards on disk."""

from __future__ import annotations

import pytest
import torch
from bucket_shards import local_and_bucket_sets

from data_prep import locations
from rtrain.data.augment import AugmentParams
from rtrain.data.batches import ShardError, iter_batches_local, list_shards
from rtrain.data.epoch_stream import StreamPlan, emit_items, read_window


@pytest.fixture
def sets(s3_bucket, tmp_path):
    return local_and_bucket_sets(s3_bucket, tmp_path, "train")


def test_the_stream_plan_and_its_windows_from_a_bucket_equal_the_local_ones(sets):
    local, remote = sets
    assert list_shards(remote) == [f"{remote}/part-0000{i}.parquet" for i in range(4)]
    kw = {"batch_rows": 4, "world_size": 2, "seed": 7, "window_rows": 16}
    a, b = StreamPlan.from_shards(local, **kw), StreamPlan.from_shards(remote, **kw)
    assert b.files == tuple(list_shards(remote)) and b.row_counts == a.row_counts == (8, 8, 8, 6)
    for epoch in (0, 1):
        for w in range(a.windows_per_epoch):
            assert read_window(b, epoch, w).equals(read_window(a, epoch, w))
    blocks = list(emit_items({"id": list(range(2 * b.windows_per_epoch))}, plan=b, clock=(1, 2)))
    assert [t.num_rows for t in blocks] == [4] * (b.rows_per_epoch // 4 - 2)  # epoch 1 less 2 blocks


def test_local_batches_from_a_bucket_equal_the_local_ones(sets):
    local, remote = sets
    kw = {"batch_size": 8, "train": True, "img_size": 64, "aug": AugmentParams(), "seed": 3, "epoch": 1,
          "shuffle": True}
    for x, y in zip(iter_batches_local(local, **kw), iter_batches_local(remote, **kw), strict=True):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))


def test_a_truncated_shard_in_the_bucket_is_named(sets):
    _, remote = sets
    part = f"{remote}/part-00002.parquet"
    locations.write_bytes(part, locations.read_bytes(part)[:-100])
    with pytest.raises(ShardError) as info:
        StreamPlan.from_shards(remote, batch_rows=4, world_size=1, seed=0)
    msg = str(info.value)
    assert msg.startswith(f"{part}: unreadable Parquet (truncated?): ") and "\n" not in msg
