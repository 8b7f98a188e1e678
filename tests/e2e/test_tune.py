"""rtrain.tune end to end on Ray Tune (the session's Ray, no dashboard): a 4-trial ASHA sweep on tiny
synthetic shards; the table, the Pareto plot, best.yaml; stopped trials' placement groups freed;
an interrupted sweep resumed."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rtrain.config import load_config
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete
from rtrain.search.report import BEST_YAML, PARETO_PNG, RESULTS_CSV, RESULTS_MD
from rtrain.search.spec import load_sweep
from rtrain.training.quickstart import prepare_synthetic


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return prepare_synthetic(root, images=24, size=96, seed=5)


def _sweep_yaml(path: Path, train: Path, val: Path) -> Path:
    doc = {
        "base": {
            "model": {"name": "compact_n"},
            "data": {"train": str(train), "val": str(val), "img_size": 96, "num_actors": 1,
                     "cpus_per_actor": 0.5, "shuffle_buffer": 16},
            "train": {"epochs": 3, "batch_size": 8, "optimizer": "adamw", "lr": 0.002,
                      "nominal_batch_size": 16, "warmup_epochs": 0.5},
            "eval": {"interval": 1, "batch_size": 8},
            "run": {"storage": str(path.parent / "unused")},
        },
        "search": {
            "model.name": {"grid": ["compact_n", "mv2_s"]},
            "model.width": {"grid": [0.25, 0.5]},
            "train.batch_size": {"choice": [4, 8]},
        },
        # min_signal 0: 24 tiny images never reach a mAP50 that separates; this test is about the
        # stopping machinery (the stop rule itself: tests/search/test_sweep_stop.py)
        "tune": {"num_samples": 1, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 1,
                 "seed": 1, "metric": "mAP", "min_signal": 0.0},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_end_to_end(ray_session, tiny_shards, tmp_path):
    from ray.util.placement_group import placement_group_table

    from rtrain.search.driver import run_sweep

    train, val = tiny_shards
    spec = load_sweep(_sweep_yaml(tmp_path / "sweep.yaml", train, val))
    result = run_sweep(spec, name="s", storage=tmp_path / "sweeps")

    out = tmp_path / "sweeps" / "s"
    assert result.sweep_dir == out and len(result.records) == 4
    combos = {(r.variant, r.width) for r in result.records}
    assert combos == {("compact_n", 0.25), ("compact_n", 0.5), ("mv2_s", 0.25), ("mv2_s", 0.5)}
    statuses = [r.status for r in result.records]
    assert "error" not in statuses, [r.reason for r in result.records]
    assert "stopped" in statuses, "ASHA stopped no trial early"
    for r in result.records:
        assert 1 <= r.epochs_run <= 3 and (r.epochs_run == 3) == (r.status == "done")
        assert 0.0 <= r.best_map <= 1.0 and r.params_m > 0 and r.gflops > 0 and r.images_per_s > 0
        assert r.lr == pytest.approx(0.002 * (r.batch_size / 16) ** 0.5)  # AdamW: sqrt scaling from 16
        assert (Path(r.run_dir) / "metrics.jsonl").is_file() and list(Path(r.run_dir).glob("checkpoint_*"))

    with open(out / RESULTS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {row["status"] for row in rows} == set(statuses)
    assert (out / RESULTS_MD).read_text().count("\n") == 6  # header, rule, 4 rows
    assert (out / PARETO_PNG).stat().st_size > 5000

    best = load_config(out / BEST_YAML)
    top = max(result.records, key=lambda r: r.best_map)
    assert (best.model.name, best.model.width, best.train.epochs) == (top.variant, top.width, 3)
    assert best.run.name == "" and best.data.train == str(train)

    # Stopped trials' Train worker groups were removed (Ray's own cleaner needs the dashboard).
    live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == []


def _trial_runs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob(f"*/run/{run_dir.METRICS_JSONL}"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.soak  # about 6 of the suite's 31 minutes on 2 cores: run with -m soak
def test_interrupted_sweep_resumes_unfinished_trial_from_its_checkpoint(ray_session, tmp_path):
    """Ctrl-C (SIGINT) to `rtrain.tune` while trial 2 trains, then --resume: trial 1 is not rerun,
    trial 2 continues from its last complete checkpoint (no epoch redone from the start)."""
    import ray

    from rtrain.search.driver import run_sweep

    # Epochs of a few seconds (not the 1 s of tiny_shards), so the interrupt lands mid-trial.
    train, val = prepare_synthetic(tmp_path / "data", images=64, size=128, seed=6)
    path = _sweep_yaml(tmp_path / "sweep.yaml", train, val)
    doc = yaml.safe_load(path.read_text())
    doc["base"]["data"]["img_size"] = 128
    doc["base"]["train"]["batch_size"] = 4
    doc["base"]["train"]["epochs"] = EPOCHS_RESUMED = 4  # Tune takes seconds to stop on Ctrl-C
    doc["search"] = {"model.width": {"grid": [0.25, 0.5]}}
    doc["tune"].update(grace_period=EPOCHS_RESUMED)  # ASHA stops nothing: both trials run every epoch
    path.write_text(yaml.safe_dump(doc))
    sweep_dir = tmp_path / "sweeps" / "r"
    cmd = [sys.executable, "-m", "rtrain.tune", "--config", str(path), "--name", "r",
           "--storage", str(tmp_path / "sweeps"), "--address", ray.get_runtime_context().gcs_address]

    def second_trial_checkpointed() -> bool:  # one trial at a time: trial 2 running means trial 1 is done
        runs = _trial_runs(sweep_dir)
        return len(runs) == 2 and find_latest_complete(checkpoint_dirs(runs[1]))[0] is not None

    log = tmp_path / "tune.log"
    with log.open("w") as sink:
        sweep = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while not second_trial_checkpointed():
                assert time.monotonic() < deadline and sweep.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            sweep.send_signal(signal.SIGINT)  # what Ctrl-C sends
            sweep.wait(timeout=120)
        finally:
            if sweep.poll() is None:
                sweep.kill()
    assert sweep.returncode == 130, log.read_text()[-3000:]
    finished, unfinished = _trial_runs(sweep_dir)
    finished_rows = (finished / run_dir.METRICS_JSONL).read_text()
    assert len(run_dir.read_metrics(finished)) == EPOCHS_RESUMED
    assert 1 <= len(run_dir.read_metrics(unfinished)) < EPOCHS_RESUMED, "trial 2 ended before Ctrl-C"

    result = run_sweep(None, name="r", storage=tmp_path / "sweeps", resume=True)

    assert [r.status for r in result.records] == ["done", "done"]
    assert (finished / run_dir.METRICS_JSONL).read_text() == finished_rows, "a finished trial was rerun"
    rows = run_dir.read_metrics(unfinished)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS_RESUMED))
    assert rows[0]["run_starts"] == 1 and rows[-1]["run_starts"] == 2, "the trial restarted from scratch"
    assert not (unfinished / "failure.txt").exists()
    # The trial's run lives in the sweep's storage (not Tune's staging copy in the Ray session dir),
    # so a resume in a new Ray session finds its checkpoints too.
    info = json.loads((unfinished.parent / "rtrain_trial.json").read_text())
    assert Path(info["run_dir"]) == unfinished


def test_a_sweep_in_a_bucket_is_refused_in_one_line_before_ray(tmp_path, monkeypatch):
    """Sweeps do not run in a bucket yet: one line, and no local `s3:` folder (no Ray needed)."""
    from rtrain.search.driver import run_sweep
    from rtrain.training.runner import FitError

    monkeypatch.chdir(tmp_path)
    spec = load_sweep(_sweep_yaml(tmp_path / "sweep.yaml", tmp_path / "train", tmp_path / "val"))
    with pytest.raises(FitError) as info:
        run_sweep(spec, storage="s3://bucket/sweeps")
    assert str(info.value).startswith("--storage s3://bucket/sweeps: object storage is not supported here")
    spec.base["run"]["storage"] = "gs://bucket/runs"
    with pytest.raises(FitError, match=r"^base run.storage gs://bucket/runs: object storage is not"):
        run_sweep(spec)
    spec.base["run"]["storage"] = "az://bucket/runs"
    with pytest.raises(FitError, match=r"^base run.storage az://bucket/runs: the az:// scheme is not"):
        run_sweep(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]
