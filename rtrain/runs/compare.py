"""Run comparison: read several run directories' metrics, overlay their curves, tabulate final/best.

    from rtrain.runs.compare import compare_runs
    result = compare_runs(["runs/a", "runs/b"], metric="loss", x="time", smooth=0.6, out="cmp.png")
    print(result.table)

What a run directory holds is `rtrain.runs.run_dir`'s layout: `metrics.jsonl` (one JSON object per
epoch, written by `rtrain.training.train_loop`) and `config.yaml`. Rows are read leniently: a killed run
may leave a truncated last line, and hand-edited files may hold other junk; such lines are
skipped and counted with their reason, and the rest is still plotted.

x axes, from the keys train_loop writes (each falls back to what can be derived):
    epoch   `epoch` + 1 (epochs completed)
    step    `step` (optimizer steps so far); else the running sum of `steps` + `skipped`
    images  running sum of `images` x `world_size` (images trained on); else (epoch + 1) x the
            train shards' image count (from data.train's manifest.json); else step x global_batch
    time    `elapsed_s` (training seconds, across resumes); else running sum of `epoch_wall_s`
            or `epoch_time_s`
Validation metrics (`mAP`, `mAP50`, `AP/<class>`, ...) count only on rows with `evaluated` true:
train_loop repeats the last mAP on the other rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_prep.shard_format import ShardError, read_manifest
from rtrain import storage
from rtrain.errors import RtrainError
from rtrain.runs.run_dir import CONFIG_YAML, METRICS_JSONL, atomic_write_bytes, read_metrics

logger = logging.getLogger(__name__)

X_AXES = ("step", "epoch", "images", "time")
X_LABELS = {"step": "optimizer steps", "epoch": "epochs", "images": "images seen",
            "time": "training time (s)"}
# Validation figures: only meaningful on evaluated rows.
_EVAL_PREFIXES = ("mAP", "AP", "AR", "best_mAP")
# Figures where smaller is better (everything else: larger is better).
_LOWER_IS_BETTER = ("loss", "data_wait", "epoch_time", "epoch_wall", "grad_norm", "nonfinite")


class CompareError(RtrainError, ValueError):
    """Nothing to compare (no run with the metric): one line."""


@dataclass
class RunData:
    """One run directory as read: its rows, config and what was skipped (reason -> count)."""

    path: Path | str  # a local Path, or the run's s3:// URI
    rows: list[dict]
    config: dict
    skipped: Counter = field(default_factory=Counter)

    @property
    def name(self) -> str:
        """The run directory's own name (the last part of its path or URI)."""
        return str(self.path).rstrip("/").rsplit("/", 1)[-1]
    label: str = ""


@dataclass
class Series:
    """One run's curve: x and y (raw), y smoothed, and the summary figures."""

    run: RunData
    x: list[float]
    y: list[float]
    smoothed: list[float]
    x_source: str  # which key (or derivation) gave x


@dataclass
class CompareResult:
    series: list[Series]
    skipped_runs: list[tuple[Path, str]]  # whole runs left out, with the reason
    table: str
    out: Path | None


# --------------------------------------------------------------------------------- reading


def read_run(path: str | os.PathLike) -> RunData:
    """Read RUN/metrics.jsonl leniently and RUN/config.yaml (empty dict if absent or unreadable).

    Skipped lines are counted by reason, e.g. "line not JSON (truncated?)" or "row not a JSON object".
    """
    p = storage.location(path)  # a run in a bucket too (s3://...)
    run = RunData(path=p, rows=[], config={})
    cfg_path = storage.child(p, CONFIG_YAML)
    if storage.is_file(cfg_path):
        try:
            loaded = yaml.safe_load(storage.read_bytes(cfg_path).decode("utf-8"))
            run.config = loaded if isinstance(loaded, dict) else {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            logger.warning("%s: config not readable (%s); legend falls back to the dir name", cfg_path, exc)
    run.rows = read_metrics(p, strict=False, skipped=run.skipped)
    return run


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _train_images(config: Mapping) -> int | None:
    """Image count of the run's train shards (manifest.json counts.images), if still readable."""
    train = (config.get("data") or {}).get("train")
    if not train:
        return None
    try:
        return int(read_manifest(train, require=("counts",))["counts"]["images"])
    except (ShardError, KeyError, TypeError, ValueError):
        return None


def x_values(run: RunData, axis: str) -> tuple[list[float | None], str]:
    """One x per row of `run.rows` (None where it cannot be had) and a note of where it came from."""
    rows = run.rows
    if axis not in X_AXES:
        raise CompareError(f"unknown x axis {axis!r}; choose from {', '.join(X_AXES)}")
    if axis == "epoch":
        return [None if _number(r.get("epoch")) is None else r["epoch"] + 1 for r in rows], "epoch"

    def running(keys) -> list[float | None] | None:
        if not all(any(_number(r.get(k)) is not None for k in keys) for r in rows):
            return None
        total, out = 0.0, []
        for r in rows:
            total += sum(v for v in (_number(r.get(k)) for k in keys) if v is not None)
            out.append(total)
        return out

    def direct(key) -> list[float | None] | None:
        values = [_number(r.get(key)) for r in rows]
        return values if rows and all(v is not None for v in values) else None

    if axis == "step":
        got = direct("step")
        if got is not None:
            return got, "step"
        got = running(["steps", "skipped"])
        return (got, "sum of steps") if got is not None else ([None] * len(rows), "none")
    if axis == "time":
        got = direct("elapsed_s")
        if got is not None:
            return got, "elapsed_s"
        for key in ("epoch_wall_s", "epoch_time_s"):
            got = running([key])
            if got is not None:
                return got, f"sum of {key}"
        return [None] * len(rows), "none"
    # images
    if rows and all(_number(r.get("images")) is not None for r in rows):
        total, out = 0.0, []
        for r in rows:
            total += r["images"] * (_number(r.get("world_size")) or 1)
            out.append(total)
        return out, "sum of images x world_size"
    per_epoch = _train_images(run.config)
    if per_epoch is not None:
        return ([None if _number(r.get("epoch")) is None else (r["epoch"] + 1) * per_epoch for r in rows],
                "epoch x train images")
    if rows and all(_number(r.get("step")) is not None and _number(r.get("global_batch")) for r in rows):
        return [r["step"] * r["global_batch"] for r in rows], "step x global_batch"
    return [None] * len(rows), "none"


def is_eval_metric(metric: str) -> bool:
    return metric.startswith(_EVAL_PREFIXES)


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in _LOWER_IS_BETTER)


def ema_smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased EMA: s_t = w s_{t-1} + (1 - w) v_t, divided by 1 - w^t (weight in [0, 1))."""
    if not 0.0 <= weight < 1.0:
        raise CompareError(f"--smooth must be in [0, 1), got {weight}")
    out, last = [], 0.0
    for t, v in enumerate(values, 1):
        last = weight * last + (1.0 - weight) * v
        out.append(last / (1.0 - weight**t))
    return out


def make_series(run: RunData, metric: str, axis: str, smooth: float) -> Series:
    """The (x, metric) points of `run`; rows without them are counted in run.skipped by reason."""
    xs, source = x_values(run, axis)
    eval_only = is_eval_metric(metric)
    points = []
    for r, x in zip(run.rows, xs, strict=True):
        if eval_only and r.get("evaluated") is False:
            run.skipped[f"not evaluated (no fresh {metric})"] += 1
            continue
        y = _number(r.get(metric))
        if y is None:
            why = "null/non-finite" if metric in r else "missing"
            run.skipped[f"{metric} {why}"] += 1
            continue
        if eval_only and y < 0:  # pycocotools writes -1 when val has no such objects
            run.skipped[f"{metric} = -1 (no such objects in val)"] += 1
            continue
        if x is None:
            run.skipped[f"no x for --x {axis}"] += 1
            continue
        points.append((float(x), y))
    points.sort(key=lambda p: p[0])  # a resumed run's rows are in epoch order already; be safe
    x = [p[0] for p in points]
    y = [p[1] for p in points]
    return Series(run, x, y, ema_smooth(y, smooth) if y else [], source)


# ----------------------------------------------------------------------------------- legend


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


# Keys that differ between any two runs without changing what is trained.
_IGNORED_KEYS = ("run.name", "run.storage")
# Legend order: the recipe first, data paths (long, and rarely the point of a comparison) last.
_LEGEND_ORDER = ("train.", "model.", "data.", "eval.", "run.")
_LEGEND_LAST = ("data.train", "data.val")


def _legend_rank(key: str) -> int:
    if key in _LEGEND_LAST:
        return len(_LEGEND_ORDER) + 1
    return next((i for i, p in enumerate(_LEGEND_ORDER) if key.startswith(p)), len(_LEGEND_ORDER))


def legend_labels(runs: Sequence[RunData], max_keys: int = 3) -> list[str]:
    """One label per run: the config keys whose values differ between the runs (`key=value, ...`).

    At most `max_keys` keys (those differing first in file order); the run dir name when configs
    are missing or identical, or when two runs would get the same label.
    """
    flats = [_flatten(r.config) for r in runs]
    with_config = [f for f in flats if f]  # a run without config.yaml must not make every key "differ"
    keys: list[str] = []
    for flat in with_config:
        keys.extend(k for k in flat if k not in keys)
    differing = [
        k for k in keys
        if k not in _IGNORED_KEYS
        and len({json.dumps(f.get(k, "<absent>"), default=str) for f in with_config}) > 1
    ]
    differing.sort(key=_legend_rank)  # stable: file order within a rank
    labels = []
    for run, flat in zip(runs, flats, strict=True):
        if not run.config or not differing:
            labels.append(run.name)
            continue
        parts = [f"{k}={flat.get(k, '<absent>')}" for k in differing[:max_keys]]
        if len(differing) > max_keys:
            parts.append(f"+{len(differing) - max_keys} more")
        labels.append(", ".join(parts))
    counts = Counter(labels)
    return [f"{lab} ({run.name})" if counts[lab] > 1 else lab
            for lab, run in zip(labels, runs, strict=True)]


# ------------------------------------------------------------------------------------ output


def summarize(s: Series, metric: str) -> dict:
    """{"final", "final_x", "best", "best_x", "points"}; best = min for loss-like metrics, else max."""
    if not s.y:
        return {"final": None, "final_x": None, "best": None, "best_x": None, "points": 0}
    pick = min if lower_is_better(metric) else max
    best_i = pick(range(len(s.y)), key=lambda i: s.y[i])
    return {"final": s.y[-1], "final_x": s.x[-1], "best": s.y[best_i], "best_x": s.x[best_i],
            "points": len(s.y)}


def format_table(series: Sequence[Series], metric: str, axis: str) -> str:
    """Per run: label, points, final value (at x), best value (at x), and skipped rows."""
    rule = "min" if lower_is_better(metric) else "max"
    at = "at " + axis
    head = f"{'run':<40} {'points':>6} {'final ' + metric:>14} {at:>10} {'best (' + rule + ')':>12} {at:>10}"
    lines = [head + "  legend"]
    for s in series:
        f = summarize(s, metric)
        name = s.run.name if len(s.run.name) <= 40 else s.run.name[:37] + "..."
        if f["points"]:
            lines.append(f"{name:<40} {f['points']:>6} {f['final']:>14.4f} {_fmt_x(f['final_x']):>10} "
                         f"{f['best']:>12.4f} {_fmt_x(f['best_x']):>10}  {s.run.label}")
        else:
            lines.append(f"{name:<40} {0:>6} {'-':>14} {'-':>10} {'-':>12} {'-':>10}  {s.run.label}")
    return "\n".join(lines)


def skipped_lines(series: Sequence[Series]) -> list[str]:
    """One line per run that had rows/lines skipped: `RUN: N reason; M reason`."""
    out = []
    for s in series:
        if s.run.skipped:
            parts = "; ".join(f"{n} {why}" for why, n in s.run.skipped.most_common())
            out.append(f"{s.run.path}: skipped {parts}")
    return out


def _fmt_x(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:.2f}"


def plot_series(series: Sequence[Series], metric: str, axis: str, out: str | os.PathLike,
                smooth: float) -> Path:
    """Raw curves thin and faint, EMA-smoothed ones solid, one colour per run; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab10")
    for i, s in enumerate(series):
        c = colours(i % 10)
        marker = "o" if len(s.x) < 30 else None
        ax.plot(s.x, s.y, color=c, alpha=0.3, linewidth=1, marker=marker, markersize=3)
        ax.plot(s.x, s.smoothed, color=c, linewidth=2, label=s.run.label)
    ax.set(xlabel=X_LABELS[axis], ylabel=metric,
           title=f"{metric} vs {X_LABELS[axis]} (faint: raw, solid: EMA smoothing {smooth})")
    if lower_is_better(metric) and all(v > 0 for s in series for v in s.y):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    path = Path(out)
    atomic_write_bytes(path, buf.getvalue())
    return path


def compare_runs(
    paths: Sequence[str | os.PathLike],
    metric: str = "loss",
    x: str = "epoch",
    smooth: float = 0.6,
    out: str | os.PathLike | None = "compare.png",
) -> CompareResult:
    """Read every run, build its curve of `metric` against `x`, plot them (when `out`), tabulate.

    A run dir without metrics.jsonl, or without any usable point, is left out with a reason;
    CompareError (one line) only when no run has a point left.
    """
    if x not in X_AXES:
        raise CompareError(f"unknown x axis {x!r}; choose from {', '.join(X_AXES)}")
    ema_smooth([], smooth)  # validates the weight before any reading
    runs = [read_run(p) for p in paths]
    for run, label in zip(runs, legend_labels(runs), strict=True):
        run.label = label
    series, left_out = [], []
    for run in runs:
        if not storage.is_dir(run.path):
            left_out.append((run.path, "not a directory"))
            continue
        if not storage.is_file(storage.child(run.path, METRICS_JSONL)):
            left_out.append((run.path, f"no {METRICS_JSONL}"))
            continue
        s = make_series(run, metric, x, smooth)
        if not s.y:
            reason = "; ".join(f"{n} {why}" for why, n in run.skipped.most_common()) or "no rows"
            left_out.append((run.path, f"no point of {metric} vs {x} ({reason})"))
            continue
        series.append(s)
    if not series:
        why = "; ".join(f"{p}: {r}" for p, r in left_out)
        known = sorted({k for run in runs for row in run.rows for k, v in row.items()
                        if _number(v) is not None})
        if known and metric not in known:
            why += f"; keys with numbers: {', '.join(known)}"
        raise CompareError(f"nothing to plot for {metric} vs {x}: {why}")
    table = format_table(series, metric, x)
    path = plot_series(series, metric, x, out, smooth) if out is not None else None
    return CompareResult(series, left_out, table, path)
