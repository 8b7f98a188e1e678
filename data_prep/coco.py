"""COCO instances JSON -> SourceImage stream.

Classes: every declared category, sorted by id (index 0..C-1, category_id kept),
also those no box uses. Images in order of their id. Crowd boxes are kept with
iscrowd=True. The JSON is loaded once in the main process; only each image's own
boxes travel on to the workers.

Faults: an unreadable or malformed JSON, or one without a usable 'images' or
'categories' list, stops the run (one line naming the file). Anything inside those
lists costs only itself, listed in the manifest with the JSON's name as `file`:
an image entry without an integer id or a file_name, or with a duplicate id, is
skipped; an annotation that is not an object, whose image_id is not an integer or
names no image, whose category_id is not a declared category, or whose bbox is not
a list of four finite numbers, is dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from data_prep.paths import UnsafePathError, safe_join
from data_prep.records import ClassInfo, DatasetError, Issue, ReadResult, SourceImage

log = logging.getLogger(__name__)


def load_json(path: Path) -> tuple[dict, str]:
    """(parsed JSON, sha256 of the bytes); DatasetError naming the file (and line:column) on any fault."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data, hashlib.sha256(raw).hexdigest()


def _categories(data: dict, path: Path) -> tuple[list[ClassInfo], dict[int, int]]:
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DatasetError(f"{path}: no 'categories' list")
    by_id: dict[int, str] = {}
    for c in cats:
        try:
            cid, name = int(c["id"]), str(c["name"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise DatasetError(f"{path}: malformed category {str(c)[:80]}") from None
        if cid in by_id:
            raise DatasetError(f"{path}: category id {cid} declared twice")
        by_id[cid] = name
    classes = [ClassInfo(i, by_id[cid], cid) for i, cid in enumerate(sorted(by_id))]
    return classes, {c.category_id: c.index for c in classes}


def _parse_box(ann: dict) -> list[float] | None:
    """[x1, y1, x2, y2] from a bbox that is a list of four finite numbers, else None."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _int_id(value) -> int | None:
    """A JSON id as an int (3 or 3.0 or "3"), None for anything else (null, lists, 3.5, NaN...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


FLAGS = ("--annotations FILE.json (the instances JSON, any name), --images DIR (the folder its "
         "file_name entries are relative to, any name)")


def read(args: argparse.Namespace) -> ReadResult:
    """Reader for `--format coco --annotations FILE.json --images DIR` (see FLAGS)."""
    if not getattr(args, "annotations", None) or not getattr(args, "images", None):
        raise DatasetError("--format coco needs --annotations FILE.json and --images DIR")
    path, root = Path(args.annotations).resolve(), Path(args.images).resolve()
    if not root.is_dir():
        raise DatasetError(f"--images {args.images}: image folder not found")
    data, sha = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: no 'images' list (not a COCO instances file)")
    if not data["images"]:
        raise DatasetError(f"{path}: empty dataset, its 'images' list holds no images")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{path}: 'annotations' is not a list")
    classes, cat_index = _categories(data, path)

    where = path.name  # the file an annotation issue belongs to (the JSON has no usable lines)
    front: list[Issue] = []  # issues with no image of their own: yielded first
    images: dict[int, dict] = {}
    for img in data["images"]:
        iid = _int_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if iid is None or name is None:
            front.append(Issue(str(img)[:80], "malformed image entry", "skipped", file=where))
            continue
        if iid in images:
            front.append(Issue(str(name), "duplicate image id", "skipped", f"id {iid}", file=where))
            continue
        images[iid] = img

    # Only what each image needs, as small tuples: (box, category index, crowd) or an Issue.
    per_image: dict[int, list] = defaultdict(list)
    for ann in anns:
        if not isinstance(ann, dict):
            front.append(Issue(f"annotation {str(ann)[:40]}", "malformed annotation", "dropped",
                               f"not an object: {type(ann).__name__}", file=where))
            continue
        aid = ann.get("id", "?")
        iid = _int_id(ann.get("image_id"))
        if iid is None:
            front.append(Issue(f"annotation {aid}", "malformed annotation", "dropped",
                               f"image_id {ann.get('image_id')!r}", file=where))
            continue
        if iid not in images:
            front.append(Issue(f"annotation {aid}", "annotation of an unknown image id", "dropped",
                               f"id {iid}", file=where))
            continue
        cid = _int_id(ann.get("category_id"))
        if cid not in cat_index:
            per_image[iid].append(Issue(f"annotation {aid}", "unknown category id", "dropped",
                                        f"id {ann.get('category_id')!r}", file=where))
            continue
        box = _parse_box(ann)
        if box is None:
            per_image[iid].append(Issue(f"annotation {aid}", "malformed bbox", "dropped",
                                        str(ann.get("bbox"))[:80], file=where))
            continue
        per_image[iid].append((box, cat_index[cid], bool(ann.get("iscrowd", 0))))
    del data, anns

    source = {"format": "coco", "annotations": str(path), "images": str(root),
              "annotations_bytes": path.stat().st_size, "annotations_sha256": sha}
    return classes, _stream(front, images, per_image, root), source


def _stream(front: list[Issue], images: dict[int, dict], per_image: dict, root: Path) -> Iterator:
    yield from front
    for iid in sorted(images):
        name = str(images[iid]["file_name"])
        try:
            file = safe_join(root, name)
        except UnsafePathError as e:
            yield Issue(name, "file name escapes the image root", "skipped", str(e))
            continue
        rec = SourceImage(image_id=iid, file_name=name, path=str(file))
        for entry in per_image.pop(iid, ()):
            if isinstance(entry, Issue):
                rec.issues.append(entry)
            else:
                rec.boxes.append(entry[0])
                rec.labels.append(entry[1])
                rec.iscrowd.append(entry[2])
        yield rec
