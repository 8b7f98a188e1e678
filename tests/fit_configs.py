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


def deterministic_fit_config(train: Path, val: Path, epochs: int, *, img_size: int, workers: int,
                             seed: int = 7, shuffle_buffer: int | None = 16, **run) -> dict:
    """The fault tests' config: `data.deterministic`, batch 4 per worker, a fixed seed, so an
    interrupted run and an uninterrupted one can be compared weight for weight."""
    data = {"train": str(train), "val": str(val), "img_size": img_size, "num_actors": 1,
            "cpus_per_actor": 0.5, "deterministic": True}
    if shuffle_buffer is not None:
        data["shuffle_buffer"] = shuffle_buffer
    return {
        "model": {"name": "compact_n"},
        "data": data,
        "train": {"epochs": epochs, "batch_size": 4, "optimizer": "adamw", "lr": 0.002,
                  "nominal_batch_size": 8, "warmup_epochs": 0.5, "seed": seed},
        "eval": {"interval": 1, "batch_size": 8},
        "run": {"workers": workers, "cpus_per_worker": 1.0, "keep_last": 2, **run},
    }


def stream_shards(root: Path) -> Path:
    """50 synthetic 96 px images in 3 shards (20 + 20 + 10 rows), so file order and windows both matter."""
    from data_prep.shard import main as shard_main
    from data_prep.synthetic import make_synthetic

    make_synthetic(root, images=50, seed=1, size=96, val_fraction=0.0)
    shard_main(["--format", "coco", "--annotations", str(root / "annotations.json"), "--images",
                str(root / "images"), "--out", str(root / "shards"), "--size", "96", "--rows-per-shard", "20",
                "--workers", "1"])
    return root / "shards"
