"""Look at a shard folder: the manifest in words, and a contact sheet of random rows with their boxes.

    python -m data_prep.inspect OUT [--n 16] [--out FILE.png] [--seed 0] [--cell 320]

Prints classes with image/box counts, totals, negatives, skipped/repaired/dropped
items by reason and the original image sizes; then draws N random rows read from
the Parquet shards (boxes xyxy in stored-image pixels, class names from the
manifest) into one PNG (default ./inspect_<folder name>.png) of
ceil(sqrt N) columns of `cell` x `cell` tiles. A missing or corrupt manifest or
shard is a one-line error.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from io import BytesIO
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from data_prep.atomic import atomic_file
from data_prep.draw import contact_sheet, draw_boxes
from data_prep.records import DatasetError
from data_prep.shard_format import read_manifest

COLUMNS = ["image_id", "file_name", "jpeg", "width", "height", "boxes", "labels"]


def load_manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest.json with classes, counts and shards; DatasetError (one line, naming the
    file) when missing or unusable."""
    return read_manifest(folder, require=("classes", "counts", "shards"))


def summarize(manifest: dict) -> str:
    """The manifest as a short readable report (several lines)."""
    c = manifest["counts"]
    lines = [f"{c.get('images', 0)} images, {c.get('boxes', 0)} boxes, "
             f"{c.get('negatives', 0)} without boxes, {c.get('crowd_boxes', 0)} crowd boxes, "
             f"{len(manifest['shards'])} shards"]
    lines.append(f"{len(manifest['classes'])} classes:")
    lines.append(f"  {'index':>5}  {'cat_id':>6}  {'images':>7}  {'boxes':>7}  name")
    for cls in manifest["classes"]:
        lines.append(f"  {cls['index']:>5}  {cls.get('category_id', ''):>6}  {cls.get('images', ''):>7}  "
                     f"{cls.get('boxes', ''):>7}  {cls['name']}")
    lines.append(f"skipped images {c.get('skipped_images', 0)}, repaired {c.get('repaired', 0)}, "
                 f"dropped boxes {c.get('dropped_boxes', 0)}")
    by_reason: dict[tuple[str, str], int] = {}
    for issue in manifest.get("issues", []):
        key = (issue.get("action", "?"), issue.get("reason", "?"))
        by_reason[key] = by_reason.get(key, 0) + 1
    for (action, reason), n in sorted(by_reason.items()):
        lines.append(f"  {action:9s} {n:6d}  {reason}")
    sizes = manifest.get("image_size") or {}
    w, h = sizes.get("orig_width"), sizes.get("orig_height")
    if w and h:
        lines.append(f"original sizes: width {w['min']}-{w['max']} (mean {w['mean']}), "
                     f"height {h['min']}-{h['max']} (mean {h['mean']}); stored longer side "
                     f"{sizes.get('max_side')}")
    return "\n".join(lines)


def _read_rows(path: Path, wanted: list[int]) -> list[dict]:
    """Rows `wanted` (indices within the file) of one shard, reading only the row groups that hold them."""
    try:
        pf = pq.ParquetFile(path)
        rows, start = [], 0
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            local = [i - start for i in wanted if start <= i < start + size]
            if local:
                table = pf.read_row_group(g, columns=COLUMNS).take(local)
                rows.extend(table.to_pylist())
            start += size
    except FileNotFoundError:
        raise DatasetError(f"{path}: shard listed in manifest.json is missing") from None
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{path}: unreadable shard: {str(e).splitlines()[0]}") from None
    if len(rows) != len(wanted):
        raise DatasetError(f"{path}: holds fewer rows than manifest.json says")
    return rows


def sample_rows(folder: str | os.PathLike, manifest: dict, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct rows (or all, if fewer) drawn at random over every shard, in shard order."""
    shards = [(Path(folder) / s["file"], int(s["rows"])) for s in manifest["shards"]]
    total = sum(rows for _, rows in shards)
    picks = sorted(random.Random(seed).sample(range(total), min(n, total)))
    out, start = [], 0
    for path, rows in shards:
        wanted = [p - start for p in picks if start <= p < start + rows]
        if wanted:
            out.extend(_read_rows(path, wanted))
        start += rows
    return out


def render_row(row: dict, class_names: list[str]) -> Image.Image:
    """The row's stored JPEG with its boxes (flat xyxy, stored pixels) and class names drawn."""
    try:
        with Image.open(BytesIO(row["jpeg"])) as im:
            image = im.convert("RGB")
    except OSError as e:
        raise DatasetError(f"row image_id {row['image_id']}: undecodable JPEG: {e}") from None
    flat = row["boxes"] or []
    boxes = [flat[i:i + 4] for i in range(0, len(flat), 4)]
    return draw_boxes(image, boxes, row["labels"] or [], class_names)


def contact_sheet_for(folder: str | os.PathLike, n: int = 16, seed: int = 0, cell: int = 320
                      ) -> tuple[Image.Image, list[dict]]:
    """A contact sheet of `n` random rows of the shard folder, and the rows drawn (without their JPEG)."""
    manifest = load_manifest(folder)
    names = [c["name"] for c in sorted(manifest["classes"], key=lambda c: c["index"])]
    rows = sample_rows(folder, manifest, n, seed)
    if not rows:
        raise DatasetError(f"{folder}: the shards hold no rows")
    tiles = [render_row(r, names) for r in rows]
    captions = [f"#{r['image_id']} {Path(r['file_name']).name[:28]} ({len(r['labels'])})" for r in rows]
    sheet = contact_sheet(tiles, cols=math.ceil(math.sqrt(len(tiles))), cell=cell, captions=captions)
    return sheet, [{k: v for k, v in r.items() if k != "jpeg"} for r in rows]


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    path = Path(path)
    with atomic_file(path) as f:
        image.save(f, format="PNG")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a data_prep.shard output folder (manifest.json + part-*.parquet)")
    parser.add_argument("--n", type=int, default=16, help="rows to draw (default 16)")
    parser.add_argument("--out", help="PNG to write (default ./inspect_<folder name>.png)")
    parser.add_argument("--seed", type=int, default=0, help="which random rows (default 0)")
    parser.add_argument("--cell", type=int, default=320, help="tile side in pixels (default 320)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.cell < 32:
        parser.error("--n must be >= 1 and --cell >= 32")
    out = Path(args.out or f"inspect_{Path(args.folder).resolve().name}.png")
    try:
        print(summarize(load_manifest(args.folder)))
        sheet, rows = contact_sheet_for(args.folder, args.n, args.seed, args.cell)
        save_png_atomic(sheet, out)
    except DatasetError as e:
        print(f"data_prep.inspect: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"data_prep.inspect: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({sheet.width}x{sheet.height}, {len(rows)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
