"""Augmentations keep boxes exact: each box must tightly cover the pixels of its coloured rectangle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from augment_scenes import TOL
from augment_scenes import scene as _scene
from augment_scenes import tight as _tight

from rtrain.data.augment import (
    PAD_VALUE,
    Augmenter,
    AugmentParams,
    Sample,
    hflip,
    hsv_jitter,
    letterbox,
    mosaic4,
    random_affine,
    rescale_batch,
    sample_rng,
)

# pure colours; a pixel "is" colour c when it is more than half-way from gray to c (bilinear edges)








def _assert_boxes_tight(sample: Sample) -> None:
    assert sample.boxes.dtype == np.float32 and sample.labels.dtype == np.int64
    for box, label in zip(sample.boxes, sample.labels, strict=True):
        tight = _tight(sample.image, int(label))
        assert tight is not None, f"label {label}: box {box} kept but no pixels visible"
        np.testing.assert_allclose(box, tight, atol=TOL, err_msg=f"label {label}")


def test_letterbox_landscape_and_portrait_exact():
    s = _scene(480, 640, {0: (300, 100, 420, 200), 1: (0, 0, 64, 48)})
    out = letterbox(s, 320)
    assert out.image.shape == (320, 320, 3) and out.image.dtype == np.uint8
    assert out.scale == pytest.approx(0.5) and out.pad == (0.0, 40.0)
    np.testing.assert_allclose(out.boxes, [[150, 90, 210, 140], [0, 40, 32, 64]])
    assert (out.image[:40] == PAD_VALUE).all() and (out.image[280:] == PAD_VALUE).all()
    _assert_boxes_tight(out)

    p = _scene(333, 150, {2: (10, 20, 140, 300)})
    out = letterbox(p, 256)
    r = 256 / 333
    left = (256 - int(150 * r)) // 2
    assert out.pad == (left, 0) and out.scale == pytest.approx(r)
    np.testing.assert_allclose(out.boxes, [[10 * r + left, 20 * r, 140 * r + left, 300 * r]], rtol=1e-6)
    _assert_boxes_tight(out)
    # stored = (input - pad) / scale maps back exactly
    back = (out.boxes - np.array(out.pad * 2, np.float32)) / out.scale
    np.testing.assert_allclose(back, p.boxes, atol=1e-3)


def test_hflip_twice_is_identity_and_mirrors_region():
    s = _scene(100, 160, {0: (10, 20, 50, 70), 3: (120, 5, 160, 30)})
    once = hflip(s)
    np.testing.assert_array_equal(once.boxes, [[110, 20, 150, 70], [0, 5, 40, 30]])
    _assert_boxes_tight(once)
    twice = hflip(once)
    np.testing.assert_array_equal(twice.image, s.image)
    np.testing.assert_array_equal(twice.boxes, s.boxes)


@pytest.mark.parametrize("seed", range(6))
def test_random_affine_boxes_cover_pixels(seed):
    s = letterbox(
        _scene(480, 640, {0: (300, 100, 420, 200), 1: (40, 300, 200, 470), 2: (560, 10, 639, 90)}), 320
    )
    out = random_affine(s, np.random.default_rng(seed), 320, scale=0.5, translate=0.25)
    assert out.image.shape == (320, 320, 3)
    _assert_boxes_tight(out)


def test_random_affine_clips_and_drops():
    s = _scene(200, 200, {0: (0, 80, 40, 120), 1: (90, 20, 91, 40), 2: (60, 50, 160, 150)})

    class Fixed:  # s = 1, centre moved by +50 px right: box 0 stays, 1 too thin, 2 partly cut
        def uniform(self, lo, hi, size=None):
            return 1.0 if size is None else np.array([150 / 200, 100 / 200])

    out = random_affine(s, Fixed(), 200, scale=0.0, translate=0.5)
    np.testing.assert_allclose(out.boxes, [[50, 80, 90, 120], [110, 50, 200, 150]])
    assert out.labels.tolist() == [0, 2]
    _assert_boxes_tight(out)
    # a box left with < 20% of its area is dropped
    tiny = _scene(200, 200, {0: (0, 0, 100, 100)})
    moved = random_affine(tiny, Fixed(), 200, 0.0, 0.5)  # 50 px right: all of it stays
    assert moved.labels.tolist() == [0]

    class FarLeft:
        def uniform(self, lo, hi, size=None):
            return 1.0 if size is None else np.array([15 / 200, 100 / 200])  # shift 85 px left

    gone = random_affine(tiny, FarLeft(), 200, 0.0, 0.5)  # 15 of 100 px wide left: 15% < 20%
    assert len(gone.boxes) == 0 and gone.boxes.shape == (0, 4)


def test_mosaic4_tiles_keep_boxes_exact():
    scenes = [
        _scene(480, 640, {0: (100, 100, 300, 300)}),
        _scene(300, 200, {1: (20, 30, 180, 260)}),
        _scene(640, 640, {2: (200, 200, 400, 420)}),
        _scene(240, 320, {3: (40, 40, 280, 200)}),
    ]
    for seed in range(4):
        canvas, ref = mosaic4(scenes, np.random.default_rng(seed), 256)
        assert canvas.image.shape == (512, 512, 3) and ref.shape == (len(canvas.boxes),)
        assert sorted(canvas.labels.tolist()) == [0, 1, 2, 3]
        _assert_boxes_tight(canvas)
        out = random_affine(canvas, np.random.default_rng(seed), 256, 0.3, 0.1, ref_area=ref)
        _assert_boxes_tight(out)


def test_augmenter_full_train_recipe_boxes_exact():
    params = AugmentParams(hflip=0.5, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, scale=0.4, translate=0.2, mosaic=0.5)
    aug = Augmenter(img_size=256, train=True, params=params, seed=3)
    scenes = [
        _scene(480, 640, {0: (100, 100, 300, 300), 2: (400, 50, 600, 200)}),
        _scene(300, 200, {1: (20, 30, 180, 260)}),
        _scene(640, 640, {3: (200, 200, 400, 420)}),
        _scene(240, 320, {}),
    ]
    for epoch in range(4):
        outs = aug(scenes, [11, 12, 13, 14], epoch)
        for out in outs:
            assert out.image.shape == (256, 256, 3)
            _assert_boxes_tight(out)


def test_hsv_jitter_changes_colours_not_boxes():
    s = _scene(64, 64, {0: (10, 10, 30, 30)}, bg=90)
    out = hsv_jitter(s, np.random.default_rng(1), 0.1, 0.7, 0.4)
    assert not np.array_equal(out.image, s.image) and out.image.shape == s.image.shape
    np.testing.assert_array_equal(out.boxes, s.boxes)
    same = hsv_jitter(s, np.random.default_rng(1), 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(same.image, s.image)


def test_determinism_per_seed_epoch_image_and_order_independent():
    params = AugmentParams(mosaic=0.0)
    aug = Augmenter(img_size=128, train=True, params=params, seed=7)
    rng = np.random.default_rng(0)
    scenes = [
        Sample(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8), [[10, 10, 90, 80]], [1], [False])
        for _ in range(3)
    ]
    a = aug(scenes, [1, 2, 3], epoch=5)
    b = aug(scenes[::-1], [3, 2, 1], epoch=5)[::-1]  # other order, same per-image results
    c = aug(scenes, [1, 2, 3], epoch=6)
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.boxes, y.boxes)
        assert not np.array_equal(x.image, z.image)
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random() != sample_rng(1, 3, 3).random()
    # mosaic too is a function of (seed, epoch, image_id) given the same batch
    m = Augmenter(img_size=128, train=True, params=AugmentParams(mosaic=1.0), seed=7)
    np.testing.assert_array_equal(m(scenes, [1, 2, 3], 2)[0].image, m(scenes, [1, 2, 3], 2)[0].image)


@pytest.mark.parametrize("train", [True, False])
def test_empty_boxes(train):
    s = Sample(np.zeros((50, 70, 3), np.uint8), np.zeros((0, 4)), [], [])
    aug = Augmenter(img_size=64, train=train, params=AugmentParams(mosaic=0.5))
    for out in aug([s, s], [1, 2], epoch=0):
        assert out.image.shape == (64, 64, 3)
        assert out.boxes.shape == (0, 4) and out.labels.shape == (0,) and out.iscrowd.shape == (0,)


def test_val_is_letterbox_only():
    s = _scene(480, 640, {0: (300, 100, 420, 200)})
    out = Augmenter(img_size=320, train=False)([s], [1])[0]
    ref = letterbox(s, 320)
    np.testing.assert_array_equal(out.image, ref.image)
    np.testing.assert_array_equal(out.boxes, ref.boxes)


def test_rescale_batch_scales_images_and_boxes():
    s = letterbox(_scene(480, 640, {0: (300, 100, 420, 200)}), 320)
    images = torch.from_numpy(s.image).permute(2, 0, 1)[None].contiguous()  # [1, 3, 320, 320] uint8
    boxes = torch.from_numpy(s.boxes)[None]
    small, small_boxes = rescale_batch(images, boxes, 256)
    assert small.shape == (1, 3, 256, 256) and small.dtype == torch.uint8
    np.testing.assert_allclose(small_boxes[0, 0].numpy(), s.boxes[0] * 0.8, rtol=1e-6)
    tight = _tight(small[0].permute(1, 2, 0).numpy(), 0)
    np.testing.assert_allclose(small_boxes[0, 0].numpy(), tight, atol=TOL)
    f, _ = rescale_batch(images.float() / 255, boxes, 384)
    assert f.dtype == torch.float32 and f.shape == (1, 3, 384, 384)
