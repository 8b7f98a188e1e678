"""The CPU decode (rtrain.data.jpeg): reduced-size DCT decode keeps boxes, scale and pad exact, the
full-size decode gives PIL's pixels, and a broken JPEG is dropped and counted on either path."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from rtrain.data.augment import AugmentParams, Sample, letterbox
from rtrain.data.batches import DecodeAugment, collate
from rtrain.data.jpeg import decode_rgb


def _jpeg(image: np.ndarray | Image.Image, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.convert(mode).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _ragged(items, dtype):
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = np.asarray(x, dtype).reshape(-1)
    return out


def _rows(jpegs: list[bytes], boxes: list[list[list[float]]]) -> dict[str, np.ndarray]:
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    n = len(jpegs)
    return {
        "image_id": np.arange(1, n + 1), "file_name": np.array([f"{i}.jpg" for i in range(n)], dtype=object),
        "jpeg": np.array(jpegs + [b""], dtype=object)[:n],
        "width": np.array([w for w, _ in sizes]), "height": np.array([h for _, h in sizes]),
        "orig_width": np.array([w for w, _ in sizes]), "orig_height": np.array([h for _, h in sizes]),
        "boxes": _ragged(boxes, np.float32),
        "labels": _ragged([[i % 3 for i in range(len(b))] for b in boxes], np.int32),
        "iscrowd": _ragged([[False] * len(b) for b in boxes], bool),
    }


def _scene(w: int, h: int, rects: list[tuple[int, int, int, int]], seed: int) -> np.ndarray:
    """Smooth noise with flat coloured rectangles (pixel boxes [x1, x2) x [y1, y2))."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)).copy()
    for k, (x1, y1, x2, y2) in enumerate(rects):
        image[y1:y2, x1:x2] = [(250, 30, 30), (30, 250, 30), (30, 30, 250)][k % 3]
    return image


@pytest.fixture(scope="module")
def scenes():
    """Odd and even sizes, landscape and portrait, with boxes round each rectangle."""
    specs = [(640, 480, [(40, 60, 200, 180), (300, 300, 620, 470)]),
             (641, 427, [(0, 0, 120, 90), (500, 200, 641, 427)]),
             (427, 641, [(100, 100, 300, 400)]),
             (1024, 768, [(512, 100, 1000, 700)])]
    jpegs, boxes = [], []
    for seed, (w, h, rects) in enumerate(specs):
        jpegs.append(_jpeg(_scene(w, h, rects, seed)))
        boxes.append([list(map(float, r)) for r in rects])
    return _rows(jpegs, boxes)


def test_the_dct_reduces_by_the_largest_power_of_two_the_resize_allows(shared_data):
    data = (shared_data / "bccd" / "JPEGImages").glob("*.jpg").__next__().read_bytes()
    assert Image.open(io.BytesIO(data)).size == (640, 480)
    for side, reduced, shape in [(None, 1, (480, 640)), (400, 1, (480, 640)), (320, 2, (240, 320)),
                                 (200, 2, (240, 320)), (160, 4, (120, 160)), (64, 8, (60, 80))]:
        image, k, full = decode_rgb(data, side)
        assert (k, image.shape, full) == (reduced, (*shape, 3), (480, 640)), side
        assert image.dtype == np.uint8 and image.flags["C_CONTIGUOUS"]


def test_the_full_size_decode_gives_pils_pixels(shared_data):
    for path in sorted((shared_data / "bccd" / "JPEGImages").glob("*.jpg"))[:5]:
        data = path.read_bytes()
        ours, k, _ = decode_rgb(data)
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert k == 1 and np.abs(ours.astype(int) - pil).max() <= 1, path.name
    gray = _jpeg(_scene(97, 61, [], 0), mode="L")
    ours, _, _ = decode_rgb(gray)
    assert ours.shape == (61, 97, 3) and (ours[..., 0] == ours[..., 2]).all()
    cmyk = _jpeg(_scene(50, 40, [(10, 10, 30, 30)], 0), mode="CMYK")  # through PIL, still RGB
    assert decode_rgb(cmyk)[0].shape == (40, 50, 3)
    png = _jpeg(_scene(50, 40, [], 0), fmt="PNG")
    assert decode_rgb(png, 8)[1] == 1  # not a JPEG: no DCT to reduce in


@pytest.mark.parametrize("train,rect", [(False, False), (False, True), (True, False)])
def test_reduced_decode_keeps_every_box_scale_and_pad_exact(scenes, train, rect):
    size = 160
    params = AugmentParams(mosaic=0.5)
    fast = DecodeAugment(train=train, img_size=size, aug=params, seed=4, epoch=3, rect=rect,
                         reduced_decode=True)
    full = DecodeAugment(train=train, img_size=size, aug=params, seed=4, epoch=3, rect=rect,
                         reduced_decode=False)
    a, b = collate(fast(scenes)), collate(full(scenes))
    for key in ("boxes", "labels", "iscrowd", "image_id", "scale", "pad", "stored_size", "orig_size"):
        assert torch.equal(a[key], b[key]), key
    assert a["images"].shape == b["images"].shape
    diff = (a["images"].float() - b["images"].float()).abs().mean((1, 2, 3))
    assert diff.max() < 2.5, diff  # DCT scaling against an antialiased bilinear resize
    assert (a["labels"] >= 0).sum() >= 4


def test_boxes_still_cover_their_rectangles_after_a_reduced_decode(scenes):
    out = collate(DecodeAugment(train=False, img_size=160, reduced_decode=True)(scenes))
    colours = torch.tensor([(250, 30, 30), (30, 250, 30), (30, 30, 250)], dtype=torch.float32)
    for i in range(len(out["image_id"])):
        for box, label in zip(out["boxes"][i], out["labels"][i], strict=True):
            if label < 0:
                continue
            x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
            inner = out["images"][i, :, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].float()
            mean = inner.mean((1, 2))
            assert (mean - colours[int(label)]).abs().max() < 12, (i, box, mean)
        # val maps back exactly: stored = (input - pad) / scale
        k = int((out["labels"][i] >= 0).sum())
        back = (out["boxes"][i, :k] - out["pad"][i].repeat(2)) / out["scale"][i]
        stored = torch.as_tensor(scenes["boxes"][i]).reshape(-1, 4)
        torch.testing.assert_close(back, stored, atol=1e-3, rtol=0)


def test_train_decodes_reduced_and_val_at_full_size_by_default(scenes, monkeypatch):
    import rtrain.data.decode_augment as decode_augment

    sizes = []
    monkeypatch.setattr(decode_augment, "decode_rgb",
                        lambda data, side: sizes.append(side) or decode_rgb(data, side))
    DecodeAugment(train=True, img_size=160)(scenes)
    DecodeAugment(train=False, img_size=160)(scenes)  # what evaluate and predict must agree on
    n = len(scenes["image_id"])
    assert sizes == [160] * n + [None] * n


def test_a_sample_that_is_not_a_reduced_decode_of_its_size_is_refused():
    image = np.zeros((120, 160, 3), np.uint8)
    with pytest.raises(ValueError, match="not a 1/2 decode of 480x640"):
        Sample(image, [], [], [], reduced=2, full_hw=(480, 640))
    s = Sample(image, [[10, 10, 40, 40]], [0], [False], reduced=4, full_hw=(480, 640))
    out = letterbox(s, 160)
    assert out.image.shape == (160, 160, 3) and out.reduced == 1 and out.full_hw is None
    np.testing.assert_allclose(out.boxes, [[2.5, 22.5, 10, 30]])


@pytest.mark.parametrize("side", [None, 64], ids=["full-size", "reduced"])
def test_a_broken_jpeg_is_dropped_counted_and_named_on_either_decode(scenes, caplog, side):
    rows = {k: v.copy() for k, v in scenes.items()}
    rows["jpeg"][1] = rows["jpeg"][1][: len(rows["jpeg"][1]) // 3]      # truncated
    rows["jpeg"][2] = b"\xff\xd8\xff\xe0" + b"\x00" * 200                # a JPEG marker, then junk
    fn = DecodeAugment(train=False, img_size=side or 1024, reduced_decode=side is not None)
    with caplog.at_level(logging.WARNING, logger="rtrain.data.decode_augment"):
        out = collate(fn(rows))
    assert fn.skipped == 2
    assert out["image_id"].tolist() == [1, 4]
    named = " ".join(r.getMessage() for r in caplog.records)
    assert "1.jpg" in named and "2.jpg" in named and "undecodable JPEG skipped" in named
