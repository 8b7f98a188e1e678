"""Broken images and annotations made in tmp_path: each is skipped or repaired, counted and listed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import imaging, shard
from data_prep.records import SourceImage

# exif_transpose applies these for orientations 2..8; their inverses make the raw file.
_INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def white_box(im: Image.Image) -> list[int]:
    a = np.asarray(im.convert("L")) > 128
    ys, xs = np.nonzero(a)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def rec(path: Path, boxes=((10, 10, 50, 40),)) -> SourceImage:
    boxes = [list(map(float, b)) for b in boxes]
    return SourceImage(1, path.name, str(path), boxes, [0] * len(boxes), [False] * len(boxes))


def reasons(issues) -> dict[str, str]:
    return {i.reason: i.action for i in issues}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_moves_boxes_with_pixels(tmp_path, orientation):
    upright = Image.new("RGB", (120, 80))
    box = [30, 10, 70, 30]
    upright.paste((255, 255, 255), box)
    raw = upright.transpose(_INVERSE[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    raw.save(path, quality=95, exif=exif)
    row, issues = imaging.convert(rec(path, [white_box(raw)]), size=240)
    assert (row["orig_width"], row["orig_height"]) == (120, 80)
    assert (row["width"], row["height"]) == (240, 160)
    assert np.allclose(row["boxes"], [2 * v for v in box])
    got = white_box(Image.open(io.BytesIO(row["jpeg"])))
    assert np.abs(np.array(got) - [2 * v for v in box]).max() <= 2
    assert ("EXIF orientation applied" in reasons(issues)) == (orientation != 1)


def test_corrupt_truncated_and_missing_files_are_skipped(tmp_path, shared_data):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    real = (shared_data / "bccd" / "JPEGImages" / "BloodImage_00001.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(real[: len(real) // 2])
    for path, reason in [(junk, "unreadable image"), (cut, "corrupt or truncated image"),
                         (tmp_path / "none.jpg", "missing image file")]:
        row, issues = imaging.convert(rec(path), size=64)
        assert row is None and reasons(issues) == {reason: "skipped"}, path


@pytest.mark.parametrize("mode,fmt,expect", [
    ("CMYK", "JPEG", {"CMYK image converted to RGB"}),
    ("L", "JPEG", {"L image converted to RGB"}),
    ("RGBA", "PNG", {"RGBA image converted to RGB", "non-JPEG image re-encoded as JPEG"}),
    ("P", "PNG", {"P image converted to RGB", "non-JPEG image re-encoded as JPEG"}),
])
def test_colour_modes_become_rgb(tmp_path, mode, fmt, expect):
    im = Image.new("RGB", (100, 60), (200, 30, 30))
    im = im.convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    if mode == "P":
        im.save(path, transparency=0)
    else:
        im.save(path, format=fmt)
    row, issues = imaging.convert(rec(path), size=50)
    assert set(reasons(issues)) == expect
    out = Image.open(io.BytesIO(row["jpeg"]))
    assert out.mode == "RGB" and out.size == (50, 30)
    assert np.allclose(row["boxes"], [5, 5, 25, 20])


def test_boxes_clipped_dropped_and_kept(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (100, 50)).save(path)
    boxes = [(-5, -5, 30, 20), (90, 40, 130, 70), (10, 10, 10, 30), (20, 20, 10, 30),
             (200, 200, 300, 300), (float("nan"), 0, 5, 5), (1, 2, 3, 4)]
    row, issues = imaging.convert(rec(path, boxes), size=100)
    got = [(i.item.split()[-1], i.reason, i.action) for i in issues]
    clip, zero = "box clipped to the image", "zero or negative area box"
    assert got == [("0", clip, "repaired"), ("1", clip, "repaired"), ("2", zero, "dropped"),
                   ("3", zero, "dropped"), ("4", "box outside the image", "dropped"),
                   ("5", "malformed box", "dropped")]
    assert row["boxes"] == [0, 0, 30, 20, 90, 40, 100, 50, 1, 2, 3, 4]


def _coco(tmp_path: Path, files: dict[str, bytes | None], boxes: dict[str, list]) -> Path:
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    images, anns = [], []
    for i, (name, data) in enumerate(files.items(), start=1):
        if data is not None:
            (img_dir / name).write_bytes(data)
        images.append({"id": i, "file_name": name, "width": 100, "height": 60})
        for j, b in enumerate(boxes.get(name, [])):
            anns.append({"id": i * 100 + j, "image_id": i, "category_id": 5, "bbox": b, "iscrowd": 0})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 5, "name": "thing"}]}))
    return path


def _encoded(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (100, 60), (10, 200, 10)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def test_run_with_every_fault_reports_each(tmp_path, capsys):
    good = _encoded("RGB", "JPEG")
    files = {"good.jpg": good, "neg.jpg": good, "cmyk.jpg": _encoded("CMYK", "JPEG"),
             "alpha.png": _encoded("RGBA", "PNG"), "junk.jpg": b"garbage", "cut.jpg": good[:-10],
             "missing.jpg": None}
    boxes = {"good.jpg": [[10, 10, 20, 20], [90, 50, 20, 20], [5, 5, 0, 3]], "cmyk.jpg": [[1, 1, 5, 5]],
             "alpha.png": [[1, 1, 5, 5]], "junk.jpg": [[1, 1, 5, 5]]}
    ann = _coco(tmp_path, files, boxes)
    out = tmp_path / "out"
    assert shard.main(["--format", "coco", "--annotations", str(ann), "--images", str(tmp_path / "img"),
                       "--out", str(out), "--size", "50", "--workers", "2"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("4 images written")
    assert "3 images skipped" in stdout and "missing image file" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["images"] == 4 and m["counts"]["negatives"] == 1 and m["counts"]["boxes"] == 4
    assert m["issue_counts"] == {
        "CMYK image converted to RGB": 1, "RGBA image converted to RGB": 1,
        "non-JPEG image re-encoded as JPEG": 1, "box clipped to the image": 1,
        "zero or negative area box": 1, "unreadable image": 1, "corrupt or truncated image": 1,
        "missing image file": 1}
    table = pq.read_table(out / "part-00000.parquet")
    assert table.column("file_name").to_pylist() == ["good.jpg", "neg.jpg", "cmyk.jpg", "alpha.png"]


@pytest.mark.parametrize("argv,needle", [
    (["--format", "yaml", "--out", "o"], "invalid choice"),
    (["--format", "coco", "--out", "o"], "--format coco needs --annotations"),
    (["--format", "voc", "--out", "o"], "--format voc needs --root"),
    (["--out", "o"], "--format"),
])
def test_bad_command_lines_exit_2_one_line(tmp_path, capsys, argv, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = shard.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["hdfs://nn/shards/train", "az://bucket/x", "s3:///x"])
def test_an_out_uri_of_another_scheme_is_refused_in_one_line_never_made_local(tmp_path, capsys, monkeypatch,
                                                                              out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "voc").mkdir()
    assert shard.main(["--format", "voc", "--root", "voc", "--out", out, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"data_prep.shard: error: --out {out}: ") and "\n" not in err
    assert ("not supported" in err) if not out.startswith("s3:") else ("no bucket name" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]


def test_empty_and_all_unusable_datasets_fail(tmp_path, capsys):
    ann = _coco(tmp_path, {}, {})
    assert shard.main(["--format", "coco", "--annotations", str(ann), "--images", str(tmp_path / "img"),
                       "--out", str(tmp_path / "o")]) == 2
    assert "empty dataset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    ann2 = tmp_path / "b" / "ann.json"
    ann2.parent.mkdir()
    ann2 = _coco(ann2.parent, {"junk.jpg": b"xx"}, {})
    assert shard.main(["--format", "coco", "--annotations", str(ann2), "--images", str(ann2.parent / "img"),
                       "--out", str(tmp_path / "o2"), "--workers", "1"]) == 2
    assert "no image could be used" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "manifest.json").exists()
