"""The training stream: one Ray Data execution that yields every epoch, shuffled before decode.

    plan = StreamPlan.from_shards(shard_dir, batch_rows=16, world_size=2, seed=0, window_rows=4096)
    ds = build_train_stream(plan, epochs=30, clock=clock, decode_fn=..., ...)   # see below
    set_start_epoch(clock, start_epoch)            # every worker, before its first batch
    it = iter(shard.iter_torch_batches(batch_size=16, ...))   # ONE iterator for the whole run
    for epoch in ...: train on itertools.islice(it, plan.steps_per_epoch)

Why one execution: Ray Data restarts a dataset's pipeline (read, schedule, first decode) every
time it is iterated. Iterating a dataset that already holds all epochs keeps the decode actors
busy while the loop evaluates and checkpoints, so the next epoch's first batch is ready.

Order (a pure function of the shards, `seed` and the epoch; `plan_epoch`):
- epoch e permutes the shard files with `default_rng([seed, e])`, concatenates their rows and
  keeps the first `rows_per_epoch` (a multiple of `epoch_unit` = batch_rows x world_size, or for
  an elastic group of min_world_size..world_size workers batch_rows x the lcm of those sizes, so
  that every size the group may have splits each epoch into whole blocks per worker; a dataset
  smaller than one unit is repeated to fill it);
- those rows are cut into windows of `window_rows` rows (a multiple of batch_rows), and each
  window is shuffled with `default_rng([seed, e, w])`. A window is the unit one read task
  holds in memory: for datasets smaller than a window the shuffle is global;
- a window is emitted as blocks of exactly `batch_rows` compact rows (JPEG bytes, boxes,
  labels, plus an `epoch` int64 column), so decode actors see random neighbours (mosaic
  partners) every epoch, and under `preserve_order` Ray's OutputSplitter hands block k to
  worker k mod world: worker r's rows in epoch e are the same in every run and restart.

Shards may be local or in a bucket (`data.train: s3://BUCKET/shards/train`): the plan holds
their paths or URIs, and each read task opens them through `rtrain.storage`'s filesystem, with
the AWS/GCS settings of its own environment (Ray workers inherit the driver's on a local
cluster; on a real one set them on every node).

Resume: the stream always starts at epoch 0; a read task skips (reads nothing for) the epochs
before the EpochClock's start epoch, which the workers set before they iterate. A resume
inside epoch e (a mid-epoch or preemption checkpoint after k steps of it, `rtrain.training.preempt`)
also skips the first `skip_blocks` = k x batch x world / batch_rows blocks of epoch e
(`set_start_epoch(clock, e, skip_blocks)`; a whole number, since such checkpoints are taken only
where a worker's k batches end on a block edge). Under `preserve_order` block j of the epoch
goes to worker j mod world, so the rest of epoch e brings every worker exactly the batches
the uninterrupted run trained on; without it the same remaining rows arrive, dealt to the
workers in whichever order Ray hands blocks out.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.shard_format import read_shard_table
from rtrain.data import executor_idle

# The process that executes the stream (a Train run's SplitCoordinator) imports this module when
# it unpickles the stream's read function, after Ray Data: its executor then waits when idle
# instead of spinning (rtrain.data.executor_idle). The driver installs it in build_train_stream.
if "ray.data" in sys.modules:
    executor_idle.install()

log = logging.getLogger(__name__)

# Compact columns a decode step needs (the shard schema, rtrain.data.batches.SCHEMA), plus the epoch.
EPOCH_COLUMN = "epoch"


@dataclass(frozen=True)
class StreamPlan:
    """What every read task needs to place epoch e's rows (plain data: it travels to tasks)."""

    files: tuple[str, ...]
    row_counts: tuple[int, ...]
    columns: tuple[str, ...]
    batch_rows: int
    world_size: int  # the most workers that read the stream (an elastic group's MAX)
    seed: int
    window_rows: int
    min_world_size: int = 0  # an elastic group's MIN (0: the group is always world_size)

    @classmethod
    def from_shards(
        cls, shard_dir: str | Path, *, batch_rows: int, world_size: int, seed: int, window_rows: int = 4096,
        min_world_size: int = 0,
    ) -> StreamPlan:
        from rtrain.data.batches import READ_COLUMNS, list_shards, read_manifest, read_shard_metadata

        read_manifest(shard_dir)
        files = list_shards(shard_dir)  # local paths or bucket URIs (rtrain.storage)
        counts = [read_shard_metadata(f).num_rows for f in files]
        if sum(counts) == 0:
            from rtrain.data.batches import ShardError

            raise ShardError(f"{shard_dir}: the shards hold no rows")
        return cls(tuple(files), tuple(counts), tuple(READ_COLUMNS), int(batch_rows), int(world_size),
                   int(seed), int(window_rows), int(min_world_size))

    @property
    def num_rows(self) -> int:
        return sum(self.row_counts)

    @property
    def world_sizes(self) -> range:
        """The group sizes the stream is cut for."""
        return range(self.min_world_size or self.world_size, self.world_size + 1)

    @property
    def epoch_unit(self) -> int:
        """`rows_per_epoch` is a multiple of this: whole blocks for every worker at every size in
        `world_sizes` (batch_rows x world_size for a fixed group)."""
        return self.batch_rows * math.lcm(*self.world_sizes)

    @property
    def rows_per_epoch(self) -> int:
        """Rows each epoch emits: whole units (at least one)."""
        return max(1, self.num_rows // self.epoch_unit) * self.epoch_unit

    @property
    def steps_per_epoch(self) -> int:
        """Blocks of `batch_rows` each worker takes per epoch at `world_size` workers."""
        return self.rows_per_epoch // (self.batch_rows * self.world_size)

    @property
    def rows_per_window(self) -> int:
        return max(1, self.window_rows // self.batch_rows) * self.batch_rows

    @property
    def windows_per_epoch(self) -> int:
        return math.ceil(self.rows_per_epoch / self.rows_per_window)


def _seed(*parts: int) -> list[int]:
    return [int(p) % 2**63 for p in parts]


def plan_epoch(plan: StreamPlan, epoch: int) -> list[list[tuple[int, int, int]]]:
    """Epoch `epoch`'s windows: each a list of (file index, start row, stop row) spans, in order."""
    order = np.random.default_rng(_seed(plan.seed, epoch)).permutation(len(plan.files))
    spans: list[tuple[int, int, int]] = []
    need = plan.rows_per_epoch
    while need > 0:  # more than once only when the dataset is smaller than one global batch
        for f in order:
            take = min(plan.row_counts[f], need)
            if take:
                spans.append((int(f), 0, take))
                need -= take
            if need == 0:
                break
    windows, current, filled = [], [], 0
    for f, start, stop in spans:
        while start < stop:
            take = min(stop - start, plan.rows_per_window - filled)
            current.append((f, start, start + take))
            start += take
            filled += take
            if filled == plan.rows_per_window:
                windows.append(current)
                current, filled = [], 0
    if current:
        windows.append(current)
    return windows


class _TableCache:
    """The last shard read by this process: neighbouring windows often share an edge file."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.table: pa.Table | None = None

    def get(self, path: str, columns: tuple[str, ...]) -> pa.Table:
        if path != self.path:
            self.table = read_shard_table(path, columns=list(columns))
            self.path = path
        return self.table


_CACHE = _TableCache()


def read_window(plan: StreamPlan, epoch: int, window: int) -> pa.Table:
    """Window `window` of epoch `epoch`: its compact rows, shuffled, with an `epoch` column."""
    spans = plan_epoch(plan, epoch)[window]
    parts = [_CACHE.get(plan.files[f], plan.columns).slice(start, stop - start) for f, start, stop in spans]
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    perm = np.random.default_rng(_seed(plan.seed, epoch, window)).permutation(table.num_rows)
    table = table.take(pa.array(perm))
    return table.append_column(EPOCH_COLUMN, pa.array(np.full(table.num_rows, epoch, np.int64)))


def emit_items(batch: dict[str, np.ndarray], *, plan: StreamPlan, clock=None):
    """map_batches UDF over item ids (epoch * windows_per_epoch + window): yields the blocks of
    `batch_rows` compact rows of every window at or after the clock's start point (module doc):
    the start epoch without its first `skip_blocks` blocks, then every later epoch whole.
    `clock`: an EpochClock handle, an int start epoch, an (epoch, skip_blocks) pair, or None."""
    per_epoch = plan.windows_per_epoch
    blocks_per_window = plan.rows_per_window // plan.batch_rows
    for item in np.asarray(batch["id"]).tolist():
        epoch, window = divmod(int(item), per_epoch)
        # Asked per window: the clock dies with the run that made it, and then this raises, which
        # ends a stream whose consumers are gone (e.g. a Tune trial that ASHA stopped) instead of
        # letting it decode on until the object store budget is full.
        start, skip = _start_point(clock)
        if epoch < start:
            continue
        first = window * blocks_per_window  # this window's first block within the epoch
        if epoch == start and first + blocks_per_window <= skip:
            continue  # trained before the checkpoint: not even read
        table = read_window(plan, epoch, window)
        for j, offset in enumerate(range(0, table.num_rows, plan.batch_rows)):
            if epoch == start and first + j < skip:
                continue
            yield table.slice(offset, plan.batch_rows)


def _start_point(clock) -> tuple[int, int]:
    if clock is None or isinstance(clock, int | np.integer):
        return int(clock or 0), 0
    if isinstance(clock, tuple | list):
        return int(clock[0]), int(clock[1])
    import ray

    epoch, skip = ray.get(clock.get_start.remote())
    return int(epoch), int(skip)


def resume_skip_blocks(steps_done: int, batch_size: int, world_size: int, batch_rows: int) -> int:
    """Blocks of an epoch that `steps_done` steps of `batch_size` per worker on `world_size`
    workers consumed. ValueError unless they end on a block edge (see `pause_every`)."""
    rows = int(steps_done) * int(batch_size)
    if rows % int(batch_rows):
        raise ValueError(f"{steps_done} steps of {batch_size} rows do not end on a block of "
                         f"{batch_rows} rows")
    return rows // int(batch_rows) * int(world_size)


def pause_every(batch_size: int, batch_rows: int) -> int:
    """Steps between the points where a worker's batches end on a stream block edge: the only
    steps inside an epoch a checkpoint can be resumed from exactly."""
    return math.lcm(int(batch_size), int(batch_rows)) // int(batch_size)


def set_start_epoch(clock, epoch: int, skip_blocks: int = 0) -> None:
    """Before the first batch of a (re)started run: the stream skips the epochs before `epoch` and
    the first `skip_blocks` blocks of `epoch`. Every worker may call it (idempotent)."""
    import ray

    ray.get(clock.set_start.remote(epoch, skip_blocks))


def build_train_stream(
    plan: StreamPlan,
    *,
    epochs: int,
    clock=None,
    decode_fn=None,
    decode_kwargs: dict | None = None,
    decode_actors: int = 1,
    cpus_per_actor: float = 1.0,
):
    """ray.data.Dataset of `epochs` epochs of the plan's rows (module doc).

    `decode_fn`: a callable class over numpy batches such as `rtrain.data.decode_augment.DecodeAugment`,
    built with `decode_kwargs` once per actor of a pool of `decode_actors` actors of
    `cpus_per_actor` CPUs, each called on blocks of `batch_rows` rows; None streams the compact
    rows as they are (decoding then happens in the train worker).
    Why actors: the stream is one execution for the whole run, so the pool starts once, and an
    actor runs block after block with no per-task scheduling; Ray tasks on 16-row blocks spent
    about as long being scheduled as decoding (benchmarks/data_speed.py).
    """
    import ray

    executor_idle.install()

    items = epochs * plan.windows_per_epoch
    ds = ray.data.range(items, override_num_blocks=max(1, min(epochs, 10_000)))
    # One execution lasts the whole run: its progress bars would print for hours into job logs.
    ds.context.enable_progress_bars = False
    # Range read, window read and the cut into batch blocks fuse into one operator; Ray Data
    # never fuses a repartition into the map after it, so decode still spreads over the actors.
    ds = ds.map_batches(emit_items, fn_kwargs={"plan": plan, "clock": clock}, batch_size=None,
                        batch_format="numpy")
    # Ray buffers a task's outputs into blocks of up to 128 MB: cut them back to batch_rows rows
    # (a streaming step) so decode spreads over the actors and the splitter deals whole batches.
    ds = ds.repartition(target_num_rows_per_block=plan.batch_rows)
    if decode_fn is None:
        return ds
    return ds.map_batches(
        decode_fn, fn_constructor_kwargs=decode_kwargs or {}, batch_size=plan.batch_rows,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, int(decode_actors))),
        num_cpus=cpus_per_actor,
    )
