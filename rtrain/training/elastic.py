"""Elastic runs: `run.workers` / `run.gpus` = "MIN:MAX", and what stays fixed when the group resizes.

Ray Train 2.60 (`ScalingConfig(num_workers=(MIN, MAX))`, read in its source): the controller asks
Ray's AutoscalingCoordinator for MAX workers' resources and starts the group with as many as the
cluster's nodes hold (at least MIN; below that it waits). A lost node kills its workers: that is a
worker-group failure (it counts against `run.max_failures`), and the group restarts, smaller, from
the latest checkpoint. While the group runs, every `run.resize_interval_s` Ray compares the
workers the cluster could hold now with the group's size; when they differ it stops the group and
starts one of the new size, again from the latest checkpoint (a resize is not a failure). The
coordinator refreshes its view of the nodes every 20 s, so a node that joins is seen after up to
that long plus the interval. Work since the last checkpoint is trained again after either
(`run.checkpoint_every_min` bounds it inside long epochs).

What stays fixed: the global batch, `train.batch_size` x MAX. At W workers each one trains on
`global / W` images per step (`per_worker_batch`), so the global batch, the LR scaled to it
(`rtrain.training.schedule.scale_lr`), the steps per epoch, the warm-up and the cosine schedule,
the EMA ramp, and every `step` in `metrics.jsonl` mean the same at any size: the loss curve and the
schedule do not jump at a resize. Why this and not the alternatives: re-scaling the LR with the
batch changes the steps per epoch, so the schedule (a function of the step) would have to be
rebuilt mid-run and curves taken at different sizes would not line up; gradient accumulation
keeps each worker's batch but needs MAX / W whole micro-steps, which fails for more sizes (2:4 at
3 workers). The cost: a worker at MIN holds MAX / MIN times `train.batch_size` (it must fit in
its memory), and the config must pick a `train.batch_size` whose global batch every size in
MIN..MAX divides (`rtrain.config` refuses others, naming a size that works). BatchNorm statistics
are per worker, so they see larger batches at fewer workers.

The stream (`rtrain.data.epoch_stream`) is cut for every size in MIN..MAX, and Ray Train splits it
for the group it actually starts. A mid-epoch checkpoint taken at one size continues at another
at the same step (`resume_skip`): the steps done consumed whole stream blocks at any pause point,
so the same blocks are skipped and the epoch keeps its step count. Each metrics row
records `world_size` and `global_batch`; a row is written once per epoch, whatever restarts.
"""

from __future__ import annotations

from rtrain.config import Config, worker_range


def global_batch(cfg: Config) -> int:
    """Images per optimizer step over all workers: `train.batch_size` x the most workers
    (an int batch; "auto" resolves on the workers and is refused for elastic runs)."""
    return int(cfg.train.batch_size) * worker_range(cfg.run)[1]


def per_worker_batch(cfg: Config, world: int) -> int:
    """Each of `world` workers' batch, so that the global batch stays `global_batch(cfg)`."""
    total = global_batch(cfg)
    if world < 1 or total % world:
        raise ValueError(f"a global batch of {total} does not split over {world} workers")
    return total // world


def resume_skip(steps_done: int, then: tuple[int, int], now: tuple[int, int], batch_rows: int,
                steps_per_epoch: int) -> int | None:
    """Stream blocks of the epoch to skip to continue a mid-epoch checkpoint, or None to replay it.

    `steps_done` steps were taken with `then` = (per-worker batch, workers); the group is now `now`.
    Same shape: the blocks those steps consumed (`epoch_stream.resume_skip_blocks`). Another shape
    with the same global batch: the same rows were consumed (steps x global batch; whole blocks at
    every pause point), so the same blocks are skipped and every new worker takes the epoch's
    remaining steps. A new worker's share of that rest may end inside a block (1 block left, 2
    workers of half a block each): the epoch's rows are still each trained once, but from then on a
    worker's epoch may start up to a block off the stream's epoch edge (no row is lost or repeated;
    a `data.deterministic` run stays a function of where it was resized). Another global batch:
    None (the step count would mean other rows).
    """
    from rtrain.data.epoch_stream import resume_skip_blocks

    (b0, w0), (b1, w1) = then, now
    if (b0, w0) == (b1, w1):
        return resume_skip_blocks(steps_done, b1, w1, batch_rows)
    if b0 * w0 != b1 * w1:
        return None
    done_rows = steps_done * b0 * w0
    if done_rows % batch_rows or steps_done >= steps_per_epoch:
        return None
    return done_rows // batch_rows
