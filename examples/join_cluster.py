"""Train on an existing Ray cluster (`ray start --head` on one machine, `ray start --address` on others).

    # on the head node:   ray start --head --dashboard-host 127.0.0.1
    # on each GPU node:   ray start --address HEAD_IP:6379
    python examples/join_cluster.py --address auto --config configs/coco.yaml --gpus 8
    python examples/join_cluster.py --smoke-test   # starts a throwaway local head, joins it, trains tiny

The run directory (`--storage`) must be on a filesystem every node sees: rank 0 writes
metrics and weights there, and Ray Train writes its checkpoints there. rtrain never shuts
down a cluster it joined.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from rtrain.training.quickstart import prepare_synthetic, quickstart_config_dict
from rtrain.training.runner import fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="auto", help="Ray cluster address (auto = local)")
    parser.add_argument("--config", default="configs/coco.yaml")
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--storage", default="runs", help="a path every node of the cluster sees")
    parser.add_argument("--smoke-test", action="store_true",
                        help="start a local head with `ray start`, join it, train 2 tiny epochs, stop it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.smoke_test:
        result = fit(args.config, address=args.address, gpus=args.gpus, workers=args.workers,
                     storage=args.storage)
        print(result.summary())
        return 0

    root = Path("data/synthetic_smoke")
    prepare_synthetic(root, images=24, size=128)
    # A throwaway "cluster" of one node; 4 logical CPUs so Ray Data and Train do not starve each other.
    subprocess.run(["ray", "start", "--head", "--num-cpus", "4", "--include-dashboard", "false"], check=True)
    try:
        result = fit(quickstart_config_dict(root), address="auto", storage=args.storage,
                     overrides=["data.img_size=128", "model.name=compact_n", "train.epochs=2",
                                "train.time_limit_min=0", "train.batch_size=8", "eval.interval=1"])
        print(result.summary())
    finally:
        subprocess.run(["ray", "stop"], check=False)  # we started this head ourselves
    return 0


if __name__ == "__main__":
    sys.exit(main())
