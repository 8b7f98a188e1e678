"""Sweep specs: a base training config plus a search space over dotted config keys (no Ray here).

A sweep YAML (see configs/sweep_*.yaml):

    base_config: configs/bccd.yaml       # a training config file (relative to the working directory) ...
    base:                                # ... and/or inline values merged on top of it
      train: {epochs: 12}
    search:                              # dotted rtrain.config keys -> one space each
      model.name: {choice: [compact_n, compact_s, mv2_s]}
      model.width: {grid: [0.5, 0.75]}
      data.img_size: {choice: [256, 320]}
      train.batch_size: {choice: [8, 16]}
      train.lr: {loguniform: [0.001, 0.01]}
    tune:                                # optional; defaults in TuneSettings
      num_samples: 8
      metric: mAP50                      # ASHA's signal (EARLY_METRICS); the table ranks by mAP
      min_signal: 0.05                   # a rung stops nothing until a trial there reaches this
      clock: epochs                      # ASHA's clock: epochs, or minutes of training (time budget)
      grace_period: 2                    # in the clock's unit
      reduction_factor: 2
    quickstart_data: data/synthetic      # optional: make the synthetic data here first (quickstart)

Space kinds and their `ray.tune` counterparts: `grid: [v, ...]` -> grid_search (every value, times
num_samples), `choice: [v, ...]` -> choice, `uniform: [lo, hi]` -> uniform, `loguniform: [lo, hi]`
-> loguniform, `randint: [lo, hi]` -> randint(lo, hi + 1) (both ends included here; Tune's upper
end is exclusive). Every key and every value (or both ends of a range) is checked against
rtrain.config before anything starts; `model.name` values must be registered variants.

`train.batch_size` is per worker; the training loop scales `train.lr` from
`train.nominal_batch_size` to the global batch (batch_size x workers; linearly for SGD, by the
square root for AdamW, see `rtrain.training.schedule.scale_lr`), so a searched batch size trains at its
scaled LR (`effective_lr`). A batch of "auto" is resolved by each trial on its device.
Searching `run.*` is refused (the sweep sets those), and so is `train.nominal_batch_size` (it
would undo the LR scaling).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtrain.config import Config, ConfigError, config_from_dict, merge, parse_overrides, read_yaml
from rtrain.errors import RtrainError
from rtrain.training.schedule import scale_lr

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = ("base_config", "base", "search", "tune", "quickstart_data")
METRIC = "mAP"  # the best trial and the table: the val COCO mAP@[.5:.95] the loop reports, mode max
EARLY_METRICS = ("mAP50", "mAP", "AR100")  # what tune.metric (ASHA's signal, mode max) may name
TIME_ATTR = "epochs_done"  # epochs finished (= loop's 0-based `epoch` + 1), added to each report
MINUTES_ATTR = "minutes_done"  # training minutes so far (the loop's elapsed_s / 60), added to each report
CLOCKS = {"epochs": TIME_ATTR, "minutes": MINUTES_ATTR}
NOT_SEARCHABLE = {"train.nominal_batch_size", "data.train", "data.val"}


class SweepError(RtrainError, ValueError):
    """A sweep spec problem, as one line naming the file and the key."""


@dataclass
class TuneSettings:
    """How the sweep runs. CLI flags override the YAML's `tune:` section."""

    num_samples: int = 4  # samples of the random kinds; grid values multiply it
    # ASHA's signal, one of EARLY_METRICS, of the last val evaluation. mAP50 separates trials earlier
    # than mAP@[.5:.95] (one loose IoU threshold instead of ten strict ones); the best trial is still
    # the one with the best mAP.
    metric: str = "mAP50"
    # ASHA stops nothing at a rung until the best value recorded there reaches this (0: always cut).
    # Below it every trial's value is noise (quick-start shapes: mAP50 0.001-0.012 after epoch 1,
    # 0.13-0.16 after epoch 2; tests/fixtures/asha_curves.json).
    min_signal: float = 0.05
    # ASHA's clock. "epochs": at a rung every trial has seen the same images whatever its batch size.
    # "minutes" (needs train.time_limit_min): training minutes, so that trials of different image or
    # batch sizes compete on what a time budget gives them; rungs in minutes, max_t the budget.
    clock: str = "epochs"
    grace_period: float = 2.0  # ASHA: clock units every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs/GPUs allow
    workers_per_trial: int = 1  # Ray Train workers of one trial
    gpus_per_trial: float = 0.0  # >0: GPU trials; each worker gets gpus_per_trial / workers_per_trial
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts inside a trial (0: a failed trial is recorded as is)
    seed: int = 0  # random-search seed (same seed, same sampled configs)


@dataclass
class Dimension:
    """One searched key: `kind` in SPACE_KINDS; `values` the list (grid/choice) or [lo, hi]."""

    key: str
    kind: str
    values: list

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # randint: both ends included


@dataclass
class SweepSpec:
    """A parsed, validated sweep: `base` is a full config dict (validated), `space` the dimensions."""

    source: Path
    base: dict
    space: list[Dimension]
    tune: TuneSettings = field(default_factory=TuneSettings)
    quickstart_data: str = ""  # root for rtrain.training.quickstart.prepare_synthetic ("" = data exists)

    @property
    def epochs(self) -> int:
        """The base config's epochs (ASHA's max_t on the epochs clock)."""
        return int(self.base["train"]["epochs"])

    @property
    def time_attr(self) -> str:
        """The report key ASHA counts in (tune.clock)."""
        return CLOCKS[self.tune.clock]

    @property
    def max_t(self) -> float:
        """ASHA's max_t: the epochs, or on the minutes clock the time budget."""
        if self.tune.clock == "minutes":
            return float(self.base["train"]["time_limit_min"])
        return self.epochs

    @property
    def grace_period(self) -> float:
        """tune.grace_period, at most max_t (whole epochs on the epochs clock)."""
        grace = min(self.tune.grace_period, self.max_t)
        return int(grace) if self.tune.clock == "epochs" else float(grace)

    def param_space(self) -> dict:
        """The Tuner's param_space: {dotted key: ray.tune domain}."""
        return {d.key: d.to_tune() for d in self.space}

    def num_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.space if d.kind == "grid")
        return grid * self.tune.num_samples


# --------------------------------------------------------------------------- trial configs


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    """A new config dict: `base` with each dotted `section.key` of `params` set (neither is changed)."""
    nested: dict = {}
    for key, value in params.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return merge(copy.deepcopy(base), nested)


def trial_config(base: dict, params: dict[str, Any]) -> Config:
    """The validated Config of one trial (ConfigError names the key at fault)."""
    return config_from_dict(apply_params(base, params))


def effective_lr(cfg: Config, workers: int = 1, batch_size: int | None = None) -> float:
    """The peak LR the training loop uses: train.lr scaled from nominal_batch_size to the global batch.

    batch_size: the per-worker batch the trial ran at (default `cfg.train.batch_size`); when that
    is "auto" and no batch is given the LR is not known before the trial runs: NaN.
    """
    batch = cfg.train.batch_size if batch_size is None else batch_size
    if not isinstance(batch, int):
        return float("nan")
    return scale_lr(cfg.train.lr, batch * max(1, workers), cfg.train.nominal_batch_size, cfg.train.optimizer)


# --------------------------------------------------------------------------- parsing


def _config_fields() -> dict[str, dataclasses.Field]:
    out = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory().__class__):
            out[f"{section.name}.{f.name}"] = f
    return out


def _is_int_field(key: str) -> bool:
    import typing

    hints = typing.get_type_hints(type(getattr(Config(), key.split(".")[0])))
    tp = hints[key.split(".")[1]]
    args = typing.get_args(tp) or (tp,)
    return int in args and float not in args


def _check_value(base: dict, key: str, value: Any, where: str) -> None:
    try:
        cfg = trial_config(base, {key: value})
    except ConfigError as exc:
        raise SweepError(f"{where}: {exc}") from None
    if key == "model.name":
        from rtrain.models import list_variants

        if cfg.model.name not in list_variants():
            known = ", ".join(list_variants())
            raise SweepError(f"{where}: unknown model variant {value!r} (registered: {known})")


def parse_dimension(key: str, spec: Any, base: dict, where: str) -> Dimension:
    """One `search:` entry -> Dimension, every value checked against rtrain.config (SweepError)."""
    fields = _config_fields()
    if key not in fields:
        raise SweepError(f"{where}: unknown config key {key!r} (search keys look like section.key, "
                         "e.g. model.width)")
    if key.startswith("run.") or key in NOT_SEARCHABLE:
        raise SweepError(f"{where}: {key} cannot be searched (the sweep sets run.*; nominal_batch_size "
                         "anchors the LR scaling; data paths are fixed)")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SweepError(f"{where}: expected one of {{{', '.join(SPACE_KINDS)}: [...]}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in SPACE_KINDS:
        raise SweepError(f"{where}: unknown space kind {kind!r} (valid: {', '.join(SPACE_KINDS)})")
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        for v in values:
            _check_value(base, key, v, where)
        return Dimension(key, kind, list(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SweepError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
    lo, hi = values
    if not lo < hi:
        raise SweepError(f"{where}: {kind} needs low < high, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise SweepError(f"{where}: loguniform needs low > 0, got {lo!r}")
    if kind == "randint":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise SweepError(f"{where}: randint needs integer bounds, got {values!r}")
    elif _is_int_field(key):
        raise SweepError(f"{where}: {key} is an integer: use randint, choice or grid, not {kind}")
    for v in (lo, hi):
        _check_value(base, key, v, where)
    return Dimension(key, kind, [lo, hi])


def _settings(data: Any, where: str, overrides: dict) -> TuneSettings:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = {**data, **overrides}
    names = {f.name: f for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SweepError(f"{where}: unknown key tune.{unknown[0]} (valid: {', '.join(names)})")
    out = TuneSettings()
    for name, value in data.items():
        default = getattr(out, name)
        if name == "metric":
            if value not in EARLY_METRICS:
                raise SweepError(f"{where}: tune.metric: expected one of {', '.join(EARLY_METRICS)}, "
                                 f"got {value!r}")
            out.metric = value
            continue
        if name == "clock":
            if value not in CLOCKS:
                raise SweepError(f"{where}: tune.clock: expected one of {', '.join(CLOCKS)}, got {value!r}")
            out.clock = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SweepError(f"{where}: tune.{name}: expected a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise SweepError(f"{where}: tune.{name}: expected an integer, got {value!r}")
        setattr(out, name, type(default)(value))
    if out.clock == "epochs" and out.grace_period != int(out.grace_period):
        raise SweepError(f"{where}: tune.grace_period: expected whole epochs, got {out.grace_period!r} "
                         f"(minutes need tune.clock: minutes)")
    if out.grace_period <= 0:
        raise SweepError(f"{where}: tune.grace_period must be > 0, got {out.grace_period!r}")
    checks = [("num_samples", 1), ("reduction_factor", 2), ("max_concurrent", 0),
              ("workers_per_trial", 1), ("gpus_per_trial", 0), ("max_failures", -1)]
    for name, lo in checks:
        if getattr(out, name) < lo:
            raise SweepError(f"{where}: tune.{name} must be >= {lo}, got {getattr(out, name)!r}")
    if not 0.0 <= out.min_signal < 1.0:
        raise SweepError(f"{where}: tune.min_signal must be in [0, 1), got {out.min_signal!r}")
    if out.cpus_per_worker <= 0:
        raise SweepError(f"{where}: tune.cpus_per_worker must be > 0, got {out.cpus_per_worker!r}")
    return out


def load_sweep(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    tune_overrides: dict | None = None,
) -> SweepSpec:
    """Read and validate a sweep YAML; SweepError (one line naming the file and key) on any fault.

    overrides: `--set section.key=value` strings; `tune.*` keys set TuneSettings, the others the
    base config. tune_overrides: TuneSettings fields from CLI flags (None values are ignored).
    """
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown top-level key {unknown[0]!r} (valid: {', '.join(TOP_KEYS)})")
    try:
        parsed = parse_overrides(overrides)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    tune_set = parsed.pop("tune", {})
    base: dict = {}
    if data.get("base_config"):
        base_path = Path(data["base_config"])
        try:
            base = read_yaml(base_path)
        except ConfigError as exc:
            raise SweepError(f"{path}: base_config: {exc}") from None
    inline = data.get("base") or {}
    if not isinstance(inline, dict):
        raise SweepError(f"{path}: base: expected a mapping, got {type(inline).__name__}")
    base = merge(merge(base, inline), parsed)
    try:
        base = dataclasses.asdict(config_from_dict(base))
    except ConfigError as exc:
        raise SweepError(f"{path}: base: {exc}") from None
    search = data.get("search")
    if not isinstance(search, dict) or not search:
        raise SweepError(f"{path}: search: expected a mapping of config keys to spaces (nothing to search)")
    space = [parse_dimension(str(k), v, base, f"{path}: search.{k}") for k, v in search.items()]
    cli = {k: v for k, v in (tune_overrides or {}).items() if v is not None}
    settings = _settings(data.get("tune"), str(path), {**tune_set, **cli})
    if settings.clock == "minutes":
        if not base["train"]["time_limit_min"] > 0:
            raise SweepError(f"{path}: tune.clock: minutes needs a time budget (train.time_limit_min > 0)")
        if any(d.key == "train.time_limit_min" for d in space):
            raise SweepError(f"{path}: search.train.time_limit_min: on the minutes clock every trial has "
                             f"the same budget (ASHA's max_t)")
    quick = data.get("quickstart_data") or ""
    if not isinstance(quick, str):
        raise SweepError(f"{path}: quickstart_data: expected a folder path, got {quick!r}")
    return SweepSpec(source=path, base=base, space=space, tune=settings, quickstart_data=quick)
