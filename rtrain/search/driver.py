"""Run a sweep on Ray Tune: one rtrain training run per trial, ASHA on a val score, then the report.

    from rtrain.search.spec import load_sweep
    from rtrain.search.driver import run_sweep
    result = run_sweep(load_sweep("configs/sweep_quickstart.yaml"), name="demo")
    print(result.summary())

Each trial is a Ray Train `TorchTrainer` running the unchanged `rtrain.training.train_loop.train_loop`
(W workers, CPU or G GPUs) with `TuneReportCallback`, which forwards rank 0's per-epoch report
to Tune; `SweepReportCallback` adds `epochs_done` (ASHA's time attribute). ASHA is
`rtrain.search.stopping.SignalASHA` on `tune.metric` (default mAP50): a rung stops nothing until a trial
there reaches `tune.min_signal`. The trial's run
directory (metrics.jsonl, best.pt, last.pt, checkpoints) is `SWEEP/<trial dir>/run`.

Layout of SWEEP = <storage>/<name>:

    SWEEP/sweep.yaml                 the resolved sweep (base inline): what --resume reruns
    SWEEP/<trial dir>/               Tune's trial dir (params.json, progress.csv, result.json)
    SWEEP/<trial dir>/run/           the rtrain run of that trial (see rtrain.runs.run_dir)
    SWEEP/results.csv, results.md, pareto.png, best.yaml     (rtrain.search.report)
    SWEEP/.lock                      the driver that runs the sweep (rtrain.runs.run_lock): one at a time
    SWEEP/../mlruns/                 run.loggers: mlflow with the default store: one experiment named
                                     after the sweep, one run per trial (rtrain.training.trackers)

In the Ray dashboard (on by default when the sweep starts its own Ray: 127.0.0.1:8265, token
from `ray get-auth-token`) a sweep shows as: one `ImplicitFunc` actor per running trial (Tune's
trial), under it a `TrainController` actor and the `RayTrainWorker` actors of that trial's
TorchTrainer, plus the Ray Data decode actors (`MapWorker(MapBatches(DecodeAugment))`); the Jobs
page shows the CLI as one driver job; the Train page lists one Train run per trial (named after the
trial) because the sweep sets RAY_TRAIN_ENABLE_STATE_TRACKING=1; the Placement Groups tab shows one
group per running trial's workers (see below).

Ray 2.60 bug worked around here (README.md, "Search"): when ASHA stops a trial, its Train
worker placement group is freed only by a helper that needs the State API (served by the
dashboard). Without a dashboard the group leaks and the next trial waits for resources forever
(WorkerGroupStartupTimeoutError). So (1) a sweep that starts its own Ray keeps the dashboard on,
and (2) rank 0 of every trial notes its placement group id in RUN/.placement_groups and
`FreeTrainPlacementGroups` (a Tune callback in this driver) removes the group a few seconds after
Tune stops or fails the trial; the dashboard is then not needed (tests run without it). What stays
after a stopped trial without a dashboard is Ray's idle cleaner actor (no CPU) until Ray shuts down.

CPU sizing: a trial needs W x cpus_per_worker for its workers plus data.num_actors x
data.cpus_per_actor for its decode tasks (at least one: 0 = auto), and Ray Data's read step
needs one whole free CPU, so max_concurrent defaults to floor((cluster CPUs - 1) / that) (at
least 1). A sweep that starts its own Ray gets max(4, cores) logical CPUs
(rtrain.ray_session.start_ray), as rtrain.fit does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rtrain.config import TrainConfig, config_from_dict, config_to_dict, dump_config
from rtrain.errors import FAILED, RtrainError
from rtrain.ray_session import start_ray
from rtrain.runs import run_dir as run_files
from rtrain.runs import run_lock
from rtrain.search.report import (
    BEST_YAML,
    PARETO_PNG,
    TrialRecord,
    best_record,
    format_table,
    plot_pareto,
    write_best_config,
    write_tables,
)
from rtrain.search.spec import (
    EARLY_METRICS,
    MINUTES_ATTR,
    TIME_ATTR,
    SweepError,
    SweepSpec,
    apply_params,
    effective_lr,
)
from rtrain.training import trackers
from rtrain.training.runner import FitError, check_data, check_storage, local_only

logger = logging.getLogger(__name__)

SWEEP_YAML = "sweep.yaml"
TRIAL_RUN = "run"  # the rtrain run dir inside each Tune trial dir
TRIAL_INFO = "rtrain_trial.json"  # trial id, params, run dir (written when the trial starts)
FAILURE_TXT = "failure.txt"  # one line: why the trial failed
PG_NOTE = ".placement_groups"  # hex ids of the trial's Train worker placement groups, one a line
TRIAL_CPU = 0.05  # the Tune trial actor only waits on its TorchTrainer


class TrialFailed(RtrainError, RuntimeError):
    """A trial could not train; the message is the one-line reason the table shows."""

    exit_code = FAILED


@dataclass
class SweepResult:
    sweep_dir: Path
    name: str
    records: list[TrialRecord]
    best: TrialRecord | None
    best_yaml: Path | None
    tables: tuple[Path, Path]
    plot: Path | None
    table_text: str = ""
    counts: dict = field(default_factory=dict)
    interrupted: bool = False  # trials left to run: `python -m rtrain.tune --resume` continues

    def summary(self) -> str:
        lines = [self.table_text, "", f"sweep:       {self.sweep_dir}",
                 "trials:      " + ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())),
                 f"table:       {self.tables[0]} , {self.tables[1]}",
                 f"plot:        {self.plot or '- (no evaluated trial)'}"]
        if self.best is not None:
            lines += [f"best:        {self.best.trial_id} {self.best.variant} mAP {self.best.best_map:.4f}",
                      f"best config: {self.best_yaml}  (python -m rtrain.fit --config {self.best_yaml})"]
        else:
            lines.append("best:        - (no trial was evaluated)")
        if self.interrupted:
            lines.append(f"interrupted: continue with python -m rtrain.tune --resume --name {self.name} "
                         f"--storage {self.sweep_dir.parent}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- inside a trial


def failure_reason(exc: BaseException) -> str:
    """One line for the table: the innermost worker exception as `Type: message` when there is one."""
    full = run_files.storage_full_line(exc)  # also when Ray's ControllerError holds it as text only
    if full is not None:
        return f"the disk is full: {full}"[:300]
    failures = getattr(exc, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) if failures else None
    while inner is not None and getattr(inner, "cause", None) is not None and inner.cause is not inner:
        inner = inner.cause
    if inner is not None and not hasattr(inner, "worker_failures"):
        text = str(inner).strip().splitlines()
        return f"{type(inner).__name__}: {text[0] if text else ''}"[:300]
    text = str(exc)
    found = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Killed)\b:?.*)$", text, re.MULTILINE)
    if found:
        return found[-1].strip()[:300]
    first = text.strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]


def train_loop_noting_group(loop_config: dict) -> None:
    """`rtrain.training.train_loop.train_loop`, after rank 0 notes its placement group (module doc)."""
    import ray
    import ray.train

    from rtrain.training.train_loop import train_loop

    loop_config = dict(loop_config)
    note = loop_config.pop("placement_group_note", None)
    pg = ray.util.get_current_placement_group()
    if note and pg is not None and ray.train.get_context().get_world_rank() == 0:
        with open(note, "a", encoding="utf-8") as fh:
            fh.write(pg.id.hex() + "\n")
    train_loop(loop_config)


def _report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        """TuneReportCallback plus `epochs_done` = the loop's 0-based `epoch` + 1 (ASHA's clock), and
        every EARLY_METRICS key in every report: an epoch without evaluation carries the last
        evaluated value forward (0.0 before the first), as the loop does for mAP; Tune refuses a
        result without its metric."""

        def __init__(self):
            super().__init__()
            self.last = dict.fromkeys(EARLY_METRICS, 0.0)

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [tune_result(m, self.last) for m in metrics], checkpoint)

    return SweepReportCallback()


def tune_result(metrics: dict, last: dict) -> dict:
    """What Tune gets for one epoch's report: `metrics` plus `epochs_done` and `minutes_done` (the
    clocks, `tune.clock`), and every EARLY_METRICS
    key, taken from `last` (the trial's last evaluated values, updated here) when this epoch was
    not evaluated. None values are left out (Tune wants numbers)."""
    if metrics.get("evaluated"):
        last.update({k: float(metrics[k]) for k in EARLY_METRICS if metrics.get(k) is not None})
    return {**last, **{k: v for k, v in metrics.items() if v is not None},
            TIME_ATTR: int(metrics.get("epoch", -1)) + 1,
            MINUTES_ATTR: float(metrics.get("elapsed_s") or 0.0) / 60.0}


def run_trial(params: dict, context: dict) -> None:
    """The Tune trainable: train the config `base` + `params` as one rtrain run; raise TrialFailed.

    context: {"base": config dict (absolute data paths), "classes", "num_images", "settings":
    TuneSettings as a dict, "sweep_dir": SWEEP}. Runs in Tune's trial actor; cwd is Tune's local
    staging dir of the trial; the rtrain run lives in SWEEP/<trial dir>/run.
    """
    import ray
    from ray import tune

    from rtrain.config import ConfigError
    from rtrain.training.runner import build_trainer

    tctx = tune.get_context()
    # The trial's dir in the sweep's storage, not Tune's local staging copy (get_trial_dir(), under
    # the Ray session's temp dir, synced to storage by Tune): a resumed sweep in a new Ray session
    # must find the trial's checkpoints, and on a cluster they must be on the shared storage.
    trial_dir = Path(context["sweep_dir"]) / Path(tctx.get_trial_dir()).name
    out_dir = trial_dir / TRIAL_RUN
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FAILURE_TXT).unlink(missing_ok=True)
    settings = context["settings"]
    params = {k: v for k, v in params.items() if "." in k}
    info = {"trial_id": tctx.get_trial_id(), "params": params, "run_dir": str(out_dir)}
    run_files.atomic_write_bytes(trial_dir / TRIAL_INFO, json.dumps(info, indent=1).encode("utf-8"))

    def fail(reason: str, exc: BaseException | None = None):
        run_files.atomic_write_bytes(out_dir / FAILURE_TXT, (reason + "\n").encode("utf-8"))
        raise TrialFailed(reason) from exc

    workers = int(settings["workers_per_trial"])
    gpus = float(settings["gpus_per_trial"])
    try:
        data = apply_params(context["base"], params)
        data["run"] = {**data["run"], "name": TRIAL_RUN, "storage": str(trial_dir), "workers": workers,
                       "gpus": math.ceil(gpus), "cpus_per_worker": settings["cpus_per_worker"],
                       "max_failures": settings["max_failures"]}
        cfg = config_from_dict(data)
    except ConfigError as exc:
        fail(f"bad config: {exc}", exc)
    dump_config(cfg, out_dir / run_files.CONFIG_YAML)

    clock = None
    try:
        trainer, clock = build_trainer(
            cfg, TRIAL_RUN, trial_dir, out_dir, context["classes"], context["num_images"],
            train_fn=train_loop_noting_group, callbacks=[_report_callback()],
            loop_extra={"placement_group_note": str(out_dir / PG_NOTE),
                        "tracking": trial_tracking_spec(cfg, Path(context["sweep_dir"]), trial_dir.name)},
            num_workers=workers, gpus_per_worker=gpus / workers,
        )
        trainer.fit()
    except TrialFailed:
        raise
    except Exception as exc:  # OOM, NonFiniteLossError, a bad shape: recorded, the sweep goes on
        if len(run_files.read_metrics(out_dir)) >= cfg.train.epochs:
            # Every epoch ran: the error is Tune stopping the trial at max_t while its trainer
            # was still exiting (e.g. ActorDiedError), not a failure of the run.
            logger.info("trial %s finished its %d epochs; ignoring on exit: %s", info["trial_id"],
                        cfg.train.epochs, failure_reason(exc))
            return
        fail(failure_reason(exc), exc)
    finally:
        if clock is not None:
            ray.kill(clock)


# --------------------------------------------------------------------------- in the driver


def _tune_callback_class():
    from ray import tune

    class FreeTrainPlacementGroups(tune.Callback):
        """Remove a stopped/failed trial's Train worker placement groups `delay_s` after Tune ends it.

        The delay lets the trial actor (and so its Train controller) die first, so nothing
        recreates the group; whatever is still pending is removed when the sweep ends.
        """

        def __init__(self, delay_s: float = 3.0) -> None:
            self.delay_s = delay_s
            self.pending: list[tuple[float, str]] = []
            self.freed = 0

        def _queue(self, trial) -> None:
            path = getattr(trial, "path", None) or getattr(trial, "local_path", None)  # storage first
            if path:
                self.pending.append((time.monotonic() + self.delay_s, str(path)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._queue(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._queue(trial)

        def on_step_begin(self, iteration, trials, **info):
            now = time.monotonic()
            due = [p for t, p in self.pending if t <= now]
            self.pending = [(t, p) for t, p in self.pending if t > now]
            for path in due:
                self.freed += free_placement_groups(Path(path) / TRIAL_RUN / PG_NOTE)

        def on_experiment_end(self, trials, **info):
            for _, path in self.pending:
                self.freed += free_placement_groups(Path(path) / TRIAL_RUN / PG_NOTE)
            self.pending = []

    return FreeTrainPlacementGroups


def free_placement_groups(note: Path) -> int:
    """Remove the placement groups listed in `note` that still exist; returns how many were removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not note.is_file():
        return 0
    removed = 0
    for line in note.read_text(encoding="utf-8").split():
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(line)))
            state = placement_group_table(pg).get("state")
            if state and state != "REMOVED":
                remove_placement_group(pg)
                removed += 1
                logger.info("freed the Train placement group %s of trial %s", line, note.parent.parent.name)
        except (ValueError, ray.exceptions.RayError) as exc:
            logger.warning("could not free placement group %s (%s): %s", line, note, exc)
    return removed


def auto_concurrency(spec: SweepSpec, cluster: dict) -> int:
    """Trials that fit at once: CPUs (leaving one whole CPU to Ray Data) and GPUs; at least 1."""
    t = spec.tune
    data = spec.base["data"]
    decoders = max(1, data["num_actors"])  # 0 (auto) takes what is free: size the trial for one
    per_trial = t.workers_per_trial * t.cpus_per_worker + decoders * data["cpus_per_actor"] + TRIAL_CPU
    k = math.floor((float(cluster.get("CPU", 1)) - 1.0) / per_trial + 1e-9)
    if t.gpus_per_trial > 0:
        k = min(k, math.floor(float(cluster.get("GPU", 0)) / t.gpus_per_trial + 1e-9))
    return max(1, k)


def _absolute_data(base: dict) -> dict:
    """Data paths made absolute (trials run with the trial dir as cwd)."""
    data = {**base["data"]}
    for key in ("train", "val"):
        if data[key]:
            data[key] = str(Path(data[key]).expanduser().resolve())
    return {**base, "data": data}


def save_spec(spec: SweepSpec, path: Path) -> Path:
    """SWEEP/sweep.yaml: the sweep with its base inline, loadable by `rtrain.search.spec.load_sweep`."""
    doc = {
        "base": spec.base,
        "search": {d.key: {d.kind: list(d.values)} for d in spec.space},
        "tune": dataclasses.asdict(spec.tune),
    }
    if spec.quickstart_data:
        doc["quickstart_data"] = spec.quickstart_data
    text = f"# Resolved from {spec.source}; rerun: python -m rtrain.tune --config {path}\n"
    run_files.atomic_write_bytes(path, (text + yaml.safe_dump(doc, sort_keys=False)).encode("utf-8"))
    return path


def latest_sweep(storage: Path) -> Path | None:
    sweeps = [p for p in storage.iterdir() if (p / SWEEP_YAML).is_file()] if storage.is_dir() else []
    return max(sweeps, key=lambda p: (p / SWEEP_YAML).stat().st_mtime) if sweeps else None


def resolve_sweep_dir(spec: SweepSpec | None, storage: Path, name: str | None, resume: bool) -> Path:
    """SWEEP: new (refuses an existing name) or, with resume, the named/latest one (SweepError)."""
    if resume:
        path = storage / name if name else latest_sweep(storage)
        if path is None or not (path / SWEEP_YAML).is_file():
            raise SweepError(f"{storage}: no sweep {'named ' + repr(name) + ' ' if name else ''}to resume")
        return path
    if spec is None:
        raise SweepError("no sweep config given (pass --config)")
    name = name or f"{spec.source.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = storage / name
    if path.exists() and any(p.name != run_lock.LOCK_FILE for p in path.iterdir()):
        raise SweepError(f"{path}: a sweep named {name!r} exists; pass --resume to continue it or choose "
                         "another --name")
    return path


def run_sweep(
    spec: SweepSpec | None,
    *,
    name: str | None = None,
    storage: str | os.PathLike | None = None,
    resume: bool = False,
    address: str | None = None,
    dashboard: bool = True,
) -> SweepResult:
    """Run (or with resume=True continue) a sweep and write its report; see the module doc.

    spec: from `rtrain.search.spec.load_sweep` (None with resume: SWEEP/sweep.yaml). storage: folder of
    sweeps (default `<base run.storage>/sweeps`). address: join a Ray cluster instead of starting
    one. Uses an already initialised Ray as is; shuts Ray down only if it started it.
    Raises SweepError / FitError (one line) on bad input before any trial starts.
    """
    if storage is None:
        base_storage = spec.base["run"]["storage"] if spec is not None else "runs"
        local_only(str(base_storage), "base run.storage")  # before Path() mangles a URI
        storage = Path(base_storage) / "sweeps"
    local_only(str(storage), "--storage")
    storage_path = check_storage(Path(storage).expanduser().resolve())
    sweep_dir = resolve_sweep_dir(spec, storage_path, name, resume)
    # one driver per sweep directory, checked before anything is written and before Ray
    with run_lock.hold(sweep_dir, what="sweep", error=SweepError):
        return _run_sweep_locked(spec, sweep_dir, storage_path, resume, address, dashboard)


def _run_sweep_locked(spec: SweepSpec | None, sweep_dir: Path, storage_path: Path, resume: bool,
                      address: str | None, dashboard: bool) -> SweepResult:
    """The rest of `run_sweep`, while this process holds SWEEP/.lock (rtrain.runs.run_lock)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from rtrain.search.stopping import SignalASHA

    if spec is None:
        from rtrain.search.spec import load_sweep

        spec = load_sweep(sweep_dir / SWEEP_YAML)
    if spec.quickstart_data:
        from rtrain.training.quickstart import prepare_synthetic

        prepare_synthetic(spec.quickstart_data)
    base = _absolute_data(spec.base)
    classes, num_images = check_data(config_from_dict(base))
    if not resume:
        save_spec(spec, sweep_dir / SWEEP_YAML)
    if spec.base["eval"]["interval"] != 1:
        logger.warning("eval.interval is %d: ASHA compares the last evaluated score; 1 is best for sweeps",
                       spec.base["eval"]["interval"])

    try:  # run.loggers: a missing package is one line before Ray
        trackers.check_available(base["run"]["loggers"])
    except trackers.TrackerError as exc:
        raise SweepError(str(exc)) from None

    started = start_ray(address, dashboard=dashboard)
    try:
        context = {"base": base, "classes": classes, "num_images": num_images,
                   "settings": dataclasses.asdict(spec.tune), "sweep_dir": str(sweep_dir)}
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": TRIAL_CPU})
        concurrency = spec.tune.max_concurrent or auto_concurrency(spec, ray.cluster_resources())
        logger.info("sweep %s: %d trial(s), %d at a time, ASHA on %s (cuts once a rung's best reaches %g) "
                    "over %g %s, first cut after %g -> %s", sweep_dir.name, spec.num_trials(), concurrency,
                    spec.tune.metric, spec.tune.min_signal, spec.max_t, spec.tune.clock, spec.grace_period,
                    sweep_dir)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space(),
                tune_config=tune.TuneConfig(
                    metric=spec.tune.metric, mode="max", num_samples=spec.tune.num_samples,
                    # max_concurrent_trials is ignored with a SearchAlgorithm: limit it here
                    search_alg=BasicVariantGenerator(random_state=spec.tune.seed, max_concurrent=concurrency),
                    scheduler=SignalASHA(min_signal=spec.tune.min_signal, time_attr=spec.time_attr,
                                         max_t=spec.max_t, reduction_factor=spec.tune.reduction_factor,
                                         grace_period=spec.grace_period),
                ),
                run_config=tune.RunConfig(
                    name=sweep_dir.name, storage_path=str(storage_path),
                    callbacks=[_tune_callback_class()()],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                ),
            )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    records = collect_records(grid, spec, len(classes))
    finish_trial_trackers(records, sweep_dir)
    return write_report(records, spec, sweep_dir)


def trial_tracking_spec(cfg, sweep_dir: Path, trial_name: str) -> dict:
    """A trial's trackers (rtrain.training.trackers): MLflow experiment = the sweep's name, run = the trial's
    directory name; the default MLflow store beside the sweep (file:<sweep storage>/mlruns)."""
    return trackers.tracking_spec(cfg.run.loggers, cfg.run.mlflow_uri, sweep_dir.parent, sweep_dir.name,
                                  trial_name)


def finish_trial_trackers(records: list[TrialRecord], sweep_dir: Path) -> None:
    """After Tune ends: each trial that ran (done, ASHA-stopped or failed; not an interrupted one,
    which --resume continues) gets its artifacts logged and its MLflow run closed, FAILED for an
    error. A trial has no plots of its own, so its curves are drawn first (RUN/plots/curves.png)."""
    from rtrain.config import read_yaml

    for record in records:
        out_dir = Path(record.run_dir)
        saved = out_dir / run_files.CONFIG_YAML
        if record.status not in ("done", "stopped", "error") or not saved.is_file():
            continue
        try:
            cfg = config_from_dict(read_yaml(saved))
        except RtrainError as exc:  # the report must still come out
            logger.warning("trial %s: trackers not finished: %s", record.trial_id, exc)
            continue
        rows = run_files.read_metrics(out_dir, strict=False)
        if not cfg.run.loggers or not rows:
            continue
        plots = []
        try:
            plots.append(run_files.plot_curves(rows, out_dir / run_files.PLOTS_DIR / "curves.png"))
        except Exception as exc:  # a plot must never cost the user a finished sweep
            logger.warning("trial %s: curves not drawn: %s", record.trial_id, exc)
        best = next((p for p in (out_dir / run_files.BEST_WEIGHTS, out_dir / run_files.LAST_WEIGHTS)
                     if p.is_file()), None)
        status = "FAILED" if record.status == "error" else "FINISHED"
        trackers.finish_run(trial_tracking_spec(cfg, sweep_dir, out_dir.parent.name), out_dir,
                            config_to_dict(cfg), best, plots, status)


def saved_trial_status(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> Tune status as last saved (TERMINATED/ERROR/RUNNING/PENDING/PAUSED).

    The saved state, not the ResultGrid: after Ctrl-C Tune stops running trials in memory (they look
    TERMINATED) but saves them as RUNNING, which is what tells an interrupted trial from an
    ASHA-stopped one. {} when the state cannot be read.
    """
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(sweep_dir)).trials}
    except Exception as exc:  # the table still comes out, just without the interrupted mark
        logger.warning("%s: Tune's saved trial states not read: %s", sweep_dir, exc)
        return {}


def collect_records(grid, spec: SweepSpec, num_classes: int) -> list[TrialRecord]:
    """One TrialRecord per Tune result (trial dir + its rtrain run dir)."""
    tune_status = saved_trial_status(Path(grid.experiment_path)) if len(grid) else {}
    records = []
    for result in grid:
        trial_dir = Path(result.path)
        info_file = trial_dir / TRIAL_INFO
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        params = info.get("params") or {k: v for k, v in (result.config or {}).items() if "." in k}
        trial_id = info.get("trial_id") or (result.metrics or {}).get("trial_id") or trial_dir.name
        status = tune_status.get(trial_id)
        error = result.error is not None or status == "ERROR"
        reason = ""
        failure = trial_dir / TRIAL_RUN / FAILURE_TXT
        # A trial Tune stops (ASHA) can see its TorchTrainer die first and write failure.txt on its
        # way out: only a trial Tune itself records as errored has a failure reason.
        if error and failure.is_file():
            reason = failure.read_text(encoding="utf-8").strip()
        elif error:
            reason = failure_reason(result.error) if result.error is not None else "error"
        records.append(trial_record(trial_id, params, spec, trial_dir / TRIAL_RUN, num_classes,
                                    error=error, reason=reason,
                                    started=info_file.is_file(),
                                    unfinished=status in ("RUNNING", "PENDING", "PAUSED")))
    return records


def trial_record(trial_id: str, params: dict, spec: SweepSpec, out_dir: Path, num_classes: int, *,
                 error: bool, reason: str, started: bool = True, unfinished: bool = False) -> TrialRecord:
    """Table row of one trial: its config, model size/cost, and what its metrics.jsonl says."""
    import torch

    from rtrain.models.flops import count_gflops, count_params
    from rtrain.runs.loading import build_detector

    cfg_dict = apply_params(spec.base, params)
    params_m = gflops = width = depth = None
    try:
        cfg = config_from_dict(cfg_dict)
        with torch.no_grad():
            model = build_detector(cfg, num_classes)
        params_m = count_params(model) / 1e6
        gflops = count_gflops(model, cfg.data.img_size)
        width, depth = model.spec.width, model.spec.depth
    except Exception as exc:  # a config that cannot build still gets its row (and its reason)
        logger.warning("trial %s: model not built for the table: %s", trial_id, exc)
        cfg = None
    rows = run_files.read_metrics(out_dir) if out_dir.is_dir() else []
    batch = _trial_batch(cfg_dict, rows)
    lr = effective_lr(cfg, spec.tune.workers_per_trial, batch) if cfg is not None else float("nan")
    evaluated = [r for r in rows if r.get("evaluated") and r.get("mAP") is not None]
    best = max(evaluated, key=lambda r: r["mAP"]) if evaluated else None
    speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    speeds = speeds[1:] if len(speeds) > 1 else speeds
    epochs_run = len(rows)
    if error:
        status = "error"
    elif not started:
        status = "pending"
    elif unfinished:
        status = "unfinished"
    elif epochs_run >= spec.epochs or (rows and rows[-1].get("finished")):  # all epochs, or the budget
        status = "done"
    else:
        status = "stopped"
    return TrialRecord(
        trial_id=trial_id, variant=cfg_dict["model"]["name"], width=width, depth=depth,
        img_size=int(cfg_dict["data"]["img_size"]), batch_size=batch, lr=lr,
        params_m=params_m, gflops=gflops, images_per_s=sum(speeds) / len(speeds) if speeds else None,
        best_map=float(best["mAP"]) if best else None,
        map50=float(best["mAP50"]) if best and best.get("mAP50") is not None else None,
        epochs_run=epochs_run, status=status, reason=reason, run_dir=str(out_dir),
        config=config_to_dict(cfg) if cfg is not None else {}, searched=dict(params),
    )


def _trial_batch(cfg_dict: dict, rows: list[dict]) -> int | None:
    """The per-worker batch a trial trained at: its config's, or for "auto" what its metrics say."""
    batch = cfg_dict.get("train", {}).get("batch_size", TrainConfig().batch_size)
    if isinstance(batch, int):
        return batch
    last = next((r for r in reversed(rows) if r.get("global_batch") and r.get("world_size")), None)
    return int(last["global_batch"]) // int(last["world_size"]) if last else None  # None: not run yet


def write_report(records: list[TrialRecord], spec: SweepSpec, sweep_dir: Path) -> SweepResult:
    """Tables, the Pareto plot and best.yaml in SWEEP; returns the SweepResult."""
    tables = write_tables(records, sweep_dir)
    try:
        plot = plot_pareto(records, sweep_dir / PARETO_PNG)
    except Exception as exc:  # a plot must never cost the user a finished sweep
        logger.warning("pareto plot not written: %s", exc)
        plot = None
    best = best_record(records)
    best_yaml = write_best_config(best, spec.base, sweep_dir / BEST_YAML, sweep_dir.name) if best else None
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    interrupted = len(records) < spec.num_trials() or bool(counts.get("unfinished") or counts.get("pending"))
    return SweepResult(sweep_dir=sweep_dir, name=sweep_dir.name, records=records, best=best,
                       best_yaml=best_yaml, tables=tables, plot=plot, table_text=format_table(records),
                       counts=counts, interrupted=interrupted)


__all__ = ["SweepResult", "TrialFailed", "FitError", "run_sweep", "run_trial", "free_placement_groups",
           "auto_concurrency", "collect_records", "trial_record", "write_report", "failure_reason"]
