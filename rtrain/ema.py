"""Exponential moving average of a model's weights (the copy that gets evaluated and exported).

decay ramps up as `decay * (1 - exp(-updates / tau))` (YOLOv5): early in training
the average follows the model closely, later it smooths over ~1/(1-decay) steps.
Float parameters and buffers (BN running stats) are averaged; integer buffers
(`num_batches_tracked`) are copied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """EMA copy of `model` (on the model's device, in eval mode, no grads).

    Call `update(model)` after every optimizer step; evaluate/export `ema.module`.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0, updates: int = 0
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"EMA tau must be > 0, got {tau}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = int(updates)

    def current_decay(self) -> float:
        """The decay the next average uses (after `updates` updates)."""
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        self.updates += 1
        d = self.current_decay()
        src = unwrap_model(model).state_dict()
        for name, ema_t in self.module.state_dict().items():
            new = src[name].detach()
            if ema_t.dtype.is_floating_point:
                ema_t.mul_(d).add_(new.to(ema_t.dtype), alpha=1.0 - d)
            else:
                ema_t.copy_(new)

    def state_dict(self) -> dict:
        """{"model": EMA weights, "updates": int, "decay": float, "tau": float} (weights_only-safe)."""
        return {
            "model": self.module.state_dict(),
            "updates": self.updates,
            "decay": self.decay,
            "tau": self.tau,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
        self.tau = float(state.get("tau", self.tau))
