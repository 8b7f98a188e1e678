"""The registered detector variants and their defaults (width, depth, neck channels, head depth).

| variant   | backbone                         | width | depth | neck | head convs | strides            |
|-----------|----------------------------------|-------|-------|------|------------|--------------------|
| seed      | research trunk (+ P6/P7 extras)  | 1.0   | 1.0   | 128  | 2          | 8,16,32,64,128     |
| mv2_s     | MobileNetV2 inverted residuals   | 0.5   | 1.0   | 64   | 2          | 8,16,32            |
| mv2_m     | MobileNetV2 inverted residuals   | 1.0   | 1.0   | 96   | 2          | 8,16,32            |
| compact_n | compact                          | 0.5   | 0.67  | 64   | 1          | 8,16,32            |
| compact_s | compact (project default)        | 1.0   | 1.0   | 96   | 2          | 8,16,32            |
| compact_m | compact                          | 1.25  | 1.5   | 128  | 2          | 8,16,32            |

compact_s was sized with benchmarks/model_speed.py against SSDLite-MobileNetV3 at 320 px (the
README's Figures table has the current numbers); a thinner width 0.75 / neck 80 was faster still
but too thin (0.36M parameters) for COCO-like data.

Any variant takes `backbone="timm:<name>"` instead of its own trunk (a timm model's features at
strides 8/16/32, rtrain.models.timm_backbone); it keeps the variant's neck and head sizes.
"""

from __future__ import annotations

from .backbone import build_backbone
from .detector import Detector, DetectorSpec
from .head import Head
from .neck import PAN
from .registry import register_variant

NECK_ACT = "lrelu"


def assemble(spec: DetectorSpec, *, pretrained: bool = False, backbone_weights: str = "") -> Detector:
    """Backbone -> PAN (reads the backbone's out_channels) -> shared head, from a spec.

    `pretrained` / `backbone_weights`: where a timm trunk's starting weights come from (not part of
    the spec: weights loaded afterwards, e.g. a run's best.pt, make them irrelevant)."""
    backbone = build_backbone(spec.backbone, width=spec.width, depth=spec.depth, pretrained=pretrained,
                              weights=backbone_weights)
    neck = PAN(backbone.out_channels, spec.neck_channels, act=NECK_ACT)
    head = Head(
        spec.neck_channels,
        len(backbone.strides),
        spec.num_classes,
        reg_max=spec.reg_max,
        num_convs=spec.head_convs,
        act=NECK_ACT,
    )
    return Detector(spec, backbone, neck, head)


# variant: (backbone family, width, depth, neck channels, head convs); the table above, as data.
DEFAULTS: dict[str, tuple[str, float, float, int, int]] = {
    "seed": ("seed", 1.0, 1.0, 128, 2),
    "mv2_s": ("mv2", 0.5, 1.0, 64, 2),
    "mv2_m": ("mv2", 1.0, 1.0, 96, 2),
    "compact_n": ("compact", 0.5, 0.67, 64, 1),
    "compact_s": ("compact", 1.0, 1.0, 96, 2),
    "compact_m": ("compact", 1.25, 1.5, 128, 2),
}


def _make(variant, num_classes, reg_max, *, width=None, depth=None, neck_channels=None,
          head_convs=None, backbone=None, pretrained=False, backbone_weights="") -> Detector:
    """The variant's defaults, overridden by every argument that is not None.

    `backbone` ("timm:<name>") replaces the variant's trunk; the variant then gives only the neck
    and head sizes, and width / depth (rtrain trunks' multipliers) must stay None."""
    family, d_width, d_depth, d_neck, d_head = DEFAULTS[variant]
    if backbone:
        family, d_width, d_depth = backbone, 1.0, 1.0
    pick = lambda value, default: default if value is None else value  # noqa: E731
    spec = DetectorSpec(
        variant=variant,
        backbone=family,
        num_classes=num_classes,
        width=float(pick(width, d_width)),
        depth=float(pick(depth, d_depth)),
        neck_channels=int(pick(neck_channels, d_neck)),
        head_convs=int(pick(head_convs, d_head)),
        reg_max=reg_max,
    )
    return assemble(spec, pretrained=pretrained, backbone_weights=backbone_weights)


# variant: its one-line description (the builder's docstring).
DESCRIPTIONS = {
    "seed": "The research trunk exactly (at width = depth = 1); its extras feed the stride 64/128 levels.",
    "mv2_s": "MobileNetV2 x0.5 trunk.",
    "mv2_m": "MobileNetV2 x1.0 trunk.",
    "compact_n": "Smallest compact model (edge devices, quick experiments).",
    "compact_s": "The project default: faster to train than SSDLite-MobileNetV3 at fewer GFLOPs "
                 "(README, Figures).",
    "compact_m": "Larger compact model, for GPUs.",
}


def _builder(variant: str):
    """The registry's keyword-only builder for `variant` (see rtrain.models.registry)."""

    def build(*, num_classes: int, reg_max: int = 7, **options) -> Detector:
        # options: width, depth, neck_channels, head_convs (None = the variant's default), backbone,
        # pretrained, backbone_weights (see rtrain.models.registry.build_model)
        return _make(variant, num_classes, reg_max, **options)

    build.__name__ = build.__qualname__ = variant
    build.__doc__ = DESCRIPTIONS[variant]
    return build


for _name in DEFAULTS:  # one registered builder per row of DEFAULTS
    register_variant(_name)(_builder(_name))
