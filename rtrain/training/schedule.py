"""Learning rate (and momentum) as a function of training progress: linear warm-up, then cosine decay.

Progress p in [0, 1] is `step / total_steps`, or, with a wall-clock budget,
`max(step / total_steps, elapsed / time_limit)`: whichever runs out first ends
the schedule, so a run with a time limit still reaches its final LR when the
time is up. Elapsed time is carried in `state_dict()`, so a resumed run keeps
counting from where it stopped.

Warm-up (progress below `warmup_steps / total_steps`), per param group of the optimizer
(`rtrain.training.optim` names them "decay", "no_decay", "bias"):
  lr        linear from `warmup_start_ratio * base_lr` to `base_lr`;
  bias lr   with `warmup_bias_lr`: linear from that absolute LR down to `base_lr`;
  momentum  with `warmup_momentum` and `momentum`: linear from the first to the second
            (SGD's "momentum", AdamW's beta1), then `momentum` for the rest of the run.
All of it is a function of (step, elapsed) and the settings in `state_dict()`, so a resumed
run sets the same values at the same step. State saved before momentum warm-up existed loads
as "no momentum warm-up" (what that run did).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping


def lr_factor(
    progress: float, warmup_fraction: float, final_lr_ratio: float, warmup_start_ratio: float
) -> float:
    """Multiplier of the base LR at `progress` in [0, 1] (clamped).

    Warm-up: linear from `warmup_start_ratio` to 1 over the first `warmup_fraction`;
    then cosine from 1 down to `final_lr_ratio` at progress 1.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and p < warmup_fraction:
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * p / warmup_fraction
    q = (p - warmup_fraction) / (1.0 - warmup_fraction) if warmup_fraction < 1 else 1.0
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))


LR_SCALING = {"sgd": "linear", "adamw": "sqrt"}


def scale_lr(base_lr: float, global_batch: int, nominal_batch: int = 64, optimizer: str = "sgd") -> float:
    """The LR a recipe tuned at `nominal_batch` should use at `global_batch`, by optimiser.

    SGD: linear (`base_lr * global / nominal`; Goyal et al. 2017). AdamW: square root
    (`base_lr * sqrt(global / nominal)`): Adam's per-parameter normalisation makes the
    gradient noise, not its size, scale with the batch, and linear scaling overshoots.
    """
    if global_batch < 1 or nominal_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1, got global_batch={global_batch}, nominal={nominal_batch}"
        )
    rule = LR_SCALING.get(optimizer.lower())
    if rule is None:
        choices = ", ".join(LR_SCALING)
        raise ValueError(f"unknown optimizer {optimizer!r} for LR scaling; choose one of: {choices}")
    ratio = global_batch / nominal_batch
    return base_lr * (ratio if rule == "linear" else math.sqrt(ratio))


class LRSchedule:
    """Per-step LR: warm-up for `warmup_steps`, cosine to `base_lr * final_lr_ratio` at the end.

    base_lr: peak LR. total_steps: steps the whole run would take without a time limit.
    warmup_steps: warm-up length (as a fraction of progress: warmup_steps / total_steps).
    warmup_start_ratio: LR at step 0 as a fraction of base_lr.
    warmup_bias_lr: if set, param groups named "bias" start warm-up at this absolute LR
        and fall to the scheduled LR (YOLOv5's trick: biases move fast at first).
    momentum, warmup_momentum: if both set, every group's momentum (SGD "momentum", AdamW
        beta1) rises linearly from `warmup_momentum` to `momentum` over the warm-up and is
        `momentum` after it; if either is None the optimizer's momentum is left alone.
    time_limit: optional wall-clock budget in seconds; the clock starts at construction
        (or `start()`) and includes time restored by `load_state_dict`.
    """

    def __init__(
        self,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        final_lr_ratio: float = 0.01,
        warmup_start_ratio: float = 0.0,
        warmup_bias_lr: float | None = None,
        time_limit: float | None = None,
        momentum: float | None = None,
        warmup_momentum: float | None = None,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_lr_ratio = float(final_lr_ratio)
        self.warmup_start_ratio = float(warmup_start_ratio)
        self.warmup_bias_lr = None if warmup_bias_lr is None else float(warmup_bias_lr)
        self.time_limit = None if time_limit is None else float(time_limit)
        self.momentum = None if momentum is None else float(momentum)
        self.warmup_momentum = None if warmup_momentum is None else float(warmup_momentum)
        self._elapsed_before = 0.0  # seconds spent in earlier (resumed-from) sessions
        self._t0 = time.monotonic()

    @classmethod
    def from_config(
        cls, train, base_lr: float, total_steps: int, warmup_steps: int, time_limit: float | None = None
    ) -> LRSchedule:
        """The schedule a `TrainConfig` asks for (warm-up start, bias LR, momentum warm-up).

        Bias warm-up is off when `train.warmup_bias_lr` is 0; under AdamW its start is capped
        at `base_lr` (Adam steps each parameter by about the LR, so 0.1 would throw biases
        around). Momentum warm-up is off when `train.momentum` is 0 (SGD without momentum).
        """
        bias_lr = float(train.warmup_bias_lr) or None
        if bias_lr is not None and str(train.optimizer).lower() == "adamw":
            bias_lr = min(bias_lr, float(base_lr))
        has_momentum = float(train.momentum) > 0
        return cls(
            base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
            final_lr_ratio=train.final_lr_ratio, warmup_start_ratio=train.warmup_start_ratio,
            warmup_bias_lr=bias_lr, time_limit=time_limit,
            momentum=train.momentum if has_momentum else None,
            warmup_momentum=train.warmup_momentum if has_momentum else None,
        )

    @property
    def warmup_fraction(self) -> float:
        return self.warmup_steps / self.total_steps

    def start(self) -> None:
        """Restart this session's clock now (call right before the first step, after set-up)."""
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        """Seconds of training so far, including earlier sessions of a resumed run."""
        return self._elapsed_before + (time.monotonic() - self._t0)

    def progress(self, step: int, elapsed: float | None = None) -> float:
        """Progress in [0, 1]; `elapsed` defaults to the schedule's own clock."""
        p = step / self.total_steps
        if self.time_limit is not None:
            t = self.elapsed() if elapsed is None else elapsed
            p = max(p, t / self.time_limit)
        return min(max(p, 0.0), 1.0)

    def finished(self, step: int, elapsed: float | None = None) -> bool:
        """True when the step budget or the time budget is used up."""
        return self.progress(step, elapsed) >= 1.0

    def lr_at(self, step: int, elapsed: float | None = None) -> float:
        """The LR for optimizer step `step` (0-based)."""
        f = lr_factor(
            self.progress(step, elapsed), self.warmup_fraction, self.final_lr_ratio, self.warmup_start_ratio
        )
        return self.base_lr * f

    def group_lr(self, step: int, group_name: str | None, elapsed: float | None = None) -> float:
        """LR for one param group: like `lr_at`, except "bias" groups during warm-up (see warmup_bias_lr)."""
        p = self.progress(step, elapsed)
        lr = self.lr_at(step, elapsed)
        if self.warmup_bias_lr is not None and group_name == "bias" and p < self.warmup_fraction:
            # Interpolate from warmup_bias_lr down to where the schedule is at the end of warm-up.
            t = p / self.warmup_fraction
            end = self.base_lr * lr_factor(
                self.warmup_fraction, self.warmup_fraction, self.final_lr_ratio, self.warmup_start_ratio
            )
            lr = self.warmup_bias_lr + (end - self.warmup_bias_lr) * t
        return lr

    def momentum_at(self, step: int, elapsed: float | None = None) -> float | None:
        """The momentum for `step` (None: momentum warm-up is off, leave the optimizer's)."""
        if self.momentum is None or self.warmup_momentum is None:
            return None
        p = self.progress(step, elapsed)
        if self.warmup_fraction > 0 and p < self.warmup_fraction:
            t = p / self.warmup_fraction
            return self.warmup_momentum + (self.momentum - self.warmup_momentum) * t
        return self.momentum

    def apply(self, optimizer, step: int, elapsed: float | None = None) -> float:
        """Set every param group's "lr" (and momentum, see `momentum_at`) for `step`.

        Returns the main (non-bias) LR. A group's optional "lr_scale" key multiplies its LR;
        its "name" selects bias warm-up. Momentum goes to "betas"[0] if the group has betas
        (Adam family), else to "momentum" (SGD).
        """
        t = self.elapsed() if elapsed is None else elapsed
        momentum = self.momentum_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = self.group_lr(step, group.get("name"), t) * group.get("lr_scale", 1.0)
            if momentum is None:
                continue
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = momentum
        return self.lr_at(step, t)

    def state_dict(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "final_lr_ratio": self.final_lr_ratio,
            "warmup_start_ratio": self.warmup_start_ratio,
            "warmup_bias_lr": self.warmup_bias_lr,
            "time_limit": self.time_limit,
            "momentum": self.momentum,
            "warmup_momentum": self.warmup_momentum,
            "elapsed": self.elapsed(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the settings and the time already spent; this session's clock restarts now."""
        self.base_lr = float(state["base_lr"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.final_lr_ratio = float(state["final_lr_ratio"])
        self.warmup_start_ratio = float(state["warmup_start_ratio"])
        wb = state.get("warmup_bias_lr")
        self.warmup_bias_lr = None if wb is None else float(wb)
        tl = state.get("time_limit")
        self.time_limit = None if tl is None else float(tl)
        mom, wmom = state.get("momentum"), state.get("warmup_momentum")  # absent before momentum warm-up
        self.momentum = None if mom is None else float(mom)
        self.warmup_momentum = None if wmom is None else float(wmom)
        self._elapsed_before = float(state["elapsed"])
        self._t0 = time.monotonic()
