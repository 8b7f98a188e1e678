"""Exponential moving average of a model's weights (the copy that gets evaluated and exported).

decay ramps up as `decay * (1 - exp(-updates / tau))` (YOLOv5): early in training the average
follows the model closely, later it smooths over ~1/(1 - decay) steps. Float parameters and
buffers (BN running stats) are averaged; integer buffers (`num_batches_tracked`) are copied.

Fitting the run: with a fixed tau the averaging window after `t` updates is about
`exp(t / tau)` steps, so a tau made for long runs (2000) barely averages a 200-step run, and a
small fixed tau lets the window outgrow a short run (the average freezes on early weights).
`ModelEMA.tau_for_run(total_steps)` picks tau so that the window at the end of the run is a
fraction (`window_fraction`, default 0.2) of the run: `tau = T / ln(window_fraction * T)`,
clamped to [floor, ceiling] (ceiling: the long-run default 2000). `train.ema_tau` = 0 in the
config means "use tau_for_run with the schedule's expected total optimizer steps".

The update runs on the device with no host synchronisation: one `torch._foreach_*` pass over
cached lists of the float tensors (no per-tensor Python arithmetic), the update count and the
decay are device tensors, and `update(model, skip=flag)` takes a device bool so that a step the
engine skipped (non-finite loss or gradient) leaves the average untouched without a host read.
`updates` and `current_decay()` read the device counter (a sync): call them at log/checkpoint time.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping

import torch
from torch import nn

DEFAULT_TAU = 2000.0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def ema_tau_for_run(
    total_steps: int, *, window_fraction: float = 0.2, floor: float = 1.0, ceiling: float = DEFAULT_TAU
) -> float:
    """The ramp tau that makes the averaging window at the run's end ~`window_fraction * total_steps`.

    total_steps: expected optimizer steps of the whole run (for a time budget: the schedule's
    expected total steps). The window after t updates is ~exp(t / tau), so
    tau = T / ln(max(window_fraction * T, e)), clamped to [floor, ceiling].
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 < window_fraction <= 1.0:
        raise ValueError(f"window_fraction must be in (0, 1], got {window_fraction}")
    if not 0.0 < floor <= ceiling:
        raise ValueError(f"need 0 < floor <= ceiling, got {floor} and {ceiling}")
    tau = total_steps / math.log(max(window_fraction * total_steps, math.e))
    return float(min(max(tau, floor), ceiling))


class ModelEMA:
    """EMA copy of `model` (on the model's device, in eval mode, no grads).

    Call `update(model)` after every optimizer step; evaluate/export `ema.module`.
    tau: ramp length in updates (see the module doc; `ModelEMA.tau_for_run` fits it to a run).
    """

    tau_for_run = staticmethod(ema_tau_for_run)

    def __init__(
        self, model: nn.Module, decay: float = 0.9998, tau: float = DEFAULT_TAU, updates: int = 0
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
        first = next(iter(self.module.state_dict().values()), None)
        device = first.device if first is not None else torch.device("cpu")
        self._count = torch.tensor(float(updates), dtype=torch.float64, device=device)
        self._lists_key: tuple | None = None
        self._lists: tuple[list, list, list, list] = ([], [], [], [])

    @classmethod
    def for_run(cls, model: nn.Module, total_steps: int, decay: float = 0.9998, tau: float = 0.0,
                **tau_kw) -> ModelEMA:
        """An EMA whose tau fits a run of `total_steps` optimizer steps when `tau` is 0 ("auto")."""
        return cls(model, decay=decay, tau=tau if tau > 0 else ema_tau_for_run(total_steps, **tau_kw))

    @property
    def updates(self) -> int:
        """Updates folded in so far (skipped ones excluded). Reads the device counter."""
        return int(self._count.item())

    @updates.setter
    def updates(self, value: int) -> None:
        self._count.fill_(float(value))

    def current_decay(self) -> float:
        """The decay the next average uses (after `updates` updates)."""
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    def _tensor_lists(self, src: nn.Module) -> tuple[list, list, list, list]:
        """(ema float, src float, ema other, src other) state tensors, cached per (src, ema) module."""
        # Weak references, not ids: a freed model's id can be reused by the next one.
        key = self._lists_key
        if key is None or key[0]() is not src or key[1]() is not self.module:
            src_state = src.state_dict()
            ema_f, src_f, ema_o, src_o = [], [], [], []
            for name, ema_t in self.module.state_dict().items():
                new = src_state[name].detach()
                if ema_t.dtype.is_floating_point:
                    ema_f.append(ema_t)
                    src_f.append(new)
                else:
                    ema_o.append(ema_t)
                    src_o.append(new)
            self._lists = (ema_f, src_f, ema_o, src_o)
            self._lists_key = (weakref.ref(src), weakref.ref(self.module))
        return self._lists

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Fold the model's current weights into the average.

        skip: optional 0-dim bool tensor (on any device): when true the average, its integer
        buffers and the update count stay as they are (the average is multiplied by 1 and gains
        0 times the model's finite weights). Applied on the device, no host read.
        """
        ema_f, src_f, ema_o, src_o = self._tensor_lists(unwrap_model(model))
        device = (ema_f or ema_o or [self._count])[0].device
        if self._count.device != device:
            self._count = self._count.to(device)
        if skip is None:
            self._count += 1
            d = self.decay * (1.0 - torch.exp(-self._count / self.tau))
        else:
            skip = skip.to(device, torch.bool)
            self._count += (~skip).to(self._count.dtype)
            d = torch.where(skip, 1.0, self.decay * (1.0 - torch.exp(-self._count / self.tau)))
        if ema_f:
            torch._foreach_mul_(ema_f, d.float())
            torch._foreach_add_(ema_f, torch._foreach_mul(src_f, (1.0 - d).float()))
        if ema_o:
            if skip is None:
                torch._foreach_copy_(ema_o, src_o)
            else:  # integer buffers: exact arithmetic, e = skip * e + (1 - skip) * s
                keep = skip.long()
                torch._foreach_mul_(ema_o, keep)
                torch._foreach_add_(ema_o, torch._foreach_mul(src_o, 1 - keep))

    def __getstate__(self) -> dict:  # copy/pickle without the cache (weak references)
        state = self.__dict__.copy()
        state["_lists_key"], state["_lists"] = None, ([], [], [], [])
        return state

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
