"""Decode and augment on the train worker's device: raw shard rows in, collated batches out
(`rtrain.data.batches.collate`).

    collate = RawCollate()                     # Ray: iter_batches(collate_fn=...) of raw shard rows
    step = DeviceDecodeAugment(img_size=320, train=True, params=AugmentParams(), seed=0)
    for raw in ds.iter_torch_batches(batch_size=128, collate_fn=collate):
        batch = step(raw, epoch, device)       # decode (nvJPEG on CUDA) + TensorAugmenter on device

Raw batch (`RawCollate` / `raw_collate` output, CPU): `image_id` int64 [B]; `file_name` list[str];
`jpeg` list of uint8 1-D tensors (the encoded bytes); `width`, `height`, `orig_width`,
`orig_height` int64 [B] (stored and original sizes); `boxes` list of float32 [M, 4] xyxy stored
px; `labels` list of int64 [M]; `iscrowd` list of bool [M]; `epoch` int64 [B] when the rows carry it.
The input is Ray's numpy batch of the shard columns (docs/design.md's schema; `boxes` flat
[x1, y1, x2, y2, ...]); `numpy_batch_from_table` builds the same from a pyarrow Table without Ray.

Output of `DeviceDecodeAugment` (all on `device`, kept rows only, in input order): the layout of
`rtrain.data.batches.collate`: images uint8 [B, 3, S, S]; boxes float32 [B, M, 4] input px (0 where
padded); labels int64 [B, M] (-1 where padded); iscrowd bool [B, M]; image_id int64 [B]; scale
float32 [B]; pad float32 [B, 2] (left, top), `input = stored * scale + pad` (exact in val mode);
stored_size, orig_size int64 [B, 2] (width, height). M >= 1.

A JPEG that does not decode is dropped, counted in `.skipped` and logged with its image_id and
file_name; the batch goes on. Ray is optional: without it `RawCollate` is a plain callable.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from rtrain.data.augment import AugmentParams
from rtrain.data.augment_tensor import TensorAugmenter, to_device_async
from rtrain.data.close_mosaic import mosaic_on
from rtrain.data.target_checks import clean_targets

log = logging.getLogger(__name__)

try:  # Ray is optional here: the GPU benchmark machine and plain-PyTorch users have none
    from ray.data.collate_fn import NumpyBatchCollateFn as _CollateBase
except ImportError:
    _CollateBase = object

RAW_COLUMNS = (
    "image_id", "file_name", "jpeg", "width", "height", "orig_width", "orig_height",
    "boxes", "labels", "iscrowd",
)
_DECODE_ERRORS = (RuntimeError, ValueError)  # what torchvision raises for bad or truncated data


def decode_jpegs(
    jpegs: list[torch.Tensor], device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[int], int]:
    """Decode uint8 1-D JPEG tensors to uint8 [3, H, W] RGB on `device` (grayscale/CMYK -> RGB).

    One batched call (nvJPEG on CUDA); when it raises, each image is decoded alone so only the
    undecodable ones are lost. Returns (images, indices of the decoded inputs, number skipped).
    """
    device = torch.device(device)
    if not jpegs:
        return [], [], 0
    try:
        images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
        return list(images), list(range(len(jpegs))), 0
    except _DECODE_ERRORS:
        pass
    images, kept = [], []
    for i, data in enumerate(jpegs):
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except _DECODE_ERRORS:
            continue
        kept.append(i)
    return images, kept, len(jpegs) - len(kept)


def _bytes_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).to(torch.uint8)
    return torch.from_numpy(np.frombuffer(data, np.uint8).copy())  # writable; empty bytes allowed


def raw_collate(batch: dict[str, np.ndarray], num_classes: int | None = None) -> dict:
    """Numpy batch of raw shard rows -> the raw batch of the module doc (CPU tensors and lists).

    Poisoned targets (non-finite, outside the stored image, label outside 0..C-1 when
    `num_classes` is given) are dropped here and counted per row in `dropped_targets`.
    """
    n = len(batch["image_id"])
    boxes, labels, crowd, dropped = [], [], [], []
    for i in range(n):
        b, lab, c, d = clean_targets(batch["boxes"][i], batch["labels"][i], batch["iscrowd"][i],
                                     float(batch["width"][i]), float(batch["height"][i]), num_classes)
        if d:
            log.warning("image_id %s (%s): %d box(es) with non-finite coordinates, outside the image or "
                        "with a label outside 0..C-1 dropped", batch["image_id"][i], batch["file_name"][i], d)
        boxes.append(torch.from_numpy(b))
        labels.append(torch.from_numpy(lab))
        crowd.append(torch.from_numpy(c))
        dropped.append(d)
    out = {
        "image_id": torch.tensor(np.asarray(batch["image_id"], np.int64).reshape(n)),
        "file_name": [str(x) for x in batch["file_name"]],
        "jpeg": [_bytes_tensor(x) for x in batch["jpeg"]],
        "boxes": boxes,
        "labels": labels,
        "iscrowd": crowd,
        "dropped_targets": torch.tensor(dropped, dtype=torch.int64),
    }
    for name in ("width", "height", "orig_width", "orig_height"):
        out[name] = torch.tensor(np.asarray(batch[name], np.int64).reshape(n))
    if "epoch" in batch:
        out["epoch"] = torch.tensor(np.asarray(batch["epoch"], np.int64).reshape(n))
    return out


class RawCollate(_CollateBase):
    """`collate_fn` for `iter_torch_batches` over raw shard rows: see `raw_collate`."""

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        return raw_collate(batch, self.num_classes)


def numpy_batch_from_table(table) -> dict[str, np.ndarray]:
    """pyarrow Table of shard rows -> Ray's numpy batch format (scalars as arrays, binaries and
    lists as object arrays of bytes / 1-D arrays), for running this path without Ray."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        col, t = table.column(name), table.schema.field(name).type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            arr = col.combine_chunks()
            values, offsets = arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy()
            ragged = np.empty(len(arr), dtype=object)
            for i in range(len(arr)):
                ragged[i] = values[offsets[i] : offsets[i + 1]]
            out[name] = ragged
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t):
            out[name] = np.asarray(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy()
    return out


class DeviceDecodeAugment:
    """Raw batch -> collated batch on `device`: decode_jpegs, then TensorAugmenter (module doc).

    `epoch` given to the call wins; None takes the rows' `epoch` column (which must agree).
    `skipped` counts the rows dropped for undecodable JPEGs over the instance's life.
    `no_mosaic_from`: batches of epochs >= this one are augmented without mosaic
    (`rtrain.data.close_mosaic`): None = never, an int, or the train loop's `CloseMosaic`, read per batch.
    `rect` (val only): each call's images share one `rtrain.data.augment.rect_canvas` canvas.
    """

    def __init__(
        self, img_size: int, train: bool, params: AugmentParams | None = None, seed: int = 0,
        no_mosaic_from=None, rect: bool = False,
    ) -> None:
        params = params or AugmentParams()
        self.augmenter = TensorAugmenter(img_size, train, params, seed, rect=rect)
        self.plain = TensorAugmenter(img_size, train, replace(params, mosaic=0.0), seed, rect=rect)
        self.no_mosaic_from = no_mosaic_from
        self.skipped = 0

    @staticmethod
    def _epoch(raw: dict, epoch: int | None) -> int:
        if epoch is not None:
            return int(epoch)
        col = raw.get("epoch")
        if col is None or len(col) == 0:
            return 0
        values = torch.unique(torch.as_tensor(col))
        if len(values) != 1:
            raise ValueError(f"rows of one batch carry different epochs: {values.tolist()}")
        return int(values[0])

    def __call__(self, raw: dict, epoch: int | None = None, device: torch.device | str = "cpu") -> dict:
        device = torch.device(device)
        epoch = self._epoch(raw, epoch)
        images, kept, skipped = decode_jpegs(raw["jpeg"], device)
        if skipped:
            self.skipped += skipped
            bad = sorted(set(range(len(raw["jpeg"]))) - set(kept))
            for i in bad:
                log.warning(
                    "image_id %s (%s): undecodable JPEG skipped", int(raw["image_id"][i]), raw["file_name"][i]
                )
        pick = torch.tensor(kept, dtype=torch.int64)
        image_ids = raw["image_id"][pick]
        augmenter = self.augmenter if mosaic_on(epoch, self.no_mosaic_from) else self.plain
        out = augmenter(
            images,
            [raw["boxes"][i] for i in kept],
            [raw["labels"][i] for i in kept],
            [raw["iscrowd"][i] for i in kept],
            image_ids.tolist(),
            epoch,
        )
        if not images:  # keep an empty batch on the requested device too
            out = {k: v.to(device) for k, v in out.items()}
        stored = torch.stack([raw["width"][pick], raw["height"][pick]], 1)
        orig = torch.stack([raw["orig_width"][pick], raw["orig_height"][pick]], 1)
        out["image_id"] = to_device_async(image_ids, device)
        out["stored_size"] = to_device_async(stored, device)
        out["orig_size"] = to_device_async(orig, device)
        if "dropped_targets" in raw:  # stays on the CPU: the loop sums it without a device sync
            out["dropped_targets"] = raw["dropped_targets"][pick]
        return out
