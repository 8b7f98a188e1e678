"""Skip training steps whose loss is NaN/Inf, and stop the run when that keeps happening.

One bad batch (an exploding gradient, a degenerate box that slipped through)
should cost one step, not the run; a loss that stays non-finite means the run
is broken and must stop with a reason the user can act on.

In DDP every rank must take the same decision (a rank that skips `backward`
while the others all-reduce would hang): reduce the finite flag across ranks
(e.g. all-reduce MIN of `float(is_finite(losses))`) and pass it as `all_finite`.

Two ways to feed the guard:
- `check(loss_dict)`: host-side, one decision per call (reads the values);
- `record(skip, values, names)` + `sync()`: the training engine's sync-free path. `record`
  counts a step's agreed skip flag on the device (consecutive, total, the values of the last
  skipped step); `sync` reads those counters once (per log interval and at the epoch end),
  logs the skipped steps and raises NonFiniteLossError when a limit was reached since the last
  sync. So a run of non-finite steps is stopped at the first sync after it reaches the limit,
  i.e. within one sync interval; the skipped steps themselves never touched the weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from rtrain.errors import FAILED, RtrainError

logger = logging.getLogger(__name__)


FORCE_NONFINITE_ENV = "RTRAIN_TEST_NONFINITE_STEPS"


def forced_nonfinite_steps(environ: Mapping[str, str]) -> list[int]:
    """The global steps of the test hook (module doc); [] when unset. ValueError (one line) if bad."""
    text = environ.get(FORCE_NONFINITE_ENV, "").strip()
    if not text:
        return []
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"{FORCE_NONFINITE_ENV}={text!r}: expected comma-separated step numbers") from None
    if any(s < 0 for s in steps):
        raise ValueError(f"{FORCE_NONFINITE_ENV}={text!r}: step numbers must be >= 0")
    return steps


def force_nonfinite(model: torch.nn.Module, steps: Sequence[int], first_step: int = 0):
    """Test hook: a forward hook that makes `model`'s training loss NaN at the global `steps`.

    Counts training-mode forward calls from `first_step` (the step a resumed run starts at).
    Returns the hook's handle."""
    bad = set(int(s) for s in steps)
    count = [int(first_step)]

    def hook(module, args, output):
        if not module.training:
            return None
        step = count[0]
        count[0] += 1
        if step in bad and isinstance(output, dict) and "loss" in output:
            return {**output, "loss": output["loss"] * float("nan")}
        return None

    return model.register_forward_hook(hook)


class NonFiniteLossError(RtrainError, RuntimeError):
    """The loss was non-finite too often: the run cannot continue."""

    exit_code = FAILED


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
        self._dev: dict[str, torch.Tensor] | None = None  # device counters of `record`
        self._names: tuple[str, ...] = ()

    @torch.no_grad()
    def record(self, skip: torch.Tensor, values: torch.Tensor, names: Sequence[str]) -> None:
        """Count one step on the device, no host read. skip: 0-dim bool, the decision agreed across
        ranks. values [K]: this rank's step values (loss parts, grad norm) named by `names`."""
        skip = skip.reshape(())
        values = values.detach().float().reshape(-1)
        if self._dev is None or self._dev["consecutive"].device != skip.device:
            dev = skip.device
            self._dev = {
                "consecutive": torch.tensor(self.consecutive, dtype=torch.int64, device=dev),
                "total": torch.tensor(self.total, dtype=torch.int64, device=dev),
                "peak": torch.tensor(self.consecutive, dtype=torch.int64, device=dev),
                "skipped": torch.zeros((), dtype=torch.int64, device=dev),
                "last": torch.zeros_like(values),
            }
        d = self._dev
        if d["last"].shape != values.shape:
            d["last"] = torch.zeros_like(values)
        self._names = tuple(names)
        s = skip.long()
        d["consecutive"].add_(1).mul_(s)
        torch.maximum(d["peak"], d["consecutive"], out=d["peak"])
        d["total"].add_(s)
        d["skipped"].add_(s)
        d["last"].copy_(torch.where(skip, values, d["last"]))

    def sync(self) -> int:
        """Read the device counters of `record` (one host read); returns the steps skipped since the
        last sync. Raises NonFiniteLossError when the consecutive or total limit was reached."""
        if self._dev is None:
            return 0
        d = self._dev
        counts = torch.stack([d["consecutive"], d["total"], d["peak"], d["skipped"]]).double()
        host = torch.cat([counts, d["last"].double()]).tolist()  # the one host read
        consecutive, total, peak, skipped = (int(c) for c in host[:4])
        last = host[4:]
        self.consecutive, self.total = consecutive, total
        d["peak"].copy_(d["consecutive"])
        d["skipped"].zero_()
        if not skipped:
            return 0
        bad = {n: v for n, v in zip(self._names, last, strict=False) if not math.isfinite(v)}
        what = ", ".join(f"{k}={v}" for k, v in bad.items()) or "non-finite on another worker"
        if peak >= self.max_consecutive:
            more = f", {peak} by the time it was checked" if peak > self.max_consecutive else ""
            raise NonFiniteLossError(
                f"loss was non-finite for {self.max_consecutive} consecutive steps{more} (last: {what}); "
                "stopping — lower train.lr or check the data"
            )
        if self.max_total and total >= self.max_total:
            raise NonFiniteLossError(
                f"loss was non-finite in {total} steps of this run (last: {what}); "
                "stopping — lower train.lr or check the data"
            )
        logger.warning(
            "non-finite loss (%s): %d step(s) skipped since the last check (%d in a row, %d in total)",
            what, skipped, consecutive, total,
        )
        return skipped

    def check(self, loss_dict: Mapping[str, object], all_finite: bool | None = None) -> bool:
        """True: the step is fine, take it. False: skip this step (it has been counted).

        loss_dict: name -> scalar tensor or number (e.g. {"loss": .., "loss_cls": .., "loss_box": ..}).
        all_finite: the decision already agreed across DDP ranks; None = decide from `loss_dict`.
        Raises NonFiniteLossError once the consecutive or total limit is reached.
        """
        if self._dev is not None:  # counts from `record` first, then continue on the host
            self.sync()
            self._dev = None
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
        if self._dev is not None:  # counts recorded on the device since the last sync
            self.consecutive = int(self._dev["consecutive"])
            self.total = int(self._dev["total"])
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
        self._dev = None
