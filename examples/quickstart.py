"""Quick start: synthetic shapes -> shards -> a few minutes of training -> mAP and plots.

    python examples/quickstart.py                 # the same as `python -m rtrain.fit`
    python examples/quickstart.py --smoke-test    # tiny: 24 images at 128 px, 2 epochs (~1-2 min)
"""

from __future__ import annotations

import argparse
import logging

from rtrain.training.quickstart import prepare_synthetic, quickstart_config_dict
from rtrain.training.runner import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny data and 2 epochs")
    parser.add_argument("--root", default=None, help="where the synthetic data goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.smoke_test:
        root = args.root or "data/synthetic_smoke"
        prepare_synthetic(root, images=24, size=128)
        overrides = ["data.img_size=128", "model.name=compact_n", "train.epochs=2", "train.time_limit_min=0",
                     "train.batch_size=8", "eval.interval=1"]
    else:
        root = args.root or "data/synthetic"
        prepare_synthetic(root)
        overrides = []
    result = fit(quickstart_config_dict(root), overrides=overrides)
    print(result.summary())


if __name__ == "__main__":
    main()
