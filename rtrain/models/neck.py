"""A light PAN neck with depthwise-separable convs (NanoDet / PP-PicoDet style, add-fusion).

Input: backbone maps at strides (8, 16, 32[, 64, 128, ...]) with any channel counts (read from
the backbone's `out_channels`). Output: maps of uniform `channels` at the same strides.
Strides 8/16/32 go through 1x1 laterals, a top-down pass (nearest x2 upsample + add +
separable conv) and a bottom-up pass (stride-2 depthwise downsample + add + separable conv).
Levels above stride 32 (the seed trunk's extras, RetinaNet P6/P7-like) only get a 1x1 lateral:
they are already deep features of their own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ConvBNAct, DepthwiseSeparable

PAN_LEVELS = 3  # strides 8, 16, 32


class PAN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], channels: int, act: str = "lrelu"):
        super().__init__()
        if len(in_channels) < PAN_LEVELS:
            raise ValueError(f"PAN needs >= {PAN_LEVELS} input levels, got {len(in_channels)}")
        self.out_channels = (channels,) * len(in_channels)
        self.laterals = nn.ModuleList(ConvBNAct(c, channels, 1, act=act) for c in in_channels)
        self.top_down = nn.ModuleList(
            DepthwiseSeparable(channels, channels, act=act) for _ in range(PAN_LEVELS - 1)
        )
        self.downsample = nn.ModuleList(
            ConvBNAct(channels, channels, 3, 2, groups=channels, act=act) for _ in range(PAN_LEVELS - 1)
        )
        self.bottom_up = nn.ModuleList(
            DepthwiseSeparable(channels, channels, act=act) for _ in range(PAN_LEVELS - 1)
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [lateral(f) for lateral, f in zip(self.laterals, feats, strict=True)]
        # top-down: 32 -> 16 -> 8
        td = [lat[PAN_LEVELS - 1]]
        for i in range(PAN_LEVELS - 2, -1, -1):
            up = F.interpolate(td[0], scale_factor=2.0, mode="nearest")
            td.insert(0, self.top_down[i](lat[i] + up))
        # bottom-up: 8 -> 16 -> 32
        out = [td[0]]
        for i in range(1, PAN_LEVELS):
            out.append(self.bottom_up[i - 1](td[i] + self.downsample[i - 1](out[-1])))
        return out + lat[PAN_LEVELS:]
