"""The smallest real fit config the end-to-end tests share: compact_n at 128 px, 2 workers, AdamW."""

from __future__ import annotations

from pathlib import Path


def tiny_fit_config(train: Path, val: Path, epochs: int, storage: Path | None = None, **run) -> dict:
    """A config dict for `rtrain.training.runner.fit`; `run` adds or overrides keys of its run section."""
    config = {
        "model": {"name": "compact_n"},
        "data": {"train": str(train), "val": str(val), "img_size": 128, "num_actors": 1,
                 "cpus_per_actor": 0.5, "shuffle_buffer": 16},
        "train": {"epochs": epochs, "batch_size": 8, "optimizer": "adamw", "lr": 0.002,
                  "nominal_batch_size": 16, "warmup_epochs": 0.5},
        "eval": {"interval": 1, "batch_size": 8},
        "run": {"workers": 2, "cpus_per_worker": 1.0, "keep_last": 2, **run},
    }
    if storage is not None:
        config["run"]["storage"] = str(storage)
    return config
