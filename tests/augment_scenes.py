"""Test scenes for the augmentation tests: coloured rectangles whose boxes can be re-measured."""

from __future__ import annotations

import numpy as np

from rtrain.data.augment import Sample

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 0)}
TOL = 1.01  # px: bilinear resampling blurs an edge by up to one pixel


def mask(image: np.ndarray, label: int) -> np.ndarray:
    """Pixels of `label`'s colour."""
    x = image.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return {
        0: (r - g > 127) & (r - b > 127),
        1: (g - r > 127) & (g - b > 127),
        2: (b - r > 127) & (b - g > 127),
        3: (r - b > 127) & (g - b > 127),
    }[label]


def tight(image: np.ndarray, label: int) -> np.ndarray | None:
    """The tight xyxy box (continuous px) around `label`'s pixels, or None."""
    ys, xs = np.nonzero(mask(image, label))
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def scene(h: int, w: int, rects: dict[int, tuple[int, int, int, int]], bg: int = 40) -> Sample:
    """An h x w dark image with one filled rectangle per label (x1, y1, x2, y2 exclusive)."""
    image = np.full((h, w, 3), bg, np.uint8)
    for label, (x1, y1, x2, y2) in rects.items():
        image[y1:y2, x1:x2] = COLOURS[label]
    labels = list(rects)
    return Sample(image, [rects[k] for k in labels], labels, [False] * len(labels))
