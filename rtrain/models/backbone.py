"""Backbones built from stage tables: the seed research trunk, MobileNetV2-style, and the compact family.

A backbone is a stem conv then stages; each stage is one table row
`Stage(block, channels, repeats, stride, expand, tap)`: `repeats` blocks of kind `block`
("ds" depthwise-separable, "ir" inverted residual), the first with `stride`. Stages with
`tap=True` are outputs. `Backbone.forward(x [B, 3, H, W])` returns the tapped feature maps,
`[B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i])]`, in increasing stride order.
Width multiplies every channel count (via `make_divisible`), depth every `repeats` (via
`scale_depth`); nothing else in a table changes with them.

Any module with `strides`, `out_channels` and that forward contract is a backbone: "timm:<name>"
builds a timm model's trunk the same way (rtrain.models.timm_backbone; timm is optional).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ConvBNAct, make_block, make_divisible, scale_depth
from .timm_backbone import PREFIX as TIMM_PREFIX
from .timm_backbone import TimmBackbone


@dataclass(frozen=True)
class Stage:
    block: str  # "ds" or "ir"
    channels: int  # at width 1.0
    repeats: int  # at depth 1.0
    stride: int  # of the stage's first block
    expand: float = 1.0  # "ir" only
    tap: bool = False  # the stage's output is a backbone output
    scale_depth: bool = True  # False: `repeats` is fixed (single-purpose stages such as the seed's extras)


@dataclass(frozen=True)
class BackboneSpec:
    stem_channels: int
    stages: tuple[Stage, ...]
    act: str = "relu"
    se: bool = False


# The research trunk, exactly: stem 3x3 conv 3->32 s2, then depthwise-separable blocks
# 32->64, 64->128 s2, 128->128, 128->256 s2, 256->256, 256->512 s2, 5x 512->512, 512->1024 s2,
# then the extras 1024->512 s2, 512->256 s2, 256->128 (also depthwise-separable). Taps at strides
# 8 (256), 16 (512), 32 (1024), 64 (512) and 128 (the last extra, 128): every extra feeds the head.
SEED = BackboneSpec(
    stem_channels=32,
    act="relu",
    stages=(
        Stage("ds", 64, 1, 1),
        Stage("ds", 128, 1, 2),
        Stage("ds", 128, 1, 1),
        Stage("ds", 256, 1, 2),
        Stage("ds", 256, 1, 1, tap=True),
        Stage("ds", 512, 1, 2),
        Stage("ds", 512, 5, 1, tap=True),
        Stage("ds", 1024, 1, 2, tap=True),
        Stage("ds", 512, 1, 2, tap=True, scale_depth=False),
        Stage("ds", 256, 1, 2, scale_depth=False),
        Stage("ds", 128, 1, 1, tap=True, scale_depth=False),
    ),
)

# MobileNetV2 (t, c, n, s) without the final 1x1 1280 conv; taps at strides 8, 16, 32.
MV2 = BackboneSpec(
    stem_channels=32,
    act="relu6",
    stages=(
        Stage("ir", 16, 1, 1, expand=1),
        Stage("ir", 24, 2, 2, expand=6),
        Stage("ir", 32, 3, 2, expand=6, tap=True),
        Stage("ir", 64, 4, 2, expand=6),
        Stage("ir", 96, 3, 1, expand=6, tap=True),
        Stage("ir", 160, 3, 2, expand=6),
        Stage("ir", 320, 1, 1, expand=6, tap=True),
    ),
)

# Compact: cheap high-resolution stages (plain separable blocks, no expansion where maps are
# large), small expansion (3-4) below, few channels; tuned for train speed on CPU and small GPUs.
COMPACT = BackboneSpec(
    stem_channels=16,
    act="relu",
    stages=(
        Stage("ds", 24, 1, 2),
        Stage("ir", 32, 2, 2, expand=3, tap=True),
        Stage("ir", 64, 2, 2, expand=4),
        Stage("ir", 96, 2, 1, expand=4, tap=True),
        Stage("ir", 160, 2, 2, expand=4, tap=True),
    ),
)

BACKBONES = {"seed": SEED, "mv2": MV2, "compact": COMPACT}


class Backbone(nn.Module):
    """Stem + stages from a `BackboneSpec`; attributes `strides` and `out_channels` (aligned tuples)."""

    def __init__(self, spec: BackboneSpec, width: float = 1.0, depth: float = 1.0):
        super().__init__()
        if not spec.stages[-1].tap:
            raise ValueError("the last stage must be tapped: later stages would get no gradient")
        if not 0.1 <= width <= 4.0 or not 0.1 <= depth <= 4.0:
            raise ValueError(f"width {width} / depth {depth} out of range [0.1, 4.0]")
        stem_ch = make_divisible(spec.stem_channels * width)
        self.stem = ConvBNAct(3, stem_ch, 3, 2, act=spec.act)
        stages, strides, out_channels, taps = [], [], [], []
        in_ch, stride = stem_ch, 2
        for i, st in enumerate(spec.stages):
            out_ch = make_divisible(st.channels * width)
            repeats = scale_depth(st.repeats, depth) if st.scale_depth else st.repeats
            blocks = []
            for j in range(repeats):
                blocks.append(
                    make_block(
                        st.block,
                        in_ch,
                        out_ch,
                        st.stride if j == 0 else 1,
                        spec.act,
                        expand=st.expand,
                        se=spec.se,
                    )
                )
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
            stride *= st.stride
            if st.tap:
                taps.append(i)
                strides.append(stride)
                out_channels.append(out_ch)
        self.stages = nn.ModuleList(stages)
        self.taps = tuple(taps)
        self.strides = tuple(strides)
        self.out_channels = tuple(out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                feats.append(x)
        return feats


def build_backbone(name: str, width: float = 1.0, depth: float = 1.0, *, pretrained: bool = False,
                   weights: str = "") -> nn.Module:
    """Backbone by family name: "seed", "mv2" or "compact", or "timm:<model>" (rtrain.models.timm_backbone).

    `pretrained` / `weights` (a local file) apply to timm trunks only; width and depth to rtrain's own.
    """
    if name.startswith(TIMM_PREFIX):
        if width != 1.0 or depth != 1.0:
            raise ValueError(f"width {width} / depth {depth}: a timm backbone's size is in its name "
                             "(e.g. mobilenetv3_small_050); leave width and depth unset")
        return TimmBackbone(name[len(TIMM_PREFIX):], pretrained=pretrained, weights=weights)
    if pretrained or weights:
        raise ValueError(f"backbone {name!r} has no pretrained weights: they come with timm backbones "
                         "(model.backbone: timm:<name>)")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)} or timm:<name>")
    return Backbone(BACKBONES[name], width=width, depth=depth)
