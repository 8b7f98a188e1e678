"""Experiment trackers: TensorBoard event files and MLflow runs fed from rtrain's metrics rows.

`run.loggers: [tensorboard, mlflow]` (default none) turns them on:

- tensorboard: event files in RUN/tensorboard/ (`torch.utils.tensorboard`; needs the
  `tensorboard` package: `pip install -e ".[tensorboard]"`). View: `tensorboard --logdir RUN`
  (or the sweep directory, one run per trial).
- mlflow: one MLflow run per rtrain run in the experiment named after the run (a sweep: one
  experiment named after the sweep, one run per trial, named after the trial), at
  `run.mlflow_uri`; "" = `file:<storage>/mlruns`, the folder beside the run (a sweep's beside the
  sweep). Needs `mlflow-skinny` (`pip install -e ".[mlflow]"`). MLflow 3 refuses its file store
  unless MLFLOW_ALLOW_FILE_STORE=true: for a `file:` URI it is set in the logging process (a
  value the user set wins). A file store needs no server and no database, and concurrent trials
  on a shared filesystem can write to it (SQLite on NFS cannot be trusted with that). View:
  `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:runs/mlruns` (the full
  `mlflow` package serves the UI).

What is logged: every epoch's metrics row (numbers only: booleans and None are left out) as
scalars at step = the row's global optimizer `step`; the resolved config as params
`section.key`; at the end (MLflow) RUN/best.pt (or last.pt when nothing was evaluated),
RUN/config.yaml and the PNGs under RUN/plots as artifacts, and the run marked FINISHED (FAILED
for a failed trial). Metric names MLflow refuses (characters outside letters, digits,
`_ - . / space`) have those characters replaced by `_` (per-class `AP/<class>`).

Where it runs (the simplest way that logs every epoch while the run is live): rank 0 of the
Train workers logs each epoch right after it appends the metrics row (`open_for_loop` +
`Trackers.log_epoch` in `rtrain.training.train_loop`); the driver logs the artifacts once the run is over
and its plots are drawn (`finish_run`: `rtrain.training.runner._finish` for a fit, the sweep driver for
every trial, ASHA-stopped ones included, after Tune ends). A driver-side Ray Train callback
was not used: in Ray Train V2 callbacks run in the Train controller actor, not the driver, so
it is no simpler, and Tune trials would need a second path. On a cluster the rank-0 worker
and the driver must both reach the tracking URI (a path on the shared storage, or a server).

Resuming: a resumed run appends to the same RUN/tensorboard/ (the writer is opened with
`purge_step` = the step after the last kept metrics row, so TensorBoard drops what a killed
run logged beyond the checkpoint it resumed from) and to the same MLflow run, whose id is kept
in RUN/mlflow_run.json (tracking URI, experiment id, run id). MLflow keeps every value it was
sent: an epoch redone after a kill has two values at its step. MLflow params cannot change: a
config value that differs on resume (e.g. `train.epochs`) is recorded as the tag
`changed_on_resume.<key>` with the new value.

Failures: a missing package is found before Ray starts (`check_available`: one line naming the
extra to install, `TrackerError`). After that a tracker never stops training: an error while
logging is a warning (once per tracker and stage) and the run goes on; a tracker that cannot
start, or fails 3 epochs in a row, is left out for the rest of that process (`Trackers`). An
HTTP tracking server that does not answer costs rank 0 seconds, not minutes: MLflow's retries
and timeout are lowered unless the user set them (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, _TIMEOUT=15).

Contract of a Tracker: `start(run_dir, cfg_dict, name)` opens (or reopens) the tracker's run
for RUN = run_dir, with the resolved config as a plain dict; `log_epoch(metrics, step)` logs one
metrics row; `finish(best_weights, plots, status)` logs the artifacts (paths; None / [] allowed)
and closes. Each call is complete when it returns (event files flushed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rtrain.errors import RtrainError

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_JSON = "mlflow_run.json"
MLRUNS_DIR = "mlruns"
LOGGERS = ("tensorboard", "mlflow")
# logger -> (module to import, pip extra of rtrain)
REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


class TrackerError(RtrainError, RuntimeError):
    """A logger that cannot work here (its package is missing): one line naming the extra."""


def check_available(loggers: Iterable[str]) -> None:
    """Raise TrackerError (one line) for the first logger whose package cannot be imported."""
    for name in loggers:
        if name not in REQUIRES:
            raise TrackerError(f"run.loggers: unknown logger {name!r} (valid: {', '.join(LOGGERS)})")
        module, extra = REQUIRES[name]
        try:
            __import__(module)
        except ImportError:
            raise TrackerError(f"run.loggers: {name} needs the {module} package: "
                               f'pip install -e ".[{extra}]"') from None


def default_mlflow_uri(storage: str | os.PathLike) -> str:
    """`file:<storage>/mlruns`: the folder beside the runs (or sweeps) stored in `storage`."""
    return "file:" + str(Path(storage).expanduser().resolve() / MLRUNS_DIR)


def tracking_spec(loggers: Sequence[str], mlflow_uri: str, storage: str | os.PathLike, experiment: str,
                  run_name: str) -> dict:
    """The plain-data description of a run's trackers that travels in the loop config.

    {"loggers", "mlflow_uri" (resolved), "experiment", "run_name"}; fit: experiment = run_name =
    the run's name; a sweep trial: the sweep's name and the trial's directory name.
    """
    uri = absolute_uri(mlflow_uri) if mlflow_uri else default_mlflow_uri(storage)
    return {"loggers": list(dict.fromkeys(loggers)), "mlflow_uri": uri, "experiment": experiment,
            "run_name": run_name}


def absolute_uri(uri: str) -> str:
    """A local store's URI made absolute (`mlruns`, `file:mlruns` -> `file:/abs/mlruns`): Ray
    workers and Tune trials run in other working directories. Other URIs are returned as given."""
    if uri.startswith("file:") and not uri.startswith("file://"):
        return "file:" + str(Path(uri[len("file:"):]).expanduser().resolve())
    if ":" not in uri:  # a plain path
        return "file:" + str(Path(uri).expanduser().resolve())
    return uri


def spec_for_run(cfg, name: str) -> dict:
    """`tracking_spec` of a fit run (Config `cfg`, stored under cfg.run.storage as `name`)."""
    return tracking_spec(cfg.run.loggers, cfg.run.mlflow_uri, cfg.run.storage, name, name)


def flatten_config(cfg_dict: Mapping, prefix: str = "") -> dict[str, str]:
    """{"model": {"name": "x"}} -> {"model.name": "x"}; values as MLflow stores them (str)."""
    out: dict[str, str] = {}
    for key, value in cfg_dict.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, full + "."))
        else:
            out[full] = str(value)
    return out


def scalars(metrics: Mapping) -> dict[str, float]:
    """The loggable numbers of a metrics row: ints and floats (NaN/inf kept), no bools or None."""
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


_BAD_NAME = re.compile(r"[^\w.\- /]")


def metric_name(key: str) -> str:
    """`key` with the characters MLflow refuses in a metric name replaced by `_`."""
    name = _BAD_NAME.sub("_", key)
    name = re.sub(r"/+", "/", name).strip("/")
    parts = [p if p not in (".", "..") else "_" for p in name.split("/")]
    return "/".join(parts) or "_"


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Scalars in RUN/tensorboard/ (one event file per writer session; a resume appends one)."""

    name = "tensorboard"

    def __init__(self) -> None:
        self.writer = None
        self.log_dir: Path | None = None

    def start(self, run_dir, cfg_dict: Mapping, name: str) -> None:
        from rtrain.runs.run_dir import read_metrics

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        rows = read_metrics(run_dir, strict=False)
        self._purge_step = int(rows[-1].get("step", 0)) + 1 if rows else None
        self._config_text = "\n".join(f"    {k}: {v}" for k, v in flatten_config(cfg_dict).items())

    def _open(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
            if self._purge_step is None:  # a fresh run: the config once, as text
                self.writer.add_text("config", self._config_text, global_step=0)
        return self.writer

    def log_epoch(self, metrics: Mapping, step: int) -> None:
        writer = self._open()
        for key, value in scalars(metrics).items():
            writer.add_scalar(key, value, global_step=int(step))
        writer.flush()

    def finish(self, best_weights=None, plots: Sequence = (), status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- MLflow


class MLflowTracker:
    """One MLflow run per rtrain run; its id in RUN/mlflow_run.json so a resume reopens it."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = None
        self.run_id: str | None = None

    def start(self, run_dir, cfg_dict: Mapping, name: str) -> None:
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A server that does not answer costs seconds, not MLflow's default minutes of retries, in
        # the rank-0 worker that trains (values the user set win).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.run_dir = Path(run_dir)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        note = self.run_dir / MLFLOW_RUN_JSON
        saved = json.loads(note.read_text(encoding="utf-8")) if note.is_file() else {}
        if saved.get("tracking_uri") == self.tracking_uri and self._exists(saved.get("run_id")):
            self.run_id = saved["run_id"]
            if self.client.get_run(self.run_id).info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = self._experiment_id()
            run = self.client.create_run(experiment_id, run_name=name, tags={"rtrain.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            from rtrain.runs.run_dir import atomic_write_bytes

            atomic_write_bytes(note, json.dumps({"tracking_uri": self.tracking_uri,
                                                 "experiment_id": experiment_id,
                                                 "run_id": self.run_id}, indent=1).encode("utf-8"))
        self._log_params(flatten_config(cfg_dict))

    def _exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted, or another store: start a new run
            return False

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another trial of the sweep created it first
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        old = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in old]
        changed = [RunTag(f"changed_on_resume.{k}", v) for k, v in params.items() if k in old and old[k] != v]
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100])

    def log_epoch(self, metrics: Mapping, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(metric_name(k), v, now, int(step)) for k, v in scalars(metrics).items()
                  if not math.isinf(v)]  # MLflow's stores refuse +-inf; NaN is kept
        for i in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[i:i + 1000])

    def finish(self, best_weights=None, plots: Sequence = (), status: str = "FINISHED") -> None:
        from rtrain.runs.run_dir import CONFIG_YAML

        if best_weights is not None and Path(best_weights).is_file():
            self.client.log_artifact(self.run_id, str(best_weights))
        config = self.run_dir / CONFIG_YAML
        if config.is_file():
            self.client.log_artifact(self.run_id, str(config))
        for plot in plots:
            if Path(plot).is_file():
                self.client.log_artifact(self.run_id, str(plot), artifact_path="plots")
        self.client.set_terminated(self.run_id, status=status)


# --------------------------------------------------------------------------- the group


def make_trackers(spec: Mapping | None) -> list:
    """The Tracker objects of a `tracking_spec` (none for None or no loggers)."""
    trackers: list = []
    for name in (spec or {}).get("loggers", []):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker())
        elif name == "mlflow":
            trackers.append(MLflowTracker(spec["mlflow_uri"], spec["experiment"]))
        else:
            raise TrackerError(f"run.loggers: unknown logger {name!r} (valid: {', '.join(LOGGERS)})")
    return trackers


MAX_FAILED_EPOCHS = 3  # consecutive epochs a tracker may fail to log before it is left out


class Trackers:
    """Several trackers called as one. An error in one is a warning (once per tracker and stage) and
    the others go on; a tracker whose start failed, or that failed MAX_FAILED_EPOCHS epochs in a row
    (a tracking server that is gone: each call costs MLflow's retries), is left out of the later
    calls, with one more warning. Training never stops for a tracker."""

    def __init__(self, trackers: list) -> None:
        self.trackers = list(trackers)
        self._warned: set[tuple[str, str]] = set()
        self._broken: set[str] = set()
        self._failed_epochs: dict[str, int] = {}

    def _call(self, stage: str, *args: Any) -> None:
        for tracker in self.trackers:
            if tracker.name in self._broken:
                continue
            try:
                getattr(tracker, stage)(*args)
            except Exception as exc:
                failed = self._failed_epochs[tracker.name] = self._failed_epochs.get(tracker.name, 0) + 1
                if (tracker.name, stage) not in self._warned:
                    self._warned.add((tracker.name, stage))
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    logger.warning("%s logger: %s failed (%s: %s); training goes on", tracker.name, stage,
                                   type(exc).__name__, first)
                if stage == "start" or (stage == "log_epoch" and failed >= MAX_FAILED_EPOCHS):
                    self._broken.add(tracker.name)
                    if stage == "log_epoch":
                        logger.warning("%s logger: %d epochs in a row not logged; left out for the rest of "
                                       "this run", tracker.name, failed)
            else:
                self._failed_epochs[tracker.name] = 0

    def start(self, run_dir, cfg_dict: Mapping, name: str) -> Trackers:
        self._call("start", run_dir, cfg_dict, name)
        return self

    def log_epoch(self, metrics: Mapping, step: int) -> None:
        self._call("log_epoch", metrics, step)

    def finish(self, best_weights=None, plots: Sequence = (), status: str = "FINISHED") -> None:
        self._call("finish", best_weights, list(plots), status)


def open_for_loop(spec: Mapping | None, run_dir, cfg_dict: Mapping) -> Trackers:
    """Rank 0 of the train loop: the run's trackers, started (after the metrics are truncated)."""
    return Trackers(make_trackers(spec)).start(run_dir, cfg_dict, (spec or {}).get("run_name", ""))


def finish_run(spec: Mapping | None, run_dir, cfg_dict: Mapping, best_weights=None, plots: Sequence = (),
               status: str = "FINISHED") -> None:
    """The driver, once a run (or trial) is over: its artifacts logged and its trackers closed."""
    if not (spec or {}).get("loggers"):
        return
    group = Trackers([t for t in make_trackers(spec) if t.name == "mlflow"])  # TB has no artifacts
    group.start(run_dir, cfg_dict, spec.get("run_name", ""))
    group.finish(best_weights, plots, status)
