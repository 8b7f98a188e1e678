"""Poisoned annotation values are dropped at decode and counted, on the CPU decode path too."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rtrain.data.batches import DecodeAugment, collate
from rtrain.data.target_checks import clean_targets


def test_each_kind_of_poisoned_box_is_dropped_and_the_rest_clipped():
    boxes = np.array([
        [10, 10, 50, 50],            # good
        [np.nan, 1, 5, 5],           # non-finite
        [1, 1, np.inf, 5],
        [500, 500, 600, 600],        # entirely outside a 100 x 80 image
        [-20, -20, 30, 30],          # partly outside: clipped, kept
        [5, 5, 9, 9],                # label 7 of 3 classes
        [20, 20, 20, 40],            # zero width
    ], np.float32)
    labels = np.array([0, 1, 1, 2, 2, 7, 0])
    crowd = np.zeros(7, bool)
    kept, kept_labels, kept_crowd, dropped = clean_targets(boxes, labels, crowd, 100, 80, num_classes=3)
    assert dropped == 5
    np.testing.assert_array_equal(kept, [[10, 10, 50, 50], [0, 0, 30, 30]])
    assert kept_labels.tolist() == [0, 2] and kept_crowd.tolist() == [False, False]
    # without a class count, only the geometry is checked
    assert clean_targets(boxes, labels, crowd, 100, 80)[3] == 4
    # flat coordinates that are not whole boxes: nothing usable, all counted
    assert clean_targets(np.zeros(5, np.float32), np.array([0, 1]), np.zeros(2, bool), 100, 80)[3] == 2


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _ragged(items, dtype):
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = np.asarray(x, dtype)
    return out


def test_the_cpu_decode_step_drops_them_and_the_batch_carries_the_count():
    batch = {
        "image_id": np.array([1, 2]), "file_name": np.array(["a.jpg", "b.jpg"], dtype=object),
        "jpeg": np.array([_jpeg(100, 80), _jpeg(100, 80)], dtype=object),
        "width": np.array([100, 100]), "height": np.array([80, 80]),
        "orig_width": np.array([100, 100]), "orig_height": np.array([80, 80]),
        "boxes": _ragged([[10, 10, 50, 50, np.nan, 0, 4, 4], [1, 1, 9, 9]], np.float32),
        "labels": _ragged([[0, 0], [5]], np.int32),
        "iscrowd": _ragged([[False, False], [False]], bool),
    }
    fn = DecodeAugment(train=False, img_size=64, num_classes=3)
    out = collate(fn(batch))
    assert fn.dropped_targets == 2 and out["dropped_targets"].tolist() == [1, 1]
    assert (out["labels"] >= 0).sum().item() == 1  # only image 1's good box is left
    assert out["boxes"].isfinite().all()
