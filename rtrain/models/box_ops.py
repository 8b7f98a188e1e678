"""Anchor points and the distance <-> box conversions shared by the head, loss and postprocess.

Conventions used everywhere in rtrain:
- boxes are `xyxy` in input-image pixels (the tensor the model sees);
- a detector predicts, at every point of every level, the distances from the
  point to the box's left, top, right and bottom sides ("ltrb"), in units of
  that level's stride, as a discrete distribution over `reg_max + 1` bins (DFL);
- points are cell centres: ((ix + 0.5) * s, (iy + 0.5) * s); levels are
  concatenated in the order of `strides`, each level row-major (y, then x).
"""

from __future__ import annotations

import torch


def level_sizes(height: int, width: int, strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """Feature-map (h, w) per level for an input of `height` x `width` (ceil, as strided convs give)."""
    return [((height + s - 1) // s, (width + s - 1) // s) for s in strides]


def make_points(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [N, 2] (x, y) in input pixels and their strides [N], for levels of the given sizes."""
    points, point_strides = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
        point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def dist_to_ltrb(box_dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Expected distances [..., 4] (stride units) from logits [..., 4 * (reg_max + 1)]."""
    bins = torch.arange(reg_max + 1, device=box_dist.device, dtype=box_dist.dtype)
    probs = box_dist.reshape(*box_dist.shape[:-1], 4, reg_max + 1).softmax(dim=-1)
    return (probs * bins).sum(dim=-1)


def ltrb_to_boxes(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Boxes xyxy from points [..., 2] and distances [..., 4] in the same units as the points."""
    x1y1 = points - ltrb[..., :2]
    x2y2 = points + ltrb[..., 2:]
    return torch.cat([x1y1, x2y2], dim=-1)


def boxes_to_ltrb(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances [..., 4] from points [..., 2] to the sides of boxes xyxy [..., 4] (same units)."""
    left_top = points - boxes[..., :2]
    right_bottom = boxes[..., 2:] - points
    return torch.cat([left_top, right_bottom], dim=-1)


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU loss `1 - GIoU` [...] of boxes xyxy [..., 4] (torchvision's formula).

    Written with clamps instead of torchvision's boolean-mask assignment, which makes the host
    wait for the mask's count on a GPU; same values (and gradients off the zero-overlap edge).
    """
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    inter_w = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
    inter_h = (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    inter = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (area_c - union) / (area_c + eps))
