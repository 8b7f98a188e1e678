"""Closing mosaic (`data.close_mosaic`, `data.close_mosaic_frac`): rows of epochs before the switch get
4-image mosaics, rows from it on none, on the CPU (PIL) and the device decode path; the decision logic
of time-limited runs and the clock that keeps it exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rtrain.config import ConfigError, config_from_dict
from rtrain.data.augment import AugmentParams
from rtrain.data.batches import DecodeAugment, EpochClock, collate, decode_augment_batch
from rtrain.data.close_mosaic import EXTRA_KEY, CloseMosaic, due, first_mosaic_free_epoch, mosaic_on
from rtrain.data.device_decode import DeviceDecodeAugment, raw_collate

# Four images of one flat colour each, far apart so JPEG noise never confuses them.
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [30, 40, 220], [230, 220, 30]], np.float32)
PAD = np.array([114, 114, 114], np.float32)
SIZE = 64
# Only the mosaic's geometry: no zoom/shift/colour/flip, so a tile's colour reaches the output as is.
PARAMS = AugmentParams(mosaic=1.0, scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, hflip=0.0)


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), rgb, np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _rows(epochs: list[int]) -> dict[str, np.ndarray]:
    """Ray's numpy batch of 4 shard rows (one flat colour each, one whole-image box), with `epoch`."""
    n = len(COLOURS)

    def ragged(items, dtype):
        out = np.empty(n, dtype=object)
        for i, x in enumerate(items):
            out[i] = np.asarray(x, dtype)
        return out

    return {
        "image_id": np.arange(n, dtype=np.int64) + 10,
        "file_name": np.asarray([f"{i}.jpg" for i in range(n)], dtype=object),
        "jpeg": np.asarray([_jpeg(c) for c in COLOURS.astype(np.uint8)], dtype=object),
        "width": np.full(n, 64, np.int32), "height": np.full(n, 48, np.int32),
        "orig_width": np.full(n, 64, np.int32), "orig_height": np.full(n, 48, np.int32),
        "boxes": ragged([[0, 0, 64, 48]] * n, np.float32),
        "labels": ragged([[i] for i in range(n)], np.int32),
        "iscrowd": ragged([[False]] * n, bool),
        "epoch": np.asarray(epochs, np.int64),
    }


def _colours_in(image: torch.Tensor, min_pixels: int = 5) -> set[int]:
    """Which of COLOURS cover at least `min_pixels` of an image ([3, S, S] uint8), gray padding aside
    (no resampling happens: tiles and letterbox are at scale 1 and integer offsets)."""
    px = image.permute(1, 2, 0).reshape(-1, 3).float().numpy()
    palette = np.concatenate([COLOURS, PAD[None]])
    nearest = np.linalg.norm(px[:, None] - palette[None], axis=2).argmin(1)
    counts = np.bincount(nearest, minlength=len(palette))[: len(COLOURS)]
    return {int(i) for i in np.nonzero(counts >= min_pixels)[0]}


def _cpu(rows, **kw) -> dict:
    return collate(DecodeAugment(train=True, img_size=SIZE, aug=PARAMS, seed=5, **kw)(rows))


def _device(rows, epoch=None, **kw) -> dict:
    return DeviceDecodeAugment(SIZE, True, PARAMS, seed=5, **kw)(raw_collate(rows), epoch, "cpu")


def _check(batch, mosaic_rows: list[bool]) -> None:
    for i, mosaic in enumerate(mosaic_rows):
        colours = _colours_in(batch["images"][i])
        labels = set(batch["labels"][i][batch["labels"][i] >= 0].tolist())
        if mosaic:  # tiles of 4 images meet at the mosaic centre, which the S x S window holds
            assert colours == {0, 1, 2, 3} and len(labels) >= 2, (i, colours, labels)
        else:
            assert colours == {i} and labels == {i}, (i, colours, labels)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_rows_before_the_switch_get_mosaics_and_rows_after_none(path):
    run = _cpu if path == "cpu" else _device
    _check(run(_rows([1] * 4)), [True] * 4)  # no switch: mosaic every time (mosaic=1)
    _check(run(_rows([1] * 4), no_mosaic_from=2), [True] * 4)
    _check(run(_rows([2] * 4), no_mosaic_from=2), [False] * 4)
    _check(run(_rows([7] * 4), no_mosaic_from=2), [False] * 4)
    _check(run(_rows([0] * 4), no_mosaic_from=0), [False] * 4)  # close_mosaic >= epochs: never


def test_cpu_rows_of_two_epochs_in_one_batch_follow_their_own_epoch():
    _check(_cpu(_rows([1, 2, 1, 2]), no_mosaic_from=2), [True, False, True, False])


def test_the_device_step_reads_the_loops_decision_per_batch():
    switch = CloseMosaic(close_mosaic_frac=0.2, time_limit_s=600.0)
    step = DeviceDecodeAugment(SIZE, True, PARAMS, seed=5, no_mosaic_from=switch)
    _check(step(raw_collate(_rows([3] * 4)), None, "cpu"), [True] * 4)  # undecided
    assert switch.close(4) == 4
    _check(step(raw_collate(_rows([3] * 4)), None, "cpu"), [True] * 4)
    _check(step(raw_collate(_rows([4] * 4)), None, "cpu"), [False] * 4)


def test_without_mosaic_the_other_draws_are_those_of_a_mosaic_free_recipe():
    plain = AugmentParams(**{**PARAMS.__dict__, "mosaic": 0.0, "scale": 0.3, "hflip": 0.5})
    closed = AugmentParams(**{**plain.__dict__, "mosaic": 1.0})
    rows = _rows([5] * 4)
    a = collate(DecodeAugment(train=True, img_size=SIZE, aug=plain, seed=5)(rows))
    b = collate(DecodeAugment(train=True, img_size=SIZE, aug=closed, seed=5, no_mosaic_from=5)(rows))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["boxes"], b["boxes"])


def test_the_task_form_passes_the_switch_through():
    out = decode_augment_batch(_rows([3] * 4), train=True, img_size=SIZE, aug=PARAMS, seed=5,
                               no_mosaic_from=3)
    _check(collate(out), [False] * 4)


class _Handle:
    """An EpochClock as the decode step sees a Ray actor handle: `method.remote(...)` -> ObjectRef."""

    def __init__(self, clock: EpochClock) -> None:
        self.clock = clock

    def __getattr__(self, name):
        fn = getattr(self.clock, name)
        return type("M", (), {"remote": staticmethod(lambda *a: ("ref", fn(*a)))})


def test_cpu_decode_asks_the_clock_and_the_clock_never_closes_on_an_epoch_already_decoded(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref: ref[1])
    clock = EpochClock()
    handle = _Handle(clock)
    _check(_cpu(_rows([3] * 4), no_mosaic_from=handle), [True] * 4)  # undecided: mosaic
    assert clock.answered == 3
    _check(_cpu(_rows([4] * 4), no_mosaic_from=handle), [True] * 4)  # decoded ahead of the loop
    # the loop, after epoch 2, wants epoch 3 on: epoch 4 was already decoded with mosaic
    assert clock.close_mosaic(3) == 5 and clock.close_mosaic(9) == 5  # first caller decides
    _check(_cpu(_rows([4] * 4), no_mosaic_from=handle), [True] * 4)
    _check(_cpu(_rows([5] * 4), no_mosaic_from=handle), [False] * 4)
    clock.restore_mosaic(None)  # a restart from a checkpoint taken before the decision
    assert clock.no_mosaic_from(0) is None and clock.close_mosaic(1) == 1


def test_epoch_count_rule():
    assert first_mosaic_free_epoch(30, 0) is None
    assert first_mosaic_free_epoch(30, 10) == 20
    assert first_mosaic_free_epoch(5, 10) == 0
    cm = CloseMosaic.from_config(config_from_dict({"train": {"epochs": 30}, "data": {"close_mosaic": 10}}))
    assert cm.first_free == 20 and not cm.pending and not cm.due(0.0, 10.0)
    assert cm.mosaic_on(19) and not cm.mosaic_on(20)
    cm.restore({EXTRA_KEY: 3})  # epoch-count runs follow train.epochs (which a resume may raise)
    assert cm.first_free == 20
    assert cm.decode_source(clock="handle") == 20  # an int for the decode step: no actor calls
    off = CloseMosaic.from_config(config_from_dict({}))
    assert off.first_free is None and not off.pending and off.mosaic_on(10**6)
    assert mosaic_on(3, None) and mosaic_on(3, 4) and not mosaic_on(4, 4)


def test_time_budget_rule():
    # 100 s budget, last 20 %: close when what is left after half an epoch cycle is under 20 s
    assert not due(remaining_s=40.0, time_limit_s=100.0, frac=0.2, cycle_s=10.0)
    assert not due(remaining_s=25.0, time_limit_s=100.0, frac=0.2, cycle_s=10.0)
    assert due(remaining_s=24.0, time_limit_s=100.0, frac=0.2, cycle_s=10.0)
    assert due(remaining_s=5.0, time_limit_s=100.0, frac=0.2, cycle_s=0.0)
    assert not due(remaining_s=5.0, time_limit_s=100.0, frac=0.0, cycle_s=0.0)
    cfg = config_from_dict({"train": {"time_limit_min": 10}, "data": {"close_mosaic_frac": 0.25}})
    cm = CloseMosaic.from_config(cfg)
    assert cm.pending and cm.first_free is None and cm.time_limit_s == 600.0
    assert cm.decode_source(clock="handle") == "handle" and cm.decode_source() is None
    # a simulated 600 s run of 60 s epoch cycles: the switch lands on the epoch end nearest the target
    for frac, last_mosaic_epoch in ((0.22, 7), (0.28, 6)):  # 132 s -> 120 s left; 168 s -> 180 s left
        sim = CloseMosaic(close_mosaic_frac=frac, time_limit_s=600.0)
        epoch = 0
        while not sim.due(600.0 - 60.0 * (epoch + 1), 60.0):
            epoch += 1
        assert epoch == last_mosaic_epoch, frac
    assert cm.close(8) == 8 and not cm.pending and not cm.due(0.0, 60.0)
    # resume: the checkpoint's decision, or undecided
    again = CloseMosaic.from_config(cfg)
    again.restore({EXTRA_KEY: 8})
    assert again.first_free == 8 and not again.pending
    fresh = CloseMosaic.from_config(cfg)
    fresh.restore({})
    assert fresh.pending


def test_config_validation():
    assert config_from_dict({}).data.close_mosaic == 0 and config_from_dict({}).data.close_mosaic_frac == 0.0
    config_from_dict({"data": {"close_mosaic": 10, "mosaic": 0.5}})
    config_from_dict({"train": {"time_limit_min": 12}, "data": {"close_mosaic_frac": 0.15}})
    with pytest.raises(ConfigError, match=r"data.close_mosaic: -1 is out of range"):
        config_from_dict({"data": {"close_mosaic": -1}})
    with pytest.raises(ConfigError, match=r"data.close_mosaic: expected int"):
        config_from_dict({"data": {"close_mosaic": 2.5}})
    with pytest.raises(ConfigError, match=r"data.close_mosaic_frac: 1.5 is out of range"):
        config_from_dict({"data": {"close_mosaic_frac": 1.5}})
    with pytest.raises(ConfigError, match="use data.close_mosaic_frac"):
        config_from_dict({"train": {"time_limit_min": 12}, "data": {"close_mosaic": 10}})
    with pytest.raises(ConfigError, match=r"use data.close_mosaic \(the last N epochs\)"):
        config_from_dict({"data": {"close_mosaic_frac": 0.2}})
