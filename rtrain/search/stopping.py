"""When a sweep stops a trial early: ASHA that cuts only where its signal already separates trials.

    from rtrain.search.stopping import SignalASHA
    scheduler = SignalASHA(min_signal=0.05, time_attr="epochs_done", max_t=8, grace_period=2,
                           reduction_factor=2)       # metric/mode come from tune.TuneConfig

Contract: decisions are Ray Tune's `ASHAScheduler`'s (asynchronous successive halving: at each
rung, a trial below the rung's 1 - 1/reduction_factor quantile of the trials recorded there is
stopped), with one change: a rung stops nothing while the best value recorded at it (this trial's
included) is below `min_signal`. Early in training every trial's val mAP is near zero (measured on
the quick-start shapes: 0.000-0.005 after epoch 1 for every variant), so a cut there ranks noise and
can stop the variant that would have won. The values are still recorded, so once a trial at that
rung reaches `min_signal` the usual cut applies to the trials that arrive after it; a rung whose
signal never gets there stops nothing. Only mode "max" (every rtrain signal is a score). The
scheduler never touches Ray itself: tests drive `on_trial_result` with plain objects that have a
`trial_id`. The clock (`time_attr`) is epochs: every epoch is one pass over the train shards, so at a
rung every trial has seen the same number of images whatever its batch size.
"""

from __future__ import annotations

import logging

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

logger = logging.getLogger(__name__)


class SignalASHA(ASHAScheduler):
    """ASHAScheduler whose rungs stop nothing until their best value reaches `min_signal`."""

    def __init__(self, *, min_signal: float = 0.0, **asha) -> None:
        super().__init__(**asha)
        self._min_signal = float(min_signal)
        self.spared: list[tuple[str, float]] = []  # (trial id, rung) ASHA would have stopped

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if mode not in (None, "max") or self._mode not in (None, "max"):
            raise ValueError(f"SignalASHA supports mode 'max' only, got {mode or self._mode!r}")
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP or result[self._time_attr] >= self._max_t:
            return action
        rung = self._rung_of(trial, result[self._time_attr])
        if rung is None:
            return action
        milestone, recorded = rung
        top = max(recorded.values())
        if top >= self._min_signal:
            logger.info("ASHA stops trial %s at %s %g: %s %.4f, rung best %.4f", trial.trial_id,
                        self._time_attr, milestone, self._metric, result[self._metric], top)
            return action
        self._num_stopped -= 1
        self.spared.append((trial.trial_id, milestone))
        logger.info("ASHA keeps trial %s at %s %g: the rung's best %s %.4f is below min_signal %.4f "
                    "(no trial separates yet)", trial.trial_id, self._time_attr, milestone, self._metric,
                    top, self._min_signal)
        return TrialScheduler.CONTINUE

    def _rung_of(self, trial, t: float):
        """The rung (milestone, {trial id: value}) this result was just recorded at, or None."""
        bracket = self._trial_info.get(trial.trial_id)
        for milestone, recorded in getattr(bracket, "_rungs", ()):  # highest milestone first
            if t >= milestone and trial.trial_id in recorded:
                return milestone, recorded
        return None


__all__ = ["SignalASHA"]
