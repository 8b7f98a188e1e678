"""Task-aligned assigner (TOOD / YOLOv8 / PP-PicoDet v2): which points learn which ground-truth box.

For every (gt, point) pair the alignment metric is `score^alpha * IoU^beta`, where `score` is the
predicted probability of the gt's class at that point and `IoU` is between the point's predicted
box and the gt. A gt's candidates are the points whose centre lies inside it (a gt too small to
contain any point falls back to the points within `center_radius` strides of its centre); the
`topk` candidates with the highest metric become its positives. A point claimed by several gts
goes to the one its predicted box overlaps most. Soft class targets are the metric normalised as
in TOOD: `metric / max metric of that gt * max IoU of that gt`.

Crowd gts never yield positives; points inside a crowd box that are not positives are flagged
`ignore` so the classification loss does not push them towards background.

Everything here runs under `torch.no_grad()` on detached predictions: the assignment is a target,
not something to back-propagate through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """Per-point targets for a batch. B images, N points, C classes.

    fg_mask [B, N] bool: positive points.
    gt_index [B, N] int64: index (into the padded gts of that image) of the assigned gt; 0 where not fg.
    target_labels [B, N] int64: class of the assigned gt; `num_classes` (background) where not fg.
    target_boxes [B, N, 4] float32: assigned gt box, xyxy input pixels; 0 where not fg.
    target_scores [B, N, C] float32: soft one-hot classification targets (0 for negatives).
    ignore_mask [B, N] bool: points inside a crowd box that are not positives (no cls loss).
    """

    fg_mask: torch.Tensor
    gt_index: torch.Tensor
    target_labels: torch.Tensor
    target_boxes: torch.Tensor
    target_scores: torch.Tensor
    ignore_mask: torch.Tensor


Targets = Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]


def num_target_images(targets: Targets) -> int:
    """Images in `targets`: a list of per-image dicts, or a padded batch dict (boxes [B, M, 4])."""
    if isinstance(targets, Mapping):
        return int(targets["boxes"].shape[0])
    return len(targets)


def prepare_targets(
    targets: Targets, device: torch.device, num_classes: int, strict: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded gt tensors for the assigner from either target form, plus the count of invalid labels.

    targets: a list of per-image dicts {boxes [M, 4], labels [M], optional iscrowd [M]} (every entry
    is a real box), or the padded batch `rtrain.data.batches.collate` gives: {"boxes" [B, M, 4],
    "labels" [B, M] (-1 = padding), optional "iscrowd" [B, M]}; the padded form is converted with
    no Python loop over images and no host synchronisation.

    A label outside 0..num_classes-1 (other than the -1 padding) is invalid: with strict=False it
    is masked out (the box is ignored) and counted on the device; strict=True raises ValueError
    (this reads the device once).

    Returns gt_boxes [B, M, 4] float32 xyxy, gt_labels [B, M] int64 (0 where not a real box),
    gt_valid [B, M] bool (a real, valid-label, non-crowd, non-degenerate box), gt_crowd [B, M]
    bool (a real crowd box), n_invalid (0-dim int64 device tensor).
    """
    if isinstance(targets, Mapping):
        boxes = targets["boxes"].to(device=device, dtype=torch.float32, non_blocking=True)
        labels = targets["labels"].to(device=device, dtype=torch.long, non_blocking=True)
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]:
            raise ValueError(
                f"padded targets: boxes must be [B, M, 4] and labels [B, M], got {tuple(boxes.shape)} "
                f"and {tuple(labels.shape)}"
            )
        crowd = targets.get("iscrowd")
        if crowd is None:
            crowd = torch.zeros_like(labels, dtype=torch.bool)
        else:
            crowd = crowd.to(device=device, dtype=torch.bool, non_blocking=True)
        if boxes.shape[1] == 0:  # at least one slot per image, as from the list form
            boxes = boxes.new_zeros(boxes.shape[0], 1, 4)
            labels = labels.new_full((labels.shape[0], 1), -1)
            crowd = crowd.new_zeros(crowd.shape[0], 1)
        real = labels != -1
    else:
        boxes, labels, real, crowd = _stack_target_dicts(targets, device)
    invalid = real & ((labels < 0) | (labels >= num_classes))
    if strict and bool(invalid.any()):
        raise ValueError(f"target labels must be in 0..{num_classes - 1}, got {labels[invalid].tolist()}")
    real = real & ~invalid
    labels = torch.where(real, labels, torch.zeros_like(labels))
    wh = boxes[..., 2:] - boxes[..., :2]
    non_degenerate = (wh > 0).all(dim=-1)
    crowd = crowd & real & non_degenerate
    gt_valid = real & ~crowd & non_degenerate
    return boxes, labels, gt_valid, crowd, invalid.sum()


def _stack_target_dicts(targets, device):
    batch = len(targets)
    max_m = max([1] + [int(t["boxes"].shape[0]) for t in targets])
    gt_boxes = torch.zeros(batch, max_m, 4, device=device, dtype=torch.float32)
    gt_labels = torch.zeros(batch, max_m, device=device, dtype=torch.long)
    gt_real = torch.zeros(batch, max_m, device=device, dtype=torch.bool)
    gt_crowd = torch.zeros(batch, max_m, device=device, dtype=torch.bool)
    for i, t in enumerate(targets):
        boxes, labels = t["boxes"], t["labels"]
        m = int(boxes.shape[0])
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != (m,):
            raise ValueError(
                f"target {i}: boxes must be [M, 4] and labels [M], got {tuple(boxes.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if m == 0:
            continue
        gt_boxes[i, :m] = boxes.to(device=device, dtype=torch.float32)
        gt_labels[i, :m] = labels.to(device=device, dtype=torch.long)
        gt_real[i, :m] = True
        crowd = t.get("iscrowd")
        if crowd is not None:
            gt_crowd[i, :m] = crowd.to(device=device, dtype=torch.bool)
    return gt_boxes, gt_labels, gt_real, gt_crowd


def pad_targets(
    targets: Targets, device: torch.device, num_classes: int, strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prepare_targets` without the invalid count; strict (a bad label raises ValueError) by default.

    Returns gt_boxes [B, M, 4] float32 xyxy, gt_labels [B, M] int64, gt_valid [B, M] bool (a real,
    non-crowd, non-degenerate box), gt_crowd [B, M] bool (a real crowd box).
    """
    return prepare_targets(targets, device, num_classes, strict=strict)[:4]


def pairwise_iou(gt_boxes: torch.Tensor, pred_boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU [B, M, N] between gt_boxes [B, M, 4] and pred_boxes [B, N, 4] (both xyxy)."""
    gt = gt_boxes[:, :, None, :]
    pd = pred_boxes[:, None, :, :]
    lt = torch.maximum(gt[..., :2], pd[..., :2])
    rb = torch.minimum(gt[..., 2:], pd[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_gt = (gt[..., 2:] - gt[..., :2]).clamp(min=0).prod(dim=-1)
    area_pd = (pd[..., 2:] - pd[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_gt + area_pd - inter + eps)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """[B, M, N] bool: point n (points [N, 2]) lies strictly inside box m (boxes [B, M, 4] xyxy)."""
    px = points[:, 0].view(1, 1, -1)
    py = points[:, 1].view(1, 1, -1)
    x1, y1, x2, y2 = (boxes[..., k, None] for k in range(4))
    return (px > x1) & (px < x2) & (py > y1) & (py < y2)


def points_near_centres(
    points: torch.Tensor, point_strides: torch.Tensor, boxes: torch.Tensor, radius: float
) -> torch.Tensor:
    """[B, M, N] bool: point n lies within `radius * its stride` of box m's centre (both axes)."""
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, M, 2]
    reach = (radius * point_strides).view(1, 1, -1)
    dx = (points[:, 0].view(1, 1, -1) - centres[..., 0, None]).abs()
    dy = (points[:, 1].view(1, 1, -1) - centres[..., 1, None]).abs()
    return (dx < reach) & (dy < reach)


class TaskAlignedAssigner:
    """Callable assigner; see the module docstring.

    topk: positives per gt (at most). alpha, beta: exponents of score and IoU in the metric.
    center_radius: fallback candidate region (in strides) for gts that contain no point.
    """

    def __init__(
        self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, center_radius: float = 2.5,
        eps: float = 1e-9,
    ) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk, self.alpha, self.beta = topk, alpha, beta
        self.center_radius, self.eps = center_radius, eps

    @torch.no_grad()
    def __call__(
        self,
        cls_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        points: torch.Tensor,
        point_strides: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_valid: torch.Tensor,
        gt_crowd: torch.Tensor,
    ) -> Assignment:
        """Assign points to gts.

        cls_scores [B, N, C]: class probabilities (after sigmoid). pred_boxes [B, N, 4]: decoded
        predictions, xyxy input pixels. points [N, 2], point_strides [N]. gt_* as from `pad_targets`.
        """
        cls_scores = cls_scores.detach().float()
        pred_boxes = pred_boxes.detach().float()
        batch, num_points, num_classes = cls_scores.shape
        num_gts = gt_boxes.shape[1]

        in_box = points_in_boxes(points, gt_boxes)  # [B, M, N]
        inside = in_box
        if self.center_radius > 0:
            # Tiny gts (smaller than the finest stride) may contain no point at all.
            empty = ~inside.any(dim=-1, keepdim=True)
            near = points_near_centres(points, point_strides, gt_boxes, self.center_radius)
            inside = inside | (empty & near)
        candidate = inside & gt_valid[..., None]

        iou = pairwise_iou(gt_boxes, pred_boxes, self.eps) * candidate  # [B, M, N]
        labels_idx = gt_labels.clamp(0, num_classes - 1)[..., None].expand(-1, -1, num_points)
        score = torch.gather(cls_scores.transpose(1, 2), 1, labels_idx)  # [B, M, N]
        metric = score.pow(self.alpha) * iou.pow(self.beta) * candidate

        k = min(self.topk, num_points)
        top_idx = metric.topk(k, dim=-1).indices  # [B, M, k]
        in_topk = torch.zeros_like(candidate).scatter_(-1, top_idx, True)
        # metric > 0: when a gt has fewer than k candidates, topk also returns arbitrary zero-metric
        # points; a candidate whose prediction does not even overlap the gt is not a positive either.
        pos = in_topk & candidate & (metric > 0)  # [B, M, N]

        # A point claimed by several gts keeps only the one its prediction overlaps most.
        multi = pos.sum(dim=1, keepdim=True) > 1  # [B, 1, N]
        gt_ids = torch.arange(num_gts, device=pos.device).view(1, -1, 1)
        best = gt_ids == (iou * pos).argmax(dim=1, keepdim=True)  # [B, M, N], no int64 one-hot
        pos = torch.where(multi, best & pos, pos)

        fg_mask = pos.any(dim=1)  # [B, N]
        gt_index = pos.float().argmax(dim=1)  # [B, N]; 0 where not fg
        target_labels = torch.gather(gt_labels, 1, gt_index)
        target_labels = torch.where(fg_mask, target_labels, torch.full_like(target_labels, num_classes))
        target_boxes = torch.gather(gt_boxes, 1, gt_index[..., None].expand(-1, -1, 4))
        target_boxes = target_boxes * fg_mask[..., None]

        # TOOD normalisation: the best point of each gt gets that gt's best IoU as its score target.
        metric = metric * pos
        iou = iou * pos
        metric_max = metric.amax(dim=-1, keepdim=True)  # [B, M, 1]
        iou_max = iou.amax(dim=-1, keepdim=True)
        # Divide by a clamp, not `+ eps`: early metrics (score ~0.01 times IoU^6) can be far below any
        # fixed eps, which would shrink every soft target towards 0.
        tiny = torch.finfo(metric.dtype).tiny
        norm = (metric * iou_max / metric_max.clamp(min=tiny)).amax(dim=1)  # [B, N]
        # Background points carry label `num_classes`: scatter into an extra column, then drop it.
        target_scores = torch.zeros(batch, num_points, num_classes + 1, device=norm.device)
        target_scores = target_scores.scatter_(-1, target_labels[..., None], norm[..., None])
        target_scores = target_scores[..., :num_classes]

        crowd_cover = (in_box & gt_crowd[..., None]).any(dim=1)
        ignore_mask = crowd_cover & ~fg_mask
        return Assignment(fg_mask, gt_index, target_labels, target_boxes, target_scores, ignore_mask)
