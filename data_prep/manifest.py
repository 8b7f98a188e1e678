"""Per-shard statistics and the dataset's manifest.json (both written atomically).

Layout of manifest.json (one per output folder, written last):

    {
      "format_version": 1,
      "num_classes": C,
      "classes": [{"index": 0, "name": "RBC", "category_id": 1, "images": 190, "boxes": 3000}, ...],
      "counts": {"images": N, "boxes": B, "negatives": K, "crowd_boxes": c,
                 "skipped_images": S, "repaired": R, "dropped_boxes": D},
      "image_size": {"orig_width": {"min", "max", "mean"}, "orig_height": {...}, "max_side": 640},
      "boxes_format": "...",
      "source": {...reader's description of its input...},
      "options": {"size", "rows_per_shard", "jpeg_quality", "classes_from"},
      "fingerprint": "sha256 of source + options + classes",
      "shards": [{"file": "part-00000.parquet", "rows": 1000}, ...],
      "issue_counts": {"<reason>": n, ...},
      "issues": [{"item", "reason", "action", "detail"?}, ...]
    }
"""

from __future__ import annotations

import json
import os
from collections import Counter

from data_prep import locations
from data_prep.atomic import atomic_file
from data_prep.records import ClassInfo, Issue
from data_prep.shard_format import read_manifest_file

BOXES_FORMAT = (
    "xyxy float32 in stored-image pixels; original pixels = x * orig_width / width, y * orig_height / height"
)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON whole or not at all: locally to a temp file in the same folder, fsynced, then
    renamed over `path`; in a bucket (`path` a URI) as one object upload."""
    if locations.is_bucket(path):
        locations.write_bytes(path, json.dumps(obj, indent=1).encode())
        return
    with atomic_file(path, "w") as f:  # a plain open()'s mode, not mkstemp's 0600
        json.dump(obj, f, indent=1)


def shard_stats(rows: list[dict], issues: list[Issue], num_classes: int) -> dict:
    """Counts for one shard's rows (the dicts imaging.convert made) and its issues."""
    class_boxes = [0] * num_classes
    class_images = [0] * num_classes
    sizes = {"orig_width": [], "orig_height": []}
    boxes = negatives = crowd = 0
    for r in rows:
        boxes += len(r["labels"])
        negatives += not r["labels"]
        crowd += sum(r["iscrowd"])
        for lab in r["labels"]:
            class_boxes[lab] += 1
        for lab in set(r["labels"]):
            class_images[lab] += 1
        sizes["orig_width"].append(r["orig_width"])
        sizes["orig_height"].append(r["orig_height"])
    size_stats = {
        k: {"min": min(v), "max": max(v), "sum": sum(v)} if v else None for k, v in sizes.items()
    }
    return {
        "rows": len(rows), "boxes": boxes, "negatives": negatives, "crowd_boxes": crowd,
        "class_boxes": class_boxes, "class_images": class_images, "sizes": size_stats,
        "issues": [i.to_dict() for i in issues],
    }


def _merge_size(stats: list[dict], key: str, images: int) -> dict | None:
    parts = [s["sizes"][key] for s in stats if s["sizes"][key]]
    if not parts:
        return None
    return {
        "min": min(p["min"] for p in parts),
        "max": max(p["max"] for p in parts),
        "mean": round(sum(p["sum"] for p in parts) / images, 2),
    }


def build_manifest(
    classes: list[ClassInfo], stats: list[dict], source: dict, options: dict, fingerprint: str
) -> dict:
    """Fold the per-shard stats (in shard order) into the manifest dict described above."""
    images = sum(s["rows"] for s in stats)
    issues = [i for s in stats for i in s["issues"]]
    by_action = Counter(i["action"] for i in issues)
    class_boxes = [sum(s["class_boxes"][c.index] for s in stats) for c in classes]
    class_images = [sum(s["class_images"][c.index] for s in stats) for c in classes]
    return {
        "format_version": 1,
        "num_classes": len(classes),
        "classes": [
            {"index": c.index, "name": c.name, "category_id": c.category_id,
             "images": class_images[c.index], "boxes": class_boxes[c.index]}
            for c in classes
        ],
        "counts": {
            "images": images,
            "boxes": sum(s["boxes"] for s in stats),
            "negatives": sum(s["negatives"] for s in stats),
            "crowd_boxes": sum(s["crowd_boxes"] for s in stats),
            "skipped_images": by_action["skipped"],
            "repaired": by_action["repaired"],
            "dropped_boxes": by_action["dropped"],
        },
        "image_size": {
            "orig_width": _merge_size(stats, "orig_width", images),
            "orig_height": _merge_size(stats, "orig_height", images),
            "max_side": options["size"],
        },
        "boxes_format": BOXES_FORMAT,
        "source": source,
        "options": options,
        "fingerprint": fingerprint,
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in stats if s["rows"]],
        "issue_counts": dict(sorted(Counter(i["reason"] for i in issues).items())),
        "issues": issues,
    }


def load_classes(manifest_path: str | os.PathLike) -> list[ClassInfo]:
    """The class list of another output's manifest.json (for --classes-from); DatasetError if unusable."""
    data = read_manifest_file(manifest_path)
    return [ClassInfo(int(c["index"]), str(c["name"]), int(c["category_id"])) for c in data["classes"]]
