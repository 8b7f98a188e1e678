"""rtrain.training.trackers: TensorBoard event files and MLflow runs, read back with their own readers.

The trackers are driven directly (no Ray) with metrics rows shaped like the train loop's, written
to a real run dir the way rank 0 writes them; `assert_fit_logged_to_tensorboard_and_mlflow` checks a
real fit with both loggers (tests/e2e/test_fit.py's end-to-end run).
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest
import torch

from rtrain.config import Config, ConfigError, config_to_dict, dump_config, load_config
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import save_weights
from rtrain.training import trackers

CLASSES = ["circle", "traffic light&co"]  # the second has a character MLflow refuses in a name


def _row(epoch: int, loss: float, evaluated: bool = True) -> dict:
    """A metrics row as train_loop.train_loop builds it (keys, types, flattened per-class AP)."""
    step = 5 * (epoch + 1)
    row = {"loss": loss, "loss_cls": loss / 2, "loss_box": loss / 4, "loss_dfl": loss / 4,
           "lr": 0.01 / (epoch + 1), "images_per_s": 30.0 + epoch, "data_wait_frac": 0.1, "steps": 5,
           "skipped": 0, "stopped_early": False,
           "first_batch_s": 0.2, "dropped_targets": 0, "epoch": epoch, "step": step, "world_size": 1,
           "num_nodes": 1, "global_batch": 8, "run_starts": 1, "nonfinite_total": 0, "evaluated": evaluated,
           "mAP": 0.1 * epoch}
    if evaluated:
        row.update({"mAP50": 0.2 * epoch, "mAP_small": None, f"AP/{CLASSES[0]}": 0.3,
                    f"AP/{CLASSES[1]}": 0.05 * epoch})
    return row


def _epochs(group, out: Path, rows: list[dict]) -> None:
    """What rank 0 does each epoch: append the row, then log it."""
    for row in rows:
        run_dir.append_metrics(out, row)
        group.log_epoch(row, row["step"])


def _run(tmp_path: Path, name: str = "r1") -> tuple[Path, dict]:
    out = tmp_path / "runs" / name
    cfg = load_config(None, [f"run.name={name}", f"run.storage={tmp_path / 'runs'}",
                             "run.loggers=[tensorboard, mlflow]", "model.name=compact_n"])
    dump_config(cfg, out / run_dir.CONFIG_YAML)
    return out, config_to_dict(cfg)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(uri: str):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def test_tensorboard_event_files_hold_every_epoch_at_its_global_step(tmp_path):
    out, cfg = _run(tmp_path)
    group = trackers.open_for_loop({"loggers": ["tensorboard"], "run_name": "r1"}, out, cfg)
    rows = [_row(0, 2.0), _row(1, 1.5, evaluated=False), _row(2, 1.0)]
    _epochs(group, out, rows)

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _scalars(out / "tensorboard")
    assert scalars["loss"] == [(5, 2.0), (10, 1.5), (15, 1.0)]
    assert [s for s, _ in scalars["lr"]] == [5, 10, 15]
    assert scalars["lr"][1][1] == pytest.approx(0.005)
    assert [s for s, _ in scalars["mAP50"]] == [5, 15]  # only evaluated epochs have it
    assert scalars[f"AP/{CLASSES[1]}"] == [(5, 0.0), (15, pytest.approx(0.1))]
    assert "evaluated" not in scalars and "stopped_early" not in scalars and "mAP_small" not in scalars
    group.finish(None, [])


def test_tensorboard_resume_appends_and_drops_what_a_killed_run_logged_past_its_checkpoint(tmp_path):
    out, cfg = _run(tmp_path)
    spec = {"loggers": ["tensorboard"], "run_name": "r1"}
    first = trackers.open_for_loop(spec, out, cfg)
    _epochs(first, out, [_row(0, 2.0), _row(1, 1.5), _row(2, 9.9)])  # killed after epoch 2's row
    # --resume from epoch 1's checkpoint: the loop truncates the metrics, then opens the trackers
    run_dir.truncate_metrics(out, 2)
    second = trackers.open_for_loop(spec, out, cfg)
    _epochs(second, out, [_row(2, 1.0), _row(3, 0.8)])

    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not replaced
    assert _scalars(out / "tensorboard")["loss"] == [(5, 2.0), (10, 1.5), (15, 1.0), (20, pytest.approx(0.8))]


def test_mlflow_run_has_every_epoch_the_config_as_params_and_the_artifacts(tmp_path):
    out, cfg = _run(tmp_path)
    spec = trackers.tracking_spec(["mlflow"], "", tmp_path / "runs", "r1", "r1")
    assert spec["mlflow_uri"] == f"file:{tmp_path / 'runs' / 'mlruns'}"
    group = trackers.open_for_loop(spec, out, cfg)
    rows = [_row(0, 2.0), _row(1, 1.5), _row(2, 1.0)]
    _epochs(group, out, rows)
    best = save_weights(out / run_dir.BEST_WEIGHTS, torch.nn.Linear(3, 2).state_dict(), cfg, CLASSES,
                        {"epoch": 2})
    plot = run_dir.plot_curves(rows, out / "plots" / "curves.png")
    trackers.finish_run(spec, out, cfg, best, [plot])

    client = _mlflow(spec["mlflow_uri"])
    note = json.loads((out / trackers.MLFLOW_RUN_JSON).read_text())
    run = client.get_run(note["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "r1"
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(5, 2.0), (10, 1.5), (15, 1.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "AP/traffic light_co")] == [5, 10, 15]
    assert "evaluated" not in run.data.metrics and "mAP_small" not in run.data.metrics
    assert run.data.params == trackers.flatten_config(cfg)
    assert run.data.params["model.name"] == "compact_n"
    assert run.data.params["run.loggers"] == "['tensorboard', 'mlflow']"
    assert _artifacts(client, run.info.run_id) == {"best.pt", "config.yaml", "plots/curves.png"}
    local = Path(client.download_artifacts(run.info.run_id, "best.pt", str(tmp_path / "dl")))
    assert local.read_bytes() == best.read_bytes()


def test_mlflow_resume_continues_the_same_run_and_records_changed_config_as_tags(tmp_path):
    out, cfg = _run(tmp_path)
    spec = trackers.tracking_spec(["mlflow"], "", tmp_path / "runs", "r1", "r1")
    _epochs(trackers.open_for_loop(spec, out, cfg), out, [_row(0, 2.0), _row(1, 1.5)])
    run_id = json.loads((out / trackers.MLFLOW_RUN_JSON).read_text())["run_id"]

    more = {**cfg, "train": {**cfg["train"], "epochs": 80}}  # --resume --set train.epochs=80
    resumed = trackers.open_for_loop(spec, out, more)
    _epochs(resumed, out, [_row(2, 1.0)])
    trackers.finish_run(spec, out, more, None, [])

    client = _mlflow(spec["mlflow_uri"])
    assert json.loads((out / trackers.MLFLOW_RUN_JSON).read_text())["run_id"] == run_id
    experiment = client.get_experiment_by_name("r1")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 10, 15]
    assert run.data.params["train.epochs"] == "30" and run.data.tags["changed_on_resume.train.epochs"] == "80"
    assert run.info.status == "FINISHED"
    assert _artifacts(client, run_id) == {"config.yaml"}  # no weights given, no plots


def test_a_relative_store_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    def uri(given: str) -> str:
        return trackers.tracking_spec(["mlflow"], given, "runs", "e", "r")["mlflow_uri"]

    assert uri("mlruns") == uri("file:mlruns") == f"file:{tmp_path.resolve()}/mlruns"
    assert uri("") == f"file:{tmp_path.resolve()}/runs/mlruns"
    for given in ("file:///abs/mlruns", "http://127.0.0.1:5000", "sqlite:////abs/mlflow.db"):
        assert uri(given) == given


def test_a_sweep_is_one_experiment_with_one_run_per_trial(tmp_path):
    from rtrain.search.driver import trial_tracking_spec

    sweep = tmp_path / "sweeps" / "arch"
    cfg = load_config(None, ["run.loggers=[mlflow]"])
    ids = []
    for trial in ("run_trial_a_00000", "run_trial_a_00001"):
        out = sweep / trial / "run"
        spec = trial_tracking_spec(cfg, sweep, trial)
        assert spec["mlflow_uri"] == f"file:{tmp_path / 'sweeps' / 'mlruns'}" and spec["experiment"] == "arch"
        _epochs(trackers.open_for_loop(spec, out, config_to_dict(cfg)), out, [_row(0, 2.0)])
        ids.append(json.loads((out / trackers.MLFLOW_RUN_JSON).read_text())["run_id"])

    client = _mlflow(spec["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("arch").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    assert sorted(r.info.run_name for r in runs) == ["run_trial_a_00000", "run_trial_a_00001"]


def test_the_sweep_driver_closes_each_trial_that_ran_with_its_artifacts(tmp_path):
    """After Tune ends (rtrain.search.driver.finish_trial_trackers): done and ASHA-stopped trials are
    FINISHED, a failed one FAILED, each with its curves, weights and config; an interrupted one is
    left RUNNING for --resume."""
    from rtrain.search.driver import finish_trial_trackers, trial_tracking_spec
    from rtrain.search.report import TrialRecord

    sweep = tmp_path / "sweeps" / "arch"
    cfg = load_config(None, ["run.loggers=[tensorboard, mlflow]", "model.name=compact_n"])
    records = []
    for i, status in enumerate(("done", "stopped", "error", "unfinished")):
        trial = f"run_trial_b_{i:05d}"
        out = sweep / trial / "run"
        dump_config(cfg, out / run_dir.CONFIG_YAML)
        group = trackers.open_for_loop(trial_tracking_spec(cfg, sweep, trial), out, config_to_dict(cfg))
        _epochs(group, out, [_row(0, 2.0), _row(1, 1.5)][: 1 if status == "stopped" else 2])
        if status != "error":
            save_weights(out / run_dir.BEST_WEIGHTS, torch.nn.Linear(3, 2).state_dict(), config_to_dict(cfg),
                         CLASSES)
        records.append(TrialRecord(trial_id=trial, variant="compact_n", width=None, depth=None, img_size=320,
                                   batch_size=16, lr=0.01, params_m=None, gflops=None, images_per_s=None,
                                   best_map=None, map50=None, epochs_run=2, status=status, run_dir=str(out)))
    finish_trial_trackers(records, sweep)

    client = _mlflow(f"file:{tmp_path / 'sweeps' / 'mlruns'}")
    for record in records:
        out = Path(record.run_dir)
        run = client.get_run(json.loads((out / trackers.MLFLOW_RUN_JSON).read_text())["run_id"])
        want = {"done": "FINISHED", "stopped": "FINISHED", "error": "FAILED", "unfinished": "RUNNING"}
        assert run.info.status == want[record.status], record.status
        assert run.info.run_name == out.parent.name
        artifacts = _artifacts(client, run.info.run_id)
        if record.status == "unfinished":
            assert artifacts == set() and not (out / "plots").exists()
        else:
            assert {"config.yaml", "plots/curves.png"} <= artifacts
            assert ("best.pt" in artifacts) == (record.status != "error")
    assert len(client.search_runs([client.get_experiment_by_name("arch").experiment_id])) == 4


def test_a_tracker_that_fails_is_one_warning_and_the_others_go_on(tmp_path, caplog):
    out, cfg = _run(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    spec = {"loggers": ["mlflow", "tensorboard"], "mlflow_uri": f"file:{blocker}/mlruns", "experiment": "r1",
            "run_name": "r1"}
    group = trackers.open_for_loop(spec, out, cfg)
    _epochs(group, out, [_row(0, 2.0), _row(1, 1.5)])
    group.finish(None, [])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow logger: start failed")
    assert "\n" not in warnings[0]
    assert _scalars(out / "tensorboard")["loss"] == [(5, 2.0), (10, 1.5)]


def test_a_tracker_that_keeps_failing_is_left_out_and_training_goes_on(tmp_path, caplog):
    import shutil

    out, cfg = _run(tmp_path)
    spec = trackers.tracking_spec(["mlflow", "tensorboard"], "", tmp_path / "runs", "r1", "r1")
    group = trackers.open_for_loop(spec, out, cfg)
    _epochs(group, out, [_row(0, 2.0)])
    shutil.rmtree(tmp_path / "runs" / "mlruns")  # the store is gone mid-run
    _epochs(group, out, [_row(e, 1.0) for e in range(1, 6)])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and warnings[0].startswith("mlflow logger: log_epoch failed")
    assert warnings[1] == "mlflow logger: 3 epochs in a row not logged; left out for the rest of this run"
    assert [s for s, _ in _scalars(out / "tensorboard")["loss"]] == [5, 10, 15, 20, 25, 30]


def test_unknown_logger_is_refused_by_the_config():
    with pytest.raises(ConfigError,
                       match=r"^run.loggers: expected one of 'tensorboard' \| 'mlflow', got 'wandb'$"):
        load_config(None, ["run.loggers=[wandb]"])
    assert Config().run.loggers == []


@pytest.mark.parametrize("logger_name", ["mlflow", "tensorboard"])
def test_a_missing_package_is_one_line_naming_the_extra_before_ray(logger_name, tmp_path, monkeypatch):
    from rtrain.training import runner

    real_import = builtins.__import__

    def hide(name, *args, **kwargs):
        if name == logger_name or name.startswith(logger_name + "."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == logger_name or m.startswith(logger_name + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", hide)
    line = f'run.loggers: {logger_name} needs the {logger_name} package: pip install -e ".[{logger_name}]"'
    with pytest.raises(trackers.TrackerError) as info:
        trackers.check_available(["tensorboard", "mlflow"])
    assert str(info.value) == line

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runner, "_start_ray", no_ray)
    with pytest.raises(runner.FitError) as info:
        runner.fit({"run": {"loggers": [logger_name]}}, storage=tmp_path / "runs", name="x", plots=False)
    assert str(info.value) == line and info.value.exit_code == 2


def assert_fit_logged_to_tensorboard_and_mlflow(result, storage: Path, epochs: int) -> None:
    """What a real fit with `run.loggers: [tensorboard, mlflow]` left: every epoch at its global step
    in both, the config as MLflow params, the weights and plots as artifacts, the summary's lines.
    tests/e2e/test_fit.py's end-to-end run calls it (one Ray Train run serves both files)."""
    rows = run_dir.read_metrics(result.run_dir)
    steps = [r["step"] for r in rows]
    assert len(steps) == epochs and steps == sorted(set(steps)) and steps[0] > 0

    scalars = _scalars(result.run_dir / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == steps
    assert [v for _, v in scalars["mAP"]] == pytest.approx([r["mAP"] for r in rows])

    client = _mlflow(f"file:{storage / 'mlruns'}")
    run_id = json.loads((result.run_dir / trackers.MLFLOW_RUN_JSON).read_text())["run_id"]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == result.name and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in rows]
    assert run.data.params["train.epochs"] == str(epochs) and run.data.params["model.name"] == "compact_n"
    artifacts = _artifacts(client, run_id)
    assert {"best.pt", "config.yaml", "plots/curves.png", "plots/val_predictions.png"} <= artifacts
    assert f"tensorboard --logdir {result.run_dir / 'tensorboard'}" in result.summary()
    assert f"mlflow:       file:{storage.resolve() / 'mlruns'} (experiment {result.name})" in result.summary()
