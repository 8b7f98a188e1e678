"""Anchor-free detection head in the NanoDet-Plus / PP-PicoDet style.

Design: one tower of `num_convs` depthwise-separable convs (5x5 depthwise + 1x1 pointwise), whose
weights are shared by every level (as in FCOS / GFL) while each level keeps its own BatchNorm
(statistics differ between strides). The tower is also shared by classification and box
regression (NanoDet-Plus `share_cls_reg`): it halves the head's cost, which matters more than
the small accuracy gain of two towers for these small models. Two 1x1 convs then predict, per
location, `num_classes` class logits (bias set so that sigmoid = 0.01 at start, RetinaNet prior)
and `4 * (reg_max + 1)` logits of the ltrb distance distributions (DFL / GFL): distances are
learned as distributions over 0..reg_max strides, which trains more stably than direct regression
and gives a cheap per-side uncertainty.

`Head.forward(feats)` takes `[B, channels, h_l, w_l]` per level and returns
`cls_logits [B, N, num_classes]` and `box_dist [B, N, 4 * (reg_max + 1)]`, N = sum of h_l * w_l,
levels concatenated in order, each row-major.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import make_act


class SharedSeparableConv(nn.Module):
    """Depthwise k x k + pointwise 1x1 with weights shared across levels and one BN pair per level."""

    def __init__(self, channels: int, num_levels: int, kernel: int = 5, act: str = "lrelu"):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel, 1, kernel // 2, groups=channels, bias=False)
        self.dw_bn = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels))
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.pw_bn = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels))
        self.act = make_act(act)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        x = self.act(self.dw_bn[level](self.dw(x)))
        return self.act(self.pw_bn[level](self.pw(x)))


class Head(nn.Module):
    def __init__(
        self,
        channels: int,
        num_levels: int,
        num_classes: int,
        reg_max: int = 7,
        num_convs: int = 2,
        act: str = "lrelu",
        prior: float = 0.01,
    ):
        super().__init__()
        if num_convs < 0:
            raise ValueError(f"head_convs must be >= 0, got {num_convs}")
        self.num_classes, self.reg_max = num_classes, reg_max
        self.tower = nn.ModuleList(
            SharedSeparableConv(channels, num_levels, act=act) for _ in range(num_convs)
        )
        self.cls_out = nn.Conv2d(channels, num_classes, 1)
        self.box_out = nn.Conv2d(channels, 4 * (reg_max + 1), 1)
        nn.init.normal_(self.cls_out.weight, std=0.01)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior) / prior))
        nn.init.normal_(self.box_out.weight, std=0.01)
        nn.init.zeros_(self.box_out.bias)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls_all, box_all = [], []
        for level, x in enumerate(feats):
            for conv in self.tower:
                x = conv(x, level)
            # [B, K, h, w] -> [B, h*w, K], row-major
            cls_all.append(self.cls_out(x).flatten(2).transpose(1, 2))
            box_all.append(self.box_out(x).flatten(2).transpose(1, 2))
        return torch.cat(cls_all, dim=1), torch.cat(box_all, dim=1)
