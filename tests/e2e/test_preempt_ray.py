"""Preemption on a real two-node Ray cluster (issue #15): SIGTERM to `python -m rtrain.fit`, then --resume.

One deterministic reference run (2 CPU workers, 2 epochs of 16 steps, a mid-epoch checkpoint at
every resumable step, two losses forced non-finite by the test hook) gives the weights an
uninterrupted run ends with. The same run as a subprocess gets a SIGTERM early in its second
epoch: it must write a mid-epoch checkpoint, exit 75 with one line naming the --resume command,
and the resumed run must continue inside that epoch and end with the reference's weights, each
epoch in metrics.jsonl once and both skipped steps counted. A SIGTERM to one training worker
must stop the run the same way.

Processes are signalled only if they descend from this test process (the cluster it started):
the machine may run other people's Ray jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fit_configs import deterministic_fit_config
from test_faults import _assert_same_weights, _train_worker_pids, _wait_for_epoch_checkpoint

from rtrain.errors import PREEMPTED
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import load_weights
from rtrain.training.guard import FORCE_NONFINITE_ENV
from rtrain.training.quickstart import prepare_synthetic
from rtrain.training.runner import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 2
STEPS = 16  # per epoch
FORCED = "5,25"  # global steps whose loss the test hook makes NaN: one in epoch 1, one in epoch 2


def _descends_from_us(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: the parent pid
        if pid == me:
            return True
    return False


def _own_train_worker_pids() -> list[int]:
    """Ray Train workers of the cluster this test process started (not other users' on the host)."""
    return [p for p in _train_worker_pids() if _descends_from_us(p)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"), images=160, size=96, seed=5)


def _config(train: Path, val: Path) -> dict:
    # 128 train images, 4 per worker-batch, 2 workers: 16 steps per epoch; stream blocks of 16
    # rows, so a checkpoint can be resumed exactly every 4 steps (pause_every)
    return deterministic_fit_config(train, val, EPOCHS, img_size=96, workers=2, seed=3, shuffle_buffer=None,
                                    max_failures=0, checkpoint_every_min=0.001, grace_s=120)


@pytest.fixture(scope="module")
def reference(ray_session, shards, tmp_path_factory):
    storage = tmp_path_factory.mktemp("reference")
    os.environ[FORCE_NONFINITE_ENV] = FORCED
    try:
        result = fit(_config(*shards), name="reference", storage=storage, plots=False)
    finally:
        del os.environ[FORCE_NONFINITE_ENV]
    return load_weights(result.last_weights)["model"], run_dir.read_metrics(result.run_dir)


def test_forced_nonfinite_losses_are_skipped_and_counted_in_metrics(reference):
    _, rows = reference
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert [r["skipped"] for r in rows] == [1, 1]
    assert [r["nonfinite_total"] for r in rows] == [1, 2]
    assert [r["steps"] for r in rows] == [STEPS - 1, STEPS - 1] and rows[-1]["step"] == EPOCHS * STEPS


def test_sigterm_to_the_driver_checkpoints_exits_75_and_resume_matches(reference, shards, tmp_path):
    import ray

    ref_weights, ref_rows = reference
    config = tmp_path / "preempt.yaml"
    config.write_text(yaml.safe_dump(_config(*shards)))
    storage = tmp_path / "runs"
    out = storage / "preempt"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "rtrain.fit", "--config", str(config), "--address", address,
           "--name", "preempt", "--storage", str(storage), "--no-plots"]
    log = tmp_path / "driver.log"
    env = {**os.environ, FORCE_NONFINITE_ENV: FORCED}
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would stall the driver
        driver = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for_epoch_checkpoint(out, epoch=0)  # epoch 2 has begun: stop inside it
            sent = time.monotonic()
            driver.send_signal(signal.SIGTERM)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
    took = time.monotonic() - sent
    text = log.read_text()
    assert driver.returncode == PREEMPTED, text[-3000:]
    start = "rtrain: preempted (SIGTERM to the driver) at epoch 2 step "
    lines = [ln for ln in text.splitlines() if ln.startswith(start)]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].endswith(f"checkpoint saved; resume with: python -m rtrain.fit --resume --name preempt "
                             f"--storage {storage}")
    assert f"mid-epoch checkpoint: epoch 1 step 4 (4 of its {STEPS} steps done)" in text
    print(f"\n{lines[0]}\n(exit {took:.1f} s after the SIGTERM)")
    assert len(run_dir.read_metrics(out)) == 1

    deadline = time.monotonic() + 60
    while _own_train_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    os.environ[FORCE_NONFINITE_ENV] = FORCED
    try:
        result = fit(None, name="preempt", storage=storage, resume=True, plots=False)
    finally:
        del os.environ[FORCE_NONFINITE_ENV]

    rows = run_dir.read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS)), "an epoch is missing or doubled"
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert [round(r["lr"], 9) for r in rows] == [round(r["lr"], 9) for r in ref_rows]
    assert rows[-1]["nonfinite_total"] == 2  # the skip before the stop came back with the checkpoint
    assert 0 < rows[-1]["resumed_at_step"] < STEPS  # it continued inside epoch 2
    assert result.epochs_done == EPOCHS
    _assert_same_weights(load_weights(out / run_dir.LAST_WEIGHTS)["model"], ref_weights)


def test_sigterm_to_one_training_worker_stops_the_run_with_a_checkpoint(ray_session, shards, tmp_path):
    import threading

    from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, read_marker
    from rtrain.training.runner import PreemptedError

    out = tmp_path / "worker-term"
    signalled: list[int] = []
    before = set(_own_train_worker_pids())

    def term_one_worker() -> None:
        _wait_for_epoch_checkpoint(out, epoch=0)
        pids = [p for p in _own_train_worker_pids() if p not in before]
        if pids:
            os.kill(pids[-1], signal.SIGTERM)
            signalled.append(pids[-1])

    thread = threading.Thread(target=term_one_worker, daemon=True)
    thread.start()
    with pytest.raises(PreemptedError) as caught:  # max_failures 0: a dead worker would fail the run
        fit(_config(*shards), name="worker-term", storage=tmp_path, plots=False)
    thread.join(timeout=5)
    assert signalled, "no Ray Train worker process was found to signal"
    assert caught.value.exit_code == PREEMPTED
    line = str(caught.value)
    assert line.startswith("preempted at epoch 2 step ")
    assert "checkpoint saved; resume with: python -m rtrain.fit --resume --name worker-term" in line
    print(f"\n{line}")
    latest, _ = find_latest_complete(checkpoint_dirs(out))
    assert STEPS < int(read_marker(latest)["step"]) < EPOCHS * STEPS  # inside epoch 2, after the SIGTERM
    assert len(run_dir.read_metrics(out)) < EPOCHS
