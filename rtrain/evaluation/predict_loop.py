"""The model over batches: detections per batch, COCO results, COCO metrics. Pure PyTorch, no Ray.

Batches are the dicts `rtrain.data.batches`'s collate gives (`images` uint8 [B, 3, S, S], `image_id`,
`scale`, `pad`, `stored_size`, `orig_size`); detections are `Detector.postprocess`'s, in input
pixels, and COCO results are mapped back to original-image pixels and source category ids by
`rtrain.evaluation.coco.to_coco_results`. Validation in training, `rtrain.evaluate` and
`rtrain.predict` all go through `predict_batches`, so their numbers agree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from rtrain.precision import amp_dtype, autocast, images_to_float


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str,
    score_thresh: float = 0.01,
    iou_thresh: float = 0.6,
    max_det: int = 100,
    amp: bool = True,
) -> Iterable[tuple[Mapping[str, Any], list[dict]]]:
    """Yield (batch, detections) per batch; detections as `Detector.postprocess` gives (input px)."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    model.eval()
    for batch in batches:
        images = images_to_float(batch["images"], device)
        with autocast(device, dtype):
            cls_logits, box_dist = model.forward_raw(images)
        dets = model.postprocess(
            cls_logits.float(),
            box_dist.float(),
            tuple(images.shape[-2:]),
            score_thresh=score_thresh,
            iou_thresh=iou_thresh,
            max_det=max_det,
        )
        yield batch, dets


def coco_results(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], category_ids: list[int], **predict_kw,
) -> tuple[list[dict], int]:
    """(COCO result dicts in original pixels and source category ids, images seen) of `model`
    on `batches` (`rtrain.evaluation.coco.to_coco_results`); the model's train/eval mode is kept.
    predict_kw: `predict_batches`' keywords (device, score_thresh, iou_thresh, max_det, amp)."""
    from rtrain.evaluation.coco import to_coco_results

    results: list[dict] = []
    n_images = 0
    was_training = model.training
    for batch, dets in predict_batches(model, batches, **predict_kw):
        n_images += len(dets)
        results.extend(to_coco_results(
            batch["image_id"], dets, batch["scale"], batch["pad"], batch["stored_size"], batch["orig_size"],
            category_ids,
        ))
    model.train(was_training)
    return results, n_images


def evaluate(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], coco_gt, category_ids: list[int],
    class_names: list[str], **predict_kw,
) -> dict[str, Any]:
    """COCO metrics of `model` (a Detector, not DDP-wrapped) on `batches`.

    Predictions are mapped back to original-image pixels and source category ids by
    `rtrain.evaluation.coco.to_coco_results`, then scored by pycocotools against `coco_gt`.
    Returns `coco_evaluate`'s dict (mAP, mAP50, mAP75, ..., per_class) plus `eval_images`,
    `eval_detections` and `eval_time_s`. predict_kw: `predict_batches`' keywords (device, ...).
    """
    from rtrain.evaluation.coco import coco_evaluate

    start = time.perf_counter()
    results, n_images = coco_results(model, batches, category_ids, **predict_kw)
    metrics = dict(coco_evaluate(coco_gt, results, class_names))
    metrics.update(eval_images=n_images, eval_detections=len(results),
                   eval_time_s=time.perf_counter() - start)
    return metrics
