"""python -m rtrain.export: a weights file -> ONNX or TorchScript for the edge, with a parity check.

    python -m rtrain.export --weights runs/bccd/best.pt --format onnx
    python -m rtrain.export --weights RUN/best.pt --format torchscript --size 416 --dynamic-batch \\
        --out edge/model.torchscript --check-images photos/

Exports `forward_raw` (input float32 [B, 3, S, S] RGB 0..1; outputs cls_logits, box_dist; NMS is
left outside) and writes `<file>.json` beside it (class names, size, strides, reg_max, pre- and
post-processing conventions): `rtrain.deploy.inference.load_exported(file)` runs it without rtrain's
training code. Then PyTorch and the exported file run on the same letterboxed images: the largest
raw-output difference is printed and the final detections must match.
Exit status: 0 done, 1 parity check failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from rtrain.cli import OneLineParser, run_cli
from rtrain.config import add_config_arguments


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rtrain.export", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="best.pt / last.pt, or a checkpoint directory")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="export format")
    p.add_argument("--size", type=int, help="input size, multiple of 32 (default: weights' data.img_size)")
    p.add_argument("--dynamic-batch", action="store_true", help="batch dimension free (default: 1)")
    p.add_argument("--out", help="output file (default: the weights' path with .onnx / .torchscript)")
    p.add_argument("--check-images", metavar="DIR",
                   help="real images for the parity check (default: the weights' val shards)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check")
    add_config_arguments(p)
    return p


@run_cli("rtrain.export", also=(OSError,), parser=build_parser)
def main(args: argparse.Namespace) -> int:
    from rtrain.deploy.exporter import export_weights, format_report

    report = export_weights(args.weights, args.format, size=args.size, dynamic_batch=args.dynamic_batch,
                            out=args.out, check_images=args.check_images, overrides=args.overrides,
                            config_file=args.config, check=not args.no_check)
    print(format_report(report))
    parity = report.get("parity")
    if parity and not parity["detections_match"]:
        print(f"rtrain.export: error: parity check failed: {parity['first_difference']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
