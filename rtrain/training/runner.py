"""The Python API of training: `fit(config, ...) -> FitResult`.

    from rtrain.training.runner import fit
    result = fit("configs/bccd.yaml", overrides=["train.epochs=5"], workers=2)
    print(result.best_metrics["mAP"], result.best_weights)

`fit` checks everything it can before it starts anything (config, shards and
manifests, that train and val name the same classes, that storage is writable),
then starts a local Ray or joins one (`address`), builds a `TorchTrainer` that
runs `rtrain.training.train_loop.train_loop` on every worker with the train shards
streamed through Ray Data, waits, and draws the plots. It shuts Ray down only if
it started it.

Run names: the run lives in `<storage>/<name>` (Ray Train's own run directory:
its checkpoints sit beside our metrics and weights, see `rtrain.runs.run_dir`). The
default name is `<config stem>-<YYYYmmdd-HHMMSS>`. An existing run is never
continued by accident: without `resume=True` a name that already exists is
refused; with `resume=True` and no name the most recent run under storage is
continued, with its saved config.yaml (plus `overrides`, e.g. more epochs)
unless a config is given. Ray Train V2 resumes by itself when storage + name
match: it hands the loop the latest checkpoint.

One writer per run: before anything is written and before Ray, `fit` takes RUN/.lock
(`rtrain.runs.run_lock`); while another live process holds it (a second `--resume`, a retried Ray
job) it is refused with one line naming that process's host and pid. A killed driver's lock
is taken over with a warning.

Multi-node clusters: storage must be a path every node sees (shared filesystem) or a bucket,
because rank 0 writes metrics and weights there directly.

Preemption (`preemptible=True`, what `python -m rtrain.fit` passes): a SIGTERM to the driver
while it trains asks the workers to checkpoint at the next resumable step and end
(`rtrain.training.preempt.DriverStop`, bounded by `run.grace_s`); a run that ended so (from the driver's
SIGTERM or a worker's node drain) raises `PreemptedError` (exit code 75) whose one line says
where it stopped and the `--resume` command. Past the grace the process exits with code 75
after one line naming the checkpoint that is kept.

Object storage: `storage="s3://bucket/runs"` puts the whole run in the bucket (`rtrain.storage`):
Ray Train gets the bucket as its `storage_filesystem`, rank 0 writes metrics and weights there,
`resume` finds the run and its checkpoints there, RUN/.lock is a lease (`rtrain.runs.run_lock`). The
driver and every worker need the AWS variables (credentials, region, AWS_ENDPOINT_URL for a
server other than AWS): a local Ray started by `fit` passes its environment on; on a cluster set
them on every node. data.train/data.val may be bucket prefixes too (shards written there by
`python -m data_prep.shard --out s3://...`), with storage local or in a bucket. Not yet with a
bucket: run.loggers (TensorBoard/MLflow write local files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rtrain import storage as store  # `storage` is fit's argument
from rtrain.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    is_elastic,
    load_config,
    uses_gpu,
    worker_range,
)
from rtrain.errors import BAD_INPUT, FAILED, PREEMPTED, RtrainError
from rtrain.runs import run_dir, run_lock
from rtrain.training import trackers

logger = logging.getLogger(__name__)


class FitError(RtrainError, RuntimeError):
    """Training could not start or did not finish: one line saying why.

    Exit code 2 when the input was refused before anything ran, 1 when training (or Ray) failed
    (those are raised `from` the underlying exception)."""

    @property
    def exit_code(self) -> int:
        return FAILED if self.__cause__ is not None else BAD_INPUT


class PreemptedError(RtrainError):
    """The run stopped on a preemption request with a checkpoint; `--resume` continues it."""

    exit_code = PREEMPTED


def resume_command(out_dir: Path) -> str:
    return f"python -m rtrain.fit --resume --name {out_dir.name} --storage {out_dir.parent}"


def preempted_line(report: dict, out_dir: Path, reason: str | None) -> str:
    """The one line of a preempted run, from its last report (`rtrain.training.train_loop`)."""
    epoch, step = int(report.get("epoch", 0)) + 1, int(report.get("step", 0))
    where = (f"at epoch {epoch} step {step} ({int(report.get('epoch_steps', 0))} of the epoch's steps done)"
             if report.get("mid_epoch") else f"after epoch {epoch} (step {step})")
    why = f" ({reason})" if reason else ""
    return f"preempted{why} {where}; checkpoint saved; resume with: {resume_command(out_dir)}"


def _grace_expired_line(cfg: Config, out_dir: Path) -> str:
    from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, read_marker

    latest, _ = find_latest_complete(checkpoint_dirs(out_dir))
    if latest is None:
        kept = "no complete checkpoint exists yet (a resume starts over)"
    else:
        info = read_marker(latest)
        kept = f"the last complete checkpoint ({latest.name}: step {int(info['step'])}) is kept"
    return (f"rtrain: preempted; no new checkpoint within run.grace_s={cfg.run.grace_s:g} s; {kept}; "
            f"resume with: {resume_command(out_dir)}")


@dataclass
class FitResult:
    """What a finished `fit` leaves behind (paths are absolute; s3:// URI strings for a bucket)."""

    run_dir: Path | str
    name: str
    config: Config
    best_weights: Path | str | None  # RUN/best.pt: EMA weights of the best-mAP evaluation
    last_weights: Path | str | None  # RUN/last.pt: EMA weights after the last epoch
    best_metrics: dict  # the metrics.jsonl row with the highest mAP (evaluated rows only)
    last_metrics: dict  # the last metrics.jsonl row
    epochs_done: int
    checkpoint: str | None = None  # Ray's latest checkpoint directory
    plots: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        best = self.best_metrics
        if best:
            best_line = (f"best mAP:     {best['mAP']:.4f} (mAP50 {best.get('mAP50', float('nan')):.4f}, "
                         f"epoch {best['epoch'] + 1})")
        else:
            best_line = "best mAP:     - (no evaluation ran)"
        lines = [
            f"run:          {self.run_dir}",
            f"epochs:       {self.epochs_done}",
            best_line,
            f"best weights: {self.best_weights}",
            f"last weights: {self.last_weights}",
            f"metrics:      {store.child(self.run_dir, run_dir.METRICS_JSONL)}",
        ]
        lines += [f"plot:         {p}" for p in self.plots]
        spec = trackers.spec_for_run(self.config, self.name)
        if "tensorboard" in spec["loggers"]:
            lines.append(f"tensorboard:  tensorboard --logdir {self.run_dir / trackers.TENSORBOARD_DIR}")
        if "mlflow" in spec["loggers"]:
            lines.append(f"mlflow:       {spec['mlflow_uri']} (experiment {spec['experiment']})")
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks before Ray


def _as_config(config, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        return config_from_dict(_merge_overrides(config_to_dict(config), overrides))
    if isinstance(config, dict):
        return config_from_dict(_merge_overrides(config, overrides))
    return load_config(config, overrides)


def _merge_overrides(data: dict, overrides: list[str] | None) -> dict:
    from rtrain.config import merge, parse_overrides

    return merge(data, parse_overrides(overrides))


def check_location(location: str, what: str, *, bucket: bool = True) -> None:
    """FitError (one line) for a scheme `rtrain.storage` does not support, and (bucket=False) for a
    bucket URI where only local paths work yet: a URI never becomes a local folder."""
    if not location:
        return
    try:
        store.check(location, what)
    except store.StorageError as exc:
        raise FitError(str(exc)) from None
    if store.is_bucket(location) and not bucket:
        raise FitError(f"{what} {location}: object storage is not supported here yet "
                       "(use a local or shared path)")


def local_only(location: str, what: str) -> None:
    """`check_location(..., bucket=False)`."""
    check_location(location, what, bucket=False)


def check_storage(location: Path | str) -> Path | str:
    """Create `storage` if needed and prove it is writable; FitError (one line) otherwise.

    A bucket URI: a test object is written and removed (credentials, bucket, permissions)."""
    if store.is_bucket(location):
        probe = store.join(location, f".write-test-{os.getpid()}-{time.time_ns()}")
        try:
            store.write_bytes(probe, b"")
            store.remove(probe)
        except OSError as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise FitError(f"{location}: storage is not writable ({first})") from None
        return location
    storage_dir = location
    try:
        storage_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise FitError(f"{storage_dir}: storage is not writable ({exc.strerror or exc})") from None
    return storage_dir


def check_data(cfg: Config) -> tuple[list[dict], int]:
    """The classes (train manifest) and the number of train images, after checking both splits.

    Raises FitError naming the file: missing/corrupt shards or manifest, or val classes that
    differ from train's.
    """
    from rtrain.data.batches import ShardError, list_shards, read_manifest, read_shard_metadata

    if not cfg.data.train:
        raise FitError("data.train is empty: set it to a shard directory (python -m data_prep.shard)")
    if not cfg.data.val:
        raise FitError("data.val is empty: set it to the val shard directory (evaluation needs it)")
    try:
        classes = read_manifest(cfg.data.train)["classes"]
        train_files = list_shards(cfg.data.train)
        val_classes = read_manifest(cfg.data.val)["classes"]
        list_shards(cfg.data.val)
    except ShardError as exc:
        raise FitError(str(exc)) from None
    names, val_names = [c["name"] for c in classes], [c["name"] for c in val_classes]
    if names != val_names:
        raise FitError(
            f"{store.join(cfg.data.val, 'manifest.json')}: val classes {val_names} differ from "
            f"train's {names}")
    num_images = sum(read_shard_metadata(f).num_rows for f in train_files)
    if num_images == 0:
        raise FitError(f"{cfg.data.train}: the train shards hold no images")
    return classes, num_images


def _absolute(path: str) -> str:
    if not path or store.is_bucket(path):
        return path
    return str(Path(path).expanduser().resolve())


def _is_run(path: Path | str) -> bool:
    if store.is_bucket(path):
        from rtrain.runs.checkpoint import checkpoint_dirs

        return store.is_file(store.child(path, run_dir.CONFIG_YAML)) or bool(checkpoint_dirs(path))
    return (path / run_dir.CONFIG_YAML).is_file() or any(path.glob("checkpoint_*"))


def _latest_run_in_bucket(uri: str) -> str | None:
    runs = [store.child(uri, n) for n in store.list_dir(uri) if not n.startswith(".")]
    runs = [r for r in runs if store.is_dir(r) and _is_run(r)]

    def mtime(r: str) -> float:
        files = [store.child(r, run_dir.METRICS_JSONL), store.child(r, run_dir.CONFIG_YAML)]
        return max([store.mtime(f) or 0.0 for f in files if store.is_file(f)] + [0.0])

    return max(runs, key=mtime) if runs else None


def latest_run(storage_dir: Path | str) -> Path | str | None:
    """The run under `storage_dir` whose metrics.jsonl or config.yaml was written last (None if none)."""
    if store.is_bucket(storage_dir):
        return _latest_run_in_bucket(storage_dir)
    runs = [p for p in storage_dir.iterdir() if p.is_dir() and _is_run(p)] if storage_dir.is_dir() else []
    if not runs:
        return None

    def mtime(p: Path) -> float:
        # Training writes these two. The folder's own time moves whenever a file in it is added or
        # removed (a user deleting an old run's best.pt), so it only dates a run that has neither.
        files = (p / run_dir.METRICS_JSONL, p / run_dir.CONFIG_YAML)
        stamps = [f.stat().st_mtime for f in files if f.exists()]
        return max(stamps) if stamps else p.stat().st_mtime

    return max(runs, key=mtime)


def _base_name(path: Path | str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def resolve_run(cfg_source, overrides, name: str | None, storage_dir: Path | str,
                resume: bool) -> tuple[Config, str]:
    """The config and run name to use (see the module doc for the rules)."""
    if resume:
        if name:
            path = store.child(storage_dir, name)
            if not _is_run(path):
                raise FitError(f"{path}: no run named {name!r} to resume under {storage_dir}")
        else:
            path = latest_run(storage_dir)
            if path is None:
                raise FitError(f"{storage_dir}: no run to resume (start one without --resume)")
            name = _base_name(path)
        if cfg_source is None:
            cfg = load_config(store.child(path, run_dir.CONFIG_YAML), overrides)
        else:
            cfg = _as_config(cfg_source, overrides)
        return cfg, name
    if cfg_source is None:
        raise FitError("no config given (pass a YAML path, a dict or a Config)")
    cfg = _as_config(cfg_source, overrides)
    name = name or cfg.run.name
    if not name:
        stem = Path(cfg_source).stem if isinstance(cfg_source, (str, os.PathLike)) else "run"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = store.child(storage_dir, name)
    if store.exists(path) and _is_run(path):
        raise FitError(f"{path}: a run named {name!r} exists; pass resume=True (--resume) to continue it "
                       "or choose another name")
    return cfg, name


def check_resume(cfg: Config, out_dir: Path | str, class_names: list[str]) -> Path | str | None:
    """Before Ray starts: the run's latest complete checkpoint must fit this config and these classes.

    Returns that checkpoint dir (None when the run has none yet). FitError with one line otherwise.
    """
    from rtrain.runs.checkpoint import CheckpointError, checkpoint_dirs, find_latest_complete, load_checkpoint
    from rtrain.runs.checkpoint import check_compatible as _check_compatible
    from rtrain.runs.loading import build_detector, load_model_weights

    latest, skipped = find_latest_complete(checkpoint_dirs(out_dir))
    for path, reason in skipped:
        logger.warning("skipping checkpoint %s: %s", path, reason)
    if latest is None:
        return None
    try:
        state = load_checkpoint(latest)
        _check_compatible(state, config_to_dict(cfg), class_names, source=f"checkpoint {latest}")
        load_model_weights(build_detector(cfg, len(class_names)), state["model"], str(latest))
    except CheckpointError as exc:
        raise FitError(f"cannot resume: {exc}") from None
    return latest


def check_model(cfg: Config, num_classes: int, pretrained: bool) -> None:
    """Before Ray starts: the config's model builds, with a timm trunk's starting weights when
    `pretrained` (timm installed, the name known, the weights downloadable or the file fitting);
    FitError with one line otherwise."""
    from rtrain.runs.loading import build_detector

    try:
        build_detector(cfg, num_classes, pretrained=pretrained)
    except ValueError as exc:  # BackboneError (an RtrainError) already names its key
        raise FitError(str(exc) if isinstance(exc, RtrainError) else f"model: {exc}") from None


def check_init(cfg: Config, class_names: list[str]) -> None:
    """Before Ray starts: `model.init` must be weights this model can start from (FitError otherwise;
    the workers load them again, `rtrain.runs.loading.init_from_weights`)."""
    from rtrain.runs.checkpoint import CheckpointError
    from rtrain.runs.loading import build_detector, init_from_weights

    try:
        init_from_weights(build_detector(cfg, len(class_names)), cfg.model.init, class_names)
    except CheckpointError as exc:
        raise FitError(f"model.init: {exc}") from None


# --------------------------------------------------------------------------- Ray


def _start_ray(cfg: Config) -> bool:
    """Join `cfg.run.address`, reuse an initialised Ray, or start a local one. True if we started it."""
    from rtrain.ray_session import start_ray

    return start_ray(cfg.run.address, dashboard=cfg.run.dashboard, dashboard_host=cfg.run.dashboard_host)


def build_trainer(
    cfg: Config,
    name: str,
    storage_dir: Path | str,
    out_dir: Path | str,
    classes: list[dict],
    num_images: int,
    *,
    train_fn=None,
    callbacks: list | None = None,
    loop_extra: dict | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float = 1.0,
):
    """The TorchTrainer of one rtrain run, and the epoch-clock actor its data path reads.

    fit and every Tune trial build their trainer here. `train_fn` defaults to `run_train_loop`
    (`rtrain.training.train_loop.train_loop`); `callbacks` go to Ray's RunConfig (Tune's report
    callback); `loop_extra` joins the loop's config; `num_workers` defaults to
    `run.gpus` GPU workers or `run.workers` CPU workers, and a "MIN:MAX" count there makes the
    group elastic (`rtrain.training.elastic`; an explicit `num_workers` is always fixed). The
    caller kills the clock when the run ends.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from rtrain.data.augment import AugmentParams
    from rtrain.data.close_mosaic import CloseMosaic
    from rtrain.data.decode_augment import DecodeAugment, make_epoch_clock
    from rtrain.data.epoch_stream import StreamPlan, build_train_stream
    from rtrain.runs.storage_guard import StopWhenStorageFull
    from rtrain.training.train_loop import SCORE_METRIC

    scaling = scaling_config(cfg, num_workers, gpus_per_worker)
    min_workers, num_workers = scaling.min_workers, scaling.max_workers
    clock = make_epoch_clock()
    # An elastic stream is cut for every size in MIN..MAX: each epoch splits into whole blocks for
    # any of them, and the split itself follows the group Ray starts (DataConfig splits per start).
    plan = StreamPlan.from_shards(cfg.data.train, batch_rows=stream_batch_rows(cfg), world_size=num_workers,
                                  min_world_size=min_workers, seed=cfg.train.seed,
                                  window_rows=cfg.data.shuffle_window)
    decode = decode_mode(cfg)
    actors = decode_actors(cfg, num_workers) if decode == "cpu" else 0
    kwargs = {"train": True, "img_size": cfg.data.img_size, "aug": AugmentParams.from_obj(cfg.data),
              "seed": cfg.train.seed, "num_classes": len(classes),
              "no_mosaic_from": CloseMosaic.from_config(cfg).decode_source(clock)}  # rtrain.data.close_mosaic
    ds_train = build_train_stream(
        plan, epochs=stream_epochs(cfg), clock=clock,
        decode_fn=DecodeAugment if decode == "cpu" else None, decode_kwargs=kwargs,
        decode_actors=actors, cpus_per_actor=cfg.data.cpus_per_actor,
    )
    logger.info("data: %d images, %d per epoch in batches of %s per worker (decoded in blocks of %d); "
                "decode on %s%s", plan.num_rows, plan.rows_per_epoch, cfg.train.batch_size, plan.batch_rows,
                decode,
                f" ({actors} Ray actors)" if decode == "cpu" else " (in the train workers)")
    trainer = TorchTrainer(
        train_fn or run_train_loop,
        train_loop_config={
            "config": config_to_dict(cfg), "run_dir": str(out_dir), "classes": classes,
            "num_train_images": num_images, "epoch_clock": clock, "decode": decode,
            "rows_per_epoch": plan.rows_per_epoch, "stream_batch_rows": plan.batch_rows,
            **(loop_extra or {}),
        },
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            **_ray_storage(storage_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_last, checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[*(callbacks or []), StopWhenStorageFull()],  # a full disk: no retries
        ),
        datasets={"train": ds_train},
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=_ingest_options(cfg, decode, num_workers)),
    )
    return trainer, clock


def run_train_loop(loop_config: dict) -> None:
    """`rtrain.training.train_loop.train_loop`, imported only where a worker runs it.

    Ray Train's controller unpickles the trainer's loop function; pickled by reference, the loop
    itself would make that process import its module (torchvision, the models) and never use it."""
    from rtrain.training.train_loop import train_loop

    train_loop(loop_config)


def scaling_config(cfg: Config, num_workers: int | None = None, gpus_per_worker: float = 1.0):
    """Ray Train's ScalingConfig of a run: `num_workers` (fixed), or from the config: run.gpus GPU
    workers, else run.workers CPU workers; "MIN:MAX" there gives Ray's elastic (MIN, MAX) group.

    Each worker reserves run.cpus_per_worker CPUs, a GPU share, and run.memory_per_worker_gb of
    Ray's memory resource; Ray sizes an elastic group by how many such workers each node holds.
    """
    from ray.train import ScalingConfig

    use_gpu = uses_gpu(cfg.run)
    elastic = num_workers is None and is_elastic(cfg.run)
    min_workers, max_workers = worker_range(cfg.run)
    if num_workers is None:
        # workers = 0 ("in the driver") is not a Ray Train mode here: V2's num_workers=0 keeps
        # checkpoints in a temp dir, which would defeat resuming; it runs as one worker.
        num_workers = max_workers
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    if cfg.run.memory_per_worker_gb > 0:
        resources["memory"] = int(cfg.run.memory_per_worker_gb * 1024**3)
    return ScalingConfig(
        num_workers=(min_workers, num_workers) if elastic else num_workers, use_gpu=use_gpu,
        resources_per_worker=resources, placement_strategy=cfg.run.placement_strategy,
        elastic_resize_monitor_interval_s=cfg.run.resize_interval_s,
    )


def _ray_storage(storage_dir: Path | str) -> dict:
    """RunConfig's storage arguments: a local path, or the bucket's pyarrow filesystem and the path
    in it (the filesystem `rtrain.storage` opens, so Ray and rtrain see the same objects)."""
    if store.is_bucket(storage_dir):
        fs, path = store.filesystem(storage_dir)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(storage_dir)}


# A time-limited run does not know its epoch count: its stream holds at most this many epochs
# (the loop ends the run, with a warning, if a budget outlasts them).
MAX_STREAM_EPOCHS = 2000


def stream_epochs(cfg: Config) -> int:
    if cfg.train.time_limit_min > 0:
        return min(cfg.train.epochs, MAX_STREAM_EPOCHS)
    return cfg.train.epochs


def stream_batch_rows(cfg: Config) -> int:
    """Rows per streamed block: whole per-worker batches, at least 16 rows (16 when "auto").

    A block is one decode task: fewer than ~16 images per task and Ray's per-task cost (on a
    busy node, a fresh worker process per task) outweighs the decoding.
    """
    batch = cfg.train.batch_size
    if not isinstance(batch, int):
        return 16
    return batch * -(-16 // batch)


def decode_mode(cfg: Config) -> str:
    """"cpu" (a Ray Data actor pool) or "gpu" (in the train worker, on its device) for `data.decode`."""
    if cfg.data.decode == "auto":
        return "gpu" if uses_gpu(cfg.run) else "cpu"
    if cfg.data.decode == "gpu" and not uses_gpu(cfg.run):
        logger.warning("data.decode=gpu without GPU workers: the train workers decode on their CPU")
    return cfg.data.decode


def decode_actors(cfg: Config, num_workers: int) -> int:
    """CPU decode actors of the train stream: `data.num_actors`, or (0) the CPUs Ray Train leaves free.

    On a one-node cluster the count is capped by the machine's cores, since a local Ray may be
    started with more logical CPUs than cores (see `_start_ray`). One CPU is left for the read
    step when there are CPUs to spare.
    """
    if cfg.data.num_actors > 0:
        return cfg.data.num_actors
    import ray

    train_cpus = num_workers * cfg.run.cpus_per_worker
    free = ray.cluster_resources().get("CPU", 1.0) - train_cpus
    if sum(1 for n in ray.nodes() if n.get("Alive")) == 1:
        free = min(free, (os.cpu_count() or 1) - train_cpus)
    if free >= 3:
        free -= 1
    return max(1, int(free // cfg.data.cpus_per_actor))


def _ingest_options(cfg: Config, decode: str, num_workers: int):
    """Ray Data's execution options for the train stream.

    The stream holds every epoch, and its read step is much faster than decoding: without a
    limit Ray Data would read epochs ahead until half the object store is full. The limit
    leaves room for about 32 blocks per worker in flight (at least 64 MiB).
    Deterministic runs preserve block order: Ray Data then also drops locality hints and
    hands the stream's blocks (one batch each) to the workers in turn, so each worker's rows
    of every epoch depend only on the shards, the seed and the epoch.
    """
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    batch = stream_batch_rows(cfg)
    block = batch * (cfg.data.img_size**2 * 3 if decode == "cpu" else 100 * 1024)
    options.resource_limits = options.resource_limits.min(
        ExecutionResources.for_limits(object_store_memory=max(64 * 1024**2, 32 * num_workers * block)))
    options.preserve_order = bool(cfg.data.deterministic)
    return options


# --------------------------------------------------------------------------- fit


def fit(
    config: Config | dict | str | os.PathLike | None = None,
    *,
    overrides: list[str] | None = None,
    gpus: int | str | None = None,
    workers: int | str | None = None,
    cpus_per_worker: float | None = None,
    address: str | None = None,
    name: str | None = None,
    storage: str | os.PathLike | None = None,
    resume: bool = False,
    dashboard: bool | None = None,
    dashboard_host: str | None = None,
    plots: bool = True,
    preemptible: bool = False,
) -> FitResult:
    """Train a detector on Ray Train; returns where the results are.

    config: a YAML path, a plain dict, or a Config (None only with resume: the run's config.yaml).
    overrides: `--set`-style "section.key=value" strings applied on top.
    gpus/workers/cpus_per_worker/address/name/storage/dashboard/dashboard_host: override `cfg.run`.
        gpus > 0 trains on that many GPU workers (one GPU each); otherwise `workers` CPU workers.
        Either may be "MIN:MAX": an elastic run (`rtrain.training.elastic`).
    resume: continue the run `name` (or the latest one under storage) from its last checkpoint.
    preemptible: handle SIGTERM while training (module doc; needs the main thread).
    Raises FitError/ConfigError with one line for bad input, before Ray starts; PreemptedError
    when the run stopped on a preemption with a checkpoint.
    """
    run_overrides = {
        "gpus": gpus, "workers": workers, "cpus_per_worker": cpus_per_worker, "address": address,
        "storage": None if storage is None else str(storage), "dashboard": dashboard,
        "dashboard_host": dashboard_host,
    }
    run_overrides = {k: v for k, v in run_overrides.items() if v is not None}
    base = load_config(None, overrides) if config is None and not resume else None
    storage_text = run_overrides.get("storage") or (base.run.storage if base else "runs")
    if config is not None and "storage" not in run_overrides:
        storage_text = _as_config(config, overrides).run.storage
    check_location(storage_text, "run.storage")  # before Path(): Path("s3://b/x") is the folder ./s3:/b/x
    if store.is_bucket(storage_text):
        storage_path = check_storage(store.normalize(storage_text))
    else:
        storage_path = check_storage(Path(storage_text).expanduser().resolve())
    cfg, name = resolve_run(config, overrides, name, storage_path, resume)
    run_section = {**config_to_dict(cfg)["run"], **run_overrides, "name": name, "storage": str(storage_path)}
    try:  # the whole config again: run keys are checked with the others (an elastic range and the batch)
        cfg = config_from_dict({**config_to_dict(cfg), "run": run_section})
    except ConfigError as exc:
        raise FitError(str(exc)) from None
    check_location(cfg.data.train, "data.train")  # a local folder or a bucket prefix
    check_location(cfg.data.val, "data.val")
    check_location(cfg.model.init, "model.init")
    local_only(cfg.model.backbone_weights, "model.backbone_weights")  # timm reads a local file
    if store.is_bucket(storage_path) and cfg.run.loggers:
        raise FitError(f"run.loggers {cfg.run.loggers}: not supported with storage in a bucket yet "
                       f"({storage_path}); they write local files")
    # Absolute shard paths: Ray workers (and a later --resume) may run from another directory.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, train=_absolute(cfg.data.train), val=_absolute(cfg.data.val)),
        model=dataclasses.replace(cfg.model, init=_absolute(cfg.model.init),
                                  backbone_weights=_absolute(cfg.model.backbone_weights)))
    out_dir = store.child(storage_path, name)
    # one writer per run name, checked before anything is written and before Ray
    with run_lock.hold(out_dir, what="run", error=FitError):
        return _fit_locked(cfg, name, storage_path, out_dir, resume, plots, preemptible)


def _fit_locked(cfg: Config, name: str, storage_path: Path | str, out_dir: Path | str, resume: bool,
                plots: bool, preemptible: bool = False) -> FitResult:
    """The rest of `fit`, while this process holds RUN/.lock (rtrain.runs.run_lock)."""
    try:  # run.loggers: a missing package is one line before Ray
        trackers.check_available(cfg.run.loggers)
    except trackers.TrackerError as exc:
        raise FitError(str(exc)) from None
    classes, num_images = check_data(cfg)
    from rtrain.training.guard import forced_nonfinite_steps

    try:
        forced = forced_nonfinite_steps(os.environ)  # a test hook (rtrain.training.guard)
    except ValueError as exc:
        raise FitError(str(exc)) from None
    check_model(cfg, len(classes), pretrained=not resume and not cfg.model.init)
    latest = None
    if resume:
        latest = check_resume(cfg, out_dir, [c["name"] for c in classes])
        logger.info("resuming %s from %s", name, latest or "its start (no complete checkpoint yet)")
    if cfg.model.init and latest is None:
        check_init(cfg, [c["name"] for c in classes])
    config_file = store.child(out_dir, run_dir.CONFIG_YAML)
    try:
        dump_config(cfg, config_file)
    except OSError as exc:
        raise FitError(f"{config_file}: cannot write ({exc.strerror or exc})") from None
    logger.info("run %s: %d train images, %d classes -> %s", name, num_images, len(classes), out_dir)

    import ray

    try:
        started = _start_ray(cfg)
    except Exception as exc:  # e.g. "The current node timed out during startup" on an overloaded host
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"join Ray at {cfg.run.address}" if cfg.run.address else "start a local Ray"
        raise FitError(f"could not {where}: {first}") from exc
    from rtrain.training import progress

    clock = None
    detach_bar = progress.attach_bar()  # a tqdm bar of the workers' progress lines, on a terminal
    try:
        trainer, clock = build_trainer(cfg, name, storage_path, out_dir, classes, num_images,
                                       loop_extra={"progress_s": progress.interval_for(),
                                                   "tracking": trackers.spec_for_run(cfg, name),
                                                   "test_nonfinite_steps": forced})
        stop = None
        if preemptible:
            from rtrain.training.preempt import DriverStop, tell_clock

            stop = DriverStop(tell_clock(clock, min(10.0, cfg.run.grace_s)), cfg.run.grace_s,
                              on_timeout=lambda: logger.error("%s", _grace_expired_line(cfg, out_dir)))
        try:
            with stop if stop is not None else contextlib.nullcontext():
                result = trainer.fit()
        except Exception as exc:  # ray.train.TrainingFailedError and friends: keep the cause visible
            full = storage_full_error(exc, out_dir)
            if full is not None:
                raise full from exc
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FitError(
                f"training failed: {first} (run dir: {out_dir}; rerun with resume to continue)"
            ) from exc
        if getattr(result, "error", None) is not None:
            raise FitError(f"training failed: {result.error} (run dir: {out_dir})")
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        report = dict(getattr(result, "metrics", None) or {})
        if report.get("preempted"):
            reason = stop.requested if stop is not None else None
            raise PreemptedError(preempted_line(report, out_dir, reason))
    finally:
        if detach_bar is not None:
            detach_bar()
        if clock is not None:
            ray.kill(clock)
        if started:
            ray.shutdown()
    return _finish(cfg, name, out_dir, [c["name"] for c in classes], checkpoint, plots)


def storage_full_error(exc: BaseException, out_dir: Path | str) -> FitError | None:
    """A training failure that is a full disk, as one FitError line: the file, what is kept, --resume."""
    from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, read_marker

    line = run_dir.storage_full_line(exc)
    if line is None:
        return None
    latest, _ = find_latest_complete(checkpoint_dirs(out_dir))
    kept = (f"the last complete checkpoint (epoch {int(read_marker(latest)['epoch']) + 1}) is kept"
            if latest is not None else "no complete checkpoint was written")
    parent = str(out_dir).rstrip("/").rsplit("/", 1)[0]
    resume = f"python -m rtrain.fit --resume --name {_base_name(out_dir)} --storage {parent}"
    return FitError(f"training stopped, the disk is full: {line}; {kept}; free space, then `{resume}` "
                    "continues")


def _finish(
    cfg: Config, name: str, out_dir: Path | str, class_names: list[str], checkpoint, plots: bool
) -> FitResult:
    rows = run_dir.read_metrics(out_dir)
    evaluated = [r for r in rows if r.get("evaluated")]
    best = max(evaluated, key=lambda r: r.get("mAP", -1.0)) if evaluated else {}
    best_w = store.child(out_dir, run_dir.BEST_WEIGHTS)
    last_w = store.child(out_dir, run_dir.LAST_WEIGHTS)
    result = FitResult(
        run_dir=out_dir, name=name, config=cfg,
        best_weights=best_w if store.is_file(best_w) else None,
        last_weights=last_w if store.is_file(last_w) else None,
        best_metrics=best, last_metrics=rows[-1] if rows else {}, epochs_done=len(rows),
        checkpoint=checkpoint,
    )
    if plots and rows:
        try:
            result.plots = make_plots(out_dir, cfg, class_names, result.best_weights or result.last_weights)
        except Exception as exc:  # a plot must never cost the user a finished run
            logger.warning("plots not written: %s", exc)
    trackers.finish_run(trackers.spec_for_run(cfg, name), out_dir, config_to_dict(cfg),
                        result.best_weights or result.last_weights, result.plots)
    logger.info("run %s finished: %d epochs, best mAP %s", name, result.epochs_done,
                f"{best['mAP']:.4f}" if best else "-")
    return result


def make_plots(out_dir: Path | str, cfg: Config, class_names: list[str], weights: Path | str | None,
               num_images: int = 8) -> list[Path | str]:
    """RUN/plots/curves.png and (with weights) RUN/plots/val_predictions.png."""
    import itertools

    import torch

    from rtrain.data.batches import batch_to_targets, iter_batches_local
    from rtrain.evaluation.predict_loop import predict_batches
    from rtrain.runs.checkpoint import load_weights
    from rtrain.runs.loading import build_detector

    plots_dir = store.child(out_dir, run_dir.PLOTS_DIR)
    paths = [run_dir.plot_curves(run_dir.read_metrics(out_dir), store.child(plots_dir, "curves.png"))]
    if weights is None:
        return paths
    model = build_detector(cfg, len(class_names))
    model.load_state_dict(load_weights(weights)["model"])
    batches = iter_batches_local(cfg.data.val, batch_size=num_images, train=False, img_size=cfg.data.img_size)
    images, preds, truths = [], [], []
    with torch.no_grad():
        for batch, dets in itertools.islice(predict_batches(model, batches, device="cpu",
                                                            score_thresh=0.3, amp=False), 1):
            images += list(batch["images"])
            preds += dets
            truths += batch_to_targets(batch, "cpu")
    paths.append(run_dir.plot_predictions(images, preds, truths, class_names,
                                          store.child(plots_dir, "val_predictions.png")))
    return paths
