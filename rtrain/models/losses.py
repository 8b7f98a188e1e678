"""Detection losses (PP-PicoDet v2 / YOLOv8 style): varifocal classification, GIoU and DFL box terms.

`DetectionLoss` decodes the raw head outputs, asks the task-aligned assigner (`rtrain.models.assigner`)
which points learn which gt, and returns weighted losses, each normalised by the sum of the soft
class targets (at least 1):

- classification: varifocal loss against IoU-aware soft targets (positives weighted by their
  target, negatives down-weighted by `alpha * p^gamma`); points inside crowd boxes are ignored;
- box: GIoU loss between predicted and assigned boxes, weighted per positive by its target score;
- DFL: distribution focal loss on the `reg_max + 1` distance bins of each side, same weights.

All of it runs in float32 with autocast off, so it is safe inside an AMP training step.

Targets: a list of per-image dicts, or the padded batch tensors of `rtrain.data.batches.collate`
(boxes [B, M, 4], labels [B, M] with -1 padding, iscrowd [B, M]) used as they are, with no loop
over images and no host synchronisation. A label outside 0..C-1 is ignored and counted on the
device in `DetectionLoss.invalid_targets` (cumulative 0-dim tensor; read it when logging);
`strict_labels=True` raises instead (one host read per call).

Normaliser under DDP: the sum of soft targets is averaged over the ranks (one device
all-reduce per call, detached, when torch.distributed is initialised with world > 1), so N ranks
with batch b give the same gradient as one rank with batch N*b once DDP averages the gradients.
Every rank must therefore compute the loss the same number of times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rtrain.models.assigner import Targets, TaskAlignedAssigner, num_target_images, prepare_targets
from rtrain.models.box_ops import boxes_to_ltrb, dist_to_ltrb, giou_loss, ltrb_to_boxes


def varifocal_loss(
    logits: torch.Tensor, target_scores: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise varifocal loss [..., C] for logits and soft targets in 0..1 of the same shape.

    Positives (target > 0) are weighted by their target; negatives by `alpha * sigmoid(logit)^gamma`.
    """
    prob = logits.sigmoid()
    positive = (target_scores > 0).to(logits.dtype)
    weight = alpha * prob.pow(gamma) * (1 - positive) + target_scores * positive
    return F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none") * weight


def distribution_focal_loss(dist_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL [...] for bin logits [..., R+1] and continuous targets [...] in [0, R) (bin units).

    Cross-entropy on the two bins around the target, weighted by closeness: minimal when the
    distribution puts all its mass on those two bins in the right proportion.
    """
    left = target.floor().long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = 1 - w_left
    logp = dist_logits.log_softmax(dim=-1)
    lp_left = logp.gather(-1, left[..., None]).squeeze(-1)
    lp_right = logp.gather(-1, right[..., None]).squeeze(-1)
    return -(lp_left * w_left + lp_right * w_right)


class DetectionLoss(nn.Module):
    """Assigner + losses for an anchor-free DFL head. No parameters.

    forward(cls_logits [B, N, C], box_dist [B, N, 4 * (reg_max + 1)], points [N, 2] (x, y input px),
    point_strides [N], targets: list of B dicts {boxes [M, 4] xyxy input px, labels [M] int64,
    optional iscrowd [M] bool} or one padded dict {boxes [B, M, 4], labels [B, M] (-1 = padding),
    optional iscrowd [B, M]}) -> {"loss", "loss_cls", "loss_box", "loss_dfl"}, scalar tensors;
    the three parts are already weighted, so loss = loss_cls + loss_box + loss_dfl.

    sync_norm: average the normaliser across DDP ranks (see the module doc).
    strict_labels: raise ValueError on a label outside 0..C-1 instead of ignoring and counting it.
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 7,
        *,
        cls_weight: float = 1.0,
        box_weight: float = 2.0,
        dfl_weight: float = 0.5,
        topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        center_radius: float = 2.5,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        sync_norm: bool = True,
        strict_labels: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1 or reg_max < 1:
            raise ValueError(f"num_classes and reg_max must be >= 1, got {num_classes} and {reg_max}")
        self.num_classes, self.reg_max = num_classes, reg_max
        self.cls_weight, self.box_weight, self.dfl_weight = cls_weight, box_weight, dfl_weight
        self.vfl_alpha, self.vfl_gamma = vfl_alpha, vfl_gamma
        self.assigner = TaskAlignedAssigner(topk=topk, alpha=alpha, beta=beta, center_radius=center_radius)
        self.sync_norm, self.strict_labels = sync_norm, strict_labels
        self.invalid_targets: torch.Tensor | None = None  # not a buffer: stays out of state_dict

    def forward(
        self,
        cls_logits: torch.Tensor,
        box_dist: torch.Tensor,
        points: torch.Tensor,
        point_strides: torch.Tensor,
        targets: Targets,
    ) -> dict[str, torch.Tensor]:
        batch, num_points, num_classes = cls_logits.shape
        bins = self.reg_max + 1
        if num_classes != self.num_classes or box_dist.shape != (batch, num_points, 4 * bins):
            raise ValueError(
                f"expected cls_logits [B, N, {self.num_classes}] and box_dist [B, N, {4 * bins}], got "
                f"{tuple(cls_logits.shape)} and {tuple(box_dist.shape)}"
            )
        if points.shape != (num_points, 2) or point_strides.shape != (num_points,):
            raise ValueError(f"points/strides do not match N={num_points}: {tuple(points.shape)}")
        if num_target_images(targets) != batch:
            raise ValueError(f"got {num_target_images(targets)} target dicts for a batch of {batch} images")

        with torch.autocast(device_type=cls_logits.device.type, enabled=False):
            return self._losses(
                cls_logits.float(), box_dist.float(), points.float(), point_strides.float(), targets
            )

    def _normaliser(self, target_scores: torch.Tensor) -> torch.Tensor:
        """Sum of the soft targets (mean over DDP ranks when `sync_norm`), at least 1; detached."""
        total = target_scores.detach().sum()
        if self.sync_norm and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                total = total / world
        return total.clamp(min=1.0)

    def _losses(self, cls_logits, box_dist, points, point_strides, targets) -> dict[str, torch.Tensor]:
        batch, num_points = cls_logits.shape[:2]
        gt_boxes, gt_labels, gt_valid, gt_crowd, n_invalid = prepare_targets(
            targets, cls_logits.device, self.num_classes, strict=self.strict_labels
        )
        self.invalid_targets = n_invalid if self.invalid_targets is None else self.invalid_targets + n_invalid
        strides = point_strides[:, None]
        ltrb = dist_to_ltrb(box_dist, self.reg_max)  # [B, N, 4] stride units
        pred_boxes = ltrb_to_boxes(points, ltrb * strides)  # [B, N, 4] input px
        a = self.assigner(
            cls_logits.sigmoid(), pred_boxes, points, point_strides, gt_boxes, gt_labels, gt_valid, gt_crowd
        )
        norm = self._normaliser(a.target_scores)

        cls_elem = varifocal_loss(cls_logits, a.target_scores, self.vfl_alpha, self.vfl_gamma)
        loss_cls = (cls_elem * (~a.ignore_mask)[..., None]).sum() / norm

        # Box terms run densely over all points with weight 0 off the positives: boolean indexing
        # (`x[fg]`) would make the host wait for the positives' count. Non-positive points get a
        # stand-in target (a one-stride box around the point) so every term and gradient is finite.
        # A batch with no boxes still keeps box_dist in the graph (zero gradient), so it neither
        # breaks backward nor leaves DDP with unused parameters.
        fg = a.fg_mask[..., None]  # [B, N, 1]
        weight = a.target_scores.sum(dim=-1)  # [B, N]; 0 off the positives
        stand_in = torch.cat([points - strides / 2, points + strides / 2], dim=-1)  # [N, 4]
        target_boxes = torch.where(fg, a.target_boxes, stand_in)  # [B, N, 4]
        loss_box = (giou_loss(pred_boxes, target_boxes) * weight).sum() / norm

        target_ltrb = boxes_to_ltrb(points / strides, target_boxes / strides[None])  # [B, N, 4]
        target_ltrb = target_ltrb.clamp(min=0, max=self.reg_max - 0.01)
        dist = box_dist.reshape(batch, num_points, 4, self.reg_max + 1)
        loss_dfl = (distribution_focal_loss(dist, target_ltrb).mean(dim=-1) * weight).sum() / norm

        loss_cls = self.cls_weight * loss_cls
        loss_box = self.box_weight * loss_box
        loss_dfl = self.dfl_weight * loss_dfl
        return {
            "loss": loss_cls + loss_box + loss_dfl,
            "loss_cls": loss_cls,
            "loss_box": loss_box,
            "loss_dfl": loss_dfl,
        }
