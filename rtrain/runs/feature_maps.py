"""Feature-map pictures: what a trained detector's layers respond to in one image.

    from rtrain.runs.feature_maps import load_detector, load_image, visualize
    det = load_detector("runs/x/best.pt")
    written = visualize(det, "cell.jpg", out_dir="maps", layers=None, channels=16)

Layer names are those of `rtrain.models.summary.capture_layers` (and `python -m rtrain.models
--layers VARIANT`): `backbone.stem`, `backbone.stage{i}` (a timm trunk: `backbone.p{stride}`),
`neck.p{stride}`, `head.tower{j}.p{stride}`, `head.cls.p{stride}`, `head.box.p{stride}`. The image
is letterboxed to the model's input size exactly as validation does (`rtrain.data.augment.letterbox`),
so the maps are what evaluation sees.

Per layer one PNG: a grid of the `channels` most active channels (by mean activation over the
map), each min-max normalised on its own, captioned with the channel index; the layer name,
output shape `[1, C, H, W]` and the chosen indices are written on top, and the indices are also
stored in the PNG text chunk "channels" (comma-separated) so tools/tests can read them back.
Plus `score_map.png`: the image with the head's per-location max class score, sigmoid of the
class logits, max over classes, each level upsampled to the input size and combined by max.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from rtrain.data.augment import Sample, letterbox
from rtrain.errors import RtrainError
from rtrain.models.summary import capture_layers
from rtrain.runs.loading import LoadedDetector
from rtrain.runs.run_dir import atomic_write_bytes

logger = logging.getLogger(__name__)

TILE = 96  # px side of one channel tile (maps are upscaled nearest, so cells stay visible)
GAP = 4  # px between tiles
CAPTION = 14  # px band under each tile for its channel index
HEADER = 36  # px band at the top for the layer name and shape (two text lines)
MIN_WIDTH = 360  # so the header text fits even for a one-tile grid
BACKGROUND = (255, 255, 255)


class VisualizeError(RtrainError, ValueError):
    """Bad input for the pictures (unknown layer, unreadable image/weights): one line."""


@dataclass
class LayerPicture:
    """One written grid: layer name, output shape [1, C, H, W], chosen channel indices, PNG path."""

    layer: str
    shape: tuple[int, ...]
    channels: list[int]
    path: Path


# ------------------------------------------------------------------------------------ inputs


def load_detector(weights: str | os.PathLike, map_location: str = "cpu") -> LoadedDetector:
    """`rtrain.runs.loading.load_detector`, also accepting a run dir holding best.pt (else last.pt).

    `weights` is a weights file (best.pt/last.pt), a checkpoint dir, or a run dir. Raises
    VisualizeError / CheckpointError / ConfigError with one line.
    """
    from rtrain.runs.loading import load_detector as load

    path = Path(weights)
    if path.is_dir() and not (path / "state.pt").exists():
        found = [path / n for n in ("best.pt", "last.pt") if (path / n).is_file()]
        if not found:
            raise VisualizeError(f"{path}: a directory without best.pt, last.pt or a checkpoint state.pt")
        path = found[0]
    return load(path, device=map_location)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """The image as uint8 [H, W, 3] RGB (EXIF orientation applied); VisualizeError if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise VisualizeError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise VisualizeError(f"{p}: cannot read image ({type(exc).__name__}: {exc})") from None


def prepare_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, Sample]:
    """Letterbox to size x size (size a multiple of 32); returns ([1, 3, S, S] float 0..1, sample)."""
    if size % 32 or size < 32:
        raise VisualizeError(f"input size {size} is not a positive multiple of 32")
    empty = np.zeros((0, 4), np.float32)
    sample = letterbox(Sample(image, empty, np.zeros(0, np.int64), np.zeros(0, bool)), size)
    tensor = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1))).float().div_(255.0)
    return tensor.unsqueeze(0), sample


# ---------------------------------------------------------------------------------- selection


def default_layers(names: list[str]) -> list[str]:
    """One early, one middle and one deep layer: the first, middle and last backbone stages."""
    stages = ([n for n in names if n.startswith("backbone.stage")]
              or [n for n in names if n.startswith("backbone.p")])  # a timm trunk's output maps
    if not stages:
        return names[:1]
    picks = [stages[0], stages[len(stages) // 2], stages[-1]]
    return list(dict.fromkeys(picks))  # a 1-2 stage backbone gives fewer distinct picks


def check_layers(requested: list[str], valid: list[str]) -> None:
    """VisualizeError (one line listing the valid names) if any requested name is not a layer."""
    unknown = [n for n in requested if n not in valid]
    if unknown:
        raise VisualizeError(f"unknown layer {unknown[0]!r}; valid layers: {', '.join(valid)}")


def top_channels(fmap: torch.Tensor, n: int) -> list[int]:
    """Indices of the `n` channels of fmap [1, C, H, W] with the largest mean activation, largest first."""
    means = fmap[0].float().mean(dim=(1, 2))
    return torch.argsort(means, descending=True, stable=True)[: min(n, means.numel())].tolist()


def normalise(channel: torch.Tensor) -> np.ndarray:
    """[H, W] -> float [H, W] in 0..1 by this channel's own min/max (a constant map gives zeros)."""
    x = channel.float()
    lo, hi = float(x.min()), float(x.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros(tuple(x.shape), np.float32)
    return ((x - lo) / (hi - lo)).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------- drawing


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid for n tiles: cols = ceil(sqrt(n))."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def grid_size(n: int, tile: int = TILE) -> tuple[int, int]:
    """(width, height) in px of the picture holding n tiles (the header band included)."""
    rows, cols = grid_shape(n)
    return max(MIN_WIDTH, GAP + cols * (tile + GAP)), HEADER + rows * (tile + CAPTION + GAP)


def _colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """float 0..1 [H, W] -> uint8 [H, W, 3] through a matplotlib colormap."""
    from matplotlib import colormaps

    return (colormaps[name](values)[..., :3] * 255).astype(np.uint8)


def draw_grid(fmap: torch.Tensor, channels: list[int], title: str, tile: int = TILE) -> Image.Image:
    """The grid picture of fmap [1, C, H, W]'s `channels`, in order, row by row, with `title` on top."""
    width, height = grid_size(len(channels), tile)
    _, cols = grid_shape(len(channels))
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((GAP, 3), title, fill=(0, 0, 0), spacing=4)
    h, w = fmap.shape[-2:]
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    for k, c in enumerate(channels):
        r, q = divmod(k, cols)
        x0, y0 = GAP + q * (tile + GAP), HEADER + r * (tile + CAPTION + GAP)
        cell = Image.fromarray(_colormap(normalise(fmap[0, c]))).resize(size, Image.Resampling.NEAREST)
        canvas.paste(cell, (x0 + (tile - size[0]) // 2, y0 + (tile - size[1]) // 2))
        draw.text((x0, y0 + tile + 1), f"c{c}", fill=(0, 0, 0))
    return canvas


def score_map(feats: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Max class score per input pixel: [S, S] in 0..1 from the `head.cls.p*` maps [1, C, h, w].

    Each level: sigmoid, max over classes, bilinear upsampling to S x S; levels combined by max.
    """
    levels = [t for name, t in feats.items() if name.startswith("head.cls.p")]
    if not levels:
        raise VisualizeError("the model's head gave no class maps (head.cls.p*)")
    out = torch.zeros(size, size)
    for t in levels:
        level = t.float().sigmoid().amax(dim=1, keepdim=True)
        up = torch.nn.functional.interpolate(level, size=(size, size), mode="bilinear", align_corners=False)
        out = torch.maximum(out, up[0, 0])
    return out


def draw_overlay(image: np.ndarray, sample: Sample, scores: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The original image with the score map (cropped out of the letterbox, resized back) as a heat map.

    scores: [S, S] in 0..1 in letterboxed-input pixels; `sample` carries the letterbox scale/pad.
    The colour scale is absolute (0..1), so an untrained model's ~0.01 reads as dark.
    """
    h, w = image.shape[:2]
    left, top = sample.pad
    nw, nh = round(w * sample.scale), round(h * sample.scale)
    crop = scores[int(top) : int(top) + nh, int(left) : int(left) + nw].clamp(0, 1).numpy()
    heat = Image.fromarray(_colormap(crop, "inferno")).resize((w, h), Image.Resampling.BILINEAR)
    blended = Image.blend(Image.fromarray(image), heat, alpha)
    band = Image.new("RGB", (w, HEADER), BACKGROUND)
    ImageDraw.Draw(band).text(
        (GAP, 4), f"max class score (sigmoid, max over classes and levels): peak {float(scores.max()):.3f}",
        fill=(0, 0, 0),
    )
    out = Image.new("RGB", (w, h + HEADER), BACKGROUND)
    out.paste(band, (0, 0))
    out.paste(blended, (0, HEADER))
    return out


def save_png(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically, with optional text chunks."""
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------- the job


def visualize(
    detector: LoadedDetector,
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layers: list[str] | None = None,
    channels: int = 16,
    size: int | None = None,
) -> tuple[list[LayerPicture], Path]:
    """Write one grid PNG per layer and `score_map.png` into out_dir; returns (pictures, overlay path).

    layers: names as `python -m rtrain.models --layers VARIANT` lists them (None: `default_layers`).
    channels: how many of the most active channels to show per layer (fewer if the layer has fewer).
    size: square input side (None: the size the model was trained at).
    """
    if channels < 1:
        raise VisualizeError(f"--channels must be >= 1, got {channels}")
    size = size or detector.img_size
    image = load_image(image_path)
    tensor, sample = prepare_input(image, size)
    feats = capture_layers(detector.model, tensor)
    names = list(feats)
    layers = layers or default_layers(names)
    check_layers(layers, names)
    out = Path(out_dir)
    pictures = []
    for name in layers:
        fmap = feats[name]
        picked = top_channels(fmap, channels)
        if len(picked) < channels:
            logger.info("%s has %d channels; showing all of them", name, len(picked))
        title = (f"{name}  {list(fmap.shape)}\n"
                 f"top {len(picked)} of {fmap.shape[1]} channels by mean activation")
        path = save_png(draw_grid(fmap, picked, title), out / f"{name}.png",
                        {"layer": name, "shape": ",".join(map(str, fmap.shape)),
                         "channels": ",".join(map(str, picked))})
        pictures.append(LayerPicture(name, tuple(fmap.shape), picked, path))
    overlay = save_png(draw_overlay(image, sample, score_map(feats, size)), out / "score_map.png")
    return pictures, overlay
