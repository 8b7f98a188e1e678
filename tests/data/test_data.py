"""Shard checks (no Ray), the in-process iterator, and the Ray Data path on tiny BCCD shards."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_prep.shard_format import SCHEMA
from rtrain.data.augment import AugmentParams
from rtrain.data.batches import (
    DetectionCollate,
    ShardError,
    batch_to_targets,
    boxes_to_original,
    build_dataset,
    iter_batches_local,
    list_shards,
    make_epoch_clock,
    read_manifest,
    set_epoch,
)

CLASSES = ["RBC", "WBC", "Platelets"]
N_IMAGES, PER_SHARD, SIZE = 10, 4, 128


def _bccd_rows(bccd: Path, n: int) -> list[dict]:
    """The first n BCCD images (640x480, already the stored size) with their VOC boxes."""
    rows = []
    for i, xml in enumerate(sorted((bccd / "Annotations").glob("*.xml"))[:n]):
        root = ET.parse(xml).getroot()
        name = root.findtext("filename")
        boxes, labels = [], []
        for obj in root.iter("object"):
            b = obj.find("bndbox")
            x1, y1, x2, y2 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x2 > x1 and y2 > y1:
                boxes += [x1, y1, x2, y2]
                labels.append(CLASSES.index(obj.findtext("name").strip()))
        rows.append(
            {
                "image_id": 1000 + i,
                "file_name": name,
                "jpeg": (bccd / "JPEGImages" / name).read_bytes(),
                "width": 640,
                "height": 480,
                "orig_width": 640,
                "orig_height": 480,
                "boxes": boxes,
                "labels": labels,
                "iscrowd": [False] * len(labels),
            }
        )
    rows[1].update(boxes=[], labels=[], iscrowd=[])  # an image without boxes
    return rows


def _write(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(rows), PER_SHARD):
        pq.write_table(
            pa.Table.from_pylist(rows[k : k + PER_SHARD], schema=SCHEMA), out / f"s-{k:05d}.parquet"
        )
    classes = [{"index": i, "name": n, "category_id": i + 1} for i, n in enumerate(CLASSES)]
    (out / "manifest.json").write_text(json.dumps({"classes": classes}))
    return out


@pytest.fixture(scope="module")
def rows(shared_data) -> list[dict]:
    return _bccd_rows(shared_data / "bccd", N_IMAGES)


@pytest.fixture(scope="module")
def shards(rows, tmp_path_factory) -> Path:
    return _write(rows, tmp_path_factory.mktemp("shards"))


def _letterboxed(row: dict) -> np.ndarray:
    r = SIZE / 640
    top = (SIZE - int(480 * r)) // 2
    return np.asarray(row["boxes"], np.float32).reshape(-1, 4) * r + np.array([0, top, 0, top], np.float32)


# ---------------------------------------------------------------- errors (no Ray)


def test_list_shards_and_manifest_ok(shards):
    files = list_shards(shards)
    assert [Path(f).name for f in files] == ["s-00000.parquet", "s-00004.parquet", "s-00008.parquet"]
    assert [c["name"] for c in read_manifest(shards)["classes"]] == CLASSES


def test_errors_name_the_file(rows, tmp_path):
    with pytest.raises(ShardError, match="nope: shard directory not found"):
        list_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"empty: no \*\.parquet shards"):
        list_shards(tmp_path / "empty")
    with pytest.raises(ShardError, match=r"empty/manifest.json: manifest not found"):
        read_manifest(tmp_path / "empty")

    bad = _write(rows[:2], tmp_path / "badjson")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"badjson/manifest.json: unreadable manifest"):
        read_manifest(bad)
    (bad / "manifest.json").write_text(json.dumps({"classes": [{"index": 1, "name": "a", "category_id": 1}]}))
    with pytest.raises(ShardError, match=r"manifest.json: classes\[0\] has index 1"):
        read_manifest(bad)

    cut = _write(rows[:6], tmp_path / "cut")
    victim = cut / "s-00004.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])  # footer gone
    with pytest.raises(ShardError, match=r"cut/s-00004.parquet: unreadable Parquet \(truncated\?\)"):
        list_shards(cut)

    wrong = tmp_path / "wrong"
    _write(rows[:2], wrong)
    t = pq.read_table(wrong / "s-00000.parquet")
    t = t.set_column(
        t.schema.get_field_index("boxes"), "boxes", t.column("boxes").cast(pa.list_(pa.float64()))
    )
    pq.write_table(t, wrong / "s-00000.parquet")
    with pytest.raises(ShardError, match=r"wrong/s-00000.parquet: column 'boxes' is list<element: double>"):
        list_shards(wrong)
    pq.write_table(t.drop_columns(["jpeg", "iscrowd"]), wrong / "s-00000.parquet")
    with pytest.raises(ShardError, match=r"s-00000.parquet: not a shard: missing column\(s\) jpeg, iscrowd"):
        list_shards(wrong)


# ---------------------------------------------------------------- in-process iterator


def test_iter_batches_local_val_boxes_are_letterboxed_source(rows, shards):
    by_id = {r["image_id"]: r for r in rows}
    seen = []
    for batch in iter_batches_local(shards, batch_size=3, train=False, img_size=SIZE):  # crosses files
        assert batch["images"].shape[1:] == (3, SIZE, SIZE) and batch["images"].dtype == torch.uint8
        targets = batch_to_targets(batch, "cpu")
        for i, image_id in enumerate(batch["image_id"].tolist()):
            row = by_id[image_id]
            np.testing.assert_allclose(targets[i]["boxes"].numpy(), _letterboxed(row), rtol=1e-6)
            assert targets[i]["labels"].tolist() == row["labels"]
            back = boxes_to_original(
                targets[i]["boxes"],
                batch["scale"][i],
                batch["pad"][i],
                batch["stored_size"][i],
                batch["orig_size"][i],
            )
            np.testing.assert_allclose(back.numpy(), np.reshape(row["boxes"], (-1, 4)), atol=1e-3)
            seen.append(image_id)
    assert sorted(seen) == sorted(by_id)


def test_iter_batches_local_train_shuffle_and_epochs(shards):
    aug = AugmentParams(mosaic=0.0)
    a = list(
        iter_batches_local(shards, batch_size=4, train=True, img_size=SIZE, aug=aug, epoch=0, shuffle=True)
    )
    b = list(
        iter_batches_local(shards, batch_size=4, train=True, img_size=SIZE, aug=aug, epoch=0, shuffle=True)
    )
    c = list(
        iter_batches_local(shards, batch_size=4, train=True, img_size=SIZE, aug=aug, epoch=1, shuffle=True)
    )
    assert [x["image_id"].tolist() for x in a] == [x["image_id"].tolist() for x in b]
    assert [x["image_id"].tolist() for x in a] != [x["image_id"].tolist() for x in c]
    assert torch.equal(a[0]["images"], b[0]["images"])
    assert sum(len(x["image_id"]) for x in a) == N_IMAGES
    assert all(x["boxes"].shape[0] == x["labels"].shape[0] == x["images"].shape[0] for x in a)


# ---------------------------------------------------------------- Ray Data


def _collect(ds, batch_size):
    out = {}
    for batch in ds.iter_torch_batches(
        batch_size=batch_size, collate_fn=DetectionCollate(), prefetch_batches=1
    ):
        b = batch["images"].shape[0]
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (b, 3, SIZE, SIZE)
        m = batch["boxes"].shape[1]
        assert m >= 1 and batch["boxes"].shape == (b, m, 4) and batch["boxes"].dtype == torch.float32
        assert batch["labels"].shape == (b, m) and batch["labels"].dtype == torch.int64
        assert batch["iscrowd"].shape == (b, m) and batch["iscrowd"].dtype == torch.bool
        assert batch["image_id"].dtype == torch.int64 and batch["scale"].dtype == torch.float32
        assert batch["pad"].shape == (b, 2) and batch["orig_size"].shape == batch["stored_size"].shape == (
            b,
            2,
        )
        for i in range(b):
            out[int(batch["image_id"][i])] = {k: v[i] for k, v in batch.items()}
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_ray_dataset_streams_val_and_train(ray_session, rows, shards):
    by_id = {r["image_id"]: r for r in rows}
    val = build_dataset(shards, train=False, img_size=SIZE, num_actors=1, cpus_per_actor=0.5, batch_rows=4)
    got = _collect(val, batch_size=3)
    assert sorted(got) == sorted(by_id)
    local = {}
    for batch in iter_batches_local(shards, batch_size=4, train=False, img_size=SIZE):
        local.update({int(i): batch["images"][k] for k, i in enumerate(batch["image_id"])})
    for image_id, item in got.items():
        n = len(by_id[image_id]["labels"])
        np.testing.assert_allclose(item["boxes"][:n].numpy(), _letterboxed(by_id[image_id]), rtol=1e-6)
        assert item["labels"][:n].tolist() == by_id[image_id]["labels"]
        assert (item["labels"][n:] == -1).all() and (item["boxes"][n:] == 0).all()
        assert item["scale"] == pytest.approx(SIZE / 640) and item["pad"].tolist() == [0.0, 16.0]
        assert item["orig_size"].tolist() == [640, 480]
        assert torch.equal(item["images"], local[image_id])

    # train (actor pool this time): the epoch reaches the seed through the clock; results match
    # the local path image by image
    clock = make_epoch_clock()
    aug = AugmentParams(mosaic=0.0)
    train = build_dataset(
        shards,
        train=True,
        img_size=SIZE,
        aug=aug,
        seed=5,
        epoch=clock,
        num_actors=1,
        cpus_per_actor=0.5,
        batch_rows=4,
        pool="actors",
    )
    set_epoch(clock, 3)
    got = _collect(train, batch_size=4)
    want = {}
    for batch in iter_batches_local(
        shards, batch_size=4, train=True, img_size=SIZE, aug=aug, seed=5, epoch=3
    ):
        want.update({int(i): batch["images"][k] for k, i in enumerate(batch["image_id"])})
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[i]["images"], want[i]) for i in got)
