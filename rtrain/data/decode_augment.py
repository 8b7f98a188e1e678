"""The CPU decode step of the data path and the run's epoch clock, importable without torch.

    fn = DecodeAugment(train=True, img_size=320, aug=AugmentParams(), seed=0, epoch=clock)
    rows = fn(numpy_batch_of_shard_rows)                 # map_batches(batch_format="numpy")
    clock = make_epoch_clock(); set_epoch(clock, 3)      # a tiny Ray actor shared by loop and decode

Rows after `DecodeAugment` (one per image): `image` uint8 [S, S, 3] (rectangular val: [H, W, 3],
one canvas per decode call); `boxes` float32 flat [x1, y1, x2, y2, ...] in input pixels; `labels`
int32; `iscrowd` bool; `image_id` int64; `scale` float32 and `pad` float32 [2] (left, top) with
`input = stored * scale + pad` (exact in val mode); `stored_size` and `orig_size` int32 [2] as
(width, height). Ragged columns are 1-D arrays (Ray keeps them as Arrow lists); nested lists would
fall back to pickle.

Contract: this module and everything it imports load no torch or torchvision (numpy, PIL, pyarrow
only; `rtrain.data.jpeg` imports torchvision on its first full-size decode). Ray pickles
`DecodeAugment` and `EpochClock` by reference, so every process that unpickles them imports this
module: the EpochClock actor, Ray Train's DatasetManager, Ray Data's SplitCoordinator and the decode
actors, at the start of every run and on the path to the first batch; none of them needs torch.
`tests/data/test_light_imports.py` checks it (`benchmarks/process_imports.py` measures the cost).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from rtrain.data.augment import Augmenter, AugmentParams, Sample, rect_canvas
from rtrain.data.close_mosaic import mosaic_on
from rtrain.data.jpeg import DECODE_ERRORS, decode_rgb
from rtrain.data.target_checks import clean_targets

log = logging.getLogger(__name__)


class EpochClock:
    """State of the tiny actor the train loop and the decode tasks share (`make_epoch_clock`).

    `set`/`get`: the epoch (the stream's start epoch, or build_dataset's current epoch).
    `no_mosaic_from` / `close_mosaic` / `restore_mosaic`: the first mosaic-free epoch F of a
    time-limited run (`rtrain.data.close_mosaic`). Calls to one actor run one at a time, so F, once
    decided, is later than every epoch a decode task was already answered for.
    `set_start` / `get_start`: the training stream's start point, (epoch, blocks of that epoch
    already trained) for a resume inside an epoch (`rtrain.data.epoch_stream`).
    `request_stop` / `stop_requested`: a preemption the driver was told about (`rtrain.training.preempt`);
    the workers poll it.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.skip_blocks = 0
        self.first_free: int | None = None
        self.answered = -1  # newest epoch a decode task asked about
        self.stop_reason: str | None = None

    def set(self, epoch: int) -> int:
        self.epoch = int(epoch)
        self.skip_blocks = 0
        return self.epoch

    def get(self) -> int:
        return self.epoch

    def set_start(self, epoch: int, skip_blocks: int = 0) -> tuple[int, int]:
        self.epoch, self.skip_blocks = int(epoch), int(skip_blocks)
        return self.epoch, self.skip_blocks

    def get_start(self) -> tuple[int, int]:
        return self.epoch, self.skip_blocks

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = str(reason)

    def stop_requested(self) -> str | None:
        return self.stop_reason

    def no_mosaic_from(self, epoch: int) -> int | None:
        """A decode task about to augment rows of epochs <= `epoch`: F, or None (undecided)."""
        self.answered = max(self.answered, int(epoch))
        return self.first_free

    def close_mosaic(self, epoch: int) -> int:
        """Decide F (the first caller decides; later calls get the same F): `epoch`, or the epoch
        after the newest one decode tasks were answered for, whichever is later."""
        if self.first_free is None:
            self.first_free = max(int(epoch), self.answered + 1)
        return self.first_free

    def restore_mosaic(self, first_free: int | None) -> None:
        """Before a (re)started stream: F as the checkpoint recorded it; nothing decoded yet."""
        self.first_free = None if first_free is None else int(first_free)
        self.answered = -1


def make_epoch_clock():
    """A tiny actor (`EpochClock`) shared by the train loop and the decode tasks.

    It lives on the caller's node (the driver's, or a Tune trial's): Ray would otherwise place it
    on any node, and a lost worker node would take the run's clock with it (an elastic run goes on
    without that node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(EpochClock).options(scheduling_strategy=here).remote()


def set_epoch(clock, epoch: int) -> None:
    """Call before iterating an epoch (every worker may call it; it is idempotent)."""
    import ray

    ray.get(clock.set.remote(epoch))


class DecodeAugment:
    """Callable for `map_batches(batch_format="numpy")`: decodes each row's JPEG, augments (train)
    or letterboxes (val) to img_size x img_size, and returns the row format of the module doc.

    `epoch`: an int, or an EpochClock actor handle read once per batch. A row whose JPEG fails to
    decode is dropped with a warning (counted in `self.skipped`).
    `no_mosaic_from`: rows of epochs >= this one are augmented without mosaic (`rtrain.data.close_mosaic`);
    None = never, an int, or an EpochClock handle asked once per batch (time-limited runs).
    `rect` (val only): each call's images share one canvas of `rtrain.data.augment.rect_canvas` (the
    call's largest resized height and width rounded up to 32) instead of img_size x img_size.
    `reduced_decode`: decode a JPEG at 1/2, 1/4 or 1/8 in the DCT when the first resize shrinks it
    at least that much (`rtrain.data.jpeg`); boxes, scale and pad are the same either way, pixels
    differ by resampling only. None (default) = for train only: val decodes at full size, so that
    evaluation, `rtrain.predict` and exported inference see the same pixels. False: always full
    size (the exact twin of the GPU path's pixels).
    """

    def __init__(
        self, *, train: bool, img_size: int, aug: AugmentParams | None = None, seed: int = 0, epoch=0,
        num_classes: int | None = None, no_mosaic_from=None, rect: bool = False,
        reduced_decode: bool | None = None,
    ) -> None:
        if rect and train:
            raise ValueError("DecodeAugment: rect=True is for evaluation only (train=False)")
        self.rect = rect
        self.decode_size = img_size if (train if reduced_decode is None else reduced_decode) else None
        params = aug or AugmentParams()
        self.augmenter = Augmenter(img_size=img_size, train=train, params=params, seed=seed)
        self.plain = Augmenter(img_size=img_size, train=train, params=replace(params, mosaic=0.0), seed=seed)
        self.no_mosaic_from = no_mosaic_from
        self.epoch = epoch
        self.num_classes = num_classes
        self.skipped = 0
        self.dropped_targets = 0

    def _current_epoch(self) -> int:
        if isinstance(self.epoch, int | np.integer):
            return int(self.epoch)
        import ray

        return int(ray.get(self.epoch.get.remote()))

    def _first_free(self, newest_epoch: int) -> int | None:
        source = self.no_mosaic_from
        if source is None or isinstance(source, int | np.integer):
            return source
        import ray

        return ray.get(source.no_mosaic_from.remote(int(newest_epoch)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = 0 if "epoch" in batch else self._current_epoch()
        samples, rows, dropped_per_row = [], [], []
        for i in range(len(batch["image_id"])):
            try:
                image, reduced, (h, w) = decode_rgb(batch["jpeg"][i], self.decode_size)
            except DECODE_ERRORS as e:
                self.skipped += 1
                log.warning(
                    "image_id %s (%s): undecodable JPEG skipped: %s",
                    batch["image_id"][i],
                    batch["file_name"][i],
                    e,
                )
                continue
            boxes, labels, crowd, dropped = clean_targets(
                batch["boxes"][i], batch["labels"][i], batch["iscrowd"][i], w, h, self.num_classes,
            )
            if dropped:
                self.dropped_targets += dropped
                log.warning("image_id %s (%s): %d box(es) with non-finite coordinates, outside the image "
                            "or with a label outside 0..C-1 dropped", batch["image_id"][i],
                            batch["file_name"][i], dropped)
            samples.append(Sample(image, boxes, labels, crowd, reduced=reduced, full_hw=(h, w)))
            dropped_per_row.append(dropped)
            rows.append(i)
        ids = [int(batch["image_id"][i]) for i in rows]
        if "epoch" in batch:  # rows of the train stream carry their epoch (rtrain.data.epoch_stream)
            epochs = [int(batch["epoch"][i]) for i in rows]
        else:
            epochs = [epoch] * len(rows)
        first_free = self._first_free(max(epochs)) if epochs and self.no_mosaic_from is not None else None
        canvas = rect_canvas([s.hw for s in samples], self.augmenter.img_size) \
            if self.rect else None
        out = [(self.augmenter if mosaic_on(epochs[k], first_free) else self.plain).one(
            samples, k, ids[k], epochs[k], canvas) for k in range(len(samples))]
        size = self.augmenter.img_size
        n = len(out)
        return {
            "image": np.stack([s.image for s in out]) if n else np.zeros((0, size, size, 3), np.uint8),
            "boxes": _ragged([s.boxes.reshape(-1) for s in out], np.float32),
            "labels": _ragged([s.labels for s in out], np.int32),
            "iscrowd": _ragged([s.iscrowd for s in out], bool),
            "image_id": np.asarray(ids, np.int64),
            "scale": np.asarray([s.scale for s in out], np.float32),
            "pad": np.asarray([s.pad for s in out], np.float32).reshape(n, 2),
            "stored_size": np.asarray(
                [(batch["width"][i], batch["height"][i]) for i in rows], np.int32
            ).reshape(n, 2),
            "orig_size": np.asarray(
                [(batch["orig_width"][i], batch["orig_height"][i]) for i in rows], np.int32
            ).reshape(n, 2),
            "dropped_targets": np.asarray(dropped_per_row, np.int32),
        }


def _ragged(arrays: list[np.ndarray], dtype) -> np.ndarray:
    """An object array of 1-D arrays (built by hand so numpy never makes it 2-D)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = np.asarray(a, dtype=dtype).reshape(-1)
    return out
