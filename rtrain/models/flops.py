"""Parameter and FLOP counts.

GFLOPs here = `torch.utils.flop_counter.FlopCounterMode` total / 1e9 for one image through
`forward_raw` (no NMS). That counter counts a multiply-add as 2 FLOPs, so GFLOPs = 2 x GMACs
(papers that quote "FLOPs" for MobileNets usually mean MACs: halve ours to compare).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (all trainable in rtrain models)."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, height: int, width: int | None = None) -> float:
    """GFLOPs (2 x GMACs) of one forward of a [1, 3, H, W] image; uses `forward_raw` when the model has it."""
    width = height if width is None else width
    param = next(model.parameters())
    x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    fn = getattr(model, "forward_raw", model)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
