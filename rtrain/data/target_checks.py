"""Poisoned annotation values never reach the loss: checks on one image's targets at decode time.

A shard written by data_prep holds clean boxes, but a shard written by hand (or by another tool)
may hold NaN/inf coordinates, boxes far outside the image, or labels outside 0..C-1. Such a box
is dropped and counted (the count travels with the batch as `dropped_targets` and is reported
in the epoch's metrics), never a crash or a non-finite step.
"""

from __future__ import annotations

import numpy as np


def clean_targets(
    boxes: np.ndarray, labels: np.ndarray, iscrowd: np.ndarray, width: float, height: float,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(boxes [K, 4] float32 clipped to the image, labels [K], iscrowd [K], dropped count).

    Dropped: a box with a non-finite coordinate, a box with no area once clipped to the
    width x height image (entirely outside it, or degenerate), a label outside 0..C-1 (when
    `num_classes` is given), and a box whose flat coordinates do not come in fours.
    """
    flat = np.asarray(boxes, np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    iscrowd = np.asarray(iscrowd).reshape(-1).astype(bool)
    m = len(labels)
    if flat.size != 4 * m or len(iscrowd) != m:  # ragged columns that disagree: nothing usable
        return np.zeros((0, 4), np.float32), labels[:0], iscrowd[:0], max(m, flat.size // 4)
    b = flat.reshape(m, 4)
    keep = np.isfinite(b).all(axis=1)
    if num_classes is not None:
        keep &= (labels >= 0) & (labels < num_classes)
    clipped = np.where(keep[:, None], b, 0.0)
    clipped = np.stack([np.clip(clipped[:, 0], 0, width), np.clip(clipped[:, 1], 0, height),
                        np.clip(clipped[:, 2], 0, width), np.clip(clipped[:, 3], 0, height)], axis=1)
    keep &= (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep].astype(np.float32), labels[keep], iscrowd[keep], int(m - keep.sum())
