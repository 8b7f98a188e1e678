"""A few images of the in-repo coco128 fixture as a COCO dataset of their own (for data_prep tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def coco_subset(shared_data: Path, ids: list[int], images: Path) -> dict:
    """coco128's annotations cut to image `ids`, their JPEGs copied into `images` (created)."""
    src = shared_data / "coco128"
    data = json.loads((src / "annotations" / "instances_train2017.json").read_text())
    data["images"] = [i for i in data["images"] if i["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    images.mkdir(parents=True)
    for im in data["images"]:
        shutil.copy(src / "train2017" / im["file_name"], images)
    return data
