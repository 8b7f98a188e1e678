"""What a finished sweep leaves: the results table (text, CSV, Markdown), the Pareto plot, best.yaml.

No Ray here: the rows are built from plain `TrialRecord`s (see `rtrain.search.driver.collect_records`),
so everything is testable with made-up trials.

    SWEEP/results.csv, results.md    one row per trial (columns: TABLE_COLUMNS)
    SWEEP/pareto.png                 best mAP against GFLOPs and against train images/s; front marked
    SWEEP/best.yaml                  the best trial's config at full length: python -m rtrain.fit --config
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rtrain.config import config_from_dict, config_to_dict, load_config
from rtrain.runs.run_dir import atomic_write_bytes

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PARETO_PNG = "pareto.png"
BEST_YAML = "best.yaml"

# (column title, TrialRecord attribute, format)
TABLE_COLUMNS: list[tuple[str, str, str]] = [
    ("trial", "trial_id", "s"),
    ("variant", "variant", "s"),
    ("width", "width", ".2f"),
    ("depth", "depth", ".2f"),
    ("input size", "img_size", "d"),
    ("batch size", "batch_size", "d"),
    ("lr", "lr", ".2e"),
    ("params (M)", "params_m", ".3f"),
    ("GFLOPs", "gflops", ".3f"),
    ("images/s", "images_per_s", ".1f"),
    ("best mAP", "best_map", ".4f"),
    ("mAP50", "map50", ".4f"),
    ("epochs run", "epochs_run", "d"),
    ("status", "status", "s"),
]
# Searched keys the fixed columns already show; any other searched key gets a column of its own.
SHOWN_KEYS = {"model.name", "model.width", "model.depth", "data.img_size", "train.batch_size", "train.lr"}


@dataclass
class TrialRecord:
    """One trial as the table shows it.

    status: "done" (all epochs), "stopped" (ASHA stopped it early), "error" (see `reason`),
    "pending"/"unfinished" (an interrupted sweep; --resume continues it). lr: the effective
    (batch-scaled) peak LR.
    images_per_s: training throughput (mean over epochs after the first; the only epoch if one).
    best_map/map50: the evaluated epoch with the highest mAP (None: no evaluation ran).
    config: the trial's full config dict (for best.yaml).
    """

    trial_id: str
    variant: str
    width: float | None
    depth: float | None
    img_size: int
    batch_size: int | None  # None: "auto" and the trial has not reported yet
    lr: float
    params_m: float | None
    gflops: float | None
    images_per_s: float | None
    best_map: float | None
    map50: float | None
    epochs_run: int
    status: str
    reason: str = ""
    run_dir: str = ""
    config: dict = field(default_factory=dict)
    searched: dict = field(default_factory=dict)

    @property
    def status_text(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else self.status


def _format(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _cell(record: TrialRecord, attr: str, fmt: str) -> str:
    if attr == "status":
        return record.status_text
    return _format(getattr(record, attr), fmt)


def searched_keys(records: Sequence[TrialRecord]) -> list[str]:
    """The extra columns: searched keys of any record, in first-seen order."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(k for k in r.searched if k not in SHOWN_KEYS))
    return list(keys)


def _searched_cell(record: TrialRecord, key: str) -> str:
    value = record.searched.get(key)
    if isinstance(value, float):
        return _format(value, ".5g")  # an EMA decay 0.9998 must not read as 1
    return "-" if value is None else str(value)


def _ordered(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    return sorted(records, key=lambda r: (r.best_map is None, -(r.best_map or 0.0), r.trial_id))


def _header(keys: list[str]) -> list[str]:
    return [title for title, _, _ in TABLE_COLUMNS] + keys


def table_rows(records: Sequence[TrialRecord]) -> list[list[str]]:
    """Formatted cells, one list per record, in TABLE_COLUMNS order then searched_keys; best mAP first."""
    keys = searched_keys(records)
    return [[_cell(r, attr, fmt) for _, attr, fmt in TABLE_COLUMNS] + [_searched_cell(r, k) for k in keys]
            for r in _ordered(records)]


def format_table(records: Sequence[TrialRecord]) -> str:
    """The table as aligned text (what the CLI prints)."""
    header = _header(searched_keys(records))
    rows = table_rows(records)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def format_markdown(records: Sequence[TrialRecord]) -> str:
    header = _header(searched_keys(records))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table_rows(records):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def format_csv(records: Sequence[TrialRecord]) -> str:
    """CSV with raw numbers (empty for missing), status and reason in separate columns."""
    keys = searched_keys(records)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(_header(keys) + ["reason", "run dir"])
    for r in _ordered(records):
        values = []
        for _, attr, _ in TABLE_COLUMNS:
            v = getattr(r, attr)
            values.append("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
        values += ["" if r.searched.get(k) is None else r.searched[k] for k in keys]
        writer.writerow(values + [r.reason, r.run_dir])
    return buf.getvalue()


def write_tables(records: Sequence[TrialRecord], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """SWEEP/results.csv and SWEEP/results.md (atomic)."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / RESULTS_CSV, out_dir / RESULTS_MD
    atomic_write_bytes(csv_path, format_csv(records).encode("utf-8"))
    atomic_write_bytes(md_path, format_markdown(records).encode("utf-8"))
    return csv_path, md_path


# --------------------------------------------------------------------------- Pareto


def pareto_front(points: Sequence[tuple[float, float]], minimize_x: bool = True) -> list[int]:
    """Indices of the points no other point dominates, sorted by x (ascending).

    points: (x, y) with y (mAP) to maximise and x to minimise (GFLOPs) or, with
    minimize_x=False, to maximise (images/s). A point is dominated when another is at least as
    good on both and strictly better on one. Exact duplicates are both kept.
    """
    sign = 1.0 if minimize_x else -1.0
    keyed = [(sign * x, y) for x, y in points]
    front = []
    for i, (xi, yi) in enumerate(keyed):
        dominated = any(
            (xj <= xi and yj >= yi) and (xj < xi or yj > yi) for j, (xj, yj) in enumerate(keyed) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(records: Sequence[TrialRecord], path: str | os.PathLike) -> Path | None:
    """best mAP vs GFLOPs (left) and vs images/s (right); the Pareto front joined and ringed.

    Only trials with a best mAP and the x value are drawn; None when no trial has both.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gflops", "GFLOPs per image (2 x GMACs)", True), ("images_per_s", "train images/s", False)]
    usable = [r for r in records if r.best_map is not None]
    if not usable:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"done": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    for ax, (attr, label, minimize) in zip(axes, panels, strict=True):
        pts = [(r, getattr(r, attr)) for r in usable if getattr(r, attr) is not None]
        for status, colour in colours.items():
            sel = [(x, r.best_map) for r, x in pts if r.status == status]
            if sel:
                ax.scatter(*zip(*sel, strict=True), c=colour, label=status, s=30, alpha=0.8)
        front = pareto_front([(x, r.best_map) for r, x in pts], minimize_x=minimize)
        if front:
            fx = [pts[i][1] for i in front]
            fy = [pts[i][0].best_map for i in front]
            ax.plot(fx, fy, "k--", linewidth=1, label="Pareto front")
            ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="k", linewidths=1.5)
            for i in front:
                r = pts[i][0]
                ax.annotate(f"{r.trial_id} {r.variant}", (pts[i][1], r.best_map), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=label, ylabel="best val mAP", title=f"mAP vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- best.yaml


def best_record(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The trial with the highest best mAP (ties: fewer GFLOPs); None if none was evaluated."""
    scored = [r for r in records if r.best_map is not None and r.config]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.best_map, -(r.gflops or 0.0)))


def write_best_config(record: TrialRecord, base: dict, path: str | os.PathLike, sweep_name: str) -> Path:
    """best.yaml: the best trial's model/data/train/eval at the base run's full length.

    base: the sweep's base config dict. The run section comes from the base (name cleared) so the
    file trains like any recipe; it is validated by rtrain.config after writing (ConfigError).
    """
    cfg = dict(record.config)
    cfg["run"] = {**base["run"], "name": ""}
    cfg["train"] = {**cfg["train"], "epochs": base["train"]["epochs"]}
    cfg = config_to_dict(config_from_dict(cfg))
    head = (
        f"# Best trial {record.trial_id} of sweep {sweep_name}: {record.variant}, best val mAP "
        f"{record.best_map:.4f} after {record.epochs_run} epoch(s) in the sweep.\n"
        f"# Train it: python -m rtrain.fit --config {path}\n"
    )
    path = Path(path)
    atomic_write_bytes(path, (head + yaml.safe_dump(cfg, sort_keys=False)).encode("utf-8"))
    load_config(path)  # proves the file is a valid training config
    return path
