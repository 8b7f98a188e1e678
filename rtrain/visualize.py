"""python -m rtrain.visualize: feature-map grids of named layers and a class-score heat map for one image.

    python -m rtrain.visualize --weights RUN/best.pt --source IMAGE [--layers NAME ...] [--channels 16]
                               [--out DIR] [--size S]

Layer names: `python -m rtrain.models --layers VARIANT` (default: an early, a middle and a deep
backbone stage). Writes DIR/<layer>.png per layer and DIR/score_map.png.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rtrain.cli import OneLineParser, run_cli
from rtrain.runs.feature_maps import load_detector, visualize


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rtrain.visualize", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="best.pt / last.pt, a checkpoint dir, or a run dir")
    p.add_argument("--source", required=True, help="the image to look at")
    p.add_argument("--layers", nargs="+", metavar="NAME",
                   help="layer names (python -m rtrain.models --layers VARIANT); default: 3 backbone stages")
    p.add_argument("--channels", type=int, default=16, help="most active channels shown per layer (16)")
    p.add_argument("--out", default="feature_maps", help="output folder (default ./feature_maps)")
    p.add_argument("--size", type=int, help="input side, a multiple of 32 (default: the training size)")
    return p


@run_cli("rtrain.visualize", parser=build_parser, log_level=logging.INFO)
def main(args: argparse.Namespace) -> int:
    det = load_detector(args.weights)
    pictures, overlay = visualize(det, args.source, args.out, args.layers, args.channels, args.size)
    for pic in pictures:
        print(f"{pic.path}  {pic.layer} {list(pic.shape)} channels {pic.channels}")
    print(f"{overlay}  max class score map")
    return 0


if __name__ == "__main__":
    sys.exit(main())
