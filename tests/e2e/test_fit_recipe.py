"""Fine-tuning and closing mosaic through rtrain.fit on Ray Train (tiny synthetic shards)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtrain.data.close_mosaic import EXTRA_KEY
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, load_checkpoint
from rtrain.training.quickstart import prepare_synthetic
from rtrain.training.runner import fit


def _config(train: Path, val: Path, storage: Path, **train_keys) -> dict:
    return {
        "model": {"name": "compact_n"},
        "data": {"train": str(train), "val": str(val), "img_size": 128, "num_actors": 1,
                 "cpus_per_actor": 0.5, "mosaic": 1.0},
        "train": {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.002, "nominal_batch_size": 16,
                  "warmup_epochs": 0.5, **train_keys},
        "eval": {"interval": 1, "batch_size": 8},
        "run": {"storage": str(storage), "workers": 1, "cpus_per_worker": 1.0, "keep_last": 2},
    }


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_from_a_run_with_time_limited_close_mosaic_then_resume_without_the_init(ray_session,
                                                                                         tmp_path):
    train, val = prepare_synthetic(tmp_path / "synthetic", images=24, size=128, seed=3)
    storage = tmp_path / "runs"
    pre = fit(_config(train, val, storage), name="pre", plots=False)
    assert pre.last_weights is not None and pre.last_weights.is_file()

    # close_mosaic_frac 0.99: the budget left after the first epoch is under 99 % of it; the run
    # ends at its epoch cap long before its budget
    cfg = _config(train, val, storage, epochs=3, time_limit_min=2.0)
    cfg["model"]["init"] = str(pre.last_weights)
    cfg["data"]["close_mosaic_frac"] = 0.99
    tuned = fit(cfg, name="tuned", plots=False)
    assert [r["epoch"] for r in run_dir.read_metrics(tuned.run_dir)] == [0, 1, 2]
    first_free = load_checkpoint(find_latest_complete(checkpoint_dirs(tuned.run_dir))[0])["extra"][EXTRA_KEY]
    # decided after epoch 0: epoch 1, or later when the decode tasks had read ahead
    assert isinstance(first_free, int) and 1 <= first_free <= 3

    # a resumed run takes every weight from its checkpoint (the init file may be gone) and keeps
    # the decision its checkpoint recorded
    pre.last_weights.unlink()
    if pre.best_weights is not None:
        pre.best_weights.unlink(missing_ok=True)
    fit(None, overrides=["train.epochs=4"], storage=storage, name="tuned", resume=True, plots=False)
    rows = run_dir.read_metrics(tuned.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert load_checkpoint(find_latest_complete(checkpoint_dirs(tuned.run_dir))[0])["extra"][EXTRA_KEY] \
        == first_free
