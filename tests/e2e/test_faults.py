"""Faults on a real Ray cluster of two nodes (issue #7): a killed training worker, a killed driver.

One deterministic reference run (2 CPU workers on different nodes, 4 epochs) gives the
weights an uninterrupted run ends with. A run whose worker is SIGKILLed in epoch 2, and a
run whose driver is SIGKILLed in epoch 2 and then rerun with --resume, must end with the
same weights (floating-point tolerance) and a metrics file with each epoch exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fit_configs import deterministic_fit_config

from rtrain.runs import run_dir
from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, load_weights
from rtrain.training.quickstart import prepare_synthetic
from rtrain.training.runner import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 4
TRAIN_WORKER = "RayTrainWorker"  # Ray Train's worker actor: its processes are titled ray::RayTrainWorker.*


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"), images=100, size=128, seed=11)


def _config(train: Path, val: Path) -> dict:
    return deterministic_fit_config(train, val, EPOCHS, img_size=128, workers=2, max_failures=2,
                                    placement_strategy="STRICT_SPREAD")


@pytest.fixture(scope="module")
def reference(ray_session, shards, tmp_path_factory):
    """The uninterrupted run: its final EMA weights and metrics rows."""
    storage = tmp_path_factory.mktemp("reference")
    result = fit(_config(*shards), name="reference", storage=storage, plots=False)
    return load_weights(result.last_weights)["model"], run_dir.read_metrics(result.run_dir)


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k].double() - want[k].double()).abs().max().item()
                for k in want if want[k].is_floating_point())
    assert worst < 1e-4, f"weights differ from the uninterrupted run by up to {worst:.3g}"


def _wait_for_epoch_checkpoint(out: Path, epoch: int, timeout: float = 240.0) -> None:
    """Block until `out` holds a complete checkpoint of `epoch` (Ray has persisted it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest, _ = find_latest_complete(checkpoint_dirs(out))
        if latest is not None and load_weights_epoch(latest) >= epoch:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no complete checkpoint of epoch {epoch} under {out} after {timeout:.0f} s")


def load_weights_epoch(ckpt: Path) -> int:
    from rtrain.runs.checkpoint import read_marker

    return int(read_marker(ckpt)["epoch"])


def _train_worker_pids() -> list[int]:
    """Pids of live Ray Train worker processes (Linux /proc: no psutil dependency)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if cmdline.startswith("ray::") and TRAIN_WORKER in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_unchanged_deterministic_run_reports_every_epoch_on_two_nodes(reference):
    _, rows = reference
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert all(r["num_nodes"] == 2 and r["world_size"] == 2 for r in rows)  # STRICT_SPREAD: one per node
    assert all(r["run_starts"] == 1 for r in rows)


def test_killed_worker_restarts_from_last_checkpoint_and_matches(reference, shards, tmp_path):
    ref_weights, ref_rows = reference
    out = tmp_path / "worker-kill"
    killed: list[int] = []

    def kill_one_worker() -> None:
        _wait_for_epoch_checkpoint(out, epoch=0)
        time.sleep(0.3)  # into epoch 2: the stream is warm, so training resumes at once
        pids = [p for p in _train_worker_pids() if p not in before]  # this run's, not a leftover
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    before = set(_train_worker_pids())
    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    result = fit(_config(*shards), name="worker-kill", storage=tmp_path, plots=False)
    killer.join(timeout=5)

    assert killed, "no Ray Train worker process was found to kill"
    rows = run_dir.read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS)), "an epoch is missing or doubled"
    assert rows[0]["run_starts"] == 1 and rows[-1]["run_starts"] == 2, "the worker group restarted once"
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert result.epochs_done == EPOCHS
    _assert_same_weights(load_weights(out / run_dir.LAST_WEIGHTS)["model"], ref_weights)


def test_killed_driver_resumes_from_last_complete_checkpoint_and_matches(reference, shards, tmp_path):
    import ray

    ref_weights, ref_rows = reference
    config = tmp_path / "faults.yaml"
    config.write_text(yaml.safe_dump(_config(*shards)))
    out = tmp_path / "runs" / "driver-kill"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "rtrain.fit", "--config", str(config), "--address", address,
           "--name", "driver-kill", "--storage", str(tmp_path / "runs")]
    log = tmp_path / "driver.log"
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would stall the driver
        driver = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for_epoch_checkpoint(out, epoch=0)
            time.sleep(0.3)  # into epoch 2
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    rows_at_kill = run_dir.read_metrics(out)
    assert len(rows_at_kill) < EPOCHS, "the driver finished before it was killed"

    # The dead driver's job takes its Train workers with it; then resume in this process.
    deadline = time.monotonic() + 60
    while _train_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    result = fit(None, name="driver-kill", storage=tmp_path / "runs", resume=True, plots=False)

    rows = run_dir.read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS)), "an epoch is missing or doubled"
    assert rows[0]["run_starts"] == 1 and rows[-1]["run_starts"] == 2
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert [round(r["lr"], 9) for r in rows] == [round(r["lr"], 9) for r in ref_rows]
    assert result.epochs_done == EPOCHS
    _assert_same_weights(load_weights(out / run_dir.LAST_WEIGHTS)["model"], ref_weights)
    assert torch.load(out / run_dir.LAST_WEIGHTS, weights_only=True)["extra"]["epoch"] == EPOCHS - 1
