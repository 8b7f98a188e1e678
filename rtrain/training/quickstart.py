"""The built-in default run: synthetic shapes, sharded, and a small model trained for a few minutes.

`python -m rtrain.fit` with no arguments calls `prepare_synthetic()` (makes
`./data/synthetic` and its train/val shards if absent) and trains
`QUICKSTART` — a plain dict, so the default needs no `configs/` folder.
`configs/quickstart.yaml` holds the same values (a test checks they agree).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "data/synthetic"
NUM_IMAGES = 600  # 480 train / 120 val
VAL_FRACTION = 0.2
IMAGE_SIZE = 320
SEED = 0

# Aim: mAP >= 0.3 on the synthetic val split in ~5 minutes on 2 cores (what it reaches: the
# README's Figures table, "quick start").
QUICKSTART: dict = {
    "model": {"name": "compact_n"},
    "data": {
        "train": f"{DEFAULT_ROOT}/shards/train",
        "val": f"{DEFAULT_ROOT}/shards/val",
        "img_size": 256,  # the data is stored at 320; 256 trains faster per image
        "scale": 0.3,
        "translate": 0.1,
        "mosaic": 0.0,
        "num_actors": 0,
        "cpus_per_actor": 1.0,
    },
    "train": {
        "epochs": 300,  # a cap: the time limit ends the run
        "time_limit_min": 4.0,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 0.008,
        "nominal_batch_size": 16,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "warmup_epochs": 1.0,
        "final_lr_ratio": 0.05,
        "ema_decay": 0.999,
        "amp": True,
    },
    "eval": {"interval": 5, "batch_size": 32},
    "run": {"storage": "runs", "workers": 1, "cpus_per_worker": 1.0},
}


def quickstart_config_dict(root: str | os.PathLike = DEFAULT_ROOT) -> dict:
    """QUICKSTART with its shard paths under `root` (a deep copy: callers may change it)."""
    cfg = copy.deepcopy(QUICKSTART)
    cfg["data"]["train"] = str(Path(root) / "shards" / "train")
    cfg["data"]["val"] = str(Path(root) / "shards" / "val")
    return cfg


def _shards_ready(shard_dir: Path) -> bool:
    return (shard_dir / "manifest.json").is_file() and any(shard_dir.glob("*.parquet"))


def prepare_synthetic(
    root: str | os.PathLike = DEFAULT_ROOT,
    images: int = NUM_IMAGES,
    size: int = IMAGE_SIZE,
    seed: int = SEED,
) -> tuple[Path, Path]:
    """Make the synthetic dataset and its train/val shards under `root` unless they exist.

    Returns (train shard dir, val shard dir). Idempotent: a second call does nothing.
    """
    from data_prep.shard import build_parser, shard
    from data_prep.synthetic import make_synthetic

    root = Path(root)
    train_dir, val_dir = root / "shards" / "train", root / "shards" / "val"
    if _shards_ready(train_dir) and _shards_ready(val_dir):
        return train_dir, val_dir
    ann = {s: root / f"annotations_{s}.json" for s in ("train", "val")}
    if not all(p.is_file() for p in ann.values()):
        logger.info("making %d synthetic images under %s", images, root)
        make_synthetic(root, images=images, seed=seed, size=size, val_fraction=VAL_FRACTION)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    for split, out in (("train", train_dir), ("val", val_dir)):
        if _shards_ready(out):
            continue
        argv = ["--format", "coco", "--annotations", str(ann[split]), "--images", str(root / "images"),
                "--out", str(out), "--size", str(size), "--workers", workers]
        if split == "val":
            argv += ["--classes-from", str(train_dir / "manifest.json")]
        logger.info("sharding the %s split into %s", split, out)
        shard(build_parser().parse_args(argv))
    return train_dir, val_dir
