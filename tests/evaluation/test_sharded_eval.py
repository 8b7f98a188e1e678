"""Validation sharded across ranks: the ranks' rows partition the val set; batches equal the serial path."""

from __future__ import annotations

import pytest
import torch

from rtrain.data.batches import iter_batches_local
from rtrain.evaluation.sharded import _rows_of_rank, val_batches, validate_sharded
from rtrain.training.quickstart import prepare_synthetic

# An untrained head scores every anchor near its 0.01 prior: a threshold there would make the
# detection count hinge on last-bit rounding, so the test scores above the prior's cluster.
EVAL = {"batch_size": 4, "score_thresh": 0.05}


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


def _validate_rank(rank: int, port: int, val: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from rtrain.config import config_from_dict
    from rtrain.evaluation.coco import coco_gt_from_shards
    from rtrain.models import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)  # the same arithmetic as the one-rank run in the parent
        torch.manual_seed(0)
        model = build_model("compact_n", 6)
        cfg = config_from_dict({"data": {"val": val, "img_size": 96}, "eval": EVAL})
        gt = coco_gt_from_shards(val) if rank == 0 else None
        metrics = validate_sharded(model, cfg, gt, list(range(1, 7)), [str(i) for i in range(6)],
                                   device="cpu", rank=rank, world=2)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_the_whole_val_set_as_one_rank_does(val_shards, tmp_path):
    """The ranks' shares are gathered on rank 0: the same images, detections and mAP as one rank."""
    import json
    import socket

    import torch.multiprocessing as mp

    from rtrain.config import config_from_dict
    from rtrain.evaluation.coco import coco_gt_from_shards
    from rtrain.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("compact_n", 6)
    cfg = config_from_dict({"data": {"val": str(val_shards), "img_size": 96}, "eval": EVAL})
    one = validate_sharded(model, cfg, coco_gt_from_shards(val_shards), list(range(1, 7)),
                           [str(i) for i in range(6)], device="cpu")
    torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.json"
    mp.spawn(_validate_rank, args=(port, str(val_shards), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert two["eval_images"] == one["eval_images"] > 0
    assert two["eval_detections"] == one["eval_detections"]
    # an untrained model: separate processes (their own thread counts) round scores differently,
    # which reorders near-ties; a lost or doubled share would move these far more
    assert two["mAP"] == pytest.approx(one["mAP"], rel=0.05)
