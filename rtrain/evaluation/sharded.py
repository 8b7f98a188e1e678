"""Validation during training: every rank scores its share of the val rows, rank 0 scores them all.

    metrics = validate_sharded(ema.module, cfg, coco_gt, category_ids, class_names,
                               device=device, rank=rank, world=world)   # a collective: all ranks

Rank r takes the val rows whose index (over the sorted shards) is r modulo the world size, or,
with `eval.rect` (the default), the batches whose index is r modulo the world size after all val
rows are sorted by aspect ratio (height / width, stable) and cut into batches of `eval.batch_size`
(as Ultralytics' `rect` does): each batch is letterboxed into its own canvas
(`rtrain.data.augment.rect_canvas`: longer side data.img_size as in square mode, the batch's largest
resized height and width rounded up to 32), so a batch of 16:9 images at 416 is 256 x 416 instead
of 416 x 416. The batches depend only on the val set, not on the world size, so every image sees
the same canvas however many ranks share the work. Rect mode reads the width/height columns of
every shard first and holds this rank's rows (JPEG bytes: its 1/world of the val set) in memory;
square mode holds one shard at a time. Each rank decodes and letterboxes its rows (a thread pool
on CPU: PIL's decode and resize release the GIL; `torchvision.io` + tensor ops on the worker's
GPU), predicts with the given model, and maps the detections to original pixels and source
category ids (`rtrain.evaluation.coco.to_coco_results`). The result lists are gathered on rank 0, which
runs pycocotools and returns the metrics (`rtrain.evaluation.coco.coco_evaluate`'s dict plus
eval_images, eval_detections, eval_time_s); other ranks return None.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist


def _rows_of_rank(shard_dir: str | Path, rank: int, world: int, batch_size: int) -> Iterator[pa.Table]:
    """Chunks of up to `batch_size` raw val rows of this rank, in shard order."""
    from rtrain.data.batches import READ_COLUMNS, list_shards, read_manifest, read_shard_table

    read_manifest(shard_dir)
    offset, pending = 0, []
    for path in list_shards(shard_dir):
        table = read_shard_table(path, columns=READ_COLUMNS)
        mine = np.nonzero((offset + np.arange(table.num_rows)) % world == rank)[0]
        offset += table.num_rows
        if len(mine):
            pending.append(table.take(pa.array(mine)))
        table = pa.concat_tables(pending, promote_options="permissive") if pending else None
        pending = []
        if table is None:
            continue
        full = table.num_rows - table.num_rows % batch_size
        for start in range(0, full, batch_size):
            yield table.slice(start, batch_size)
        if full < table.num_rows:
            pending = [table.slice(full)]
    if pending:
        yield pending[0]


def _rect_rows_of_rank(shard_dir: str | Path, rank: int, world: int, batch_size: int) -> Iterator[pa.Table]:
    """This rank's batches of raw val rows in rect mode (module doc): all rows sorted by
    height / width, cut into batches of `batch_size`, batch b going to rank b % world."""
    from rtrain.data.batches import READ_COLUMNS, list_shards, read_manifest, read_shard_table

    read_manifest(shard_dir)
    paths = list_shards(shard_dir)
    sizes = [read_shard_table(p, columns=["width", "height"]) for p in paths]
    if not sizes:
        return
    width = np.concatenate([t.column("width").to_numpy() for t in sizes]).astype(np.float64)
    height = np.concatenate([t.column("height").to_numpy() for t in sizes]).astype(np.float64)
    order = np.argsort(height / np.maximum(width, 1.0), kind="stable")
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)][rank::world]
    if not groups:
        return
    mine = np.sort(np.concatenate(groups))
    parts, offset = [], 0
    for path, t in zip(paths, sizes, strict=True):
        local = mine[(mine >= offset) & (mine < offset + t.num_rows)] - offset
        if len(local):
            parts.append(read_shard_table(path, columns=READ_COLUMNS).take(pa.array(local)))
        offset += t.num_rows
    table = pa.concat_tables(parts, promote_options="permissive")
    for group in groups:
        yield table.take(pa.array(np.searchsorted(mine, group)))


def default_threads(world: int) -> int:
    return max(1, min(8, (os.cpu_count() or 2) // max(1, world)))


def val_batches(
    shard_dir: str | Path,
    *,
    batch_size: int,
    img_size: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    rect: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's letterboxed val batches (the `rtrain.data.batches.collate` layout), in order.

    rect=False: rows r::world in shard order, img_size x img_size. rect=True: the aspect-sorted
    batches b::world (module doc), each in its own rectangular canvas.

    On a CUDA device the JPEGs are decoded there (`rtrain.data.device_decode`); otherwise by a pool of
    `threads` threads (default: the cores shared among the ranks, at most 8), a few batches ahead.
    """
    from rtrain.data.batches import DecodeAugment, _column_numpy, collate

    device = torch.device(device)
    chunks = (_rect_rows_of_rank if rect else _rows_of_rank)(shard_dir, rank, world, batch_size)
    if device.type == "cuda":
        from rtrain.data.augment import AugmentParams
        from rtrain.data.device_decode import DeviceDecodeAugment, RawCollate

        raw = RawCollate()
        decoder = DeviceDecodeAugment(img_size=img_size, train=False, params=AugmentParams(), rect=rect)
        for chunk in chunks:
            batch = decoder(raw({c: _column_numpy(chunk.column(c)) for c in chunk.column_names}), 0, device)
            if len(batch["image_id"]):
                yield batch
        return

    def decode(chunk: pa.Table):
        fn = DecodeAugment(train=False, img_size=img_size, rect=rect)
        out = fn({c: _column_numpy(chunk.column(c)) for c in chunk.column_names})
        return collate(out) if len(out["image_id"]) else None

    workers = threads or default_threads(world)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rtrain-val") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(decode, chunk))
            if len(pending) > 2 * workers:
                batch = pending.popleft().result()
                if batch is not None:
                    yield batch
        while pending:
            batch = pending.popleft().result()
            if batch is not None:
                yield batch


def _gather(part: tuple[list[dict], int], world: int) -> list[tuple[list[dict], int]]:
    """Every rank's (results, images) on every rank: one collective."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [part]
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return parts


def validate_sharded(
    model: torch.nn.Module,
    cfg,
    coco_gt,
    category_ids: list[int],
    class_names: list[str],
    *,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
) -> dict | None:
    """See the module doc. `cfg` is an `rtrain.config.Config` (data.val, data.img_size, eval.*)."""
    from rtrain.evaluation.coco import coco_evaluate
    from rtrain.evaluation.predict_loop import coco_results

    start = time.perf_counter()
    batches = val_batches(cfg.data.val, batch_size=cfg.eval.batch_size, img_size=cfg.data.img_size,
                          rank=rank, world=world, device=device, rect=cfg.eval.rect)
    mine = coco_results(model, batches, category_ids, device=device, score_thresh=cfg.eval.score_thresh,
                        iou_thresh=cfg.eval.iou_thresh, max_det=cfg.eval.max_det, amp=cfg.train.amp)
    parts = _gather(mine, world)
    if rank != 0:
        return None
    # In image order (each image's detections kept in their order): pycocotools breaks score ties
    # by input order, so the mAP then does not depend on how many ranks shared the work.
    results = sorted((r for part, _ in parts for r in part), key=lambda r: r["image_id"])
    metrics = dict(coco_evaluate(coco_gt, results, class_names))
    metrics.update(eval_images=sum(n for _, n in parts), eval_detections=len(results),
                   eval_time_s=time.perf_counter() - start)
    return metrics
