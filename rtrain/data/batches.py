"""Training data path: Parquet shards -> decode + augment -> fixed-size batches of tensors.

    files = list_shards(shard_dir)                       # checks every shard's footer and schema
    ds = build_dataset(shard_dir, train=True, img_size=320, aug=AugmentParams(), epoch=clock)
    for batch in ds.iter_torch_batches(batch_size=16, collate_fn=DetectionCollate(),
                                       local_shuffle_buffer_size=64):
        images = batch["images"].float().div_(255)        # uint8 [B, 3, S, S] -> float on device
        targets = batch_to_targets(batch, device)        # list of {boxes, labels, iscrowd}

The rows `DecodeAugment` makes (one per image) are described in `rtrain.data.decode_augment`,
which holds the decode step and the EpochClock without torch (Ray's data processes import it).

Training reads these rows through `rtrain.data.epoch_stream` (one Ray Data execution over all
epochs; each row carries its `epoch`, which seeds its augmentation). `build_dataset` is the
one-pass dataset for validation, inference and tests: its `epoch` is an int or an EpochClock
actor (`make_epoch_clock()`, `set_epoch(clock, e)`) read once per decode batch, so the
augmentation of image i in epoch e depends only on (seed, e, i) whatever the task or worker
(mosaic partners come from the same batch; see `rtrain.data.augment.Augmenter`).

Compute (this one-pass dataset; the train stream of `rtrain.data.epoch_stream` always uses an
actor pool, which lives as long as its one execution): decode/augment runs as Ray tasks
(`pool="tasks"`, default; at most `num_actors` at a time, `cpus_per_actor` each) on worker
processes Ray reuses across executions. An actor pool (`pool="actors"`) is re-created by Ray
Data for every execution and pays process start + imports each time. Shards are read with Ray's
V1 Parquet reader (2.60's V2 reader runs a slow ListFiles step every execution). Blocks are cut
to `batch_rows` rows so every task gets work.

Resources (2-core machines): Ray Data's read step asks for a whole CPU and Ray Train takes its
workers' CPUs out of Ray Data's budget, so 2 Train workers on `ray.init(num_cpus=2)` deadlock.
Start Ray with more logical CPUs than cores (`ray.init(num_cpus=4)`, as the tests'
`ray_session` fixture and the fit CLI on small machines do). Without Ray,
`iter_batches_local` runs the same decode/augment/collate in-process.

A box with non-finite coordinates, outside its image or (given `num_classes`) with a label
outside 0..C-1 is dropped at decode (`rtrain.data.target_checks`); each row counts its drops in
`dropped_targets`, which the collate passes on per image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

# The shard format (schema, manifest reader, ShardError) lives in data_prep.shard_format, shared with
# the writer; re-exported here under the names rtrain has always used.
from data_prep.shard_format import (  # noqa: F401
    MANIFEST,
    SCHEMA,
    SHARD_GLOB,
    ShardError,
    check_schema,
    read_manifest,
    read_shard_metadata,
    read_shard_table,
    shard_files,
)
from rtrain import storage
from rtrain.data.augment import AugmentParams
from rtrain.data.decode_augment import (  # noqa: F401  (the names rtrain has always imported from here)
    DecodeAugment,
    EpochClock,
    _ragged,
    make_epoch_clock,
    set_epoch,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- shards and manifest


def list_shards(shard_dir: str | Path) -> list[str]:
    """Sorted shard paths of `shard_dir` (URIs for a bucket), after reading every shard's footer and
    schema (cheap).

    Raises ShardError naming the file: missing dir, no shards, truncated/corrupt Parquet, wrong
    schema. Hidden files (writers' temp names) are ignored.
    """
    files = shard_files(shard_dir)
    for path in files:
        try:
            meta = read_shard_metadata(path)
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{path}: unreadable Parquet (truncated?): {str(e).splitlines()[0]}") from None
        check_schema(meta.schema.to_arrow_schema(), path)
    return files


def parquet_source(files: list[str]) -> tuple[list[str], object | None]:
    """(paths, filesystem) for pyarrow and `ray.data.read_parquet` from `list_shards`' files: local
    paths and None, or the paths inside the bucket and its pyarrow filesystem (rtrain.storage)."""
    if not files or not storage.is_bucket(files[0]):
        return list(files), None
    fs = storage.filesystem(files[0])[0]
    return [storage.filesystem(f)[1] for f in files], fs


def num_classes(shard_dir: str | Path) -> int:
    return len(read_manifest(shard_dir)["classes"])


# ---------------------------------------------------------------- collate


class DetectionCollate(NumpyBatchCollateFn):
    """Numpy batch of DecodeAugment rows -> dict of tensors, boxes padded to the batch's max M.

    images uint8 [B, 3, S, S]; boxes float32 [B, M, 4] xyxy input px (0 where padded);
    labels int64 [B, M] (-1 where padded); iscrowd bool [B, M]; image_id int64 [B];
    scale float32 [B]; pad float32 [B, 2] (left, top); orig_size, stored_size int64 [B, 2]
    (width, height); dropped_targets int64 [B] (boxes the decode step dropped). M >= 1 so
    reductions over the box axis never see an empty dimension.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch)


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """See DetectionCollate."""
    images = np.asarray(batch["image"])
    if images.ndim != 4:  # a ragged-looking object column of equal-shaped images
        images = np.stack(list(images))
    b = images.shape[0]
    labels_in = [np.asarray(x, np.int64).reshape(-1) for x in batch["labels"]]
    m = max([1] + [len(x) for x in labels_in])
    boxes = np.zeros((b, m, 4), np.float32)
    labels = np.full((b, m), -1, np.int64)
    iscrowd = np.zeros((b, m), bool)
    for i in range(b):
        k = len(labels_in[i])
        boxes[i, :k] = np.asarray(batch["boxes"][i], np.float32).reshape(-1, 4)
        labels[i, :k] = labels_in[i]
        iscrowd[i, :k] = np.asarray(batch["iscrowd"][i], bool).reshape(-1)
    return {
        "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        "boxes": torch.from_numpy(boxes),
        "labels": torch.from_numpy(labels),
        "iscrowd": torch.from_numpy(iscrowd),
        "image_id": torch.tensor(
            np.asarray(batch["image_id"], np.int64)
        ),  # copies: Ray's arrays are read-only
        "scale": torch.tensor(np.asarray(batch["scale"], np.float32)),
        "pad": torch.as_tensor(np.stack([np.asarray(p, np.float32) for p in batch["pad"]]).reshape(b, 2)),
        "orig_size": torch.as_tensor(
            np.stack([np.asarray(p, np.int64) for p in batch["orig_size"]]).reshape(b, 2)
        ),
        "stored_size": torch.as_tensor(
            np.stack([np.asarray(p, np.int64) for p in batch["stored_size"]]).reshape(b, 2)
        ),
        # boxes dropped from each image at decode (rtrain.data.target_checks); absent means none
        "dropped_targets": torch.as_tensor(np.asarray(batch.get("dropped_targets", np.zeros(b)), np.int64)),
    }


def batch_to_targets(batch: dict[str, torch.Tensor], device=None) -> list[dict[str, torch.Tensor]]:
    """Unpadded per-image targets: [{boxes float32 [M, 4] xyxy input px, labels int64 [M],
    iscrowd bool [M]}], on `device`."""
    out = []
    for boxes, labels, crowd in zip(batch["boxes"], batch["labels"], batch["iscrowd"], strict=True):
        keep = labels >= 0
        out.append(
            {
                "boxes": boxes[keep].to(device),
                "labels": labels[keep].to(device),
                "iscrowd": crowd[keep].to(device),
            }
        )
    return out


def boxes_to_original(boxes: torch.Tensor, scale, pad, stored_size, orig_size) -> torch.Tensor:
    """Map boxes [..., 4] xyxy from input (letterboxed) px of one image back to original px:
    stored = (input - pad) / scale, then x * orig_w / stored_w, y * orig_h / stored_h."""
    pad = torch.as_tensor(pad, dtype=boxes.dtype, device=boxes.device).reshape(2).repeat(2)
    ratio = (
        torch.as_tensor(orig_size, dtype=boxes.dtype, device=boxes.device).reshape(2)
        / torch.as_tensor(stored_size, dtype=boxes.dtype, device=boxes.device).reshape(2)
    ).repeat(2)
    return (boxes - pad) / float(scale) * ratio


# ---------------------------------------------------------------- datasets


READ_COLUMNS = list(SCHEMA.names)


def build_dataset(
    shard_dir: str | Path,
    *,
    train: bool,
    img_size: int,
    aug: AugmentParams | None = None,
    seed: int = 0,
    epoch=0,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    batch_rows: int = 16,
    shuffle_files: bool | None = None,
    pool: str = "tasks",
):
    """ray.data.Dataset of DecodeAugment rows (module doc) from the shards of `shard_dir`.

    Checks the manifest and every shard first (ShardError). `epoch`: int or EpochClock handle.
    `batch_rows`: rows per decode call (also the pool mosaic partners come from).
    `shuffle_files` (default: = train) shuffles the file order each execution.
    `pool`: "tasks" (default) runs decode/augment as up to `num_actors` concurrent Ray tasks on
    reused worker processes; "actors" uses an ActorPoolStrategy of `num_actors` DecodeAugment
    actors, which Ray Data starts afresh for every execution, i.e. every epoch (seconds of
    process start + imports each epoch on a small machine; see benchmarks/data_speed.py).
    """
    import ray

    read_manifest(shard_dir)
    files = list_shards(shard_dir)
    shuffle = train if shuffle_files is None else shuffle_files
    ctx = ray.data.DataContext.get_current()
    v2 = ctx.use_datasource_v2
    # Ray 2.60's V2 Parquet reader runs a ListFiles task every epoch that took 35-45 s of wall time
    # (0.2 s CPU) here, against 2-5 s for a whole epoch read with V1: read with V1.
    ctx.use_datasource_v2 = False
    try:
        paths, fs = parquet_source(files)
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle="files" if shuffle else None)
    finally:
        ctx.use_datasource_v2 = v2
    ds = ds.select_columns(READ_COLUMNS)
    # The reader merges small shards into one block, and an actor pool works one block per actor:
    # cut blocks to batch_rows (a streaming op, no all-to-all) so every actor gets work.
    ds = ds.repartition(target_num_rows_per_block=batch_rows)
    kwargs = {"train": train, "img_size": img_size, "aug": aug, "seed": seed, "epoch": epoch}
    if pool == "actors":
        fn, how = DecodeAugment, {"fn_constructor_kwargs": kwargs,
                                  "compute": ray.data.ActorPoolStrategy(size=num_actors)}
    elif pool == "tasks":
        fn, how = decode_augment_batch, {"fn_kwargs": kwargs,
                                         "compute": ray.data.TaskPoolStrategy(size=num_actors)}
    else:
        raise ValueError(f"pool must be 'tasks' or 'actors', got {pool!r}")
    return ds.map_batches(fn, batch_size=batch_rows, batch_format="numpy", num_cpus=cpus_per_actor, **how)


_FN_CACHE: dict[tuple, DecodeAugment] = {}


def decode_augment_batch(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    """Task form of DecodeAugment (same arguments); reuses one instance per worker process."""
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    fn = _FN_CACHE.get(key)
    if fn is None:
        fn = _FN_CACHE[key] = DecodeAugment(**kwargs)
    return fn(batch)


def iter_batches_local(
    shard_dir: str | Path,
    *,
    batch_size: int,
    train: bool,
    img_size: int,
    aug: AugmentParams | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """In-process twin of build_dataset + DetectionCollate (pyarrow, no Ray): yields collated
    batches. `shuffle` permutes the files and the rows within each file with a generator seeded by
    (seed, epoch); one shard is held in memory at a time."""
    read_manifest(shard_dir)
    files = list_shards(shard_dir)
    fn = DecodeAugment(train=train, img_size=img_size, aug=aug, seed=seed, epoch=epoch)
    rng = np.random.default_rng([seed % 2**63, epoch % 2**63])
    if shuffle:  # files in random order, rows shuffled within each file: one shard in memory at a time
        files = [files[k] for k in rng.permutation(len(files))]
    pending: list[pa.Table] = []  # rows carried over to the next file so batches stay full
    for path in files:
        table = read_shard_table(path, columns=READ_COLUMNS)
        if shuffle:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        pending.append(table)
        table = pa.concat_tables(pending, promote_options="permissive")
        full = table.num_rows - table.num_rows % batch_size
        for start in range(0, full, batch_size):
            yield from _local_batch(fn, table.slice(start, batch_size))
        pending = [table.slice(full)] if full < table.num_rows else []
    if pending and not drop_last:
        yield from _local_batch(fn, pending[0])


def _local_batch(fn: DecodeAugment, chunk: pa.Table) -> Iterator[dict[str, torch.Tensor]]:
    out = fn({name: _column_numpy(chunk.column(name)) for name in READ_COLUMNS})
    if len(out["image_id"]):
        yield collate(out)


def _column_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """Like Ray's numpy batches: scalars as arrays, binaries and lists as object arrays."""
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        arr = col.combine_chunks()
        values, offsets = arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy()
        return _ragged([values[offsets[i] : offsets[i + 1]] for i in range(len(arr))], None)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t):
        return np.asarray(col.to_pylist(), dtype=object)
    return col.to_numpy()
