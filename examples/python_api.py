"""The Python API end to end: make data, shard it, fit, then evaluate the best weights yourself.

    python examples/python_api.py [--out /tmp/rtrain_api]
    python examples/python_api.py --smoke-test
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from data_prep.shard import build_parser as shard_parser
from data_prep.shard import shard
from data_prep.synthetic import make_synthetic
from rtrain.config import config_from_dict
from rtrain.data.batches import iter_batches_local, read_manifest
from rtrain.evaluation.coco import coco_gt_from_shards
from rtrain.evaluation.predict_loop import evaluate
from rtrain.runs.checkpoint import load_weights
from rtrain.training.runner import fit
from rtrain.training.train_loop import build_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/rtrain_api"))
    parser.add_argument("--smoke-test", action="store_true", help="24 images at 128 px, 2 epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images, size = (24, 128) if args.smoke_test else (300, 320)

    # 1. Raw data in COCO format, then Parquet shards (train, and val with the same classes).
    raw = make_synthetic(args.out / "raw", images=images, size=size, val_fraction=0.25)
    shards = {}
    for split in ("train", "val"):
        shards[split] = args.out / "shards" / split
        argv = ["--format", "coco", "--annotations", str(raw.annotations[split]), "--images", str(raw.images),
                "--out", str(shards[split]), "--size", str(size)]
        if split == "val":
            argv += ["--classes-from", str(shards["train"] / "manifest.json")]
        shard(shard_parser().parse_args(argv))

    # 2. Fit: a plain dict is a config (missing keys take their defaults).
    config = {
        "model": {"name": "compact_n" if args.smoke_test else "compact_s"},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "img_size": size},
        "train": {"epochs": 2 if args.smoke_test else 20, "batch_size": 8, "optimizer": "adamw",
                  "lr": 0.002, "nominal_batch_size": 16},
        "eval": {"interval": 1 if args.smoke_test else 5},
        "run": {"storage": str(args.out / "runs")},
    }
    result = fit(config, workers=1)
    print(result.summary())

    # 3. Evaluate the best weights again, outside Ray, with the same engine function.
    weights = load_weights(result.best_weights)
    cfg = config_from_dict(weights["config"])
    model = build_detector(cfg, len(weights["class_names"]))
    model.load_state_dict(weights["model"])
    classes = read_manifest(shards["val"])["classes"]
    metrics = evaluate(
        model, iter_batches_local(shards["val"], batch_size=16, train=False, img_size=cfg.data.img_size),
        coco_gt_from_shards(shards["val"]), [c["category_id"] for c in classes], weights["class_names"],
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    print(f"re-evaluated best.pt: mAP {metrics['mAP']:.4f}  mAP50 {metrics['mAP50']:.4f}")
    print("per class:", {k: round(v, 3) for k, v in metrics["per_class"].items()})


if __name__ == "__main__":
    main()
