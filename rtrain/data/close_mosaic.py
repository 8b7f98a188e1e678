"""Closing mosaic: the last part of a run trains without it, on the image statistics it is tested on.

The decision is one epoch F, the first mosaic-free epoch: rows of epochs >= F are augmented with
mosaic probability 0, rows of earlier epochs with `data.mosaic` (every other augmentation stays).
Rows of the train stream carry their epoch (`rtrain.data.epoch_stream`), so the decode step applies
F per row, whichever task or worker decodes it. F is a function of the config and, for a
time-limited run, of the epoch the budget crossed; it is saved in the checkpoint's extra
(`EXTRA_KEY`) so a resumed run uses the same one.

- `data.close_mosaic = N` (epoch-count runs): F = max(0, train.epochs - N), known up front and
  handed to the decode step as an int.
- `data.close_mosaic_frac = f` (time-limited runs, `train.time_limit_min`): F is not known up
  front. After each epoch the train loop asks `CloseMosaic.due`: whether the budget left, less
  half an epoch cycle (so the switch lands on the nearest epoch boundary), is under f of the
  budget. All ranks agree on it; then F = the next epoch, or later when the CPU decode tasks
  have already decoded rows of that epoch: the EpochClock actor (`rtrain.data.decode_augment.EpochClock`)
  remembers the newest epoch it answered a decode task for and never closes at or before it,
  so every row of an epoch gets the same decision. The GPU decode step runs in the train loop
  at consumption time and reads F from the loop's `CloseMosaic` directly.
- both 0 (the default): mosaic for the whole run, as before.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

EXTRA_KEY = "no_mosaic_from"  # checkpoint extra: F, or None while undecided


def first_mosaic_free_epoch(epochs: int, close_mosaic: int) -> int | None:
    """F for an epoch-count run: the last `close_mosaic` of `epochs` epochs; None when 0 (off)."""
    if close_mosaic <= 0:
        return None
    return max(0, int(epochs) - int(close_mosaic))


def due(remaining_s: float, time_limit_s: float, frac: float, cycle_s: float) -> bool:
    """True when the next epoch should start mosaic-free: what is left of the budget after half
    an epoch cycle is under `frac` of the budget (the switch rounds to the nearest epoch end)."""
    if frac <= 0 or time_limit_s <= 0:
        return False
    return remaining_s - 0.5 * cycle_s < frac * time_limit_s


def mosaic_on(epoch: int, no_mosaic_from) -> bool:
    """Whether rows of `epoch` may use mosaic; `no_mosaic_from` is None, F, or a `CloseMosaic`."""
    if isinstance(no_mosaic_from, CloseMosaic):
        no_mosaic_from = no_mosaic_from.first_free
    return no_mosaic_from is None or int(epoch) < int(no_mosaic_from)


class CloseMosaic:
    """The train loop's view of the decision (module doc); `first_free` is F or None."""

    def __init__(self, *, epochs: int = 0, close_mosaic: int = 0, close_mosaic_frac: float = 0.0,
                 time_limit_s: float | None = None) -> None:
        self.frac = float(close_mosaic_frac) if time_limit_s else 0.0
        self.time_limit_s = float(time_limit_s or 0.0)
        self.first_free = None if self.frac else first_mosaic_free_epoch(epochs, close_mosaic)

    @classmethod
    def from_config(cls, cfg) -> CloseMosaic:
        limit = cfg.train.time_limit_min * 60.0 if cfg.train.time_limit_min > 0 else None
        return cls(epochs=cfg.train.epochs, close_mosaic=cfg.data.close_mosaic,
                   close_mosaic_frac=cfg.data.close_mosaic_frac, time_limit_s=limit)

    @property
    def pending(self) -> bool:
        """A time-limited run that has not closed mosaic yet."""
        return bool(self.frac) and self.first_free is None

    def due(self, remaining_s: float, cycle_s: float) -> bool:
        return self.pending and due(remaining_s, self.time_limit_s, self.frac, cycle_s)

    def close(self, next_epoch: int, clock=None) -> int:
        """Decide F >= `next_epoch` (through the clock when the CPU decode tasks read it)."""
        if clock is None:
            self.first_free = int(next_epoch)
        else:
            import ray

            self.first_free = int(ray.get(clock.close_mosaic.remote(int(next_epoch))))
        return self.first_free

    def restore(self, extra: dict, clock=None) -> None:
        """A resumed time-limited run: the F its checkpoint recorded (None: still undecided),
        also on the clock. Call on every rank before the stream starts."""
        if not self.frac:
            return  # epoch-count runs: F follows from the (possibly raised) train.epochs
        self.first_free = extra.get(EXTRA_KEY)
        if clock is not None:
            import ray

            ray.get(clock.restore_mosaic.remote(self.first_free))

    def decode_source(self, clock=None):
        """What the CPU decode step reads F from: an int/None, or the clock while undecided."""
        return clock if self.pending and clock is not None else self.first_free

    def mosaic_on(self, epoch: int) -> bool:
        return mosaic_on(epoch, self.first_free)
