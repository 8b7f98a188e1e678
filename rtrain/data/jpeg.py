"""Decode one stored JPEG for the CPU data path, at the smallest size its first resize allows.

`decode_rgb(data, longer_side)` -> (image uint8 [h, w, 3] RGB, reduced, (H, W)):
- (H, W) is the stored image's size from its header; boxes stay in those pixels.
- `longer_side` is the longer side the first resize will make (letterbox or mosaic tile: the
  train and val image size). When that is at most half the stored longer side, libjpeg decodes
  at 1/2, 1/4 or 1/8 in the DCT (PIL's draft mode) and `reduced` is that divisor: the image is
  (ceil(H / reduced), ceil(W / reduced)), never smaller than the resize needs, and its pixel x
  covers stored pixels [reduced * x, reduced * (x + 1)). Fewer pixels decoded and resized.
  `rtrain.data.augment.Sample(reduced=, full_hw=)` carries it; letterbox/mosaic read it so boxes,
  scale and pad are exactly those of a full-size decode (only the pixels' resampling differs).
  `rtrain.data.decode_augment.DecodeAugment` asks for it in training only.
- Otherwise (None, or a small reduction) the whole image is decoded by `torchvision.io.decode_jpeg`:
  the same libjpeg-turbo pixels as PIL (checked on BCCD: identical), in about half PIL's time.
  Images other than plain RGB/grey baseline JPEG go through PIL.

torchvision (and torch) are imported on the first full-size decode, not with this module: the
train stream's decode actors decode reduced and then never import them (`rtrain.data.decode_augment`).

PIL reads the header first in every case, so its decompression-bomb limit guards all paths.
Errors: OSError / ValueError / `Image.DecompressionBombError` (PIL), RuntimeError (torchvision);
`DECODE_ERRORS` lists them for callers that skip and count a broken image.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image

DECODE_ERRORS = (OSError, ValueError, RuntimeError, SyntaxError, Image.DecompressionBombError)


def decode_rgb(data: bytes, longer_side: int | None = None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """(RGB image, reduced, stored (H, W)); see the module doc."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if im.format == "JPEG" and longer_side and 2 * longer_side <= max(w, h):
            r = longer_side / max(w, h)
            drafted = im.draft("RGB", (math.ceil(w * r), math.ceil(h * r)))
            reduced = round(w / drafted[1][2]) if drafted else 1
            return np.asarray(im.convert("RGB")), reduced, (h, w)
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            image = _torchvision_decode(data)
            if image.shape[:2] != (h, w):  # a header and a scan that disagree
                raise ValueError(f"decoded {image.shape[0]}x{image.shape[1]}, header says {h}x{w}")
            return np.ascontiguousarray(image), 1, (h, w)
        return np.asarray(im.convert("RGB")), 1, (h, w)


@functools.cache
def _torchvision():
    """torch and torchvision.io, imported once, on the first full-size decode (module doc)."""
    import torch
    from torchvision import io as tvio

    return torch, tvio


def _torchvision_decode(data: bytes) -> np.ndarray:
    torch, tvio = _torchvision()
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return tvio.decode_jpeg(buf, mode=tvio.ImageReadMode.RGB).permute(1, 2, 0).numpy()
