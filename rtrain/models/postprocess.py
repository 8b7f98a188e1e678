"""Decode raw head outputs into per-image detections: DFL decode, score threshold, top-k, NMS.

Device-agnostic and batched: the whole batch goes through one class-aware
`torchvision.ops.batched_nms` call (the NMS group is image * num_classes + label).
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from rtrain.models.box_ops import dist_to_ltrb, ltrb_to_boxes


def decode_boxes(
    box_dist: torch.Tensor, points: torch.Tensor, point_strides: torch.Tensor, reg_max: int
) -> torch.Tensor:
    """Boxes xyxy in input pixels [B, N, 4] from DFL logits [B, N, 4(R+1)], points [N, 2], strides [N]."""
    ltrb = dist_to_ltrb(box_dist, reg_max) * point_strides[:, None]
    return ltrb_to_boxes(points, ltrb)


def postprocess(
    cls_logits: torch.Tensor,
    box_dist: torch.Tensor,
    points: torch.Tensor,
    point_strides: torch.Tensor,
    image_size: tuple[int, int],
    reg_max: int,
    score_thresh: float = 0.05,
    iou_thresh: float = 0.6,
    max_det: int = 100,
    pre_nms_topk: int = 1000,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image from cls_logits [B, N, C] and box_dist [B, N, 4(R+1)].

    `image_size` is the (H, W) of the model input. Each image keeps its `pre_nms_topk` best
    (point, class) pairs above `score_thresh` (sigmoid scores), boxes are clipped to the image,
    then class-aware NMS at `iou_thresh` and the `max_det` best survive. Returns a list (len B) of
    `{"boxes": [K, 4] xyxy input px, "scores": [K], "labels": [K] int64}`, sorted by score.
    """
    batch, num_points, num_classes = cls_logits.shape
    height, width = int(image_size[0]), int(image_size[1])
    boxes = decode_boxes(box_dist, points, point_strides, reg_max)
    boxes = torch.stack(
        [
            boxes[..., 0].clamp(0, width),
            boxes[..., 1].clamp(0, height),
            boxes[..., 2].clamp(0, width),
            boxes[..., 3].clamp(0, height),
        ],
        dim=-1,
    )
    scores = cls_logits.sigmoid().flatten(1)  # [B, N * C], index = point * C + label
    k = min(pre_nms_topk, scores.shape[1])
    top_scores, top_idx = scores.topk(k, dim=1)
    point_idx = torch.div(top_idx, num_classes, rounding_mode="floor")
    labels = top_idx % num_classes
    top_boxes = torch.gather(boxes, 1, point_idx[..., None].expand(-1, -1, 4))
    image_idx = torch.arange(batch, device=cls_logits.device)[:, None].expand(-1, k)
    keep = top_scores > score_thresh
    top_boxes, top_scores, labels, image_idx = (
        top_boxes[keep],
        top_scores[keep],
        labels[keep],
        image_idx[keep],
    )
    kept = batched_nms(top_boxes, top_scores, image_idx * num_classes + labels, iou_thresh)
    kept_image = image_idx[kept]
    results = []
    for b in range(batch):
        sel = kept[kept_image == b][:max_det]
        results.append({"boxes": top_boxes[sel], "scores": top_scores[sel], "labels": labels[sel].long()})
    return results
