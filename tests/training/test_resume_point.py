"""Which checkpoint a (re)started training loop continues from: Ray's, or a newer complete one on disk."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rtrain.runs.checkpoint import save_checkpoint
from rtrain.training.train_loop import _resume_state


class FakeRayCheckpoint:
    """What `ray.train.get_checkpoint()` hands back: a path and `as_directory()`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def _save(directory: Path, epoch: int) -> Path:
    return save_checkpoint(directory, {
        "model": {"w": torch.full((2,), float(epoch))}, "optimizer": {}, "epoch": epoch,
        "step": 10 * (epoch + 1), "rng": {}, "config": {}, "class_names": ["a"],
    })


def test_fresh_run_has_nothing_to_resume(tmp_path):
    assert _resume_state(None, tmp_path / "run", "cpu") == (None, "")


def test_newer_complete_checkpoint_on_disk_wins_over_rays(tmp_path, caplog):
    run = tmp_path / "run"
    older = _save(run / "checkpoint_2026-01-01_00-00-00.000001", epoch=0)
    newer = _save(run / "checkpoint_2026-01-01_00-00-09.000001", epoch=1)
    state, source = _resume_state(FakeRayCheckpoint(older), run, "cpu")
    assert source == str(newer) and state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert "newer than Ray's latest registered checkpoint" in caplog.text

    # Not registered with Ray at all (killed right after the save): still found.
    state, source = _resume_state(None, run, "cpu")
    assert source == str(newer) and state["step"] == 20


def test_half_written_newer_checkpoint_is_skipped_for_rays(tmp_path):
    run = tmp_path / "run"
    registered = _save(run / "checkpoint_a", epoch=0)
    broken = _save(run / "checkpoint_b", epoch=1)
    (broken / "state.pt").write_bytes((broken / "state.pt").read_bytes()[:100])  # crash mid-copy
    state, source = _resume_state(FakeRayCheckpoint(registered), run, "cpu")
    assert source == str(registered) and state["epoch"] == 0
