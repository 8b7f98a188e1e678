"""A disk that fills during training, on a real 3 MB tmpfs (needs root for `mount`; skipped otherwise).

Checkpoints, weights and metrics written into a full disk raise one line naming the file
(`StorageFullError`, ENOSPC), leave the previous files loadable and no temp file behind, and
`find_latest_complete` never picks what a full disk cut short (a checkpoint whose upload
stopped half-way). Rank 0's `_write_outputs` ends the run with that line; the driver-side pieces
(`rtrain.runs.storage_guard`, `runner.storage_full_error`) turn Ray's wrapped error into the FitError
line with the `--resume` command. No Ray is started here.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fit_configs import tiny_fit_config

from rtrain.runs import run_dir
from rtrain.runs.checkpoint import (
    capture_rng_state,
    find_latest_complete,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from rtrain.runs.run_dir import StorageFullError

SIZE = "3m"


@pytest.fixture
def tmpfs(tmp_path):
    """A 3 MB tmpfs mounted for this test (unmounted after)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
        why = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        done, why = None, str(exc)
    if done is None or done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the disk-full tests need root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave: int = 64 * 1024) -> Path:
    """Fill `mount` with one file until ENOSPC, then give back about `leave` bytes."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\0" * (1 << 16)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _no_temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def _state(epoch: int, width: int = 256) -> dict:
    torch.manual_seed(epoch)
    model = torch.nn.Linear(width, width)
    return {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch,
            "step": 10 * (epoch + 1), "rng": capture_rng_state(), "config": {"model": {"name": "t"}},
            "class_names": ["a", "b"]}


def test_checkpoint_into_a_full_disk_names_the_file_and_keeps_the_last_complete_one(tmpfs):
    first = save_checkpoint(tmpfs / "checkpoint_000000", _state(0))
    _fill(tmpfs)
    second = tmpfs / "checkpoint_000001"
    with pytest.raises(StorageFullError) as info:
        save_checkpoint(second, _state(1))
    assert str(info.value) == f"{second / 'state.pt'}: no space left on the device"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert _no_temp_files(tmpfs) == []
    latest, skipped = find_latest_complete([first, second])
    assert latest == first
    assert [(p, "no COMPLETE marker" in why) for p, why in skipped] == [(second, True)]
    assert torch.equal(load_checkpoint(first)["model"]["weight"], _state(0)["model"]["weight"])

    (tmpfs / "filler").unlink()  # space freed: the same save now succeeds and is the latest
    save_checkpoint(second, _state(1))
    assert find_latest_complete([first, second])[0] == second


def test_a_checkpoint_upload_cut_short_by_a_full_disk_is_never_picked(tmpfs, tmp_path):
    """What Ray's copy of a checkpoint into full storage leaves: COMPLETE there, state.pt truncated."""
    first = save_checkpoint(tmpfs / "checkpoint_000000", _state(0))
    local = save_checkpoint(tmp_path / "local", _state(1, width=512))  # bigger than what is left
    _fill(tmpfs, leave=256 * 1024)
    cut = tmpfs / "checkpoint_000001"
    cut.mkdir()
    shutil.copyfile(local / "COMPLETE", cut / "COMPLETE")  # the worst order: the marker first
    with pytest.raises(OSError) as info:
        shutil.copyfile(local / "state.pt", cut / "state.pt")
    assert info.value.errno == errno.ENOSPC
    assert 0 < (cut / "state.pt").stat().st_size < (local / "state.pt").stat().st_size
    latest, skipped = find_latest_complete([first, cut])
    assert latest == first
    assert len(skipped) == 1 and skipped[0][0] == cut and "truncated" in skipped[0][1]


def test_weights_into_a_full_disk_keep_the_previous_file(tmpfs):
    path = tmpfs / "last.pt"
    old = _state(0)["model"]
    save_weights(path, old, {"model": {}}, ["a"], {"epoch": 0})
    _fill(tmpfs)
    with pytest.raises(StorageFullError, match=f"^{path}: no space left on the device$"):
        save_weights(path, _state(1, width=512)["model"], {"model": {}}, ["a"], {"epoch": 1})
    kept = load_weights(path)
    assert kept["extra"]["epoch"] == 0 and torch.equal(kept["model"]["weight"], old["weight"])
    assert _no_temp_files(tmpfs) == []


def test_metrics_into_a_full_disk_keep_the_rows_written_before(tmpfs):
    run_dir.append_metrics(tmpfs, {"epoch": 0, "loss": 1.0})
    _fill(tmpfs, leave=0)
    with pytest.raises(StorageFullError) as info:
        run_dir.append_metrics(tmpfs, {"epoch": 1, "loss": 0.5, "note": "x" * 200_000})
    assert str(info.value).endswith(": no space left on the device")
    assert Path(info.value.filename).parent == tmpfs and Path(info.value.filename).name.startswith("metrics.")
    assert run_dir.read_metrics(tmpfs) == [{"epoch": 0, "loss": 1.0}]
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler", "metrics.csv", "metrics.jsonl"]


def test_rank0_write_outputs_stop_the_run_with_one_line_naming_the_file(tmpfs, tmp_path, caplog):
    from rtrain.config import config_from_dict, config_to_dict
    from rtrain.training.ema import ModelEMA
    from rtrain.training.guard import NonFiniteGuard
    from rtrain.training.optim import build_optimizer
    from rtrain.training.schedule import LRSchedule
    from rtrain.training.train_loop import _write_outputs, build_detector

    cfg = config_from_dict({"model": {"name": "compact_n"}})
    model = build_detector(cfg, 3)
    ema, optimizer = ModelEMA(model), build_optimizer(model, "adamw", lr=0.001)
    schedule, guard = LRSchedule(base_lr=0.001, total_steps=10), NonFiniteGuard()
    names = ["a", "b", "c"]

    def write(epoch: int) -> None:
        metrics = {"epoch": epoch, "step": epoch + 1, "loss": 1.0, "evaluated": True, "mAP": 0.1 * epoch}
        extra = {"best_map": 0.1 * epoch, "last_map": 0.1 * epoch, "run_starts": 1}
        _write_outputs(str(tmp_path / f"ckpt{epoch}"), tmpfs, config_to_dict(cfg), names, model, ema,
                       optimizer, schedule, None, guard, epoch, epoch + 1, metrics, extra)

    write(0)
    _fill(tmpfs)
    with (caplog.at_level(logging.ERROR, logger="rtrain.training.train_loop"),
          pytest.raises(StorageFullError) as info):
        write(1)
    assert str(info.value) == f"{tmpfs / 'last.pt'}: no space left on the device"
    assert [r.getMessage() for r in caplog.records] == [f"{tmpfs / 'last.pt'}: no space left on the device; "
                                                        "the run stops, the last complete checkpoint is kept"]
    assert load_weights(tmpfs / "last.pt")["extra"]["epoch"] == 0  # the previous weights, whole
    assert load_weights(tmpfs / "best.pt")["extra"]["epoch"] == 0
    assert _no_temp_files(tmpfs) == []


def test_the_driver_turns_rays_wrapped_error_into_one_fit_error_line(tmp_path):
    import pickle

    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from rtrain.runs.storage_guard import StopWhenStorageFull
    from rtrain.training.runner import storage_full_error

    out = tmp_path / "runs" / "X"
    save_checkpoint(out / "checkpoint_000002", _state(2))
    full = pickle.loads(pickle.dumps(StorageFullError(errno.ENOSPC, "No space left on device",
                                                      str(out / "last.pt"))))  # it crosses processes
    worker_error = WorkerGroupError("rank 0: boom", {0: full, 1: RuntimeError("collective aborted")})

    # In the Train controller: the callback raises (a controller error, which Ray does not retry).
    with pytest.raises(StorageFullError):
        StopWhenStorageFull().after_exception(None, worker_error.worker_failures)
    StopWhenStorageFull().after_exception(None, {0: RuntimeError("not a disk")})  # others: Ray decides

    as_the_driver_gets_it = pickle.loads(pickle.dumps(ControllerError(full)))  # its cause is text by then
    for exc in (worker_error, ControllerError(full), as_the_driver_gets_it,
                RuntimeError(f"Traceback...\n{full}\nmore")):
        line = str(storage_full_error(exc, out))
        assert "\n" not in line
        assert line == (f"training stopped, the disk is full: {out / 'last.pt'}: no space left on the "
                        "device; the last complete checkpoint (epoch 3) is kept; free space, then "
                        f"`python -m rtrain.fit --resume --name X --storage {out.parent}` continues")
    assert storage_full_error(RuntimeError("CUDA out of memory"), out) is None

    from rtrain.search.driver import failure_reason  # a sweep's table names the file too

    reason = failure_reason(as_the_driver_gets_it)
    assert reason == f"the disk is full: {out / 'last.pt'}: no space left on the device"


@pytest.mark.ray
@pytest.mark.slow
def test_fit_stops_on_a_disk_that_fills_mid_run_and_resumes_after_space_is_freed(ray_session, tmp_path):
    """End to end on the session's Ray, storage on a 48 MB tmpfs filled once epoch 0 is checkpointed.

    The run ends with one FitError line (no retries: every row keeps run_starts 1), the last
    complete checkpoint stays loadable, and --resume after the filler is removed trains the rest,
    each epoch once in metrics.jsonl.
    """
    import threading
    import time

    from rtrain.runs.checkpoint import checkpoint_dirs, read_marker
    from rtrain.training.quickstart import prepare_synthetic
    from rtrain.training.runner import FitError, fit

    mount = tmp_path / "store"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the disk-full tests need root")
    try:
        train, val = prepare_synthetic(tmp_path / "data", images=32, size=128, seed=5)
        epochs = 3
        config = tiny_fit_config(train, val, epochs, max_failures=2)
        out = mount / "full"
        filled: list[int] = []

        def fill_after_first_checkpoint() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                latest, _ = find_latest_complete(checkpoint_dirs(out))
                if latest is not None:
                    _fill(mount)
                    filled.append(int(read_marker(latest)["epoch"]))
                    return
                time.sleep(0.05)

        filler = threading.Thread(target=fill_after_first_checkpoint, daemon=True)
        filler.start()
        with pytest.raises(FitError) as info:
            fit(config, name="full", storage=mount, plots=False)
        filler.join(timeout=5)
        msg = str(info.value)
        assert filled, "no checkpoint appeared before the run ended"
        assert "\n" not in msg and "the disk is full" in msg and "no space left" in msg.lower(), msg
        assert f"--resume --name full --storage {mount}" in msg
        latest, _ = find_latest_complete(checkpoint_dirs(out))
        assert latest is not None and int(read_marker(latest)["epoch"]) < epochs - 1
        load_checkpoint(latest)  # whole
        assert all(r["run_starts"] == 1 for r in run_dir.read_metrics(out)), "Ray retried into the full disk"

        (mount / "filler").unlink()
        result = fit(None, name="full", storage=mount, resume=True, plots=False)
        rows = run_dir.read_metrics(out)
        assert [r["epoch"] for r in rows] == list(range(epochs))
        assert rows[-1]["run_starts"] == 2 and result.epochs_done == epochs
        assert load_weights(out / run_dir.LAST_WEIGHTS)["extra"]["epoch"] == epochs - 1
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
