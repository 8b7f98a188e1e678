"""python -m rtrain.predict on a 1x1 image, a 10000x10000 JPEG and one over PIL's pixel limit (issue #7).

The weights are untrained (tests/inference_fixtures.py), so where boxes land means nothing; what is
checked is the frame: each extreme image is a flat colour, and so is a reference image of ordinary
size with the same colour and aspect. Both letterbox to the same model input, so the detections
must be the same up to the ratio of the two sizes (boxes in each image's original pixels).
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from inference_fixtures import (  # noqa: F401  (the *_fixture names are module fixtures)
    one_thread_module_fixture,
    weights_128_fixture,
)
from PIL import Image

from rtrain.deploy.predictor import DECODE_MAX, _read_file, predict
from rtrain.predict import main

HUGE = 10_000
TOO_LARGE = "image over PIL's pixel limit"

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def declared_jpeg(path, w: int, h: int):
    """A 16x16 JPEG whose header declares w x h (PIL refuses it at open when over its pixel limit)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 140, 200)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5:sof + 7] = h.to_bytes(2, "big")
    data[sof + 7:sof + 9] = w.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def _flat_colour(path) -> tuple[int, ...]:
    with Image.open(path) as im:
        im.draft("RGB", (64, 64))  # cheap decode; a flat JPEG decodes to one colour at any scale
        return im.convert("RGB").getpixel((0, 0))


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory):
    """One `python -m rtrain.predict` over {tiny 1x1, huge 10000x10000, bomb 20000x20000 declared},
    and predict() over the references: (predictions JSON, stdout, reference JSON, folders)."""
    src = tmp_path_factory.mktemp("extreme")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(src / "tiny.jpg")
    Image.new("RGB", (HUGE, HUGE), (90, 140, 200)).save(src / "huge.jpg", quality=75)  # ~1.5 MB, < 1 s
    declared_jpeg(src / "bomb.jpg", 20_000, 20_000)
    ref = tmp_path_factory.mktemp("reference")
    Image.new("RGB", (128, 128), _flat_colour(src / "tiny.jpg")).save(ref / "tiny.png")  # x128
    Image.new("RGB", (1000, 1000), _flat_colour(src / "huge.jpg")).save(ref / "huge.png")  # x0.1
    out = tmp_path_factory.mktemp("out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["--weights", str(weights), "--source", str(src), "--out", str(out), "--conf", "0.3"])
    assert code == 0
    reference = predict(weights, ref, out_dir=out / "ref", conf=0.3, draw=False)
    return (json.loads((out / "predictions.json").read_text()), stdout.getvalue(),
            json.loads(reference.json_path.read_text()), src, out)


def _results(data: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy, scores) of image `name`, by descending score."""
    [image_id] = [im["id"] for im in data["images"] if im["file_name"] == name]
    rs = sorted((r for r in data["results"] if r["image_id"] == image_id), key=lambda r: -r["score"])
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rs)]).reshape(-1, 4)
    return boxes, np.array([r["score"] for r in rs])


@pytest.mark.parametrize("name,size,ratio", [("tiny", 1, 1 / 128), ("huge", HUGE, 10.0)])
def test_boxes_are_in_the_original_pixels_of_1x1_and_10000x10000_images(run, name, size, ratio):
    data, _, reference, _, _ = run
    [image] = [im for im in data["images"] if im["file_name"] == f"{name}.jpg"]
    assert (image["width"], image["height"]) == (size, size)
    boxes, scores = _results(data, f"{name}.jpg")
    ref_boxes, ref_scores = _results(reference, f"{name}.png")
    assert len(scores) > 0 and len(scores) == len(ref_scores)
    assert scores == pytest.approx(ref_scores, abs=1e-4)
    assert boxes == pytest.approx(ref_boxes * ratio, rel=1e-4, abs=1e-3 * size)
    assert boxes.min() >= 0 and boxes.max() <= size


def test_image_over_pils_pixel_limit_is_skipped_by_name_and_the_run_goes_on(run):
    data, stdout, _, _, _ = run
    assert sorted(im["file_name"] for im in data["images"]) == ["huge.jpg", "tiny.jpg"]
    [skipped] = data["skipped"]
    assert skipped["file_name"] == "bomb.jpg" and skipped["reason"].startswith(f"{TOO_LARGE} (")
    assert "400000000 pixels" in skipped["reason"] and "\n" not in skipped["reason"]
    assert "skipped:     1 unreadable image(s):" in stdout
    assert f"  bomb.jpg: {TOO_LARGE} (" in stdout


def test_10000x10000_jpeg_is_decoded_at_reduced_scale(run, tmp_path):
    """Bounded memory: 100 MP is decoded by libjpeg at 1/2 scale (75 MB, not 300 MB), boxes still
    mapped to the original pixels (above); the picture is drawn at the decoded size."""
    _, _, _, src, out = run
    image, size = _read_file(str(src / "huge.jpg"))
    assert size == (HUGE, HUGE) and image.size == (HUGE // 2, HUGE // 2) and image.mode == "RGB"
    with Image.open(out / "huge.jpg") as pic:
        assert pic.size == (HUGE // 2, HUGE // 2)
    with Image.open(out / "tiny.jpg") as pic:
        assert pic.size == (1, 1)
    # EXIF orientation 6 (width and height swap) on a long JPEG: the original upright size is kept
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (2 * DECODE_MAX, 1024), (10, 200, 10)).save(tmp_path / "long.jpg", exif=exif)
    image, size = _read_file(str(tmp_path / "long.jpg"))
    assert size == (1024, 2 * DECODE_MAX) and image.size == (512, DECODE_MAX)
    # below 2 * DECODE_MAX nothing changes: full decode, the picture at the original size
    Image.new("RGB", (2 * DECODE_MAX - 1, 64)).save(tmp_path / "wide.jpg")
    image, size = _read_file(str(tmp_path / "wide.jpg"))
    assert size == image.size == (2 * DECODE_MAX - 1, 64)
