"""A small procedural detection dataset in COCO format: the project's built-in default.

Six shape classes (category ids 1..6, in this order): circle, square, triangle,
star, cross, ring. Each image (size x size px, default 320) has a textured
background (noise, gradient, stripes, soft blobs, or a mix) and 0-6 shapes of
random colour, 8%-45% of the image side, most of them rotated. Shapes may
overlap a little; each box is the tight extent of the shape's *visible* pixels
after all shapes are drawn, and a shape left with less than 60% of its pixels
visible is removed again, so boxes never describe hidden objects. About 10% of
the images have no objects.

Layout written under OUT:

    OUT/images/000001.jpg ...            all images (JPEG, quality 92)
    OUT/annotations.json                 COCO instances, every image   (--val-fraction 0, default)
    OUT/annotations_train.json           first images                  (--val-fraction > 0)
    OUT/annotations_val.json             last round(N * fraction) images

COCO fields: images {id, file_name, width, height}, annotations {id, image_id,
category_id, bbox [x, y, w, h] in pixels, area (visible pixel count), iscrowd 0},
categories {id, name, supercategory "shape"}. Image ids run 1..N in file order.

Every image is drawn from its own generator seeded by (seed, image index), so the
output is identical for a seed, whatever the split.

    python -m data_prep.synthetic --out /tmp/shapes --images 300 --val-fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep.atomic import atomic_file

log = logging.getLogger(__name__)

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring")
MIN_FRACTION, MAX_FRACTION = 0.08, 0.45  # object size relative to the image side
MAX_OBJECTS = 6
NEGATIVE_RATE = 0.10
MIN_VISIBLE = 0.60  # a shape more hidden than this is removed from the image
MAX_OVERLAP = 0.15  # of the new shape's box area that may cover earlier boxes


@dataclass
class SyntheticObject:
    """One drawn shape: `label` is the 0-based class index; `box` xyxy pixels (x2, y2 exclusive edges)."""

    label: int
    box: tuple[int, int, int, int]
    area: int  # visible pixels


@dataclass
class SyntheticImage:
    image: Image.Image  # RGB, size x size
    background: Image.Image  # the same image before any shape was drawn
    objects: list[SyntheticObject] = field(default_factory=list)


@dataclass
class SyntheticPaths:
    root: Path
    images: Path
    annotations: dict[str, Path]  # split name ("all" or "train"/"val") -> COCO json


def _luma(rgb) -> float:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A textured background whose mean brightness is either dark or light, with modest contrast."""
    dark = rng.random() < 0.5
    base = rng.uniform(25, 95) if dark else rng.uniform(150, 225)
    tint = rng.uniform(-25, 25, size=3)
    axis = np.arange(size, dtype=np.float32) / size
    xx, yy = axis[None, :], axis[:, None]
    field_ = np.zeros((size, size), np.float32)
    kinds = rng.choice(["gradient", "stripes", "noise", "blobs"], size=rng.integers(1, 3), replace=False)
    for kind in kinds:
        if kind == "gradient":
            angle = rng.uniform(0, 2 * math.pi)
            field_ += rng.uniform(15, 40) * ((xx * math.cos(angle) + yy * math.sin(angle)) - 0.5)
        elif kind == "stripes":
            angle = rng.uniform(0, math.pi)
            period = rng.uniform(0.03, 0.15)
            phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
            field_ += rng.uniform(8, 22) * np.sin(2 * math.pi * phase)
    field_ += np.float32(base)
    if "noise" in kinds:  # grey noise: a third of the cost of per-channel noise, looks the same
        field_ += rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(4, 14))
    img = field_[..., None] + tint.astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8), "RGB")
    if "blobs" in kinds:
        # Soft, low-contrast irregular blobs: clutter, not shapes a detector should learn.
        layer = Image.new("RGB", (size, size))
        mask = Image.new("L", (size, size), 0)
        draw_l, draw_m = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(3, 9))):
            cx, cy = rng.uniform(0, size, 2)
            rx, ry = rng.uniform(0.05, 0.2, 2) * size
            shade = tuple(int(v) for v in np.clip(base + rng.uniform(-35, 35, 3), 0, 255))
            draw_l.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=shade)
            draw_m.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.uniform(90, 170)))
        mask = mask.filter(ImageFilter.GaussianBlur(size / 40))
        out = Image.composite(layer, out, mask)
    return out


def _polygon(cx, cy, radius, n, angle, inner=None) -> list[tuple[float, float]]:
    """Regular n-gon (or a star when `inner` is the inner radius ratio) centred on (cx, cy)."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        r = radius * (inner if inner and k % 2 else 1.0)
        a = angle + 2 * math.pi * k / steps
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_shape(mask: Image.Image, label: int, cx: float, cy: float, side: float, rng) -> None:
    """Draw class `label` filled with 255 into the L-mode `mask`, fitting a `side` x `side` square."""
    draw = ImageDraw.Draw(mask)
    r = side / 2
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASS_NAMES[label]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        width = max(2, int(r * rng.uniform(0.25, 0.4)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
    elif name == "square":
        # Side s rotated by a: bounding half-width s/2 (|cos a| + |sin a|) must stay <= r.
        a = rng.uniform(-math.pi / 9, math.pi / 9)
        half = r / (abs(math.cos(a)) + abs(math.sin(a)))
        draw.polygon(_polygon(cx, cy, half * math.sqrt(2), 4, a + math.pi / 4), fill=255)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=255)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.42), fill=255)
    elif name == "cross":
        arm = r * rng.uniform(0.28, 0.4)
        c, s = math.cos(angle), math.sin(angle)
        for hx, hy in ((r, arm), (arm, r)):
            corners = [(-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=255)


def _object_colour(rng, background_luma: float) -> tuple[int, int, int]:
    """A random saturated colour whose brightness stands clearly apart from the background."""
    for _ in range(50):
        rgb = rng.integers(0, 256, 3)
        if rgb.max() - rgb.min() < 60 and rng.random() < 0.7:
            continue  # mostly saturated colours, some greys
        if abs(float(_luma(rgb.astype(np.float32))) - background_luma) >= 70:
            return tuple(int(v) for v in rgb)
    return (255, 255, 255) if background_luma < 128 else (0, 0, 0)


def _overlap(box, other) -> float:
    ix = max(0, min(box[2], other[2]) - max(box[0], other[0]))
    iy = max(0, min(box[3], other[3]) - max(box[1], other[1]))
    return ix * iy


def render_image(seed: int, index: int, size: int = 320) -> SyntheticImage:
    """Draw image `index` of the dataset with `seed`: the same arguments always give the same pixels."""
    rng = np.random.default_rng([seed, index])
    background = _background(rng, size)
    bg = np.asarray(background)
    image = background.copy()
    n = 0 if rng.random() < NEGATIVE_RATE else int(rng.integers(1, MAX_OBJECTS + 1))
    owner = np.zeros((size, size), np.int16)  # which shape (1-based) owns each pixel, 0 = background
    drawn: list[tuple[int, int, tuple[int, int, int, int]]] = []  # (label, full pixel count, crop)
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _attempt in range(20):
            side = rng.uniform(MIN_FRACTION, MAX_FRACTION) * size
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            if all(_overlap(box, b) <= MAX_OVERLAP * side * side for b in boxes):
                break
        else:
            continue
        label = int(rng.integers(len(CLASS_NAMES)))
        # Draw in a crop around the shape only: full-image masks cost most of the time.
        x0, y0 = max(0, int(box[0]) - 1), max(0, int(box[1]) - 1)
        x1, y1 = min(size, int(math.ceil(box[2])) + 1), min(size, int(math.ceil(box[3])) + 1)
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        _draw_shape(mask, label, cx - x0, cy - y0, side, rng)
        m = np.asarray(mask) > 0
        if not m.any():
            continue
        colour = _object_colour(rng, float(_luma(bg[y0:y1, x0:x1][m].astype(np.float32)).mean()))
        image.paste(colour, (x0, y0, x1, y1), mask)
        boxes.append(box)
        owner[y0:y1, x0:x1][m] = len(drawn) + 1
        drawn.append((label, int(m.sum()), (x0, y0, x1, y1)))
    objects = []
    for oid, (label, full, (x0, y0, x1, y1)) in enumerate(drawn, start=1):
        visible = owner[y0:y1, x0:x1] == oid
        count = int(visible.sum())
        if count < MIN_VISIBLE * full:
            # Mostly hidden: paint its visible remains back to background so no unlabeled shape stays.
            crop = Image.fromarray(visible.astype(np.uint8) * 255, "L")
            image.paste(background.crop((x0, y0, x1, y1)), (x0, y0, x1, y1), crop)
            continue
        ys, xs = np.nonzero(visible)
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        objects.append(SyntheticObject(label, box, count))
    return SyntheticImage(image=image, background=background, objects=objects)


def _write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_file(path, "w") as f:
        json.dump(payload, f)


def _coco(images: list[dict], annotations: list[dict]) -> dict:
    return {
        "info": {"description": "rtrain synthetic shapes", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)],
    }


def make_synthetic(
    out_dir: str | Path, images: int = 300, seed: int = 0, size: int = 320, val_fraction: float = 0.0
) -> SyntheticPaths:
    """Write `images` synthetic images and their COCO annotations under `out_dir` (layout: module doc)."""
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if size < 32:
        raise ValueError(f"--size must be >= 32, got {size}")
    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    coco_images, coco_anns = [], []
    for i in range(images):
        sample = render_image(seed, i, size)
        file_name = f"{i + 1:06d}.jpg"
        with atomic_file(image_dir / file_name, durable=False) as fh:
            sample.image.save(fh, format="JPEG", quality=92)
        coco_images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            coco_anns.append({
                "id": len(coco_anns) + 1, "image_id": i + 1, "category_id": obj.label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj.area, "iscrowd": 0,
            })
    n_val = round(images * val_fraction)
    if val_fraction > 0 and not 0 < n_val < images:
        raise ValueError(f"--val-fraction {val_fraction} of {images} images leaves an empty split")
    annotations: dict[str, Path] = {}
    if n_val == 0:
        annotations["all"] = root / "annotations.json"
        _write_json_atomic(annotations["all"], _coco(coco_images, coco_anns))
    else:
        n_train = images - n_val
        for split, keep in (("train", lambda i: i <= n_train), ("val", lambda i: i > n_train)):
            path = root / f"annotations_{split}.json"
            _write_json_atomic(path, _coco([im for im in coco_images if keep(im["id"])],
                                           [a for a in coco_anns if keep(a["image_id"])]))
            annotations[split] = path
    log.info("wrote %d images, %d boxes under %s", images, len(coco_anns), root)
    return SyntheticPaths(root=root, images=image_dir, annotations=annotations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--images", type=int, default=300, help="number of images (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320, help="image side in pixels (default 320)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="fraction of images in a val split (0 = one annotations.json)")
    args = parser.parse_args(argv)
    try:
        paths = make_synthetic(args.out, args.images, args.seed, args.size, args.val_fraction)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    for split, path in paths.annotations.items():
        print(f"{split}: {path}")
    print(f"images: {paths.images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
