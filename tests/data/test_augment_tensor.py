"""TensorAugmenter keeps boxes exact and matches the PIL Augmenter it twins (CPU tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from augment_scenes import TOL
from augment_scenes import scene as _scene
from augment_scenes import tight as _tight

from data_prep.synthetic import render_image
from rtrain.data.augment import PAD_VALUE, Augmenter, AugmentParams, Sample, hsv_jitter
from rtrain.data.augment_tensor import TensorAugmenter, hsv_jitter_batch

# pure colours; a pixel "is" colour c when it is more than half-way from gray to c (bilinear edges)
NO_HSV = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}








def _run(aug: TensorAugmenter, samples: list[Sample], ids: list[int], epoch: int = 0) -> dict:
    return aug(
        [torch.from_numpy(s.image.copy()).permute(2, 0, 1).contiguous() for s in samples],
        [torch.from_numpy(s.boxes) for s in samples],
        [torch.from_numpy(s.labels) for s in samples],
        [torch.from_numpy(s.iscrowd) for s in samples],
        ids,
        epoch,
    )


def _unpadded(out: dict, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = out["labels"][i] >= 0
    image = out["images"][i].permute(1, 2, 0).numpy()
    return image, out["boxes"][i][keep].numpy(), out["labels"][i][keep].numpy()


def _assert_tight(out: dict) -> int:
    """Every kept box tightly covers its colour's pixels; returns how many boxes were checked."""
    checked = 0
    for i in range(out["images"].shape[0]):
        image, boxes, labels = _unpadded(out, i)
        for box, label in zip(boxes, labels, strict=True):
            tight = _tight(image, int(label))
            assert tight is not None, f"image {i} label {label}: box {box} kept but no pixels visible"
            np.testing.assert_allclose(box, tight, atol=TOL, err_msg=f"image {i} label {label}")
            checked += 1
    return checked


def _assert_layout(out: dict, b: int, size: int) -> None:
    m = out["boxes"].shape[1]
    assert m >= 1
    assert out["images"].shape == (b, 3, size, size) and out["images"].dtype == torch.uint8
    assert out["boxes"].shape == (b, m, 4) and out["boxes"].dtype == torch.float32
    assert out["labels"].shape == (b, m) and out["labels"].dtype == torch.int64
    assert out["iscrowd"].shape == (b, m) and out["iscrowd"].dtype == torch.bool
    assert out["scale"].shape == (b,) and out["scale"].dtype == torch.float32
    assert out["pad"].shape == (b, 2) and out["pad"].dtype == torch.float32
    padded = out["labels"] < 0
    assert (out["boxes"][padded] == 0).all() and not out["iscrowd"][padded].any()


SCENES = [
    _scene(480, 640, {0: (300, 100, 420, 200), 1: (40, 300, 200, 470), 2: (560, 10, 639, 90)}),
    _scene(333, 150, {2: (10, 20, 140, 300)}),
    _scene(640, 640, {3: (200, 200, 400, 420), 0: (0, 0, 90, 60)}),
    _scene(240, 320, {1: (40, 40, 280, 200)}),
]
# one colour per image: in a mosaic each label's pixels come from one tile
MOSAIC_SCENES = [
    _scene(480, 640, {0: (100, 100, 300, 300)}),
    _scene(300, 200, {1: (20, 30, 180, 260)}),
    _scene(640, 640, {2: (200, 200, 400, 420)}),
    _scene(240, 320, {3: (40, 40, 280, 200)}),
]


def test_val_letterbox_exact_and_maps_back():
    aug = TensorAugmenter(320, train=False)
    out = _run(aug, SCENES, [1, 2, 3, 4])
    _assert_layout(out, 4, 320)
    assert _assert_tight(out) == 7
    np.testing.assert_allclose(out["scale"].numpy(), [0.5, 320 / 333, 0.5, 1.0], rtol=1e-6)
    left = (320 - int(150 * 320 / 333)) // 2
    np.testing.assert_array_equal(out["pad"].numpy(), [[0, 40], [left, 0], [0, 0], [0, 40]])
    np.testing.assert_allclose(out["boxes"][0, 0].numpy(), [150, 90, 210, 140])
    images = out["images"][0]
    assert (images[:, :40] == PAD_VALUE).all() and (images[:, 280:] == PAD_VALUE).all()
    # stored = (input - pad) / scale, exactly
    for i, s in enumerate(SCENES):
        k = len(s.labels)
        back = (out["boxes"][i, :k] - out["pad"][i].repeat(2)) / out["scale"][i]
        np.testing.assert_allclose(back.numpy(), s.boxes, atol=1e-3)
    # the same as the PIL path: identical boxes, pixels within one gray level on average
    ref = Augmenter(320, train=False)(SCENES, [1, 2, 3, 4])
    for i, r in enumerate(ref):
        image, boxes, _ = _unpadded(out, i)
        np.testing.assert_array_equal(boxes, r.boxes)
        assert np.abs(image.astype(float) - r.image).mean() < 0.5


@pytest.mark.parametrize("epoch", range(4))
def test_train_affine_and_flip_boxes_cover_pixels(epoch):
    params = AugmentParams(hflip=0.5, scale=0.5, translate=0.25, mosaic=0.0, **NO_HSV)
    out = _run(TensorAugmenter(256, train=True, params=params, seed=1), SCENES, [1, 2, 3, 4], epoch)
    _assert_layout(out, 4, 256)
    _assert_tight(out)


def test_flip_is_folded_into_the_warp():
    s = _scene(200, 200, {0: (10, 20, 50, 70), 3: (120, 5, 190, 30)})
    base = {"scale": 0.0, "translate": 0.0, "mosaic": 0.0, **NO_HSV}
    plain = _run(TensorAugmenter(200, True, AugmentParams(hflip=0.0, **base)), [s], [1])
    flipped = _run(TensorAugmenter(200, True, AugmentParams(hflip=1.0, **base)), [s], [1])
    # zoom 1, centre kept: the affine is the identity, so the flip mirrors pixels and boxes exactly
    np.testing.assert_array_equal(plain["images"].numpy(), s.image.transpose(2, 0, 1)[None])
    np.testing.assert_array_equal(flipped["images"].numpy(), plain["images"].flip(-1).numpy())
    np.testing.assert_array_equal(flipped["boxes"][0].numpy(), [[150, 20, 190, 70], [10, 5, 80, 30]])
    _assert_tight(flipped)


@pytest.mark.parametrize("epoch", range(3))
def test_mosaic_keeps_boxes_exact_and_takes_partners_boxes(epoch):
    params = AugmentParams(hflip=0.5, scale=0.3, translate=0.1, mosaic=1.0, **NO_HSV)
    out = _run(TensorAugmenter(256, train=True, params=params, seed=2), MOSAIC_SCENES, [1, 2, 3, 4], epoch)
    _assert_layout(out, 4, 256)
    assert _assert_tight(out) > 4  # mosaic brings partners' boxes in
    assert (out["scale"] == 1).all() and (out["pad"] == 0).all()  # as Augmenter: mosaic has no letterbox


def _synthetic_samples(n: int) -> list[Sample]:
    """Real textured images with their true boxes; a third cropped to landscape, a third to portrait."""
    out = []
    for i in range(n):
        im = render_image(seed=5, index=i, size=320)
        image = np.asarray(im.image)
        boxes = np.array([o.box for o in im.objects], np.float32).reshape(-1, 4)
        labels = [o.label for o in im.objects]
        h, w = {0: (320, 320), 1: (200, 320), 2: (320, 180)}[i % 3]
        image = np.ascontiguousarray(image[:h, :w])
        boxes = np.minimum(boxes, [w, h, w, h]).astype(np.float32)
        keep = (boxes[:, 2] - boxes[:, 0] >= 4) & (boxes[:, 3] - boxes[:, 1] >= 4)
        out.append(Sample(image, boxes[keep], np.asarray(labels, np.int64)[keep], np.zeros(keep.sum(), bool)))
    return out


@pytest.mark.parametrize("mosaic", [0.0, 0.5])
def test_statistics_match_the_pil_augmenter(mosaic):
    """Same inputs, same (seed, epoch, image_id): same random parameters, so the boxes are identical
    and the pixels differ only by resampling / HSV rounding. Tolerances: per-channel mean and std
    within 1.5 gray levels over the batch, mean absolute pixel difference per image under 3."""
    samples = _synthetic_samples(12)
    ids = list(range(100, 112))
    params = AugmentParams(mosaic=mosaic)  # the default recipe: HSV, zoom 0.5, shift 0.1, flip 0.5
    for epoch in range(2):
        ref = Augmenter(320, True, params, seed=9)(samples, ids, epoch)
        out = _run(TensorAugmenter(320, True, params, seed=9), samples, ids, epoch)
        _assert_layout(out, 12, 320)
        ours = out["images"].permute(0, 2, 3, 1).numpy().astype(np.float64)
        theirs = np.stack([r.image for r in ref]).astype(np.float64)
        np.testing.assert_allclose(ours.mean((0, 1, 2)), theirs.mean((0, 1, 2)), atol=1.5)
        np.testing.assert_allclose(ours.std((0, 1, 2)), theirs.std((0, 1, 2)), atol=1.5)
        assert np.abs(ours - theirs).mean((1, 2, 3)).max() < 3.0
        kept = (out["labels"] >= 0).sum(1).tolist()
        assert kept == [len(r.labels) for r in ref] and sum(kept) > 10
        for i, r in enumerate(ref):
            _, boxes, labels = _unpadded(out, i)
            np.testing.assert_array_equal(boxes, r.boxes)  # hence the same box size distribution
            np.testing.assert_array_equal(labels, r.labels)
            assert out["scale"][i].item() == pytest.approx(r.scale) and tuple(out["pad"][i].tolist()) == r.pad


def test_hsv_matches_pil_and_zero_gain_is_identity():
    image = np.array(render_image(seed=3, index=1, size=96).image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    same = hsv_jitter_batch(x, torch.zeros(1, 3))
    np.testing.assert_allclose(same.numpy(), x.numpy(), atol=1e-3)

    class Fixed:
        def uniform(self, lo, hi, size=None):
            return np.array([0.5, -0.8, 0.6])

    ref = hsv_jitter(Sample(image, np.zeros((0, 4)), [], []), Fixed(), 0.1, 0.5, 0.3).image
    gains = torch.tensor([[0.5 * 0.1, -0.8 * 0.5, 0.6 * 0.3]])
    ours = hsv_jitter_batch(x, gains).round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    diff = np.abs(ours - ref.astype(np.float64))
    assert diff.mean() < 2.0, diff.mean()  # PIL quantizes H, S, V to 8 bits on the way


def test_deterministic_per_seed_epoch_image_and_order_independent():
    params = AugmentParams(mosaic=0.0)
    aug = TensorAugmenter(128, train=True, params=params, seed=7)
    samples = _synthetic_samples(3)
    a = _run(aug, samples, [1, 2, 3], epoch=5)
    again = _run(aug, samples, [1, 2, 3], epoch=5)
    rev = _run(aug, samples[::-1], [3, 2, 1], epoch=5)
    other = _run(aug, samples, [1, 2, 3], epoch=6)
    for key in ("images", "boxes", "labels", "scale", "pad"):
        assert torch.equal(a[key], again[key]), key
    for i in range(3):
        np.testing.assert_array_equal(_unpadded(a, i)[0], _unpadded(rev, 2 - i)[0])
        np.testing.assert_array_equal(_unpadded(a, i)[1], _unpadded(rev, 2 - i)[1])
        assert not torch.equal(a["images"][i], other["images"][i])
    m = TensorAugmenter(128, train=True, params=AugmentParams(mosaic=1.0), seed=7)
    assert torch.equal(_run(m, samples, [1, 2, 3], 2)["images"], _run(m, samples, [1, 2, 3], 2)["images"])


@pytest.mark.parametrize("train", [True, False])
def test_empty_boxes_and_one_pixel_image(train):
    empty = Sample(np.zeros((50, 70, 3), np.uint8), np.zeros((0, 4)), [], [])
    dot = Sample(np.full((1, 1, 3), 200, np.uint8), [[0, 0, 1, 1]], [2], [False])
    params = AugmentParams(mosaic=0.5)
    aug = TensorAugmenter(64, train=train, params=params)
    for epoch in range(3):  # a mosaic may bring the dot's box into an empty image: as the PIL path does
        out = _run(aug, [empty, empty, dot], [1, 2, 3], epoch)
        ref = Augmenter(64, train=train, params=params)([empty, empty, dot], [1, 2, 3], epoch)
        _assert_layout(out, 3, 64)
        assert (out["labels"] >= 0).sum(1).tolist() == [len(r.labels) for r in ref]
    val = _run(TensorAugmenter(64, train=False), [dot, empty], [3, 1])
    assert (val["images"][0] == 200).all() and val["scale"][0].item() == 64.0
    np.testing.assert_array_equal(val["boxes"][0].numpy(), [[0, 0, 64, 64]])
    assert val["boxes"].shape == (2, 1, 4) and val["labels"][1].tolist() == [-1]
    none = _run(TensorAugmenter(64, train=train), [], [])
    _assert_layout(none, 0, 64)


def test_rejects_mismatched_inputs():
    aug = TensorAugmenter(64, train=False)
    img = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="lengths differ"):
        aug([img], [torch.zeros(1, 4)], [torch.zeros(2)], [torch.zeros(1, dtype=bool)], [1])
    with pytest.raises(ValueError, match="uint8"):
        aug([img.float()], [torch.zeros(0, 4)], [torch.zeros(0)], [torch.zeros(0)], [1])


@pytest.mark.parametrize("train", [False, True])
def test_float_resize_path_as_on_cuda_agrees(train):
    """CUDA resizes in float (no uint8 antialias kernel there); CPU in uint8: same result to rounding."""
    params = AugmentParams(mosaic=0.5)
    fast = TensorAugmenter(160, train, params, seed=4)
    cuda_like = TensorAugmenter(160, train, params, seed=4)
    cuda_like.uint8_resize_on_cpu = False
    a, b = _run(fast, MOSAIC_SCENES, [1, 2, 3, 4], 1), _run(cuda_like, MOSAIC_SCENES, [1, 2, 3, 4], 1)
    for key in ("boxes", "labels", "scale", "pad"):
        assert torch.equal(a[key], b[key]), key
    assert (a["images"].float() - b["images"].float()).abs().mean() < 0.5
    _assert_tight(b)
