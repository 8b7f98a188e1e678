"""COCO box evaluation (pycocotools) in ORIGINAL image pixels and SOURCE category ids.

Ground truth comes from the val shards (boxes stored in stored-image pixels,
scaled back to the original image); predictions come from the model in
letterboxed input pixels and are mapped back the same way, so the figures are
comparable with any other tool evaluated on the source annotations.

Coordinate chain for one image:
    original (orig_w x orig_h) --resize--> stored (w x h, in the shard)
    --letterbox: * scale, + (pad_x, pad_y)--> model input
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_prep.shard_format import ShardError, read_manifest, read_shard_table, shard_files

logger = logging.getLogger(__name__)

STAT_NAMES = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)
_GT_COLUMNS = ("image_id", "width", "height", "orig_width", "orig_height", "boxes", "labels", "iscrowd")


@contextlib.contextmanager
def quiet_pycocotools():
    """pycocotools prints progress to stdout; library code must not.

    Redirecting sys.stdout is not enough inside Ray workers, where Ray swaps `builtins.print`
    for a tqdm-safe version that writes to the real stream: shadow `print` in pycocotools'
    modules too.
    """
    import pycocotools.coco
    import pycocotools.cocoeval

    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = _discard
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for module in modules:
            vars(module).pop("print", None)


def _discard(*args, **kwargs) -> None:
    return None


def coco_gt_from_shards(shard_dir: str | os.PathLike) -> COCO:
    """Ground truth of the shards in `shard_dir` (*.parquet + manifest.json) as an in-memory COCO.

    Images carry their ORIGINAL width/height, boxes are scaled to original pixels
    (xywh), `category_id` is the source id from the manifest, `area` = w * h.
    """
    classes = read_manifest(shard_dir)["classes"]
    try:
        files = shard_files(shard_dir)  # local paths or bucket URIs
    except ShardError as e:
        raise FileNotFoundError(str(e)) from None
    cat_of = [c["category_id"] for c in classes]
    images, annotations, seen = [], [], set()
    for f in files:
        try:
            table = read_shard_table(f, columns=list(_GT_COLUMNS))
        except (OSError, ValueError, KeyError) as e:  # pyarrow raises ArrowInvalid (a ValueError) etc.
            raise ValueError(f"{f}: cannot read shard columns {list(_GT_COLUMNS)} ({e})") from None
        cols = table.to_pydict()
        for r in range(table.num_rows):
            image_id = int(cols["image_id"][r])
            if image_id in seen:
                raise ValueError(f"{f}: duplicate image_id {image_id}")
            seen.add(image_id)
            w, h = int(cols["width"][r]), int(cols["height"][r])
            ow, oh = int(cols["orig_width"][r]), int(cols["orig_height"][r])
            if min(w, h, ow, oh) <= 0:
                raise ValueError(
                    f"{f}: image_id {image_id} has a non-positive size ({w}x{h}, orig {ow}x{oh})"
                )
            boxes = np.asarray(cols["boxes"][r] or [], dtype=np.float64)
            labels = cols["labels"][r] or []
            crowd = cols["iscrowd"][r] or [False] * len(labels)
            if boxes.size % 4 or boxes.size // 4 != len(labels) or len(crowd) != len(labels):
                raise ValueError(
                    f"{f}: image_id {image_id} has {boxes.size} box values, {len(labels)} labels, "
                    f"{len(crowd)} iscrowd flags (expected 4 values per label)"
                )
            images.append({"id": image_id, "width": ow, "height": oh})
            boxes = boxes.reshape(-1, 4) * np.array([ow / w, oh / h, ow / w, oh / h])
            for (x1, y1, x2, y2), label, c in zip(boxes.tolist(), labels, crowd, strict=True):
                if not 0 <= label < len(classes):
                    raise ValueError(
                        f"{f}: image_id {image_id} has label {label}, manifest has {len(classes)}"
                    )
                bw, bh = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat_of[label],
                        "bbox": [x1, y1, bw, bh],
                        "area": bw * bh,
                        "iscrowd": int(bool(c)),
                    }
                )
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c["category_id"], "name": c["name"]} for c in classes],
    }
    return coco_from_dict(dataset)


def coco_from_dict(dataset: Mapping) -> COCO:
    """An indexed COCO object from a dataset dict {images, annotations, categories} (copied)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dict(dataset))
    with quiet_pycocotools():
        coco.createIndex()
    return coco


def _pair(value, i: int) -> tuple[float, float]:
    """Element i of a per-image sequence of scalars or pairs, as (x, y)."""
    v = value[i]
    arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    arr = arr.astype(np.float64).reshape(-1)
    if arr.size == 1:
        return float(arr[0]), float(arr[0])
    if arr.size == 2:
        return float(arr[0]), float(arr[1])
    raise ValueError(f"expected a number or an (x, y) pair per image, got {arr.size} values")


def to_coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, torch.Tensor]],
    scales,
    pads,
    stored_sizes,
    orig_sizes,
    category_ids: Sequence[int],
) -> list[dict]:
    """COCO result dicts for one batch of detections, in original pixels and source category ids.

    image_ids: [B] source image ids.
    detections: [B] dicts {"boxes": [K, 4] xyxy in model-input pixels, "scores": [K], "labels": [K]
        class index 0..C-1}.
    scales: [B] letterbox scale (stored -> input), a number or (sx, sy) per image.
    pads: [B] (pad_x, pad_y): left/top padding in input pixels.
    stored_sizes, orig_sizes: [B] (width, height) of the stored (shard) and original image.
    category_ids: [C] class index -> source category id.
    Returns [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]; boxes that are empty
    after clipping to the image are dropped.
    """
    n = len(image_ids)
    if not (len(detections) == len(scales) == len(pads) == len(stored_sizes) == len(orig_sizes) == n):
        raise ValueError(
            f"batch lengths differ: {n} image_ids, {len(detections)} detections, {len(scales)} scales, "
            f"{len(pads)} pads, {len(stored_sizes)} stored_sizes, {len(orig_sizes)} orig_sizes"
        )
    cat_ids = [int(c) for c in category_ids]
    results = []
    for i in range(n):
        det = detections[i]
        boxes = det["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        scores = det["scores"].detach().cpu().double().numpy().reshape(-1)
        labels = det["labels"].detach().cpu().long().numpy().reshape(-1)
        sx, sy = _pair(scales, i)
        px, py = _pair(pads, i)
        sw, sh = _pair(stored_sizes, i)
        ow, oh = _pair(orig_sizes, i)
        stored = (boxes - np.array([px, py, px, py])) / np.array([sx, sy, sx, sy])
        stored = np.clip(stored, 0.0, np.array([sw, sh, sw, sh]))
        orig = stored * np.array([ow / sw, oh / sh, ow / sw, oh / sh])
        wh = orig[:, 2:] - orig[:, :2]
        keep = (wh > 0).all(axis=1)
        bad = labels[(labels < 0) | (labels >= len(cat_ids))]
        if bad.size:
            raise ValueError(f"detection label {int(bad[0])} out of range for {len(cat_ids)} classes")
        image_id = int(image_ids[i])
        for k in np.nonzero(keep)[0]:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat_ids[labels[k]],
                    "bbox": [float(orig[k, 0]), float(orig[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
                    "score": float(scores[k]),
                }
            )
    return results


def _empty_metrics(names: list[str]) -> dict:
    out = {k: 0.0 for k in STAT_NAMES}
    out["per_class"] = {n: 0.0 for n in names}
    return out


def coco_evaluate(
    coco_gt: COCO, results: Sequence[Mapping], class_names: Sequence[str] | None = None
) -> dict:
    """Box mAP of `results` (COCO result dicts) against `coco_gt`.

    Returns the 12 standard COCOeval stats under STAT_NAMES (mAP = AP@[.5:.95], ...) and
    "per_class" {name: AP@[.5:.95]}. As in pycocotools, -1.0 means "no ground truth in
    that range/class". Empty `results` give zeros. `class_names` (optional) are in the order
    of `coco_gt.dataset["categories"]` (class index order for shard GT); default: category names.
    The caller's result dicts are not modified.
    """
    cats = coco_gt.dataset.get("categories", [])
    if class_names is not None and len(class_names) != len(cats):
        raise ValueError(f"{len(class_names)} class names given, ground truth has {len(cats)} categories")
    name_of = {
        c["id"]: (class_names[i] if class_names is not None else c["name"]) for i, c in enumerate(cats)
    }
    ordered_names = [name_of[c["id"]] for c in cats]
    if not results:
        return _empty_metrics(ordered_names)
    gt_images = set(coco_gt.getImgIds())
    for r in results:
        if r["image_id"] not in gt_images:
            raise ValueError(f"result for image_id {r['image_id']}, which is not in the ground truth")
        if r["category_id"] not in name_of:
            raise ValueError(f"result with category_id {r['category_id']}, which is not in the ground truth")
    dets = [dict(r) for r in results]  # loadRes adds keys to each dict
    with quiet_pycocotools():
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats, strict=True)}
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max dets]
    precision = ev.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name_of[cat_id]] = float(p.mean()) if p.size else -1.0
    out["per_class"] = {n: per_class[n] for n in ordered_names}
    return out
