"""The run directory: per-epoch metrics (JSON lines + CSV) and the plots a user looks at.

Layout of RUN = <storage>/<name> (Ray Train writes its `checkpoint_*` dirs there too):

    RUN/config.yaml          the resolved config the run trains with
    RUN/metrics.jsonl        one JSON object per epoch (never duplicated after a resume)
    RUN/metrics.csv          the same rows as CSV (columns: union of keys, in first-seen order)
    RUN/best.pt, last.pt     EMA weights + config + class names (`rtrain.runs.checkpoint.save_weights`)
    RUN/plots/curves.png     loss parts, LR and mAP against epoch
    RUN/plots/val_predictions.png   val images: predicted boxes (solid) and true boxes (dashed)
    RUN/checkpoint_*/        Ray Train checkpoints (state.pt + COMPLETE), the last K and the best
    RUN/tensorboard/         TensorBoard event files (run.loggers: tensorboard; rtrain.training.trackers)
    RUN/mlflow_run.json      the MLflow run this run logs to (run.loggers: mlflow; rtrain.training.trackers)

Every file is written to a temp name and renamed, so a crash never leaves half a file. A write
that finds the disk full (ENOSPC, or EDQUOT: over quota) removes its temp file, leaves the old
file as it was, and raises `StorageFullError`: one line naming the file.

RUN may be a bucket URI (s3://bucket/runs/NAME): the same files, each written as one object
upload, which appears whole or not at all (`rtrain.storage`). The functions here take a local
path or such a URI.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from rtrain import storage

# the one atomic writer and its full-disk error live in rtrain.storage; their names stay here too
from rtrain.storage import FULL_ERRNOS, StorageFullError, atomic_write_bytes, full_storage  # noqa: F401

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_YAML = "config.yaml"
BEST_WEIGHTS = "best.pt"
LAST_WEIGHTS = "last.pt"
PLOTS_DIR = "plots"

_FULL_TEXT = re.compile(r"no space left on (the )?device|disk quota exceeded", re.IGNORECASE)


def storage_full_line(exc: BaseException) -> str | None:
    """The one-line reason when `exc` (or what it wraps: a cause, Ray's worker failures) is a full disk.

    Looks through __cause__/__context__ and the attributes Ray's errors keep their causes in
    (`worker_failures`, `controller_failure`, `cause`); falls back to the text of the error
    ("No space left on device"), which is all that is left when the cause did not unpickle.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageFullError):
            return str(e)
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS and e.filename:
            return str(full_storage(e, e.filename))
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, Mapping):
            todo.extend(v for v in failures.values() if isinstance(v, BaseException))
        for attr in ("controller_failure", "cause", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
    for line in str(exc).splitlines():
        if _FULL_TEXT.search(line):
            return line.strip()[:300]
    return None


def write_file(path: Path | str, data: bytes) -> None:
    """`atomic_write_bytes` for a local path; one object upload for a bucket URI (`rtrain.storage`)."""
    if storage.is_bucket(path):
        storage.write_bytes(path, data)
    else:
        atomic_write_bytes(Path(path), data)


def _plain(value):
    """JSON-safe scalars: NaN/Inf become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def read_metrics(run_dir: str | os.PathLike, *, strict: bool = True,
                 skipped: Counter | None = None) -> list[dict]:
    """The rows of RUN/metrics.jsonl (empty list when absent).

    strict (what training and resuming use): a malformed line raises ValueError naming it.
    strict=False (what comparing runs uses): undecodable bytes are replaced, and lines that are
    not JSON or not a JSON object are skipped and counted by reason in `skipped`, e.g.
    "line not JSON (truncated or garbled)" or "row not a JSON object".
    """
    path = storage.child(run_dir, METRICS_JSONL)
    if not storage.is_file(path):
        return []
    text = storage.read_bytes(path).decode("utf-8", errors="strict" if strict else "replace")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
            reason = "line not JSON (truncated or garbled)"
        else:
            if isinstance(row, dict) or strict:
                rows.append(row)
                continue
            reason = "row not a JSON object"
        if skipped is not None:
            skipped[reason] += 1
    return rows


def _write_rows(run_dir: Path | str, rows: Sequence[Mapping]) -> None:
    text = "".join(json.dumps(_plain(dict(r)), sort_keys=False) + "\n" for r in rows)
    write_file(storage.child(run_dir, METRICS_JSONL), text.encode("utf-8"))
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns and not isinstance(r[k], Mapping))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _plain(r.get(k)) for k in columns})
    write_file(storage.child(run_dir, METRICS_CSV), buf.getvalue().encode("utf-8"))


def truncate_metrics(run_dir: str | os.PathLike, from_epoch: int) -> int:
    """Drop rows with epoch >= `from_epoch` (a resumed run redoes them); returns rows kept."""
    run_dir = storage.location(run_dir)
    rows = read_metrics(run_dir)
    kept = [r for r in rows if int(r.get("epoch", -1)) < from_epoch]
    if len(kept) != len(rows) or (rows and not storage.is_file(storage.child(run_dir, METRICS_CSV))):
        _write_rows(run_dir, kept)
    return len(kept)


def append_metrics(run_dir: str | os.PathLike, row: Mapping) -> None:
    """Add one epoch's row (replacing a row of the same epoch, if any) to metrics.jsonl and .csv."""
    run_dir = storage.location(run_dir)
    rows = [r for r in read_metrics(run_dir) if r.get("epoch") != row.get("epoch")]
    rows.append(dict(row))
    _write_rows(run_dir, rows)


# --------------------------------------------------------------------------- plots


def _savefig(fig, path: Path | str) -> Path | str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    write_file(path, buf.getvalue())
    return path


def plot_curves(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Loss parts, LR and mAP/mAP50 against epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [r["epoch"] for r in rows]
    loss_keys = [k for k in ("loss", "loss_cls", "loss_box", "loss_dfl") if any(k in r for r in rows)]
    for k in loss_keys:
        axes[0].plot(epochs, [r.get(k, float("nan")) for r in rows], label=k, marker=".")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend()
    axes[1].plot(epochs, [r.get("lr", float("nan")) for r in rows], marker=".")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    for k in ("mAP", "mAP50"):
        pts = [(r["epoch"], r[k]) for r in rows if r.get(k) is not None and r.get("evaluated")]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), label=k, marker="o")
    axes[2].set(title="val (EMA model)", xlabel="epoch", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    try:
        return _savefig(fig, storage.location(path))
    finally:
        plt.close(fig)


def plot_predictions(
    images: Sequence,
    predictions: Sequence[Mapping],
    truths: Sequence[Mapping],
    class_names: Sequence[str],
    path: str | os.PathLike,
    score_thresh: float = 0.3,
) -> Path:
    """A grid of images with predicted boxes (solid, with class and score) and true boxes (dashed).

    images: uint8 arrays [H, W, 3] (or tensors [3, H, W]); predictions: {"boxes" [K,4] xyxy px,
    "scores" [K], "labels" [K]}; truths: {"boxes" [M,4], "labels" [M]}, in the same pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(images)
    cols = min(4, max(n, 1))
    rows_n = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 4 * rows_n), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, pred, true in zip(axes.flat, images, predictions, truths, strict=False):
        arr = img.permute(1, 2, 0).cpu().numpy() if hasattr(img, "permute") else np.asarray(img)
        ax.imshow(arr)
        true_boxes = np.asarray(true["boxes"]).reshape(-1, 4)
        for box, label in zip(true_boxes, np.asarray(true["labels"]), strict=True):
            x1, y1, x2, y2 = box
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linestyle="--",
                                           linewidth=1.5, edgecolor=colours(int(label) % 10)))
        scores = np.asarray(pred["scores"])
        for box, label, score in zip(np.asarray(pred["boxes"]).reshape(-1, 4), np.asarray(pred["labels"]),
                                     scores, strict=True):
            if score < score_thresh:
                continue
            x1, y1, x2, y2 = box
            c = colours(int(label) % 10)
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=2, edgecolor=c))
            ax.text(x1, y1, f"{class_names[int(label)]} {score:.2f}", fontsize=7, color="white",
                    bbox={"facecolor": c, "alpha": 0.8, "pad": 1, "linewidth": 0})
    fig.suptitle("val: predicted (solid) vs true (dashed)")
    fig.tight_layout()
    try:
        return _savefig(fig, storage.location(path))
    finally:
        plt.close(fig)
