"""Skip training steps whose loss is NaN/Inf, and stop the run when that keeps happening.

One bad batch (an exploding gradient, a degenerate box that slipped through)
should cost one step, not the run; a loss that stays non-finite means the run
is broken and must stop with a reason the user can act on.

In DDP every rank must take the same decision (a rank that skips `backward`
while the others all-reduce would hang): reduce the finite flag across ranks
(e.g. all-reduce MIN of `float(is_finite(losses))`) and pass it as `all_finite`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite too often: the run cannot continue."""


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().sum()) if value.numel() != 1 else float(value.detach())
    return float(value)


def non_finite_terms(loss_dict: Mapping[str, object]) -> dict[str, float]:
    """The entries of `loss_dict` (name -> tensor or number) whose value is NaN or +-Inf."""
    bad = {}
    for name, value in loss_dict.items():
        v = _as_float(value)
        if not math.isfinite(v):
            bad[name] = v
    return bad


def is_finite(loss_dict: Mapping[str, object]) -> bool:
    """True when every entry of `loss_dict` is finite."""
    return not non_finite_terms(loss_dict)


class NonFiniteGuard:
    """Counts non-finite losses; `check` says whether to take the step, raises when it is hopeless.

    max_consecutive: stop after this many non-finite steps in a row.
    max_total: stop after this many non-finite steps in the whole run (0 = no limit).
    """

    def __init__(self, max_consecutive: int = 20, max_total: int = 0) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if max_total < 0:
            raise ValueError(f"max_total must be >= 0, got {max_total}")
        self.max_consecutive = max_consecutive
        self.max_total = max_total
        self.consecutive = 0
        self.total = 0

    def check(self, loss_dict: Mapping[str, object], all_finite: bool | None = None) -> bool:
        """True: the step is fine, take it. False: skip this step (it has been counted).

        loss_dict: name -> scalar tensor or number (e.g. {"loss": .., "loss_cls": .., "loss_box": ..}).
        all_finite: the decision already agreed across DDP ranks; None = decide from `loss_dict`.
        Raises NonFiniteLossError once the consecutive or total limit is reached.
        """
        bad = non_finite_terms(loss_dict)
        finite = (not bad) if all_finite is None else bool(all_finite)
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        last = ", ".join(f"{k}={v}" for k, v in bad.items()) or "non-finite on another worker"
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"loss was non-finite for {self.consecutive} consecutive steps (last: {last}); "
                "stopping — lower train.lr or check the data"
            )
        if self.max_total and self.total >= self.max_total:
            raise NonFiniteLossError(
                f"loss was non-finite in {self.total} steps of this run (last: {last}); "
                "stopping — lower train.lr or check the data"
            )
        logger.warning(
            "non-finite loss (%s): step skipped (%d in a row, %d in total)",
            last,
            self.consecutive,
            self.total,
        )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
