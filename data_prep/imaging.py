"""Per-image work done in the worker processes: decode, orient, resize, encode, fix boxes.

Nothing here knows about shards or Parquet; `convert` turns one SourceImage into
one shard row (or a skip), so the benchmark can time exactly this work alone.
"""

from __future__ import annotations

import math
import os
import threading
import time
from io import BytesIO

from PIL import Image, ImageOps

from data_prep.records import Issue, SourceImage

JPEG_QUALITY = 90
# Issue reason for a file above PIL's hard pixel limit (Image.MAX_IMAGE_PIXELS x 2): PIL refuses to
# open it as a possible decompression bomb. Not "unreadable": the file may be fine, just too large.
TOO_LARGE = "image over PIL's pixel limit"
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS = {5, 6, 7, 8}


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the longer side equal to `size`, aspect kept (each side at least 1)."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def orient_box(box: list[float], orientation: int, w: int, h: int) -> list[float]:
    """Map an xyxy box from the raw pixel frame (w x h) to the frame exif_transpose gives."""
    x1, y1, x2, y2 = box
    if orientation == 2:  # mirrored left-right
        return [w - x2, y1, w - x1, y2]
    if orientation == 3:  # rotated 180
        return [w - x2, h - y2, w - x1, h - y1]
    if orientation == 4:  # mirrored top-bottom
        return [x1, h - y2, x2, h - y1]
    if orientation == 5:  # transpose: (x, y) -> (y, x)
        return [y1, x1, y2, x2]
    if orientation == 6:  # shown rotated 90 clockwise: (x, y) -> (h - y, x)
        return [h - y2, x1, h - y1, x2]
    if orientation == 7:  # transverse: (x, y) -> (h - y, w - x)
        return [h - y2, w - x2, h - y1, w - x1]
    if orientation == 8:  # shown rotated 90 counter-clockwise: (x, y) -> (y, w - x)
        return [y1, w - x2, y2, w - x1]
    return list(box)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to lose the image
        return 1
    return value if 1 <= value <= 8 else 1


def _to_rgb(im: Image.Image, name: str, issues: list[Issue]) -> Image.Image:
    if im.mode == "RGB":
        return im
    issues.append(Issue(name, f"{im.mode} image converted to RGB", "repaired"))
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency must pass through RGBA to be dropped cleanly
    return im.convert("RGB")


def fix_boxes(
    rec: SourceImage, orientation: int, raw_w: int, raw_h: int, issues: list[Issue]
) -> tuple[list[list[float]], list[int], list[bool]]:
    """Boxes in the upright frame, clipped; degenerate ones dropped (each listed in `issues`)."""
    up_w, up_h = (raw_h, raw_w) if orientation in _SWAPS else (raw_w, raw_h)
    boxes, labels, crowd = [], [], []
    for i, (box, label, iscrowd) in enumerate(zip(rec.boxes, rec.labels, rec.iscrowd, strict=True)):
        item = f"{rec.file_name} box {i}"
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            issues.append(Issue(item, "malformed box", "dropped", str(box)))
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            issues.append(Issue(item, "zero or negative area box", "dropped", str(list(box))))
            continue
        ob = orient_box(list(box), orientation, raw_w, raw_h)
        cb = [min(max(ob[0], 0.0), up_w), min(max(ob[1], 0.0), up_h),
              min(max(ob[2], 0.0), up_w), min(max(ob[3], 0.0), up_h)]
        if cb[2] <= cb[0] or cb[3] <= cb[1]:
            issues.append(Issue(item, "box outside the image", "dropped", f"{list(box)} in {raw_w}x{raw_h}"))
            continue
        if cb != ob:
            issues.append(Issue(item, "box clipped to the image", "repaired", f"{list(box)} -> {cb}"))
        boxes.append(cb)
        labels.append(int(label))
        crowd.append(bool(iscrowd))
    return boxes, labels, crowd


def convert(rec: SourceImage, size: int, quality: int = JPEG_QUALITY) -> tuple[dict | None, list[Issue]]:
    """Decode `rec.path`, apply EXIF orientation, resize (longer side = `size`), JPEG-encode.

    Returns (row, issues): `row` holds every shard column (`boxes` flat xyxy float in
    stored pixels, scaled per axis by width/orig_width and height/orig_height), or is
    None when the image cannot be used (missing, corrupt, truncated).
    """
    issues: list[Issue] = []
    name = rec.file_name
    try:
        im = Image.open(rec.path)
    except FileNotFoundError:
        return None, [Issue(name, "missing image file", "skipped", rec.path)]
    except Image.DecompressionBombError as e:
        return None, [Issue(name, TOO_LARGE, "skipped", str(e))]
    except (OSError, ValueError, SyntaxError) as e:
        return None, [Issue(name, "unreadable image", "skipped", str(e))]
    with im:
        try:
            raw_w, raw_h = im.size
            orientation = _orientation(im)
            up_w, up_h = (raw_h, raw_w) if orientation in _SWAPS else (raw_w, raw_h)
            tw, th = target_size(up_w, up_h, size)
            if im.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target.
                im.draft("RGB", (th, tw) if orientation in _SWAPS else (tw, th))
            else:
                issues.append(Issue(name, "non-JPEG image re-encoded as JPEG", "repaired", str(im.format)))
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
                issues.append(Issue(name, "EXIF orientation applied", "repaired", f"value {orientation}"))
            im = _to_rgb(im, name, issues)
            if im.size != (tw, th):
                im = im.resize((tw, th), Image.Resampling.BILINEAR)
            buf = BytesIO()
            im.save(buf, format="JPEG", quality=quality)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, [Issue(name, "corrupt or truncated image", "skipped", str(e))]
    boxes, labels, crowd = fix_boxes(rec, orientation, raw_w, raw_h, issues)
    sx, sy = tw / up_w, th / up_h
    flat = [v for b in boxes for v in (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)]
    row = {
        "image_id": rec.image_id, "file_name": rec.file_name, "jpeg": buf.getvalue(),
        "width": tw, "height": th, "orig_width": up_w, "orig_height": up_h,
        "boxes": flat, "labels": labels, "iscrowd": crowd,
    }
    return row, issues


def convert_batch(recs: list[SourceImage], size: int, quality: int) -> list[tuple[dict | None, list[Issue]]]:
    """`convert` over a few records: one task for a worker process (fewer round trips)."""
    return [convert(r, size, quality) for r in recs]


def watch_parent(pid: int, every_s: float = 1.0) -> None:
    """Pool initializer: end this worker when process `pid` (the main process) is gone.

    A pool worker holds both ends of its task pipe, so after the main process is
    killed (SIGKILL, OOM) it would wait for work forever; this thread ends it.
    """

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid was reused by another user's process
                os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
