"""Detection augmentations that keep boxes exact (numpy + PIL; torch only in `rescale_batch`).

Conventions:
- images are uint8 HxWx3 RGB numpy arrays;
- boxes are float32 [M, 4] `xyxy` in continuous pixel coordinates (pixel i covers [i, i+1)),
  labels int64 [M], iscrowd bool [M];
- every geometric step maps a point x to `a * x + b` with the same continuous convention as
  PIL's resize/affine sampling, so a box drawn around a coloured rectangle still covers it
  tightly (to interpolation blur) after the step.

The train recipe (as YOLO-style detectors use): [mosaic of 4 | letterbox] -> random affine
(zoom `scale`, shift `translate`) to S x S -> HSV jitter -> horizontal flip. Val: letterbox only,
to S x S or, for rectangular evaluation, to a batch canvas (H, W) from `rect_canvas` (the same
resize by S / max(h, w), so only the gray padding around the image differs).
Every random choice comes from `sample_rng(seed, epoch, image_id)`, so one image's augmentation
for an epoch does not depend on worker order or on the other images (mosaic partners excepted:
they are drawn from the same batch, see `Augmenter`).

Multi-scale training is per batch, not per image: the train step calls `rescale_batch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
from PIL import Image

PAD_VALUE = 114  # letterbox / affine border gray


@dataclass
class Sample:
    """One image and its annotations, plus the letterbox mapping from the stored image.

    `scale` and `pad` (left, top) describe `current = stored * scale + pad`; they are exact
    after `letterbox` (val mode) and only describe the letterbox step in train mode.
    """

    image: np.ndarray  # uint8 [H, W, 3]
    boxes: np.ndarray  # float32 [M, 4] xyxy pixels
    labels: np.ndarray  # int64 [M]
    iscrowd: np.ndarray  # bool [M]
    scale: float = 1.0
    pad: tuple[float, float] = (0.0, 0.0)
    # `image` may be the current image decoded at 1/reduced of its size (JPEG DCT scaling, see
    # `rtrain.data.jpeg.decode_rgb`): boxes, scale and pad still refer to the full-size image of
    # (height, width) `full_hw`, and only the first resize (`letterbox`, `mosaic4`) reads it.
    reduced: int = 1
    full_hw: tuple[int, int] | None = None

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the image the boxes refer to."""
        return self.full_hw if self.full_hw is not None else self.image.shape[:2]

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        if not len(self.boxes) == len(self.labels) == len(self.iscrowd):
            raise ValueError(
                f"boxes/labels/iscrowd lengths differ: {len(self.boxes)}/{len(self.labels)}/"
                f"{len(self.iscrowd)}"
            )
        if self.reduced != 1:
            h, w = self.full_hw or (0, 0)
            if self.image.shape[:2] != (-(-h // self.reduced), -(-w // self.reduced)):
                raise ValueError(f"a {self.image.shape[0]}x{self.image.shape[1]} image is not a "
                                 f"1/{self.reduced} decode of {h}x{w}")


@dataclass(frozen=True)
class AugmentParams:
    """Train-time augmentation knobs; names match `rtrain.config.DataConfig`'s fields."""

    hflip: float = 0.5  # probability
    hsv_h: float = 0.015  # hue shift, fraction of the hue circle (+-)
    hsv_s: float = 0.5  # saturation gain (+-)
    hsv_v: float = 0.3  # value gain (+-)
    scale: float = 0.5  # affine zoom in [1 - scale, 1 + scale]
    translate: float = 0.1  # affine shift, fraction of the output side (+-)
    mosaic: float = 0.0  # probability of a 4-image mosaic
    min_area_frac: float = 0.2  # drop a box left with less of its (transformed) area
    min_side: float = 2.0  # drop a box thinner than this (px) after the geometry

    @classmethod
    def from_obj(cls, obj) -> AugmentParams:
        """Take the same-named attributes of a config object (e.g. DataConfig); others default."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)})


def sample_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator for one image in one epoch: independent of order and of other images."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, epoch % 2**63, image_id % 2**63]))


# ---------------------------------------------------------------- geometry helpers


def _resize_exact(image: np.ndarray, r: float, reduced: int = 1,
                  full_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Resize by exactly `r` (x_out = r * x_in) to (floor(w r), floor(h r)), bilinear (antialiased).

    `reduced` > 1: `image` is a 1/reduced decode of a `full_hw` image (`Sample.reduced`); the output
    is that full-size image's resize, read from the smaller one (x_full = reduced * x_image)."""
    h, w = full_hw if reduced != 1 else image.shape[:2]
    if r == 1.0 and reduced == 1:
        return image
    # floor keeps the source box inside the image; `box` makes the scale exactly r in both axes.
    nw, nh = max(1, math.floor(w * r + 1e-6)), max(1, math.floor(h * r + 1e-6))
    box = (0.0, 0.0, min(nw / r, w) / reduced, min(nh / r, h) / reduced)
    if (nh, nw) == image.shape[:2] and box == (0.0, 0.0, float(nw), float(nh)):
        return image  # r * reduced == 1: the DCT already made this size
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR, box=box))


def _keep_boxes(boxes: np.ndarray, ref_area: np.ndarray, min_area_frac: float, min_side: float) -> np.ndarray:
    """Mask of boxes that kept >= min_area_frac of `ref_area` and are >= min_side px on both sides."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    area = np.clip(w, 0, None) * np.clip(h, 0, None)
    return (w >= min_side) & (h >= min_side) & (area >= min_area_frac * np.maximum(ref_area, 1e-6))


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _select(sample: Sample, keep: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    return boxes[keep], sample.labels[keep], sample.iscrowd[keep]


# ---------------------------------------------------------------- transforms


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(nh, nw) of an h x w image after `letterbox`'s resize (longer side -> `size`)."""
    r = size / max(h, w)
    if r == 1.0:
        return h, w
    return max(1, math.floor(h * r + 1e-6)), max(1, math.floor(w * r + 1e-6))


def rect_canvas(shapes, size: int, stride: int = 32) -> tuple[int, int]:
    """The (H, W) canvas that holds every (h, w) of `shapes` resized by `letterbox` (longer side
    `size`): the batch's largest resized height and width, each rounded up to a multiple of
    `stride` (rectangular evaluation: a batch of 16:9 images at 416 gets 256 x 416, not 416 x 416).
    At most `size` x `size` when `size` is a multiple of `stride`."""
    if not len(shapes):
        return size, size
    dims = [resized_shape(int(h), int(w), size) for h, w in shapes]
    nh, nw = max(d[0] for d in dims), max(d[1] for d in dims)
    return -(-nh // stride) * stride, -(-nw // stride) * stride


def letterbox(sample: Sample, size: int, canvas: tuple[int, int] | None = None) -> Sample:
    """Resize so the longer side is `size` (aspect kept), pad with gray, centred, to size x size or
    to `canvas` (H, W), which must hold the resized image (`rect_canvas`).

    Boxes follow exactly: `new = old * r + (left, top)`; `scale`/`pad` accumulate that mapping.
    """
    h, w = sample.hw
    r = size / max(h, w)
    image = _resize_exact(sample.image, r, sample.reduced, sample.full_hw)
    nh, nw = image.shape[:2]
    ch, cw = canvas if canvas is not None else (size, size)
    if nh > ch or nw > cw:
        raise ValueError(f"letterbox: a {h}x{w} image resized to {nh}x{nw} does not fit a {ch}x{cw} canvas")
    left, top = (cw - nw) // 2, (ch - nh) // 2
    canvas = np.full((ch, cw, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top : top + nh, left : left + nw] = image
    boxes = sample.boxes * np.float32(r) + np.array([left, top, left, top], dtype=np.float32)
    pad = (sample.pad[0] * r + left, sample.pad[1] * r + top)
    return replace(sample, image=canvas, boxes=boxes, scale=sample.scale * r, pad=pad,
                   reduced=1, full_hw=None)


def hflip(sample: Sample) -> Sample:
    """Mirror left-right: x -> W - x, so [x1, x2] -> [W - x2, W - x1]."""
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, 0] = w - sample.boxes[:, 2]
    boxes[:, 2] = w - sample.boxes[:, 0]
    return replace(sample, image=np.ascontiguousarray(sample.image[:, ::-1]), boxes=boxes)


def hsv_jitter(sample: Sample, rng: np.random.Generator, h: float, s: float, v: float) -> Sample:
    """Shift hue by U(-h, h) of the circle, multiply saturation and value by 1 + U(-s, s), 1 + U(-v, v)."""
    dh, gs, gv = rng.uniform(-1.0, 1.0, 3) * (h, s, v)
    if h == s == v == 0:
        return sample
    x = np.arange(256, dtype=np.float32)
    lut_h = np.mod(x + dh * 256.0, 256.0).astype(np.uint8)
    lut_s = np.clip(x * (1.0 + gs), 0, 255).astype(np.uint8)
    lut_v = np.clip(x * (1.0 + gv), 0, 255).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(sample.image).convert("HSV"))
    hsv = np.stack([lut_h[hsv[..., 0]], lut_s[hsv[..., 1]], lut_v[hsv[..., 2]]], axis=-1)
    rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    return replace(sample, image=rgb)


def random_affine(
    sample: Sample,
    rng: np.random.Generator,
    out_size: int,
    scale: float,
    translate: float,
    min_area_frac: float = 0.2,
    min_side: float = 2.0,
    ref_area: np.ndarray | None = None,
) -> Sample:
    """Zoom by s ~ U(1 - scale, 1 + scale) about the input centre and place that centre at
    (0.5 + U(-translate, translate)) * out_size in an out_size x out_size output.

    Boxes: `new = s * (old - c_in) + t`, clipped to the output; a box is dropped when less than
    `min_area_frac` of its area before any clipping remains (`ref_area`, input pixels, defaults
    to the box's own area) or when a side is shorter than `min_side` px.
    """
    h, w = sample.image.shape[:2]
    s = rng.uniform(1.0 - scale, 1.0 + scale)
    tx, ty = rng.uniform(0.5 - translate, 0.5 + translate, 2) * out_size
    cx, cy = w / 2.0, h / 2.0
    if s == 1.0 and (w, h) == (out_size, out_size) and tx == cx and ty == cy:
        image = sample.image
    else:
        # PIL wants the output->input map: in = (out - t) / s + c.
        coeffs = (1.0 / s, 0.0, cx - tx / s, 0.0, 1.0 / s, cy - ty / s)
        image = np.asarray(
            Image.fromarray(sample.image).transform(
                (out_size, out_size), Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=(PAD_VALUE,) * 3
            )
        )
    if ref_area is None:
        ref_area = _box_area(sample.boxes)
    a = np.float32(s)
    boxes = (sample.boxes - np.array([cx, cy, cx, cy], np.float32)) * a + np.array(
        [tx, ty, tx, ty], np.float32
    )
    boxes = np.clip(boxes, 0.0, float(out_size)).astype(np.float32)
    keep = _keep_boxes(boxes, ref_area * s * s, min_area_frac, min_side)
    boxes, labels, iscrowd = _select(sample, keep, boxes)
    return replace(sample, image=image, boxes=boxes, labels=labels, iscrowd=iscrowd)


def mosaic4(samples: list[Sample], rng: np.random.Generator, size: int) -> tuple[Sample, np.ndarray]:
    """Tile 4 images (each resized so its longer side is `size`) around a random centre of a
    2*size x 2*size gray canvas: top-left, top-right, bottom-left, bottom-right.

    Returns the canvas sample (boxes clipped to each tile's visible part) and each box's area
    before clipping (canvas pixels), for the area filter of the `random_affine` that follows.
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic4 needs 4 samples, got {len(samples)}")
    big = 2 * size
    xc, yc = (int(v) for v in rng.integers(size // 2, big - size // 2 + 1, 2))
    canvas = np.full((big, big, 3), PAD_VALUE, dtype=np.uint8)
    all_boxes, all_ref, all_labels, all_crowd = [], [], [], []
    for i, sample in enumerate(samples):
        h, w = sample.hw
        image = _resize_exact(sample.image, size / max(h, w), sample.reduced, sample.full_hw)
        nh, nw = image.shape[:2]
        ox = xc - nw if i in (0, 2) else xc  # tile origin on the canvas, may be negative
        oy = yc - nh if i in (0, 1) else yc
        x1, y1, x2, y2 = max(ox, 0), max(oy, 0), min(ox + nw, big), min(oy + nh, big)
        canvas[y1:y2, x1:x2] = image[y1 - oy : y2 - oy, x1 - ox : x2 - ox]
        r = np.float32(size / max(h, w))
        boxes = sample.boxes * r + np.array([ox, oy, ox, oy], np.float32)
        all_ref.append(_box_area(boxes))
        boxes = np.stack(
            [
                np.clip(boxes[:, 0], x1, x2),
                np.clip(boxes[:, 1], y1, y2),
                np.clip(boxes[:, 2], x1, x2),
                np.clip(boxes[:, 3], y1, y2),
            ],
            axis=1,
        )
        all_boxes.append(boxes.astype(np.float32))
        all_labels.append(sample.labels)
        all_crowd.append(sample.iscrowd)
    first = samples[0]
    out = Sample(
        image=canvas,
        boxes=np.concatenate(all_boxes),
        labels=np.concatenate(all_labels),
        iscrowd=np.concatenate(all_crowd),
        scale=first.scale,
        pad=first.pad,
    )
    return out, np.concatenate(all_ref)


# ---------------------------------------------------------------- pipeline


@dataclass
class Augmenter:
    """The composed recipe for a batch of decoded samples (stored-image pixels in, S x S out).

    train=False: letterbox to `img_size` only (exact `scale`/`pad`, nothing random).
    train=True: per image, with its own `sample_rng(seed, epoch, image_id)`:
      mosaic (prob `mosaic`; the 3 partners are drawn from the other images of the same call)
      or letterbox, then random affine, HSV jitter and horizontal flip (prob `hflip`).
    Mosaic partners make an image's result depend on which images share its batch; without
    mosaic the result depends only on (seed, epoch, image_id, the image).
    """

    img_size: int
    train: bool
    params: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0

    def one(self, samples: list[Sample], index: int, image_id: int, epoch: int,
            canvas: tuple[int, int] | None = None) -> Sample:
        """Augment samples[index] (the others are mosaic partners only). `canvas` (H, W): the
        val letterbox canvas (rectangular evaluation, `rect_canvas`); None = S x S."""
        sample, p, size = samples[index], self.params, self.img_size
        if not self.train:
            return letterbox(sample, size, canvas)
        rng = sample_rng(self.seed, epoch, image_id)
        ref_area = None
        if p.mosaic > 0 and rng.random() < p.mosaic and len(samples) > 1:
            others = [i for i in range(len(samples)) if i != index]
            picks = rng.choice(others, size=3, replace=len(others) < 3)
            sample, ref_area = mosaic4([sample] + [samples[int(i)] for i in picks], rng, size)
        else:
            sample = letterbox(sample, size)
        sample = random_affine(sample, rng, size, p.scale, p.translate, p.min_area_frac, p.min_side, ref_area)
        sample = hsv_jitter(sample, rng, p.hsv_h, p.hsv_s, p.hsv_v)
        if rng.random() < p.hflip:
            sample = hflip(sample)
        return sample

    def __call__(self, samples: list[Sample], image_ids: list[int], epoch: int = 0) -> list[Sample]:
        return [self.one(samples, i, int(image_ids[i]), epoch) for i in range(len(samples))]


def rescale_batch(images, boxes, new_size: int):
    """Multi-scale step: resize images [B, 3, S, S] to [B, 3, new, new] and boxes [B, M, 4] (xyxy px)
    by new / S. Padding rows (any value) are scaled too, which keeps zeros zero.

    uint8 images come back uint8 (rounded); float images stay float. Bilinear with
    align_corners=False maps x -> x * new / S, the same continuous convention as the boxes.
    """
    import torch.nn.functional as F  # torch only here: the rest of the module is numpy/PIL

    size = images.shape[-1]
    if images.shape[-2] != size:
        raise ValueError(f"rescale_batch expects square images, got {tuple(images.shape)}")
    if new_size == size:
        return images, boxes
    out = F.interpolate(images.float(), size=(new_size, new_size), mode="bilinear", align_corners=False)
    if images.dtype != out.dtype:
        out = out.round_().clamp_(0, 255).to(images.dtype)
    return out, boxes * (new_size / size)
