"""COCO reader + shard writer on coco128 (real data): classes, crowd boxes, round trip, bad JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import shard

# Of the fixture's 12 coco128 images: 86 grayscale, 149 crowd, 250 no boxes (tests/fixtures/data/README.md).
SUBSET = [30, 86, 143, 149, 250, 326, 349, 472, 643]  # 643: crowd, and the only bowls


def rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]


@pytest.fixture
def coco128(shared_data):
    root = shared_data / "coco128"
    return root / "annotations" / "instances_train2017.json", root / "train2017"


@pytest.fixture
def subset_json(coco128, tmp_path):
    data = json.loads(coco128[0].read_text())
    data["images"] = [i for i in data["images"] if i["id"] in SUBSET]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in SUBSET]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(data))
    return path, data


def run(*argv) -> int:
    return shard.main([str(a) for a in argv])


def not_rgb(images: Path, data: dict) -> int:
    """How many of data's images are stored in another mode than RGB (the reader converts them)."""
    return sum(Image.open(images / i["file_name"]).mode != "RGB" for i in data["images"])


def negatives(data: dict) -> int:
    with_boxes = {a["image_id"] for a in data["annotations"]}
    return sum(i["id"] not in with_boxes for i in data["images"])


def test_subset_round_trip(subset_json, coco128, tmp_path, capsys):
    path, data = subset_json
    out = tmp_path / "out"
    assert run("--format", "coco", "--annotations", path, "--images", coco128[1], "--out", out,
               "--size", 160, "--rows-per-shard", 5, "--workers", 2) == 0
    n = len(SUBSET)
    assert f"{n} images written" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    # All 80 declared categories kept, sorted by COCO id, with their own ids.
    cats = sorted(data["categories"], key=lambda c: c["id"])
    assert [(c["index"], c["name"], c["category_id"]) for c in m["classes"]] == [
        (i, c["name"], c["id"]) for i, c in enumerate(cats)]
    assert [s["rows"] for s in m["shards"]] == [min(5, n - k) for k in range(0, n, 5)]
    assert m["counts"]["negatives"] == negatives(data) == 1 and m["counts"]["images"] == n
    assert m["issue_counts"] == {"L image converted to RGB": not_rgb(coco128[1], data)} == {
        "L image converted to RGB": 1}

    got = rows(out)
    assert [r["image_id"] for r in got] == sorted(SUBSET)
    index_of = {c["category_id"]: c["index"] for c in m["classes"]}
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for r in got:
        assert max(r["width"], r["height"]) == 160
        src = next(i for i in data["images"] if i["id"] == r["image_id"])
        assert (r["orig_width"], r["orig_height"]) == (src["width"], src["height"])
        anns = by_image.get(r["image_id"], [])
        assert len(r["labels"]) == len(anns)
        boxes = np.array(r["boxes"], dtype=np.float64).reshape(-1, 4)
        boxes[:, [0, 2]] *= r["orig_width"] / r["width"]
        boxes[:, [1, 3]] *= r["orig_height"] / r["height"]
        for box, lab, crowd, a in zip(boxes, r["labels"], r["iscrowd"], anns, strict=True):
            x, y, w, h = a["bbox"]
            ref = np.clip([x, y, x + w, y + h], 0, [src["width"], src["height"]] * 2)
            assert np.abs(box - ref).max() < 1.0
            assert lab == index_of[a["category_id"]]
            assert crowd == bool(a["iscrowd"])
    assert any(any(r["iscrowd"]) for r in got)  # image 149's crowd box is kept, flagged


def test_full_coco128_keeps_declared_classes(coco128, tmp_path):
    """Every image and box of the (fixture's) coco128 json, and all its declared categories, used or not."""
    data = json.loads(coco128[0].read_text())
    used = {a["category_id"] for a in data["annotations"]}
    crowd = sum(bool(a["iscrowd"]) for a in data["annotations"])
    assert len(used) < len(data["categories"]) == 80 and crowd > 0  # what this test is about is there
    out = tmp_path / "out"
    assert run("--format", "coco", "--annotations", coco128[0], "--images", coco128[1], "--out", out,
               "--size", 64, "--rows-per-shard", 4, "--workers", 2) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_classes"] == 80
    assert {c["category_id"] for c in m["classes"] if c["boxes"] > 0} == used
    n_boxes = len(data["annotations"])
    assert m["counts"] == {"images": len(data["images"]), "boxes": n_boxes, "negatives": negatives(data),
                           "crowd_boxes": crowd, "skipped_images": 0, "repaired": not_rgb(coco128[1], data),
                           "dropped_boxes": 0}
    assert sum(c["boxes"] for c in m["classes"]) == n_boxes
    per_class = {c["category_id"]: c["boxes"] for c in m["classes"]}
    assert per_class == {c["id"]: sum(a["category_id"] == c["id"] for a in data["annotations"])
                         for c in data["categories"]}


def test_annotation_faults_listed(subset_json, coco128, tmp_path):
    path, data = subset_json
    data["images"].append(dict(data["images"][0]))  # duplicate id
    data["images"].append({"id": 900001, "file_name": "../../etc/passwd", "width": 10, "height": 10})
    data["images"].append({"id": 900002, "file_name": "/etc/hostname", "width": 10, "height": 10})
    data["images"].append({"id": 900003, "file_name": "nope.jpg", "width": 10, "height": 10})
    a = dict(data["annotations"][0], id=777001, category_id=999)  # unknown category
    b = dict(data["annotations"][0], id=777002, image_id=424242)  # unknown image
    c = dict(data["annotations"][0], id=777003, bbox=[10, 10, 0, 5])  # zero width
    data["annotations"] += [a, b, c]
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert run("--format", "coco", "--annotations", path, "--images", coco128[1], "--out", out,
               "--size", 96, "--workers", 1) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["images"] == len(SUBSET)
    ic = m["issue_counts"]
    assert ic["duplicate image id"] == 1
    assert ic["file name escapes the image root"] == 2
    assert ic["missing image file"] == 1
    assert ic["unknown category id"] == 1
    assert ic["annotation of an unknown image id"] == 1
    assert ic["zero or negative area box"] == 1
    assert m["counts"]["skipped_images"] == 4
    assert {i["item"] for i in m["issues"] if i["reason"] == "unknown category id"} == {"annotation 777001"}


def test_classes_from_freezes_indices(subset_json, coco128, tmp_path):
    path, data = subset_json
    train = tmp_path / "train"
    # A "train" manifest with only two classes, in reverse order: val must follow it.
    train.mkdir()
    (train / "manifest.json").write_text(json.dumps({"classes": [
        {"index": 0, "name": "person", "category_id": 1}, {"index": 1, "name": "bowl", "category_id": 51}]}))
    out = tmp_path / "val"
    assert run("--format", "coco", "--annotations", path, "--images", coco128[1], "--out", out,
               "--size", 96, "--workers", 1, "--classes-from", train / "manifest.json") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in m["classes"]] == ["person", "bowl"]
    n_person = sum(a["category_id"] == 1 for a in data["annotations"])
    n_bowl = sum(a["category_id"] == 51 for a in data["annotations"])
    assert n_person > 0 and n_bowl > 0
    assert [c["boxes"] for c in m["classes"]] == [n_person, n_bowl]
    n_other = len(data["annotations"]) - n_person - n_bowl
    assert m["issue_counts"]["class not in --classes-from list"] == n_other
    assert all(set(r["labels"]) <= {0, 1} for r in rows(out))


def test_malformed_json_one_line_error(tmp_path, coco128, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,,}\n]}')
    out = tmp_path / "out"
    assert run("--format", "coco", "--annotations", bad, "--images", coco128[1], "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2:" in err and "malformed JSON" in err
    assert not out.exists()
