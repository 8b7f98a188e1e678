"""Detector models: separable blocks, backbones, PAN neck, anchor-free head, registry of variants.

from rtrain.models import build_model, list_variants
model = build_model("compact_s", num_classes=3)
cls_logits, box_dist = model.forward_raw(images)  # images [B, 3, H, W] RGB in 0..1
"""

from . import backbone, blocks, detector, flops, head, neck, postprocess, registry, summary, variants  # noqa: F401
from .detector import Detector, DetectorSpec
from .flops import count_gflops, count_params
from .registry import build_model, list_variants, register_variant

__all__ = [
    "Detector",
    "DetectorSpec",
    "build_model",
    "count_gflops",
    "count_params",
    "list_variants",
    "register_variant",
]
