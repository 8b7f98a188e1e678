"""YOLO reader on small layouts made in tmp_path: boxes, negatives, broken lines, YAML faults, EXIF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.imaging import orient_box
from data_prep.records import DatasetError, Issue, SourceImage
from data_prep.yolo import read_yolo


def _image(path: Path, w: int, h: int, exif_orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (w, h), (90, 120, 150))
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    else:
        im.save(path)


def _label(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _split(stream) -> tuple[list[SourceImage], list[Issue]]:
    items = list(stream)
    return [x for x in items if isinstance(x, SourceImage)], [x for x in items if isinstance(x, Issue)]


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    (root).mkdir()
    (root / "data.yaml").write_text("names: [cat, dog]\nnc: 2\n")
    _image(root / "images/train/a.jpg", 200, 100)
    _label(root / "labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.5 0.5\n")
    _image(root / "images/train/b.jpg", 64, 64)  # no label file: negative
    _image(root / "images/train/c.png", 100, 100)
    _label(root / "labels/train/c.txt", "\n".join([
        "1 0.5 0.5 0.1",  # line 1: 4 columns
        "x 0.5 0.5 0.1 0.1",  # line 2: non-numeric
        "",  # line 3: blank, ignored
        "5 0.5 0.5 0.1 0.1",  # line 4: class out of range
        "1 0.2 0.2 0.1 0.1",  # line 5: good
        "0 0.5 0.5 0 0.1",  # line 6: zero width
        "0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4",  # line 7: polygon -> its box
    ]))
    _label(root / "labels/train/orphan.txt", "0 0.5 0.5 0.1 0.1\n")
    _image(root / "images/val/v.jpg", 50, 40)
    _label(root / "labels/val/v.txt", "1 0.5 0.5 1 1\n")
    return root


def test_boxes_negatives_and_broken_lines(dataset):
    classes, stream, source = read_yolo(dataset, "train")
    assert [(c.index, c.name, c.category_id) for c in classes] == [(0, "cat", 1), (1, "dog", 2)]
    assert source["format"] == "yolo" and source["images"] == 3
    recs, issues = _split(stream)
    by_name = {r.file_name: r for r in recs}
    assert list(by_name) == ["images/train/a.jpg", "images/train/b.jpg", "images/train/c.png"]
    assert [r.image_id for r in recs] == [1, 2, 3]
    a = by_name["images/train/a.jpg"]
    assert a.labels == [0, 1] and a.iscrowd == [False, False]
    assert a.boxes[0] == pytest.approx([80, 30, 120, 70])
    assert a.boxes[1] == pytest.approx([0, 0, 100, 50])
    assert Path(a.path) == dataset / "images/train/a.jpg"
    assert by_name["images/train/b.jpg"].boxes == []
    c = by_name["images/train/c.png"]
    assert c.labels == [1, 0]
    assert c.boxes[0] == pytest.approx([15, 15, 25, 25])
    assert c.boxes[1] == pytest.approx([10, 10, 30, 40])
    bad = {i.item: i.detail for i in c.issues}
    assert set(bad) == {"labels/train/c.txt:1", "labels/train/c.txt:2", "labels/train/c.txt:4",
                        "labels/train/c.txt:6"}
    assert "got 4" in bad["labels/train/c.txt:1"] and "out of range" in bad["labels/train/c.txt:4"]
    assert all(i.action == "dropped" and i.reason == "malformed label line" for i in c.issues)
    assert [(i.item, i.reason) for i in issues] == [("labels/train/orphan.txt", "label file without image")]


def test_val_split_and_names_mapping_with_path_keys(tmp_path, dataset):
    yaml_file = tmp_path / "elsewhere.yaml"
    yaml_file.write_text(f"path: {dataset}\ntrain: images/train\nval: images/val\n"
                         "names:\n  0: cat\n  1: dog\n")
    classes, stream, _ = read_yolo(tmp_path, "val", data_yaml=yaml_file)
    assert [c.name for c in classes] == ["cat", "dog"]
    recs, issues = _split(stream)
    assert [r.file_name for r in recs] == ["images/val/v.jpg"] and not issues
    assert recs[0].boxes == [pytest.approx([0, 0, 50, 40])]


@pytest.mark.parametrize("text, message", [
    ("names: [cat, dog\nnc: 2\n", r"data\.yaml:\d+: malformed YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("names: {0: a, 2: b}\n", "keys must be 0..1"),
    ("names: [a, b]\nnc: 3\n", "nc: 3 but 2 names"),
    ("nc: 2\n", "no 'names:' key"),
])
def test_bad_yaml_is_one_line_error(tmp_path, text, message):
    (tmp_path / "data.yaml").write_text(text)
    _image(tmp_path / "images/train/a.jpg", 10, 10)
    with pytest.raises(DatasetError, match=message) as err:
        read_yolo(tmp_path, "train")
    assert "data.yaml" in str(err.value) and "\n" not in str(err.value)


def test_missing_split_and_missing_names(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    with pytest.raises(DatasetError, match="does not exist"):
        read_yolo(tmp_path, "val")
    other = tmp_path / "other"
    _image(other / "images/train/a.jpg", 10, 10)
    with pytest.raises(DatasetError, match="no data.yaml, classes.txt"):
        read_yolo(other, "train")
    (other / "classes.txt").write_text("only\n")
    classes, stream, _ = read_yolo(other, "train")
    assert [c.name for c in classes] == ["only"] and len(list(stream)) == 1


def test_image_list_file_missing_image_and_unsafe_entry(tmp_path, dataset):
    (dataset / "train.txt").write_text("./images/train/a.jpg\n./images/train/gone.jpg\n../../etc/passwd\n")
    _label(dataset / "labels/train/gone.txt", "0 0.5 0.5 0.5 0.5\n")
    (dataset / "data.yaml").write_text("names: [cat, dog]\ntrain: train.txt\n")
    _, stream, _ = read_yolo(dataset, "train")
    recs, issues = _split(stream)
    assert [r.file_name for r in recs] == ["images/train/a.jpg"]
    reasons = {(i.item, i.reason) for i in issues}
    assert ("images/train/gone.jpg", "missing image file") in reasons
    assert any(r == "unsafe image path" for _, r in reasons)
    assert ("labels/train/c.txt", "label file without image") in reasons


def test_exif_rotated_image_gives_raw_frame_boxes(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [thing]\n")
    # Stored 200x100, EXIF 6: shown upright as 100x200. The label is in the upright frame.
    _image(tmp_path / "images/train/r.jpg", 200, 100, exif_orientation=6)
    _label(tmp_path / "labels/train/r.txt", "0 0.3 0.25 0.2 0.1\n")
    _, stream, _ = read_yolo(tmp_path, "train")
    (rec,) = list(stream)
    upright = orient_box(rec.boxes[0], 6, 200, 100)  # what the writer does with it
    assert upright == pytest.approx([20, 40, 40, 60])


def _shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.shard", *args], capture_output=True, text=True)


def test_round_trip_through_shard_cli(tmp_path):
    root = tmp_path / "ds"
    (root / "data.yaml").parent.mkdir(parents=True)
    (root / "data.yaml").write_text("names: {0: cat, 1: dog}\n")
    # Upright frames: a.jpg 200x100; r.jpg stored 120x80 with EXIF 6, so shown 80x120.
    _image(root / "images/val/a.jpg", 200, 100)
    _label(root / "labels/val/a.txt", "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.3 0.5\nbroken line\n")
    _image(root / "images/val/n.jpg", 30, 60)
    _image(root / "images/val/r.jpg", 120, 80, exif_orientation=6)
    _label(root / "labels/val/r.txt", "1 0.5 0.25 0.5 0.25\n")
    out = tmp_path / "out"
    done = _shard_cli("--format", "yolo", "--root", str(root), "--data", str(root / "data.yaml"),
                      "--split", "val", "--out", str(out),
                      "--size", "64", "--workers", "1")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["name"], c["category_id"]) for c in manifest["classes"]] == [("cat", 1), ("dog", 2)]
    assert manifest["counts"]["images"] == 3 and manifest["counts"]["negatives"] == 1
    assert manifest["issue_counts"]["malformed label line"] == 1
    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    rows = {r["file_name"]: r for t in tables for r in t.to_pylist()}
    expected = {  # upright-frame pixels, from the label lines
        "images/val/a.jpg": ([[80, 30, 120, 70], [20, 50, 80, 100]], [0, 1]),
        "images/val/n.jpg": ([], []),
        "images/val/r.jpg": ([[20, 15, 60, 45]], [1]),
    }
    for name, (boxes, labels) in expected.items():
        row = rows[name]
        assert row["labels"] == labels
        sx, sy = row["width"] / row["orig_width"], row["height"] / row["orig_height"]
        got = np.array(row["boxes"], dtype=float).reshape(-1, 4)
        want = np.array(boxes, dtype=float).reshape(-1, 4) * [sx, sy, sx, sy]
        assert np.abs(got - want).max(initial=0) <= 1.0, (name, got, want)
    assert (rows["images/val/r.jpg"]["orig_width"], rows["images/val/r.jpg"]["orig_height"]) == (80, 120)
