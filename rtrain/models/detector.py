"""The detector: input normalisation -> backbone -> neck -> head, plus loss and decoding.

Images are float32 `[B, 3, H, W]`, RGB in 0..1, H and W multiples of 32. They are normalised
inside the model with the ImageNet mean/std, or a backbone's own `input_mean` / `input_std`
when it has them (a timm trunk: its pretrained_cfg's, rtrain.models.timm_backbone). `forward_raw` is the
pure network (exportable; no NMS); `forward` returns a loss dict in training mode and
detections in eval mode (torchvision's detection contract).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rtrain.models.box_ops import level_sizes, make_points

from .backbone import Backbone
from .head import Head
from .neck import PAN
from .postprocess import postprocess

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class DetectorSpec:
    """Everything that rebuilds a variant's architecture (saved with weights)."""

    variant: str
    backbone: str  # a family of rtrain.models.backbone, or "timm:<name>"
    num_classes: int
    width: float
    depth: float
    neck_channels: int
    head_convs: int
    reg_max: int = 7


def _make_loss(num_classes: int, reg_max: int) -> nn.Module | None:
    # Imported lazily: rtrain.models.losses is developed alongside and may be absent in a partial checkout.
    if importlib.util.find_spec("rtrain.models.losses") is None:
        log.debug("rtrain.models.losses not found: Detector built without loss_fn")
        return None
    from rtrain.models.losses import DetectionLoss

    return DetectionLoss(num_classes, reg_max)


class Detector(nn.Module):
    """Anchor-free separable-conv detector; attributes `num_classes`, `reg_max`, `strides`, `loss_fn`."""

    def __init__(self, spec: DetectorSpec, backbone: Backbone | nn.Module, neck: PAN, head: Head):
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.reg_max = spec.reg_max
        self.strides = tuple(backbone.strides)
        self.backbone, self.neck, self.head = backbone, neck, head
        mean = getattr(backbone, "input_mean", IMAGENET_MEAN)  # what pretrained trunk weights expect
        std = getattr(backbone, "input_std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.loss_fn = _make_loss(spec.num_classes, spec.reg_max)
        self._points_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls_logits [B, N, C] and box_dist [B, N, 4(R+1)] for images [B, 3, H, W] in 0..1."""
        x = (images - self.mean) / self.std
        return self.head(self.neck(self.backbone(x)))

    def points(self, image_size: tuple[int, int], device=None, dtype=torch.float32):
        """Points [N, 2] (x, y input px) and their strides [N] for an input of (H, W)."""
        return make_points(
            level_sizes(int(image_size[0]), int(image_size[1]), self.strides),
            self.strides,
            device=device,
            dtype=dtype,
        )

    def compute_loss(
        self,
        cls_logits: torch.Tensor,
        box_dist: torch.Tensor,
        image_size: tuple[int, int],
        targets,
    ) -> dict[str, torch.Tensor]:
        """Loss dict {"loss", "loss_cls", "loss_box", "loss_dfl"} from raw outputs and targets.

        targets: a list of per-image dicts or the padded batch dict (see `rtrain.models.losses`).
        Points and strides are float32 even under autocast (bf16 cannot hold 8.5 * 32 exactly).
        """
        if self.loss_fn is None:
            raise RuntimeError("Detector has no loss_fn: rtrain.models.losses is not importable")
        key = (int(image_size[0]), int(image_size[1]), cls_logits.device)
        if key not in self._points_cache:  # a handful of sizes (multi-scale): built once each
            self._points_cache[key] = self.points(image_size, cls_logits.device, torch.float32)
        points, point_strides = self._points_cache[key]
        return self.loss_fn(cls_logits, box_dist, points, point_strides, targets)

    def postprocess(
        self,
        cls_logits: torch.Tensor,
        box_dist: torch.Tensor,
        image_size: tuple[int, int],
        score_thresh: float = 0.05,
        iou_thresh: float = 0.6,
        max_det: int = 100,
        pre_nms_topk: int = 1000,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image {"boxes" [K,4] xyxy input px, "scores" [K], "labels" [K] int64}; see postprocess.py."""
        points, point_strides = self.points(image_size, cls_logits.device, box_dist.dtype)
        return postprocess(
            cls_logits,
            box_dist,
            points,
            point_strides,
            image_size,
            self.reg_max,
            score_thresh=score_thresh,
            iou_thresh=iou_thresh,
            max_det=max_det,
            pre_nms_topk=pre_nms_topk,
        )

    def forward(self, images: torch.Tensor, targets=None):
        """Training: loss dict (targets required). Eval: list (len B) of detection dicts.

        targets: a list of B per-image dicts, or the padded batch dict {"boxes" [B, M, 4],
        "labels" [B, M] (-1 = padding), "iscrowd" [B, M]} that
        `rtrain.training.engine.targets_from_batch` gives.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"image size {height}x{width} is not a multiple of {SIZE_MULTIPLE}")
        cls_logits, box_dist = self.forward_raw(images)
        if self.training:
            if targets is None:
                raise ValueError("Detector in training mode needs targets")
            n = int(targets["boxes"].shape[0]) if isinstance(targets, Mapping) else len(targets)
            if n != images.shape[0]:
                raise ValueError(f"{n} targets for {images.shape[0]} images")
            return self.compute_loss(cls_logits, box_dist, (height, width), targets)
        return self.postprocess(cls_logits, box_dist, (height, width))
