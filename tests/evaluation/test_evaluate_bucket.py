"""Evaluation's reads of shards in a bucket (moto's S3 server on 127.0.0.1, no Ray): the ground
truth, the val batches (square and rect) and `python -m rtrain.evaluate --shards s3://...` equal
those of the same shards on disk; a bucket prefix without a whole set is one line naming it."""

from __future__ import annotations

import json

import pytest
import torch
from bucket_shards import local_and_bucket_sets
from inference_fixtures import cli_error, make_weights, one_thread

from data_prep import locations
from data_prep.shard_format import read_manifest
from rtrain.evaluate import main
from rtrain.evaluation.coco import coco_gt_from_shards
from rtrain.evaluation.sharded import val_batches


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture
def sets(s3_bucket, tmp_path):
    return local_and_bucket_sets(s3_bucket, tmp_path, "val")


def test_ground_truth_and_val_batches_from_a_bucket_equal_the_local_ones(sets):
    local, remote = sets
    assert coco_gt_from_shards(remote).dataset == coco_gt_from_shards(local).dataset
    for rect in (False, True):
        for rank in (1,):  # rank 1 of 2: the rank's own rows, from the bucket
            kw = {"batch_size": 8, "img_size": 64, "rank": rank, "world": 2, "threads": 1, "rect": rect}
            for x, y in zip(val_batches(local, **kw), val_batches(remote, **kw), strict=True):
                assert all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))


def test_evaluate_on_bucket_shards_equals_local_and_refuses_half_sets(sets, tmp_path, capsys):
    local, remote = sets
    names = [c["name"] for c in read_manifest(local)["classes"]]
    weights = make_weights(tmp_path / "best.pt", variant="compact_n", class_names=names, img_size=64)
    outs = {}
    for where, shards in (("local", local), ("bucket", remote)):
        outs[where] = tmp_path / f"{where}.json"
        assert main(["--weights", str(weights), "--shards", str(shards), "--out", str(outs[where]),
                     "--device", "cpu"]) == 0
    got, want = (json.loads(outs[w].read_text()) for w in ("bucket", "local"))
    assert got["settings"]["shards"] == remote and got["eval_images"] == 30
    timing = {"settings", "eval_time_s"}
    assert ({k: v for k, v in got.items() if k not in timing}
            == {k: v for k, v in want.items() if k not in timing})

    capsys.readouterr()
    missing = remote.replace("/val", "/nothing")
    assert cli_error(capsys, main, ["--weights", str(weights), "--shards", missing]) == (
        f"rtrain.evaluate: error: {missing}: shard directory not found (no manifest.json)")
    locations.remove(f"{remote}/manifest.json")  # as a shard run cut short leaves it
    err = cli_error(capsys, main, ["--weights", str(weights), "--shards", remote])
    assert err.startswith(f"rtrain.evaluate: error: {remote}/manifest.json: manifest not found")
    err = cli_error(capsys, main, ["--weights", str(weights), "--shards", "az://b/val"])
    assert err.startswith("rtrain.evaluate: error: --shards az://b/val: the az:// scheme is not supported")
