"""Validation sharded across ranks: the ranks' rows partition the val set; batches equal the serial path."""

from __future__ import annotations

import pytest
import torch

from rtrain.data import iter_batches_local
from rtrain.quickstart import prepare_synthetic
from rtrain.sharded_eval import _rows_of_rank, val_batches


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    _, val = prepare_synthetic(tmp_path_factory.mktemp("val"), images=60, size=96, seed=2)
    return val


def test_ranks_partition_the_val_rows(val_shards):
    everything = [i for c in _rows_of_rank(val_shards, 0, 1, 5) for i in c["image_id"].to_pylist()]
    assert len(everything) == len(set(everything)) > 0
    for world in (2, 3):
        parts = [[i for c in _rows_of_rank(val_shards, r, world, 4) for i in c["image_id"].to_pylist()]
                 for r in range(world)]
        assert sorted(i for p in parts for i in p) == sorted(everything)
        assert all(abs(len(p) - len(everything) / world) < 1 for p in parts)


def test_threaded_batches_equal_the_serial_path_in_order(val_shards):
    serial = list(iter_batches_local(val_shards, batch_size=4, train=False, img_size=96))
    threaded = list(val_batches(val_shards, batch_size=4, img_size=96, threads=2))
    assert [b["image_id"].tolist() for b in threaded] == [b["image_id"].tolist() for b in serial]
    for a, b in zip(threaded, serial, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
