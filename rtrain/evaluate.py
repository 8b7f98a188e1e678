"""python -m rtrain.evaluate: COCO metrics (pycocotools) of a weights file on a shard folder.

    python -m rtrain.evaluate --weights runs/bccd/best.pt --shards data/bccd/shards/val
    python -m rtrain.evaluate --weights s3://bucket/runs/r1/best.pt --shards s3://bucket/shards/val
    python -m rtrain.evaluate --weights RUN/best.pt --shards DIR --out metrics.json --pr-curves RUN/pr \\
        --set data.img_size=416 eval.score_thresh=0.001

Image size and thresholds come from the weights' saved config (data.img_size, eval.*); --config
and --set override them. Same code path, so the same numbers, as the evaluation during training.
Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from rtrain.cli import OneLineParser, run_cli
from rtrain.config import add_config_arguments


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rtrain.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="best.pt / last.pt, or a checkpoint directory")
    p.add_argument("--shards", required=True, help="shard folder (*.parquet + manifest.json) to evaluate on, "
                   "local or a bucket URI (s3://BUCKET/PATH)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the config's eval.batch_size)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--pr-curves", metavar="DIR", help="write one precision-recall PNG per class here")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    add_config_arguments(p)
    return p


@run_cli("rtrain.evaluate", also=(FileNotFoundError, ValueError), parser=build_parser)
def main(args: argparse.Namespace) -> int:
    from rtrain.evaluation.weights import evaluate_weights, format_metrics
    from rtrain.runs.run_dir import atomic_write_bytes

    metrics = evaluate_weights(args.weights, args.shards, batch_size=args.batch_size,
                               overrides=args.overrides, config_file=args.config, device=args.device,
                               pr_curves=args.pr_curves)
    print(format_metrics(metrics))
    if args.out:
        from pathlib import Path

        atomic_write_bytes(Path(args.out), json.dumps(metrics, indent=2).encode())
        print(f"metrics: {args.out}")
    for path in metrics.get("pr_curves", []):
        print(f"PR curve: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
