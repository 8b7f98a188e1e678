"""Over-fit proof: compact_s learns a handful of real BCCD images to mAP@0.5 >= 0.9.

Model, assigner, losses, decoding and postprocess all have to be wired right for this to pass:
training runs through `Detector.forward(images, targets)` and scoring through eval-mode
`Detector.forward(images)` and pycocotools, on the very images trained on.
"""

from __future__ import annotations

import contextlib
import io
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("RBC", "WBC", "Platelets")
SIZE = 256  # BCCD is 640x480: RBCs become ~40 px, platelets ~12 px
NUM_IMAGES = 4
MAX_STEPS = 150
EVAL_EVERY = 25
TARGET_MAP50 = 0.9


def load_voc_image(root: Path, name: str, size: int) -> tuple[torch.Tensor, dict]:
    """Image [3, size, size] in 0..1 (longer side resized to `size`, padded bottom/right) and its
    target {boxes [M, 4] xyxy px, labels [M]}; boxes are clipped and degenerate ones dropped."""
    ann = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
    img = Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB")
    scale = size / max(img.size)
    w, h = round(img.width * scale), round(img.height * scale)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:h, :w] = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255
    boxes, labels = [], []
    for obj in ann.iter("object"):
        bb = obj.find("bndbox")
        x1, y1, x2, y2 = (float(bb.find(k).text) * scale for k in ("xmin", "ymin", "xmax", "ymax"))
        x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
        y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
        if x2 - x1 >= 1 and y2 - y1 >= 1:  # BCCD has a few zero-area boxes
            boxes.append([x1, y1, x2, y2])
            labels.append(CLASSES.index(obj.find("name").text.strip()))
    target = {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}
    return torch.from_numpy(canvas).permute(2, 0, 1), target


def coco_map(targets: list[dict], detections: list[dict], size: int) -> tuple[float, float]:
    """(mAP@0.5, mAP@[.5:.95]) of detections against targets, via in-memory pycocotools objects."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    categories = [{"id": i, "name": n} for i, n in enumerate(CLASSES)]
    gt = {"images": [], "annotations": [], "categories": categories}
    results = []
    for image_id, (t, d) in enumerate(zip(targets, detections, strict=True)):
        gt["images"].append({"id": image_id, "width": size, "height": size})
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": label,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
        for (x1, y1, x2, y2), score, label in zip(
            d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True
        ):
            results.append({"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])




@pytest.mark.slow
def test_compact_s_overfits_bccd_images(shared_data, one_thread):
    from rtrain.models import build_model

    root = shared_data / "bccd"
    names = (root / "ImageSets" / "Main" / "train.txt").read_text().split()[:NUM_IMAGES]
    loaded = [load_voc_image(root, n, SIZE) for n in names]
    images = torch.stack([img for img, _ in loaded])
    targets = [t for _, t in loaded]
    assert sum(len(t["labels"]) for t in targets) > 20
    assert {int(lbl) for t in targets for lbl in t["labels"]} == {0, 1, 2}  # all three classes present

    torch.manual_seed(0)
    model = build_model("compact_s", num_classes=len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    start = time.perf_counter()
    history = []
    for step in range(1, MAX_STEPS + 1):
        model.train()
        losses = model(images, targets)
        assert torch.isfinite(losses["loss"]), (step, {k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        warmup.step()
        if step % EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                detections = model(images)
            map50, map_all = coco_map(targets, detections, SIZE)
            history.append((step, round(map50, 3), round(map_all, 3), round(losses["loss"].item(), 3)))
            if map50 >= TARGET_MAP50:
                break
    elapsed = time.perf_counter() - start
    print(f"over-fit: (step, mAP50, mAP, loss) {history}, {elapsed:.0f} s")
    assert map50 >= TARGET_MAP50, f"mAP@0.5 {map50:.3f} < {TARGET_MAP50} after {step} steps: {history}"
    # The detections must be tight boxes of the right classes, not just many guesses.
    assert map_all >= 0.6, history
    assert all(len(d["boxes"]) <= 100 for d in detections)
