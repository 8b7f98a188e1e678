"""The registered detector variants and their defaults (width, depth, neck channels, head depth).

| variant   | backbone                         | width | depth | neck | head convs | strides            |
|-----------|----------------------------------|-------|-------|------|------------|--------------------|
| seed      | research trunk (+ P6/P7 extras)  | 1.0   | 1.0   | 128  | 2          | 8,16,32,64,128     |
| mv2_s     | MobileNetV2 inverted residuals   | 0.5   | 1.0   | 64   | 2          | 8,16,32            |
| mv2_m     | MobileNetV2 inverted residuals   | 1.0   | 1.0   | 96   | 2          | 8,16,32            |
| compact_n | compact                          | 0.5   | 0.5   | 64   | 1          | 8,16,32            |
| compact_s | compact (project default)        | 0.75  | 1.0   | 80   | 2          | 8,16,32            |
| compact_m | compact                          | 1.0   | 1.5   | 128  | 2          | 8,16,32            |
"""

from __future__ import annotations

from .backbone import build_backbone
from .detector import Detector, DetectorSpec
from .head import Head
from .neck import PAN
from .registry import register_variant

NECK_ACT = "lrelu"


def assemble(spec: DetectorSpec) -> Detector:
    """Backbone -> PAN (reads the backbone's out_channels) -> shared head, from a spec."""
    backbone = build_backbone(spec.backbone, width=spec.width, depth=spec.depth)
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


def _spec(
    variant: str,
    backbone: str,
    num_classes: int,
    reg_max: int,
    width: float,
    depth: float,
    neck_channels: int,
    head_convs: int,
) -> DetectorSpec:
    return DetectorSpec(
        variant=variant,
        backbone=backbone,
        num_classes=num_classes,
        width=float(width),
        depth=float(depth),
        neck_channels=int(neck_channels),
        head_convs=int(head_convs),
        reg_max=reg_max,
    )


def _or(value, default):
    return default if value is None else value


@register_variant("seed")
def seed(
    *,
    num_classes: int,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
) -> Detector:
    """The research trunk exactly (at width = depth = 1); its extras are the stride 64/128 levels."""
    return assemble(
        _spec(
            "seed",
            "seed",
            num_classes,
            reg_max,
            _or(width, 1.0),
            _or(depth, 1.0),
            _or(neck_channels, 128),
            _or(head_convs, 2),
        )
    )


@register_variant("mv2_s")
def mv2_s(
    *,
    num_classes: int,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
) -> Detector:
    """MobileNetV2 x0.5 trunk."""
    return assemble(
        _spec(
            "mv2_s",
            "mv2",
            num_classes,
            reg_max,
            _or(width, 0.5),
            _or(depth, 1.0),
            _or(neck_channels, 64),
            _or(head_convs, 2),
        )
    )


@register_variant("mv2_m")
def mv2_m(
    *,
    num_classes: int,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
) -> Detector:
    """MobileNetV2 x1.0 trunk."""
    return assemble(
        _spec(
            "mv2_m",
            "mv2",
            num_classes,
            reg_max,
            _or(width, 1.0),
            _or(depth, 1.0),
            _or(neck_channels, 96),
            _or(head_convs, 2),
        )
    )


@register_variant("compact_n")
def compact_n(
    *,
    num_classes: int,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
) -> Detector:
    """Smallest compact model."""
    return assemble(
        _spec(
            "compact_n",
            "compact",
            num_classes,
            reg_max,
            _or(width, 0.5),
            _or(depth, 0.5),
            _or(neck_channels, 64),
            _or(head_convs, 1),
        )
    )


@register_variant("compact_s")
def compact_s(
    *,
    num_classes: int,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
) -> Detector:
    """The project default: small and fast (trains >= 1.5x faster than SSDLite-MobileNetV3 at 320)."""
    return assemble(
        _spec(
            "compact_s",
            "compact",
            num_classes,
            reg_max,
            _or(width, 0.75),
            _or(depth, 1.0),
            _or(neck_channels, 80),
            _or(head_convs, 2),
        )
    )


@register_variant("compact_m")
def compact_m(
    *,
    num_classes: int,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
) -> Detector:
    """Larger compact model for GPUs."""
    return assemble(
        _spec(
            "compact_m",
            "compact",
            num_classes,
            reg_max,
            _or(width, 1.0),
            _or(depth, 1.5),
            _or(neck_channels, 128),
            _or(head_convs, 2),
        )
    )
