"""The synthetic shapes dataset: deterministic, valid COCO, boxes that hug the drawn shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.synthetic import CLASS_NAMES, make_synthetic, render_image


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_same_seed_same_annotations_other_seed_differs(tmp_path):
    a = make_synthetic(tmp_path / "a", images=24, seed=3, size=128)
    b = make_synthetic(tmp_path / "b", images=24, seed=3, size=128)
    c = make_synthetic(tmp_path / "c", images=24, seed=4, size=128)
    ja, jb, jc = (_load(p.annotations["all"]) for p in (a, b, c))
    assert ja == jb
    assert ja["annotations"] != jc["annotations"]
    assert (a.images / "000001.jpg").read_bytes() == (b.images / "000001.jpg").read_bytes()


def test_coco_fields_and_boxes_inside_images(tmp_path):
    paths = make_synthetic(tmp_path, images=60, seed=0, size=160)
    coco = _load(paths.annotations["all"])
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    assert len(coco["images"]) == 60
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for im in coco["images"]:
        with Image.open(paths.images / im["file_name"]) as img:
            assert img.size == (160, 160) and img.mode == "RGB"
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        # 8%-45% of the side, less only where a neighbour hides part of the shape.
        assert 0.03 * 160 <= max(w, h) <= 0.45 * 160 + 1
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
    used = {a["category_id"] for a in coco["annotations"]}
    assert used == set(range(1, len(CLASS_NAMES) + 1))
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    negatives = len(coco["images"]) - len(with_boxes)
    assert 1 <= negatives <= 20, negatives
    assert max(sum(a["image_id"] == i for a in coco["annotations"]) for i in sizes) <= 6


def test_boxes_are_tight_around_drawn_pixels():
    """Every box's four edge rows/columns hold changed pixels, and most pixels inside changed."""
    checked = 0
    for index in range(40):
        sample = render_image(seed=7, index=index, size=128)
        image, background = np.asarray(sample.image, np.int16), np.asarray(sample.background, np.int16)
        diff = np.abs(image - background).sum(-1) > 0
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            inside = diff[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert inside.sum() >= obj.area * 0.99  # the visible pixels really differ from background
            checked += 1
    assert checked > 50


def test_val_split_layout(tmp_path):
    paths = make_synthetic(tmp_path, images=20, seed=1, size=96, val_fraction=0.25)
    assert set(paths.annotations) == {"train", "val"}
    assert not (tmp_path / "annotations.json").exists()
    train, val = _load(paths.annotations["train"]), _load(paths.annotations["val"])
    assert [im["id"] for im in train["images"]] == list(range(1, 16))
    assert [im["id"] for im in val["images"]] == list(range(16, 21))
    assert all(a["image_id"] >= 16 for a in val["annotations"])
    assert len({a["id"] for a in train["annotations"] + val["annotations"]}) == (
        len(train["annotations"]) + len(val["annotations"])
    )


def test_cli_and_bad_arguments(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--images", "5", "--size", "64"],
        capture_output=True, text=True, check=True,
    )
    assert "annotations.json" in done.stdout
    assert len(list((out / "images").glob("*.jpg"))) == 5
    bad = subprocess.run(
        [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--images", "0"],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "--images" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="val-fraction"):
        make_synthetic(tmp_path / "x", images=3, val_fraction=0.01)


def test_round_trip_through_shard_cli_and_inspect(tmp_path):
    paths = make_synthetic(tmp_path / "syn", images=12, seed=5, size=128, val_fraction=0.25)
    out = tmp_path / "shards"
    done = subprocess.run(
        [sys.executable, "-m", "data_prep.shard", "--format", "coco", "--annotations",
         str(paths.annotations["train"]), "--images", str(paths.images), "--out", str(out),
         "--size", "96", "--workers", "1"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    coco = _load(paths.annotations["train"])
    manifest = _load(out / "manifest.json")
    assert [c["name"] for c in manifest["classes"]] == list(CLASS_NAMES)
    assert manifest["counts"]["images"] == 9 and manifest["counts"]["boxes"] == len(coco["annotations"])
    rows = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    for row in rows:
        anns = [a for a in coco["annotations"] if a["image_id"] == row["image_id"]]
        assert row["labels"] == [a["category_id"] - 1 for a in anns]
        want = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        got = np.array(row["boxes"]).reshape(-1, 4)
        assert got.shape == want.shape and np.abs(got - want * 96 / 128).max(initial=0) <= 1
    sheet_png = tmp_path / "sheet.png"
    shown = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(out), "--n", "4", "--out",
                            str(sheet_png), "--cell", "96"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "circle" in shown.stdout and f"{manifest['counts']['boxes']} boxes" in shown.stdout
    with Image.open(sheet_png) as im:
        assert im.size == (192, 192)
