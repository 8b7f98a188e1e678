"""Batch size 1 vs batched on BCCD, same wall-clock budget: shard, train twice, compare the curves.

    python examples/batch1_vs_batched.py [--minutes 5] [--batch 16] [--out /tmp/batch1_vs_batched]
    python examples/batch1_vs_batched.py --smoke-test     # 24/8 images at 128 px, 1 min budget per run

The question the project started from: on a small detection set and a fixed time budget, does a
batch of 1 (more, noisier updates) or a batch of 16 (fewer, steadier ones) get further? Both runs use
configs/bccd.yaml with only `train.batch_size` changed (the LR is scaled linearly to the batch by
rtrain, `train.nominal_batch_size`), and `train.time_limit_min` ends each run. The comparison is
`rtrain.runs.compare.compare_runs`: loss and mAP against training time and against images seen, the
legend naming what differs (`train.batch_size=1` vs `=16`). The same from the shell:

    python -m rtrain.compare OUT/runs/bs1-* OUT/runs/bs16-* --metric mAP50 --x time --out cmp.png
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from train_bccd import shard_split  # the sibling example (this folder is on sys.path when run)

from rtrain.runs.compare import CompareError, compare_runs, skipped_lines
from rtrain.training.runner import FitError, fit

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bccd", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--out", type=Path, default=Path("/tmp/batch1_vs_batched"))
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per run (default 5)")
    parser.add_argument("--batch", type=int, default=16, help="the batched run's batch size (default 16)")
    parser.add_argument("--gpus", type=int, default=0, help="GPU workers per run (0: one CPU worker)")
    parser.add_argument("--smoke-test", action="store_true", help="24 train / 8 val images, 128 px, 1 min")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    smoke = args.smoke_test
    size, minutes = (128, 1.0) if smoke else (416, args.minutes)
    data = args.out / ("shards_smoke" if smoke else "shards")
    train = shard_split(args.bccd, "train", data / "train", size, None, limit=24 if smoke else None,
                        workers=2)
    val = shard_split(args.bccd, "val", data / "val", size, train, limit=8 if smoke else None, workers=2)

    common = [f"data.train={train}", f"data.val={val}", f"data.img_size={size}",
              f"train.time_limit_min={minutes}", "train.epochs=100000",  # the clock ends the runs
              "eval.interval=1"]
    if smoke:
        common += ["model.name=compact_n", "data.mosaic=0", "eval.batch_size=8", "train.warmup_epochs=0.5"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    # Each fit starts (and stops) its own local Ray, so both runs pay the same cold start (worker
    # processes, Ray Data warm-up): a Ray shared by both runs would hand the second one warm workers.
    for batch in (1, args.batch):
        result = fit(REPO / "configs" / "bccd.yaml", overrides=[*common, f"train.batch_size={batch}"],
                     name=f"bs{batch}-{stamp}", storage=args.out / "runs", gpus=args.gpus, workers=1)
        print(result.summary())
        runs.append(result.run_dir)

    for metric, x in (("loss", "time"), ("mAP50", "time"), ("mAP50", "images"), ("loss", "step")):
        out = args.out / f"compare_{metric}_vs_{x}.png"
        try:
            cmp = compare_runs(runs, metric=metric, x=x, smooth=0.0 if smoke else 0.6, out=out)
        except CompareError as exc:  # e.g. a budget too short for a single step
            print(f"\n{metric} vs {x}: {exc}")
            continue
        print(f"\n{metric} vs {x}: {out}")
        for path, reason in cmp.skipped_runs:
            print(f"left out {path}: {reason}")
        for line in skipped_lines(cmp.series):
            print(line)
        print(cmp.table)


if __name__ == "__main__":
    try:
        main()
    except FitError as exc:
        raise SystemExit(f"error: {exc}") from None
