"""Separable building blocks and the one helper pair that applies width/depth multipliers.

All blocks take and return feature maps [B, C, H, W]; a stride-2 block halves H and W
(rounding up, since every conv pads k // 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hswish": lambda: nn.Hardswish(inplace=True),
    "lrelu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "none": nn.Identity,
}


def make_act(name: str) -> nn.Module:
    """Activation module by name (relu, relu6, hswish, lrelu, none)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def make_divisible(channels: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a (width-multiplied) channel count to a multiple of `divisor`, never dropping below 90%."""
    min_value = min_value or divisor
    rounded = max(min_value, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def scale_depth(repeats: int, depth: float) -> int:
    """Blocks in a stage after the depth multiplier: ceil(repeats * depth), at least 1."""
    return max(1, math.ceil(repeats * depth))


class ConvBNAct(nn.Sequential):
    """k x k conv (no bias) + BatchNorm + activation; `groups=in_ch` makes it depthwise."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: str = "relu"
    ):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            make_act(act),
        )
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> hard sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        mid = make_divisible(channels / reduction)
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.expand = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        w = self.expand(torch.relu(self.reduce(w)))
        return x * nn.functional.hardsigmoid(w)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise + BN + act, then 1x1 pointwise + BN + act (MobileNetV1 block)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, act: str = "relu", kernel: int = 3, se: bool = False
    ):
        super().__init__()
        self.dw = ConvBNAct(in_ch, in_ch, kernel, stride, groups=in_ch, act=act)
        self.se = SqueezeExcite(in_ch) if se else nn.Identity()
        self.pw = ConvBNAct(in_ch, out_ch, 1, act=act)
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.se(self.dw(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (x `expand`) -> 3x3 depthwise -> [SE] -> 1x1 linear project.

    The identity shortcut is added when stride is 1 and channels are unchanged.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        expand: float = 6.0,
        act: str = "relu6",
        kernel: int = 3,
        se: bool = False,
    ):
        super().__init__()
        mid = make_divisible(in_ch * expand)
        self.expand = ConvBNAct(in_ch, mid, 1, act=act) if mid != in_ch else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = ConvBNAct(mid, out_ch, 1, act="none")
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.use_shortcut else y


BLOCKS: dict[str, type[nn.Module]] = {"ds": DepthwiseSeparable, "ir": InvertedResidual}


def make_block(
    kind: str, in_ch: int, out_ch: int, stride: int, act: str, expand: float = 1.0, se: bool = False
) -> nn.Module:
    """Block by table name: "ds" (DepthwiseSeparable, `expand` unused) or "ir" (InvertedResidual)."""
    if kind not in BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}; known: {sorted(BLOCKS)}")
    extra = {"expand": expand} if kind == "ir" else {}
    return BLOCKS[kind](in_ch, out_ch, stride, act=act, se=se, **extra)
