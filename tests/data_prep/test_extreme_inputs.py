"""Extreme image sizes and an empty COCO file, built in tmp_path (issue #7's bad-input list).

- a 1x1 image is a valid image: sharded like any other (resized up to --size, boxes mapped);
- a 10000x10000 JPEG (100 MP: over PIL's DecompressionBombWarning threshold, under its error
  threshold) is sharded, decoded by libjpeg at 1/8 scale, so in bounded memory;
- a file over PIL's hard pixel limit is skipped with its own reason, listed by name;
- a COCO json with `"images": []` is a one-line error naming the json, exit 2, nothing written.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import shard
from data_prep.imaging import TOO_LARGE
from data_prep.yolo import read_yolo

REPO = Path(__file__).resolve().parents[2]
HUGE = 10_000
COLOUR = (90, 140, 200)

# The 100 MP image warns (PIL's DecompressionBombWarning) by design; the tests check it is handled.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def declared_jpeg(path: Path, w: int, h: int) -> Path:
    """A 16x16 JPEG whose header declares w x h: PIL refuses it at open when over its pixel limit."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLOUR).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5:sof + 7] = h.to_bytes(2, "big")
    data[sof + 7:sof + 9] = w.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("extreme")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(d / "tiny.jpg")
    Image.new("RGB", (HUGE, HUGE), COLOUR).save(d / "huge.jpg", quality=75)  # ~1.5 MB, < 1 s
    declared_jpeg(d / "bomb.jpg", 20_000, 20_000)  # 400 MP: over PIL's 179 MP error threshold
    return d


def coco(path: Path, entries: list[tuple[str, int, int, list]]) -> Path:
    """COCO json of (file name, width, height, bbox xywh) entries, one category."""
    images = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h, _) in enumerate(entries, 1)]
    anns = [{"id": i, "image_id": i, "category_id": 7, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (_, _, _, b) in enumerate(entries, 1)]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 7, "name": "thing"}]}))
    return path


def run(ann: Path, images: Path, out: Path, *extra: str) -> int:
    return shard.main(["--format", "coco", "--annotations", str(ann), "--images", str(images),
                       "--out", str(out), "--size", "320", "--workers", "1", *extra])


def test_1x1_and_10000x10000_images_are_sharded_and_boxes_round_trip(images, tmp_path, capsys):
    boxes = {"tiny.jpg": [0, 0, 1, 1], "huge.jpg": [1000, 2000, 3000, 4000]}  # xywh, inside the image
    ann = coco(tmp_path / "ann.json", [("tiny.jpg", 1, 1, boxes["tiny.jpg"]),
                                       ("huge.jpg", HUGE, HUGE, boxes["huge.jpg"])])
    out = tmp_path / "out"
    assert run(ann, images, out) == 0
    assert capsys.readouterr().out.startswith("2 images written")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 2 and manifest["counts"]["boxes"] == 2
    assert manifest["issues"] == []  # neither size is a fault
    rows = {r["file_name"]: r for r in pq.read_table(out / "part-00000.parquet").to_pylist()}
    for name, orig in [("tiny.jpg", 1), ("huge.jpg", HUGE)]:
        r = rows[name]
        assert (r["orig_width"], r["orig_height"]) == (orig, orig)
        assert (r["width"], r["height"]) == (320, 320)  # longer side = --size, up or down
        with Image.open(io.BytesIO(r["jpeg"])) as im:
            assert im.size == (320, 320) and im.mode == "RGB"
            pixels = np.asarray(im, np.int16)
        x, y, w, h = boxes[name]
        back = np.array(r["boxes"]) * orig / 320  # stored px -> original px
        assert np.abs(back - [x, y, x + w, y + h]).max() <= 1.0, name
    assert np.abs(pixels - COLOUR).max() <= 3  # the huge one: its flat colour survives
    assert rows["tiny.jpg"]["boxes"] == [0, 0, 320, 320]


def test_10000x10000_jpeg_is_converted_in_bounded_memory(images):
    """A full decode of 100 MP RGB takes 300 MB; libjpeg's 1/8-scale draft takes ~4 MB."""
    code = (
        "import resource, sys, warnings\n"
        "from data_prep import imaging\n"
        "from data_prep.records import SourceImage\n"
        "warnings.simplefilter('ignore')\n"
        "rec = lambda p: SourceImage(1, 'x.jpg', p, [[0.0, 0.0, 5.0, 5.0]], [0], [False])\n"
        f"imaging.convert(rec({str(images / 'tiny.jpg')!r}), 320)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"row, issues = imaging.convert(rec({str(images / 'huge.jpg')!r}), 320)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(row['width'], row['height'], row['orig_width'], (after - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    w, h, orig, grew_mb = map(int, done.stdout.split())
    assert (w, h, orig) == (320, 320, HUGE)
    assert grew_mb < 100, f"peak memory grew by {grew_mb} MB for one 100 MP image"


def test_image_over_pils_pixel_limit_is_skipped_by_name(images, tmp_path, capsys):
    ann = coco(tmp_path / "ann.json", [("tiny.jpg", 1, 1, [0, 0, 1, 1]), ("bomb.jpg", 20_000, 20_000,
                                                                          [0, 0, 10, 10])])
    out = tmp_path / "out"
    assert run(ann, images, out) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "1 images written" in captured.out and "1 images skipped" in captured.out
    assert f"skipped        1  {TOO_LARGE}" in captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    [issue] = manifest["issues"]
    assert (issue["item"], issue["reason"], issue["action"]) == ("bomb.jpg", TOO_LARGE, "skipped")
    assert "400000000 pixels" in issue["detail"] and "\n" not in issue["detail"]


def test_yolo_image_over_pils_pixel_limit_is_skipped_by_name(tmp_path):
    """The YOLO reader opens image headers itself (normalised labels need the size): same reason."""
    root = tmp_path / "ds"
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [thing]\n")
    declared_jpeg(root / "images/train/bomb.jpg", 20_000, 20_000)
    (root / "labels/train/bomb.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    _, stream, _ = read_yolo(root, "train")
    [issue] = list(stream)
    assert (issue.item, issue.reason, issue.action) == ("images/train/bomb.jpg", TOO_LARGE, "skipped")


def _empty_coco(tmp_path: Path) -> Path:
    ann = tmp_path / "empty.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    (tmp_path / "img").mkdir()
    return ann


@pytest.mark.parametrize("out_exists", [False, True])
def test_coco_json_with_no_images_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, out_exists):
    ann = _empty_coco(tmp_path)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    assert run(ann, tmp_path / "img", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(ann) in err and "holds no images" in err
    assert not out.exists() if not out_exists else list(out.iterdir()) == []


def test_coco_json_with_no_images_exits_2_from_the_command_line(tmp_path):
    """The real `python -m data_prep.shard` with a worker pool (started before the reader runs)."""
    ann = _empty_coco(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "data_prep.shard", "--format", "coco", "--annotations",
                           str(ann), "--images", str(tmp_path / "img"), "--out", str(out), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    expected = f"data_prep.shard: error: {ann}: empty dataset, its 'images' list holds no images"
    assert done.stderr.strip() == expected
    assert done.stdout == "" and not out.exists()
