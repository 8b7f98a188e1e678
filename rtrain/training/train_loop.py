"""What one Ray Train worker runs: rebuild the config, build the model, resume, train, report.

`train_loop(loop_config)` is the `train_loop_per_worker` of the TorchTrainer that
`rtrain.training.runner.fit` builds. `loop_config` is plain data plus one actor handle:

    {"config": config_to_dict(cfg), "run_dir": "/abs/RUN", "classes": manifest classes
     [{index, name, category_id}], "num_train_images": int, "epoch_clock": EpochClock handle}

Weights: the model is built from the config; a fresh run with `model.init` then loads the
tensors of that weights file that fit (`rtrain.runs.loading.init_from_weights`) and the EMA starts
from them; a resumed run loads its checkpoint instead and ignores `model.init`.

Every epoch every worker calls `ray.train.report` exactly once (it is a barrier): rank 0
with the metrics and a checkpoint directory (state.pt + COMPLETE, `rtrain.runs.checkpoint`),
the others with the same metrics and no checkpoint. Rank 0 alone evaluates (the EMA
model, on the val shards, in-process), appends RUN/metrics.jsonl and writes RUN/best.pt
and RUN/last.pt. All the numerical work is in `rtrain.training.engine` (no Ray there).

Pauses inside an epoch (`rtrain.training.preempt`: `run.checkpoint_every_min`, a SIGTERM or node drain):
every worker reports once more, at the same step, and rank 0's checkpoint holds the state after
k steps of epoch e as `epoch` = e - 1 (the last whole epoch), `step` = the global step and
`extra[EPOCH_STEPS]` = k (with `extra[EPOCH_SHAPE]` = [batch, world]). No metrics row is written
for it (a row is one whole epoch: after a resume at k, the row of epoch e averages its last
steps only, and says `resumed_at_step` k). A resume continues with step k of epoch e on the
batches the uninterrupted run would have had (`rtrain.data.epoch_stream` skips the first blocks);
after an elastic resize (same global batch, another worker count, `rtrain.training.elastic`) at
step k too, on the epoch's remaining rows; with another global batch it replays epoch e from its
start, with a warning.

Elastic runs (`run.workers`/`run.gpus` "MIN:MAX"): each worker's batch is the fixed global batch
divided by the world size of this (re)start (`rtrain.training.elastic.per_worker_batch`).
After a stop the loop returns: the last report carries `preempted` 1 for the driver.

Test hook: `loop_config["test_nonfinite_steps"]` (from RTRAIN_TEST_NONFINITE_STEPS in the
driver, `rtrain.training.guard.forced_nonfinite_steps`) makes rank 0's loss NaN at those global steps.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rtrain import storage
from rtrain.config import Config, config_from_dict, config_to_dict, is_elastic
from rtrain.data.augment import rescale_batch
from rtrain.data.close_mosaic import EXTRA_KEY as MOSAIC_EXTRA
from rtrain.data.close_mosaic import CloseMosaic
from rtrain.evaluation.sharded import validate_sharded
from rtrain.precision import make_grad_scaler
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_compatible,
    checkpoint_dirs,
    find_latest_complete,
    load_checkpoint,
    read_marker,
    restore_rng_state,
    save_checkpoint,
    save_weights,
)
from rtrain.runs.loading import build_detector, init_from_weights, load_model_weights  # noqa: F401 (re-exported)
from rtrain.training import elastic, engine, preempt, trackers
from rtrain.training.autobatch import resolve_batch_size
from rtrain.training.ema import ModelEMA, unwrap_model
from rtrain.training.guard import NonFiniteGuard, force_nonfinite
from rtrain.training.memory_format import contiguous_state, match_optimizer_state, to_memory_format
from rtrain.training.memory_format import resolve as resolve_memory_format
from rtrain.training.optim import build_optimizer
from rtrain.training.progress import GUARD_EVERY, ProgressReporter, read_every
from rtrain.training.schedule import LRSchedule, scale_lr

logger = logging.getLogger(__name__)

SCORE_METRIC = "mAP"  # CheckpointConfig.checkpoint_score_attribute: every checkpointed report has it
EPOCH_STEPS = "epoch_steps"  # extra key of a mid-epoch checkpoint: steps of the next epoch done
AUTO_BATCH = "batch_size"  # extra key: the per-worker batch this run trains with ("auto" resolved once)
EPOCH_SHAPE = "epoch_steps_shape"  # ... and the [batch size, world size] they were taken with


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches one worker sees per epoch: Ray Data splits rows equally (remainder dropped)."""
    return max(1, math.ceil((num_images // world_size) / batch_size))


def multi_scale_fn(cfg: Config):
    """(batch, step) -> batch resized to a random multiple of 32 within +-multi_scale, or None.

    The size depends only on (seed, step), so all ranks pick the same one.
    """
    frac = cfg.data.multi_scale
    if frac <= 0:
        return None
    size = cfg.data.img_size
    lo = max(32, int(size * (1 - frac)) // 32 * 32)
    hi = max(lo, int(size * (1 + frac)) // 32 * 32)
    choices = list(range(lo, hi + 1, 32))

    def transform(batch, step):
        new = choices[np.random.default_rng([cfg.train.seed, step]).integers(len(choices))]
        if new == batch["images"].shape[-1]:
            return batch
        images, boxes = rescale_batch(batch["images"], batch["boxes"], new)
        return {**batch, "images": images, "boxes": boxes}

    return transform


class EpochBatches:
    """Iterate one epoch's `batches`, recording how long the first took to arrive
    (`first_batch_s`) and how many boxes the decode step dropped (`dropped_targets`)."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.first_batch_s = 0.0
        self.dropped_targets = 0

    def __iter__(self):
        t0 = time.perf_counter()
        iterator = iter(self.batches)
        first = next(iterator, None)
        self.first_batch_s = time.perf_counter() - t0
        if first is None:
            return
        for batch in itertools.chain([first], iterator):
            dropped = batch.get("dropped_targets")
            if dropped is not None:  # a CPU tensor from the collate: no device sync
                self.dropped_targets += int(dropped.sum())
            yield batch


def _refit_ema_tau(ema: ModelEMA, schedule: LRSchedule, step: int, time_limit: float) -> None:
    """Fit the EMA ramp to the steps a time-limited run is now expected to take."""
    elapsed = schedule.elapsed()
    if elapsed > 0 and step > 0:
        ema.tau = ModelEMA.tau_for_run(max(step, round(step / elapsed * time_limit)))


def _train_batches(cfg: Config, shard, decode: str, device, rank: int, batch_size: int, num_classes: int,
                   no_mosaic_from=None):
    """ONE iterator over the worker's shard of the whole run's stream (rtrain.data.epoch_stream):
    collated batches (the `rtrain.data.batches.collate` layout), decoded by Ray Data tasks ("cpu") or
    here on the worker's device ("gpu"; `no_mosaic_from`: the loop's CloseMosaic, read per batch)."""
    from rtrain.data.batches import DetectionCollate

    buffer = cfg.data.shuffle_buffer if not cfg.data.deterministic else 0
    if cfg.data.shuffle_buffer and cfg.data.deterministic and rank == 0:
        logger.warning("data.shuffle_buffer is ignored in deterministic runs (rows are shuffled before "
                       "decode)")
    collate = DetectionCollate()
    if decode == "gpu":
        from rtrain.data.device_decode import DeviceDecodeAugment, RawCollate

        collate = RawCollate(num_classes)
    on_gpu = torch.device(device).type == "cuda"
    batches = shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=collate,
        local_shuffle_buffer_size=max(buffer, batch_size) if buffer else None,
        prefetch_batches=cfg.data.prefetch_batches,
        # decoded batches: Ray pins and copies them to the device in its prefetch thread; raw
        # batches (lists of JPEG bytes) stay on the CPU for the worker's own decode
        device="cpu" if decode == "gpu" else "auto", pin_memory=on_gpu and decode != "gpu",
    )
    if decode != "gpu":
        return iter(batches)
    from rtrain.data.augment import AugmentParams

    decoder = DeviceDecodeAugment(img_size=cfg.data.img_size, train=True,
                                  params=AugmentParams.from_obj(cfg.data), seed=cfg.train.seed,
                                  no_mosaic_from=no_mosaic_from)
    return _decoded_on_device(batches, decoder, device)


def _decoded_on_device(raw_batches, decoder, device):
    for raw in raw_batches:
        epoch = int(raw["epoch"][0]) if "epoch" in raw and len(raw["epoch"]) else 0
        batch = decoder(raw, epoch, device)
        if len(batch["image_id"]):
            yield batch


def _log_setup() -> None:
    """Workers are fresh processes: give the rtrain loggers a handler so epoch lines reach the driver."""
    root = logging.getLogger("rtrain")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


class _Gauges:
    """Throughput gauges exported through Ray's metrics port (rank 0 only; cheap)."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.images_per_s = Gauge("rtrain_images_per_s", description="training images per second (rank 0)")
        self.loss = Gauge("rtrain_loss", description="mean training loss of the last epoch")
        self.data_wait = Gauge("rtrain_data_wait_frac", description="fraction of epoch time waiting for data")

    def set(self, metrics: dict) -> None:
        self.images_per_s.set(float(metrics.get("images_per_s", 0.0)))
        self.loss.set(float(metrics.get("loss", 0.0)))
        self.data_wait.set(float(metrics.get("data_wait_frac", 0.0)))


def _flat_eval(metrics: dict) -> dict:
    """COCO metrics with per-class AP flattened to `AP/<class>` (Ray wants flat scalars)."""
    out = {k: v for k, v in metrics.items() if k != "per_class"}
    for name, ap in metrics.get("per_class", {}).items():
        out[f"AP/{name}"] = ap
    return out


def train_loop(loop_config: dict) -> None:
    """The per-worker function of the TorchTrainer (see the module doc for `loop_config`)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from rtrain.data.epoch_stream import pause_every, set_start_epoch

    _log_setup()
    cfg = config_from_dict(loop_config["config"])
    cfg_dict = config_to_dict(cfg)
    classes = loop_config["classes"]
    class_names = [c["name"] for c in classes]
    category_ids = [int(c["category_id"]) for c in classes]
    out_dir = storage.location(loop_config["run_dir"])  # a local Path, or an s3:// URI
    clock = loop_config.get("epoch_clock")

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)

    state, source = _resume_state(ray.train.get_checkpoint(), out_dir, device)
    # A timm trunk's starting weights (model.pretrained / backbone_weights) only for a new run that
    # does not fine-tune: a checkpoint or model.init overwrites them anyway.
    model = build_detector(cfg, len(class_names), pretrained=state is None and not cfg.model.init)
    if cfg.model.init and state is None:  # fine-tuning; a resumed run's checkpoint holds every weight
        init_from_weights(model, cfg.model.init, class_names, log=rank == 0)
    layout = resolve_memory_format(cfg.train.memory_format, device)
    model = to_memory_format(model.to(device), layout)  # before the optimizer, the EMA and DDP
    if is_elastic(cfg.run):  # the global batch stays train.batch_size x MAX at any group size
        batch_size = elastic.per_worker_batch(cfg, world)
    else:
        batch_size = resolve_batch_size(  # autobatch: "auto" -> int (min over ranks), or as resolved before
            cfg, model, device, max_batch=int(loop_config["num_train_images"]) // world,
            resumed=state["extra"].get(AUTO_BATCH) if state is not None else None)
    global_batch = batch_size * world
    batch_rows = int(loop_config.get("stream_batch_rows") or batch_size)
    base_lr = scale_lr(cfg.train.lr, global_batch, cfg.train.nominal_batch_size, cfg.train.optimizer)
    optimizer = build_optimizer(model, cfg.train.optimizer, lr=base_lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    rows_per_epoch = loop_config.get("rows_per_epoch")
    spe = (max(1, int(rows_per_epoch) // (batch_size * world)) if rows_per_epoch
           else steps_per_epoch(int(loop_config["num_train_images"]), batch_size, world))
    total_steps = cfg.train.epochs * spe
    time_limit = cfg.train.time_limit_min * 60.0 if cfg.train.time_limit_min > 0 else None
    # A time-limited run does not know its step count: its EMA starts fitted to one epoch and is
    # refitted from the measured speed after every epoch (_refit_ema_tau).
    ema = ModelEMA.for_run(model, total_steps if time_limit is None else spe, decay=cfg.train.ema_decay,
                           tau=cfg.train.ema_tau)
    schedule = LRSchedule.from_config(
        cfg.train, base_lr=base_lr, total_steps=total_steps,
        warmup_steps=min(total_steps, round(cfg.train.warmup_epochs * spe)), time_limit=time_limit,
    )
    scaler = make_grad_scaler(device, cfg.train.amp)
    guard = NonFiniteGuard(max_consecutive=cfg.train.max_nonfinite)

    start_epoch, step, best_map, last_map, run_starts, resumed_at, skip_blocks = 0, 0, -1.0, 0.0, 1, 0, 0
    if state is not None:
        check_compatible(state, cfg_dict, class_names)
        load_model_weights(model, state["model"], source)
        ema.load_state_dict(state["ema"])
        if cfg.train.ema_tau == 0 and time_limit is None:  # the epoch count may have been raised
            ema.tau = ModelEMA.tau_for_run(total_steps)
        optimizer.load_state_dict(state["optimizer"])
        match_optimizer_state(optimizer)  # the checkpoint may come from a run in the other layout
        schedule.load_state_dict(state["scheduler"])
        schedule.total_steps = total_steps  # the epoch count (also a time budget's cap) may have grown
        schedule.time_limit = time_limit
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        guard.load_state_dict(state["guard"])
        restore_rng_state(state["rng"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        best_map = float(state["extra"].get("best_map", -1.0))
        last_map = float(state["extra"].get("last_map", 0.0))
        run_starts = int(state["extra"].get("run_starts", 1)) + 1  # resumed or restarted after a failure
        resumed_at = int(state["extra"].get(EPOCH_STEPS, 0))
        shape = list(state["extra"].get(EPOCH_SHAPE, [batch_size, world]))
        skip_blocks = (elastic.resume_skip(resumed_at, tuple(shape), (batch_size, world), batch_rows, spe)
                       if resumed_at else 0)
        if skip_blocks is None:
            if rank == 0:
                logger.warning("the mid-epoch checkpoint was taken with batch %d x %d workers, now %d x %d: "
                               "epoch %d restarts from its first batch", *shape, batch_size, world,
                               start_epoch + 1)
            resumed_at = skip_blocks = 0
        elif rank == 0 and shape != [batch_size, world]:
            logger.info("the group is now %d workers x batch %d (was %d x %d): the global batch of %d, "
                        "the LR and the schedule are unchanged", world, batch_size, shape[1], shape[0],
                        global_batch)
        if rank == 0:
            within = f", {resumed_at} steps into epoch {start_epoch + 1}" if resumed_at else ""
            logger.info("resumed from epoch %d (step %d%s, best mAP %.4f)", start_epoch - 1, step, within,
                        best_map)
    mosaic = CloseMosaic.from_config(cfg)  # before prepare_model: every rank, before the stream starts
    mosaic.restore(state["extra"] if state is not None else {}, clock)

    model = ray.train.torch.prepare_model(model)
    num_nodes = _count_nodes(world)
    train_shard = ray.train.get_dataset_shard("train")
    transform = multi_scale_fn(cfg)
    gauges = val_gt = None
    if rank == 0:
        from rtrain.evaluation.coco import coco_gt_from_shards

        run_dir.truncate_metrics(out_dir, start_epoch)
        tracking = trackers.open_for_loop(loop_config.get("tracking"), out_dir, cfg_dict)  # run.loggers
        val_gt = coco_gt_from_shards(cfg.data.val)
        try:
            gauges = _Gauges()
        except Exception as exc:  # metrics export is optional (e.g. no metrics agent)
            logger.warning("ray metrics gauges unavailable: %s", exc)

    every = pause_every(batch_size, batch_rows)  # steps between exactly resumable points
    if clock is not None:  # the stream skips the epochs (and blocks of this one) already trained
        set_start_epoch(clock, start_epoch, skip_blocks)
    sources = [preempt.clock_source(clock) if clock is not None else None, preempt.drain_source()]
    pauses = preempt.PauseRequests(cfg.run.checkpoint_every_min * 60.0, [s for s in sources if s is not None])
    preempt.install_worker_sigterm(pauses)
    forced = loop_config.get("test_nonfinite_steps") or []
    if forced and rank == 0:
        force_nonfinite(model, forced, first_step=step)  # after the EMA copy: the average stays clean
    stream = _train_batches(cfg, train_shard, loop_config.get("decode", "cpu"), device, rank, batch_size,
                            len(class_names), mosaic)
    # Progress inside an epoch: rank 0's lines at the driver's pace (training.progress; 0/absent = none).
    progress_s = float(loop_config.get("progress_s") or 0.0)
    reporter = ProgressReporter(progress_s) if rank == 0 and progress_s > 0 else None
    schedule.start()
    epoch = start_epoch
    finished = start_epoch >= cfg.train.epochs or (time_limit is not None and schedule.finished(step))
    cycle_start = None  # wall time of a whole epoch cycle: data restart, training, eval, checkpoint
    extra_state = {}  # the checkpoint's `extra`, minus what a pause adds

    def on_pause(code: int, iters: int) -> None:
        """A mid-epoch checkpoint after `iters` steps of this call (every rank, the same step)."""
        done = phase + iters
        at = step + iters
        report = {"epoch": epoch, "step": at, SCORE_METRIC: last_map, "mid_epoch": 1, EPOCH_STEPS: done,
                  "preempted": int(code >= preempt.STOP), "world_size": world}
        ckpt = ckpt_tmp = None
        if rank == 0:
            ckpt_tmp = tempfile.TemporaryDirectory(prefix="rtrain-ckpt-")
            _write_outputs(ckpt_tmp.name, out_dir, cfg_dict, class_names, model, ema, optimizer, schedule,
                           scaler, guard, epoch - 1, at, None,
                           {**extra_state, EPOCH_STEPS: done, EPOCH_SHAPE: [batch_size, world]})
            ckpt = Checkpoint.from_directory(ckpt_tmp.name)
            why = pauses.reason or "another worker was asked to stop"
            what = f"preempted ({why})" if code >= preempt.STOP else "mid-epoch checkpoint"
            logger.info("%s: epoch %d step %d (%d of its %d steps done)", what, epoch + 1, at, done, spe)
        ray.train.report(report, checkpoint=ckpt)
        if ckpt_tmp is not None:
            ckpt_tmp.cleanup()
        pauses.checkpointed()

    while not finished:
        t_epoch = time.perf_counter()
        phase = resumed_at if epoch == start_epoch else 0  # steps of this epoch done before this call
        extra_state = {"best_map": best_map, "last_map": last_map, "run_starts": run_starts,
                       MOSAIC_EXTRA: mosaic.first_free, AUTO_BATCH: batch_size}
        epoch_batches = EpochBatches(itertools.islice(stream, spe - phase))
        batches = iter(epoch_batches)
        if epoch == start_epoch:
            batches = _clock_from_first_batch(batches, schedule)
        metrics = engine.train_one_epoch(
            model, optimizer, batches, device=device, schedule=schedule, ema=ema, amp=cfg.train.amp,
            scaler=scaler, guard=guard, grad_clip=cfg.train.grad_clip, batch_transform=transform,
            step_offset=step, stop_when_finished=time_limit is not None, epoch=epoch,
            log_every=read_every(device) if reporter else 0, guard_every=GUARD_EVERY, on_progress=reporter,
            steps_total=spe - phase, pause=pauses.code, on_pause=on_pause, pause_every=every,
            pause_phase=phase, memory_format=layout,
        )
        step += metrics["steps"] + metrics["skipped"]
        if metrics["preempted"]:
            break  # on_pause wrote and reported the checkpoint
        metrics["first_batch_s"] = epoch_batches.first_batch_s
        metrics["dropped_targets"] = epoch_batches.dropped_targets
        if time_limit is not None and cfg.train.ema_tau == 0:
            _refit_ema_tau(ema, schedule, step, time_limit)
        if phase + metrics["steps"] + metrics["skipped"] < spe and not metrics["stopped_early"] and rank == 0:
            logger.warning("epoch %d: the data stream ended after %d of %d steps", epoch + 1,
                           phase + metrics["steps"] + metrics["skipped"], spe)
        now = time.perf_counter()
        cycle_s = now - (cycle_start if cycle_start is not None else t_epoch)
        cycle_start = now
        remaining = (time_limit - schedule.elapsed()) if time_limit is not None else 0.0
        spent = _budget_ends_before_next_epoch(schedule, step, cycle_s)
        stop_asked = float(pauses.code() >= preempt.STOP)
        budget_spent, close_mosaic, stop = engine.agree_max(
            [float(spent), float(mosaic.due(remaining, cycle_s)), stop_asked], device)
        finished = epoch + 1 >= cfg.train.epochs or (time_limit is not None and bool(budget_spent))
        preempted = bool(stop) and not finished
        if close_mosaic and not finished:
            first_free = mosaic.close(epoch + 1, clock)
            if rank == 0:
                logger.info("mosaic closed from epoch %d on (%.0fs of the budget left)", first_free + 1,
                            remaining)

        metrics.update(epoch=epoch, step=step, world_size=world, num_nodes=num_nodes,
                       global_batch=global_batch, run_starts=run_starts, nonfinite_total=guard.total,
                       evaluated=False, mAP=last_map, resumed_at_step=phase, preempted=int(preempted),
                       finished=int(finished))
        ckpt = None
        # a preempted epoch skips its evaluation: a large val set would outlast run.grace_s
        if not preempted and (finished or (epoch + 1) % cfg.eval.interval == 0):
            val = validate_sharded(ema.module, cfg, val_gt, category_ids, class_names, device=device,
                                   rank=rank, world=world)
            if rank == 0:
                metrics.update(_flat_eval(val), evaluated=True)
                last_map = float(val["mAP"])
        if rank == 0:
            metrics["best_mAP"] = best_map = max(best_map, last_map) if metrics["evaluated"] else best_map
            metrics["elapsed_s"] = schedule.elapsed()
            metrics["epoch_wall_s"] = time.perf_counter() - t_epoch
            ckpt_tmp = tempfile.TemporaryDirectory(prefix="rtrain-ckpt-")
            _write_outputs(ckpt_tmp.name, out_dir, cfg_dict, class_names, model, ema, optimizer, schedule,
                           scaler, guard, epoch, step, metrics,
                           {**extra_state, "best_map": best_map, "last_map": last_map,
                            MOSAIC_EXTRA: mosaic.first_free})
            tracking.log_epoch(metrics, step)
            ckpt = Checkpoint.from_directory(ckpt_tmp.name)
            if gauges is not None:
                gauges.set(metrics)
            _log_epoch(cfg, metrics, schedule, time_limit)
        ray.train.report(metrics, checkpoint=ckpt)
        if ckpt is not None:
            ckpt_tmp.cleanup()  # report has copied it to storage
        pauses.checkpointed()
        if preempted:
            if rank == 0:
                logger.info("preempted (%s) after epoch %d (step %d)",
                            pauses.reason or "another worker was asked to stop", epoch + 1, step)
            break
        epoch += 1
    pauses.close()
    preempt.uninstall_worker(pauses)


def _resume_state(checkpoint, out_dir: Path, device) -> tuple[dict | None, str]:
    """The state to continue from: Ray's latest checkpoint, or a newer complete one in the run dir.

    Ray registers a reported checkpoint only when its controller next polls the workers
    (every couple of seconds): a worker or driver killed in between leaves a checkpoint
    that is persisted and complete (sha256 marker) but that Ray does not hand back. Every
    rank scans the same run directory (shared storage), so all pick the same one.
    """
    ray_at, ray_dir = (-2, -1), None
    if checkpoint is not None:
        ray_dir = checkpoint.path
        try:
            with checkpoint.as_directory() as ckpt_dir:
                state = load_checkpoint(ckpt_dir, map_location=device)
            ray_at = _position(state)
        except CheckpointError as exc:  # e.g. an upload cut short by a full disk: never load half a file
            logger.warning("Ray's latest checkpoint is not usable (%s); resuming from the newest complete "
                           "one in %s", exc, out_dir)
            checkpoint = None
    disk, skipped = find_latest_complete(checkpoint_dirs(out_dir))
    if disk is not None and _position(read_marker(disk)) > ray_at:
        for path, reason in skipped:
            logger.warning("skipping checkpoint %s: %s", path, reason)
        logger.warning("resuming from %s (epoch %s): newer than Ray's latest registered checkpoint %s",
                       disk, read_marker(disk)["epoch"], ray_dir)
        return load_checkpoint(disk, map_location=device), str(disk)
    if checkpoint is None:
        return None, ""
    return state, str(ray_dir)


def _position(info) -> tuple[int, int]:
    """(epoch, global step) of a checkpoint state or marker: mid-epoch ones sort after their epoch."""
    return int(info["epoch"]), int(info["step"])


def _count_nodes(world: int) -> int:
    """How many Ray nodes the workers run on (all ranks take part: a collective)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world <= 1 or not torch.distributed.is_initialized():
        return 1
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))


def _budget_ends_before_next_epoch(schedule: LRSchedule, step: int, cycle_s: float) -> bool:
    """True when the budget is spent, or what is left of it is under half an epoch cycle.

    `cycle_s` is the wall time from one epoch's end to the next (the data pipeline's restart,
    training, evaluation, checkpoint). Without this a time-limited run starts one more epoch
    only to find, after the restart, that the budget ran out: an epoch of zero steps.
    """
    if schedule.finished(step):
        return True
    if schedule.time_limit is None:
        return False
    remaining = schedule.time_limit - schedule.elapsed()
    return remaining < 0.5 * cycle_s


def _clock_from_first_batch(batches, schedule: LRSchedule):
    """Yield `batches`, restarting the schedule's clock when the first one arrives.

    Ray Data's one-time start-up (workers, file listing, first decode) can take tens of
    seconds on a small machine; it is not training, so the time budget starts after it.
    """
    iterator = iter(batches)
    first = next(iterator, None)
    schedule.start()
    if first is None:
        return
    yield first
    yield from iterator


def _write_outputs(ckpt_dir, out_dir, *args) -> None:
    """Rank 0: `_write_epoch_files`; a full disk ends the run with one line naming the file.

    The run's previous files stay as they were (every write is temp + rename) and Ray gets no
    checkpoint of this epoch, so the last complete one is where `--resume` continues once space
    is freed. The error is `rtrain.runs.run_dir.StorageFullError`; the driver's callback
    (`rtrain.runs.storage_guard`) stops Ray Train from retrying into the same full disk.
    """
    try:
        _write_epoch_files(ckpt_dir, out_dir, *args)
    except OSError as exc:
        full = run_dir.full_storage(exc, exc.filename or out_dir)
        if full is None:
            raise
        logger.error("%s; the run stops, the last complete checkpoint is kept", full)
        raise full from None


def _write_epoch_files(ckpt_dir, out_dir, cfg_dict, class_names, model, ema, optimizer, schedule, scaler,
                       guard, epoch, step, metrics, extra) -> None:
    """The checkpoint dir for Ray, the metrics row, last.pt and (when improved) best.pt; with
    `metrics` None (a mid-epoch checkpoint) the checkpoint dir only."""
    save_checkpoint(ckpt_dir, {
        "model": unwrap_model(model).state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "guard": guard.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": capture_rng_state(),
        "config": cfg_dict,
        "class_names": list(class_names),
        "extra": extra,
    })
    if metrics is None:
        return
    run_dir.append_metrics(out_dir, metrics)
    weights = contiguous_state(ema.module.state_dict())  # the layout exporters and readers expect
    last_map = extra["last_map"]
    info = {"epoch": epoch, "step": step, "mAP": last_map if metrics["evaluated"] else None}
    save_weights(storage.child(out_dir, run_dir.LAST_WEIGHTS), weights, cfg_dict, class_names, info)
    best_file = storage.child(out_dir, run_dir.BEST_WEIGHTS)
    if metrics["evaluated"] and (last_map >= extra["best_map"] or not storage.is_file(best_file)):
        save_weights(best_file, weights, cfg_dict, class_names, info)


def _log_epoch(cfg: Config, m: dict, schedule: LRSchedule, time_limit: float | None) -> None:
    """One terminal line per epoch: epoch, time, loss, mAP, throughput, ETA."""
    epoch = m["epoch"]
    elapsed = schedule.elapsed()
    if time_limit is not None:
        eta = max(0.0, time_limit - elapsed)
    else:
        eta = elapsed / max(1, epoch + 1) * max(0, cfg.train.epochs - epoch - 1)
    val = f"mAP {m['mAP']:.4f} mAP50 {m.get('mAP50', float('nan')):.4f}" if m["evaluated"] else "mAP -"
    of_total = "" if time_limit is not None else f"/{cfg.train.epochs}"  # a time budget sets the count
    logger.info(
        "epoch %d%s  %.1fs  loss %.4f (cls %.3f box %.3f dfl %.3f)  %s  lr %.5f  %.1f img/s  "
        "data-wait %.0f%%  ETA %s",
        epoch + 1, of_total, m["epoch_wall_s"], m.get("loss", float("nan")),
        m.get("loss_cls", float("nan")), m.get("loss_box", float("nan")), m.get("loss_dfl", float("nan")),
        val, m["lr"], m["images_per_s"], 100 * m["data_wait_frac"], _fmt_time(eta),
    )


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
