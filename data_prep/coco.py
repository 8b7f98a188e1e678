"""COCO instances JSON -> SourceImage stream.

Classes: every declared category, sorted by id (index 0..C-1, category_id kept),
also those no box uses. Images in order of their id. Crowd boxes are kept with
iscrowd=True. The JSON is loaded once in the main process; only each image's own
boxes travel on to the workers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
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
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: malformed category {str(c)[:80]}") from None
        if cid in by_id:
            raise DatasetError(f"{path}: category id {cid} declared twice")
        by_id[cid] = name
    classes = [ClassInfo(i, by_id[cid], cid) for i, cid in enumerate(sorted(by_id))]
    return classes, {c.category_id: c.index for c in classes}


def _parse_box(ann: dict) -> list[float] | None:
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        return None
    return [x, y, x + w, y + h]


def read(args: argparse.Namespace) -> ReadResult:
    """Reader for `--format coco --annotations FILE.json --images DIR`."""
    if not getattr(args, "annotations", None) or not getattr(args, "images", None):
        raise DatasetError("--format coco needs --annotations FILE.json and --images DIR")
    path, root = Path(args.annotations).resolve(), Path(args.images).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    data, sha = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: no 'images' list (not a COCO instances file)")
    if not data["images"]:
        raise DatasetError(f"{path}: empty dataset, its 'images' list holds no images")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{path}: 'annotations' is not a list")
    classes, cat_index = _categories(data, path)

    front: list[Issue] = []  # issues with no image of their own: yielded first
    images: dict[int, dict] = {}
    for img in data["images"]:
        try:
            iid, name = int(img["id"]), img["file_name"]
        except (KeyError, TypeError, ValueError):
            front.append(Issue(str(img)[:80], "malformed image entry", "skipped"))
            continue
        if iid in images:
            front.append(Issue(str(name), "duplicate image id", "skipped", f"id {iid}"))
            continue
        images[iid] = img

    # Only what each image needs, as small tuples: (box, category index, crowd) or an Issue.
    per_image: dict[int, list] = defaultdict(list)
    for ann in anns:
        try:
            iid = int(ann["image_id"])
        except (KeyError, TypeError, ValueError):
            front.append(Issue(f"annotation {ann.get('id') if isinstance(ann, dict) else '?'}",
                               "malformed annotation", "dropped"))
            continue
        aid = ann.get("id", "?")
        if iid not in images:
            front.append(Issue(f"annotation {aid}", "annotation of an unknown image id", "dropped",
                               f"id {iid}"))
            continue
        cid = ann.get("category_id")
        if cid not in cat_index:
            per_image[iid].append(Issue(f"annotation {aid}", "unknown category id", "dropped", f"id {cid}"))
            continue
        box = _parse_box(ann)
        if box is None:
            per_image[iid].append(Issue(f"annotation {aid}", "malformed bbox", "dropped",
                                        str(ann.get("bbox"))))
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
