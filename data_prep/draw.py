"""Drawing boxes on pictures: a per-class palette, labelled boxes, contact sheets.

Boxes are xyxy in the pixels of the image they are drawn on. Used by
`data_prep.inspect` and reusable by predict/visualize.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours that read well on photos (Tableau/Okabe-Ito-like); more classes cycle hues.
_BASE_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (255, 255, 255),
)


def class_color(index: int) -> tuple[int, int, int]:
    """The colour of class `index`: fixed for the first 20 classes, golden-ratio hues after."""
    if 0 <= index < len(_BASE_PALETTE):
        return _BASE_PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `background`."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font bundled with Pillow >= 10.1
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    class_names: Sequence[str],
    scores: Sequence[float] | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """A copy of `image` (converted to RGB) with each box xyxy outlined in its class colour and labelled.

    The label is "name" or "name 0.87" when `scores` are given; a label index outside
    `class_names` is written as its number.
    """
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    side = max(out.size)
    width = line_width or max(1, round(side / 300))
    font = _font(max(10, round(side / 40)))
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        x1, y1, x2, y2 = (float(v) for v in box)
        colour = class_color(int(label))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        # Label above the box, or inside its top edge when the box touches the image top.
        ty = y1 - th - 2 * width if y1 - th - 2 * width >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 2 * width, ty + th + 2 * width], fill=colour)
        draw.text((x1 + width - left, ty + width - top), text, fill=text_color(colour), font=font)
    return out


def contact_sheet(
    tiles: Sequence[Image.Image], cols: int, cell: int, captions: Sequence[str] | None = None
) -> Image.Image:
    """Tiles fitted (aspect kept) into `cell` x `cell` squares on a grey grid of `cols` columns.

    Returns an RGB image of (cols * cell) x (rows * cell) pixels, rows = ceil(len / cols).
    """
    rows = max(1, -(-len(tiles) // cols))
    sheet = Image.new("RGB", (cols * cell, rows * cell), (48, 48, 48))
    draw = ImageDraw.Draw(sheet)
    font = _font(max(10, cell // 24))
    for i, tile in enumerate(tiles):
        scale = min((cell - 4) / tile.width, (cell - 4) / tile.height)
        fitted = tile.convert("RGB").resize(
            (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.Resampling.BILINEAR
        )
        x0 = (i % cols) * cell + (cell - fitted.width) // 2
        y0 = (i // cols) * cell + (cell - fitted.height) // 2
        sheet.paste(fitted, (x0, y0))
        if captions:  # bottom-left, where it hides fewer box labels than at the top
            y = (i // cols + 1) * cell - getattr(font, "size", 10) - 6
            draw.text(((i % cols) * cell + 4, y), captions[i], fill=(255, 255, 255),
                      font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return sheet
