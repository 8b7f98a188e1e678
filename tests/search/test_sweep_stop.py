"""Early stopping in sweeps without Ray's runtime: rtrain.search.stopping.SignalASHA (Ray Tune's ASHA
scheduler object, driven here through its on_trial_result with plain trial objects) fed the real
per-epoch metric rows of two quick-start runs, a known-better and a known-worse variant
(tests/fixtures/asha_curves.json, recorded with `python -m rtrain.fit`, see "source" there), and the
report rows Tune gets (rtrain.search.driver.tune_result)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rtrain.search.spec import EARLY_METRICS, TIME_ATTR, SweepError, TuneSettings, load_sweep

CURVES = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "asha_curves.json").read_text())


@dataclass(frozen=True)
class FakeTrial:
    trial_id: str


def _scheduler(metric: str, min_signal: float, grace: int, epochs: int, rf: int = 2):
    from rtrain.search.stopping import SignalASHA

    s = SignalASHA(min_signal=min_signal, time_attr=TIME_ATTR, max_t=epochs, grace_period=grace,
                   reduction_factor=rf)
    assert s.set_search_properties(metric, "max")
    return s


def _trial_rows(name: str) -> list[dict]:
    from rtrain.search.driver import tune_result

    last = dict.fromkeys(EARLY_METRICS, 0.0)
    return [tune_result(row, last) for row in CURVES["runs"][name]["rows"]]


def _run_sweep(scheduler, trials: list[str], concurrent: int) -> dict[str, int]:
    """Feed the recorded rows as Tune would with `concurrent` trials at once (round robin, a new trial
    starting when one ends). Returns {trial: epochs it ran}."""
    from ray.tune.schedulers import TrialScheduler

    rows = {t: _trial_rows(t.split("#")[0]) for t in trials}
    waiting, running, ran = list(trials), [], {}
    for t in trials:
        scheduler.on_trial_add(None, FakeTrial(t))
    while waiting or running:
        while waiting and len(running) < concurrent:
            running.append(waiting.pop(0))
        for t in list(running):
            epoch = ran.get(t, 0)
            decision = scheduler.on_trial_result(None, FakeTrial(t), rows[t][epoch])
            ran[t] = epoch + 1
            if decision == TrialScheduler.STOP or ran[t] == len(rows[t]):
                running.remove(t)
                scheduler.on_trial_complete(None, FakeTrial(t), rows[t][epoch])
    return ran


def _better_and_worse() -> tuple[str, str]:
    runs = CURVES["runs"]
    final = {name: max(r["mAP"] for r in run["rows"]) for name, run in runs.items()}
    better, worse = sorted(final, key=final.get, reverse=True)
    assert final[better] > final[worse] + 0.03, f"the recorded runs do not differ: {final}"
    return better, worse


def test_recorded_curves_show_the_early_noise():
    """The fixture is what the issue measured: after epoch 1 both runs' mAP is near zero, and the
    better variant is clearly better by the end."""
    better, worse = _better_and_worse()
    for name in (better, worse):
        first = CURVES["runs"][name]["rows"][0]
        assert first["evaluated"] and first["mAP"] < 0.01
    assert len(CURVES["runs"][better]["rows"]) == len(CURVES["runs"][worse]["rows"]) >= 4


@pytest.mark.parametrize("concurrent", [1, 2])
def test_the_sweep_defaults_keep_the_better_variant_and_cut_the_worse(concurrent):
    """Four trials (two of each variant), in every arrival order, one or two at a time: with the
    default signal (TuneSettings: mAP50, min_signal, grace period) the better variant's trials
    always run to the end, and the worse variant is cut early in most orders (not when both of its
    trials reach the rung before any better one: ASHA only compares with trials already there)."""
    better, worse = _better_and_worse()
    d = TuneSettings()
    epochs = len(CURVES["runs"][better]["rows"])
    names = [f"{better}#1", f"{better}#2", f"{worse}#1", f"{worse}#2"]
    orders = list(itertools.permutations(names))
    cut = 0
    for order in orders:
        s = _scheduler(d.metric, d.min_signal, d.grace_period, epochs, 2)
        ran = _run_sweep(s, list(order), concurrent)
        assert all(ran[t] == epochs for t in names if t.startswith(better)), (order, ran)
        cut += any(ran[t] < epochs for t in names if t.startswith(worse))
    assert cut >= len(orders) // 2, f"the worse variant was cut in {cut} of {len(orders)} orders"


def test_the_old_rule_cut_on_noise_at_epoch_one():
    """mAP with a 1-epoch grace period and no signal floor (the sweep's earlier settings) decides at
    epoch 1 on values that are all near zero: in some arrival order it stops a trial of the better
    variant there; min_signal on the same rows spares it."""
    better, worse = _better_and_worse()
    epochs = len(CURVES["runs"][better]["rows"])
    names = [f"{better}#1", f"{worse}#1", f"{worse}#2", f"{better}#2"]
    old_stops, new_stops = [], []
    for order in itertools.permutations(names):
        for floor, stops in ((0.0, old_stops), (TuneSettings().min_signal, new_stops)):
            ran = _run_sweep(_scheduler("mAP", floor, 1, epochs, 2), list(order), 1)
            stops += [(t, ran[t]) for t in names if t.startswith(better) and ran[t] < epochs]
    assert any(e == 1 for _, e in old_stops), "the better variant was never below the worse at epoch 1"
    assert not any(e == 1 for _, e in new_stops), new_stops


def test_a_rung_below_min_signal_stops_nothing_then_cuts_once_a_trial_separates():
    s = _scheduler("mAP50", 0.05, 1, 4, 2)
    from ray.tune.schedulers import TrialScheduler

    for t in "abcd":
        s.on_trial_add(None, FakeTrial(t))
    def report(t, epoch, v):
        return s.on_trial_result(None, FakeTrial(t), {TIME_ATTR: epoch, "mAP50": v})
    assert report("a", 1, 0.004) == TrialScheduler.CONTINUE
    assert report("b", 1, 0.001) == TrialScheduler.CONTINUE  # plain ASHA stops b here (0.001 < 0.004)
    assert s.spared == [("b", 1)]
    assert report("c", 1, 0.2) == TrialScheduler.CONTINUE  # the rung separates from here on
    assert report("d", 1, 0.003) == TrialScheduler.STOP  # below the median of 0.004, 0.001, 0.2
    assert "num_stopped=1" in s.debug_string()


def test_min_signal_zero_is_plain_asha():
    from ray.tune.schedulers import ASHAScheduler

    rows = [("a", 1, 0.3), ("b", 1, 0.1), ("c", 1, 0.2), ("a", 2, 0.4), ("c", 2, 0.25), ("b", 2, 0.0)]
    plain = ASHAScheduler(time_attr=TIME_ATTR, metric="mAP50", mode="max", max_t=4, grace_period=1,
                          reduction_factor=2)
    ours = _scheduler("mAP50", 0.0, 1, 4, 2)
    for s in (plain, ours):
        for t in "abc":
            s.on_trial_add(None, FakeTrial(t))
    for t, e, v in rows:
        r = {TIME_ATTR: e, "mAP50": v}
        assert ours.on_trial_result(None, FakeTrial(t), r) == plain.on_trial_result(None, FakeTrial(t), r)


def test_only_mode_max_is_accepted():
    from rtrain.search.stopping import SignalASHA

    with pytest.raises(ValueError, match="mode 'max' only"):
        SignalASHA(min_signal=0.1, time_attr=TIME_ATTR, max_t=4).set_search_properties("loss", "min")


def test_tune_result_carries_the_last_evaluation_forward():
    from rtrain.search.driver import tune_result

    last = dict.fromkeys(EARLY_METRICS, 0.0)
    first = tune_result({"epoch": 0, "evaluated": False, "mAP": 0.0, "loss": 3.0}, last)
    assert (first[TIME_ATTR], first["mAP50"], first["AR100"]) == (1, 0.0, 0.0)
    tune_result({"epoch": 1, "evaluated": True, "mAP": 0.1, "mAP50": 0.3, "AR100": 0.5}, last)
    third = tune_result({"epoch": 2, "evaluated": False, "mAP": 0.1, "mAP50": None}, last)
    assert (third[TIME_ATTR], third["mAP"], third["mAP50"], third["AR100"]) == (3, 0.1, 0.3, 0.5)


def test_tune_metric_and_min_signal_are_checked(tmp_path):
    base = {"model": {"name": "compact_n"}, "data": {"train": "d/train", "val": "d/val"}}

    def write(tune: dict) -> Path:
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"base": base, "search": {"model.width": {"choice": [0.5]}},
                                        "tune": tune}))
        return path

    spec = load_sweep(write({"metric": "AR100", "min_signal": 0}))
    assert (spec.tune.metric, spec.tune.min_signal) == ("AR100", 0.0)
    assert load_sweep(write({}), ["tune.metric=mAP"]).tune.metric == "mAP"
    msg = r"s\.yaml: tune\.metric: expected one of mAP50, mAP, AR100, got 'loss'"
    with pytest.raises(SweepError, match=msg):
        load_sweep(write({"metric": "loss"}))
    with pytest.raises(SweepError, match=r"tune\.min_signal must be in \[0, 1\), got 1\.5"):
        load_sweep(write({"min_signal": 1.5}))


def test_the_minutes_clock_compares_trials_at_equal_training_time():
    """Two trials of one time budget: "big" (large images) gains more mAP50 per epoch but takes 60 s
    an epoch, "small" takes 20 s an epoch and is ahead at every minute. ASHA on epochs keeps big and
    stops small at the epoch-2 rung; on minutes (tune.clock: minutes) it compares both at 2 minutes
    of training and stops big instead."""
    from ray.tune.schedulers import TrialScheduler

    from rtrain.search.driver import tune_result
    from rtrain.search.spec import MINUTES_ATTR
    from rtrain.search.stopping import SignalASHA

    def rows(epoch_s: float, map50_per_epoch: float, epochs: int) -> list[dict]:
        last = dict.fromkeys(EARLY_METRICS, 0.0)
        return [tune_result({"epoch": e, "evaluated": True, "mAP": 0.0, "elapsed_s": (e + 1) * epoch_s,
                             "mAP50": min(0.9, (e + 1) * map50_per_epoch), "AR100": 0.0}, last)
                for e in range(epochs)]

    curves = {"big": rows(60.0, 0.15, 8), "small": rows(20.0, 0.08, 24)}  # 8 minutes each
    assert curves["big"][1]["mAP50"] > curves["small"][1]["mAP50"]  # ahead at epoch 2 ...
    assert curves["small"][5]["mAP50"] > curves["big"][1]["mAP50"]  # ... behind at 2 minutes

    def cut(time_attr: str, max_t: float, grace: float, order: tuple[str, str]) -> set[str]:
        """The trials stopped before their budget ran out, the trials run one at a time in `order`."""
        s = SignalASHA(min_signal=0.05, time_attr=time_attr, max_t=max_t, grace_period=grace,
                       reduction_factor=2)
        s.set_search_properties("mAP50", "max")
        out = set()
        for name in order:
            s.on_trial_add(None, FakeTrial(name))
            for k, row in enumerate(curves[name]):
                if s.on_trial_result(None, FakeTrial(name), row) == TrialScheduler.STOP:
                    out |= {name} if k < len(curves[name]) - 1 else set()
                    break
        return out

    assert curves["small"][5][MINUTES_ATTR] == pytest.approx(2.0)
    for order in (("big", "small"), ("small", "big")):
        # ASHA only compares with trials already at the rung: the first trial always goes on.
        assert cut(TIME_ATTR, 24, 2, order) == ({"small"} if order[0] == "big" else set())
        assert cut(MINUTES_ATTR, 8.0, 2.0, order) == ({"big"} if order[0] == "small" else set())


def test_the_minutes_clock_is_checked(tmp_path):
    base = {"model": {"name": "compact_n"}, "data": {"train": "d/train", "val": "d/val"},
            "train": {"epochs": 1000, "time_limit_min": 8.0}}

    def write(tune: dict, search=None, train=None) -> Path:
        path = tmp_path / "s.yaml"
        doc_base = {**base, "train": {**base["train"], **(train or {})}}
        search = search or {"train.lr": {"choice": [0.01]}}
        path.write_text(yaml.safe_dump({"base": doc_base, "search": search, "tune": tune}))
        return path

    spec = load_sweep(write({"clock": "minutes", "grace_period": 2.5}))
    assert (spec.time_attr, spec.max_t, spec.grace_period) == ("minutes_done", 8.0, 2.5)
    epochs = load_sweep(write({"grace_period": 3}))
    assert (epochs.time_attr, epochs.max_t, epochs.grace_period) == ("epochs_done", 1000, 3)
    with pytest.raises(SweepError, match=r"s\.yaml: tune\.clock: expected one of epochs, minutes, got 'hour"):
        load_sweep(write({"clock": "hours"}))
    with pytest.raises(SweepError, match=r"tune\.grace_period: expected whole epochs, got 2\.5"):
        load_sweep(write({"grace_period": 2.5}))
    with pytest.raises(SweepError, match=r"tune\.clock: minutes needs a time budget"):
        load_sweep(write({"clock": "minutes"}, train={"time_limit_min": 0.0}))
    with pytest.raises(SweepError, match=r"search\.train\.time_limit_min: on the minutes clock"):
        load_sweep(write({"clock": "minutes"}, search={"train.time_limit_min": {"choice": [4.0, 8.0]}}))
    with pytest.raises(SweepError, match=r"tune\.grace_period must be > 0"):
        load_sweep(write({"clock": "minutes", "grace_period": 0}))
