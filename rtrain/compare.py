"""python -m rtrain.compare: overlay the curves of several runs and print their final and best figures.

    python -m rtrain.compare RUN_A RUN_B [...] [--metric loss|mAP|mAP50|...] [--x step|epoch|images|time]
                             [--smooth 0.6] [--out compare.png]

The legend names what differs between the runs' config.yaml (e.g. train.batch_size=1 vs 16).
Runs with partly written metrics still plot what is there; what was skipped is printed per run.
"""

from __future__ import annotations

import argparse
import sys

from rtrain.cli import OneLineParser, run_cli
from rtrain.runs.compare import X_AXES, compare_runs, skipped_lines


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rtrain.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl and config.yaml)")
    p.add_argument("--metric", default="loss", help="metrics.jsonl key: loss, loss_cls, mAP, mAP50, lr, ...")
    p.add_argument("--x", default="epoch", choices=X_AXES, help="x axis (default epoch)")
    p.add_argument("--smooth", type=float, default=0.6, help="EMA smoothing weight in [0, 1) (default 0.6)")
    p.add_argument("--out", default="compare.png", help="PNG to write (default ./compare.png)")
    return p


@run_cli("rtrain.compare", parser=build_parser)
def main(args: argparse.Namespace) -> int:
    result = compare_runs(args.runs, metric=args.metric, x=args.x, smooth=args.smooth, out=args.out)
    for path, reason in result.skipped_runs:
        print(f"left out {path}: {reason}")
    for line in skipped_lines(result.series):
        print(line)
    print(result.table)
    print(f"wrote {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
