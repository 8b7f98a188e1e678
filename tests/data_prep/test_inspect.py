"""data_prep.inspect on a small hand-made shard folder: summary text, contact sheet size, clean failures."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.draw import class_color
from data_prep.inspect import contact_sheet_for, load_manifest, render_row, sample_rows, summarize
from data_prep.records import DatasetError
from data_prep.shard_format import SCHEMA

NAMES = ["apple", "pear"]


def _jpeg(w: int, h: int) -> bytes:
    buf = BytesIO()
    Image.new("RGB", (w, h), (128, 128, 128)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _shards(folder: Path, per_shard=(3, 2)) -> dict:
    """Two shards of grey images; image i has one box of class i % 2 (image 5 has none)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, image_id = [], 0
    for k, n in enumerate(per_shard):
        rows = []
        for _ in range(n):
            image_id += 1
            boxes = [] if image_id == 5 else [10.0, 12.0, 50.0, 40.0]
            rows.append({"image_id": image_id, "file_name": f"img{image_id}.jpg", "jpeg": _jpeg(96, 64),
                         "width": 96, "height": 64, "orig_width": 192, "orig_height": 128,
                         "boxes": boxes, "labels": [image_id % 2] if boxes else [],
                         "iscrowd": [False] * bool(boxes)})
        name = f"part-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / name)
        shards.append({"file": name, "rows": n})
    manifest = {
        "classes": [{"index": 0, "name": "apple", "category_id": 1, "images": 2, "boxes": 2},
                    {"index": 1, "name": "pear", "category_id": 2, "images": 2, "boxes": 2}],
        "counts": {"images": 5, "boxes": 4, "negatives": 1, "crowd_boxes": 0, "skipped_images": 1,
                   "repaired": 1, "dropped_boxes": 0},
        "image_size": {"orig_width": {"min": 192, "max": 192, "mean": 192.0},
                       "orig_height": {"min": 128, "max": 128, "mean": 128.0}, "max_side": 96},
        "shards": shards,
        "issues": [{"item": "x.jpg", "reason": "missing image file", "action": "skipped"},
                   {"item": "y.jpg", "reason": "box clipped to the image", "action": "repaired"}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_summary_lists_classes_counts_and_reasons(tmp_path):
    text = summarize(_shards(tmp_path))
    assert "5 images, 4 boxes, 1 without boxes" in text
    assert any(line.split()[-1] == "pear" and line.split()[-2] == "2" for line in text.splitlines())
    assert "missing image file" in text and "box clipped to the image" in text
    assert "width 192-192" in text


def test_sample_rows_spans_shards_and_is_seeded(tmp_path):
    manifest = _shards(tmp_path)
    rows = sample_rows(tmp_path, manifest, 10, seed=1)
    assert sorted(r["image_id"] for r in rows) == [1, 2, 3, 4, 5]
    a = [r["image_id"] for r in sample_rows(tmp_path, manifest, 3, seed=2)]
    assert a == [r["image_id"] for r in sample_rows(tmp_path, manifest, 3, seed=2)] and len(set(a)) == 3


def test_render_row_draws_box_in_class_colour(tmp_path):
    manifest = _shards(tmp_path)
    (row,) = [r for r in sample_rows(tmp_path, manifest, 5) if r["image_id"] == 1]
    image = np.asarray(render_row(row, NAMES))
    assert image.shape == (64, 96, 3)
    # Left edge of the box, below its label: the class colour of "pear" (label 1).
    assert tuple(image[30, 10]) == class_color(1)
    assert tuple(image[30, 30]) == pytest.approx((128, 128, 128), abs=3)  # inside stays untouched


def test_contact_sheet_size(tmp_path):
    _shards(tmp_path)
    sheet, rows = contact_sheet_for(tmp_path, n=4, seed=0, cell=100)
    assert sheet.size == (200, 200) and len(rows) == 4
    sheet, rows = contact_sheet_for(tmp_path, n=16, cell=64)  # only 5 rows exist: 3 x 2 grid
    assert sheet.size == (3 * 64, 2 * 64) and len(rows) == 5


def test_cli_writes_png_and_prints_counts(tmp_path):
    _shards(tmp_path / "data")
    out = tmp_path / "sheet.png"
    done = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(tmp_path / "data"), "--n", "4",
                           "--out", str(out), "--cell", "128"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "apple" in done.stdout and "pear" in done.stdout and "wrote" in done.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (256, 256)


def test_missing_or_corrupt_manifest_and_shard_fail_cleanly(tmp_path):
    with pytest.raises(DatasetError, match="manifest.json: manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"manifest\.json:1:2: malformed JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"classes": []}')
    with pytest.raises(DatasetError, match="missing counts, shards"):
        load_manifest(tmp_path)
    data = tmp_path / "data"
    _shards(data)
    (data / "part-00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DatasetError, match=r"part-00001\.parquet: unreadable shard"):
        contact_sheet_for(data, n=5)
    (data / "part-00001.parquet").unlink()
    with pytest.raises(DatasetError, match="missing"):
        contact_sheet_for(data, n=5)
    done = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "manifest.json" in done.stderr
