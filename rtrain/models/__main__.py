"""python -m rtrain.models [--layers VARIANT | --trunk VARIANT] [--backbone timm:NAME]: variant table,
layer list or trunk convs (--backbone: with a timm trunk instead of the variant's own; needs timm)."""

from __future__ import annotations

import sys

from rtrain.cli import OneLineParser, run_cli
from rtrain.errors import RtrainError

from .registry import build_model, list_variants
from .summary import (
    format_layers,
    format_trunk,
    format_variant_table,
    layer_table,
    trunk_convs,
    variant_table,
)


@run_cli("rtrain.models")
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rtrain.models", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--layers", metavar="VARIANT", help="named layers with their output shapes")
    group.add_argument(
        "--trunk", metavar="VARIANT", help="every backbone conv: in->out, kernel, stride, groups"
    )
    parser.add_argument("--size", type=int, default=320, help="input size for --layers (default 320)")
    parser.add_argument("--num-classes", type=int, default=80, help="number of classes (default 80)")
    parser.add_argument("--backbone", metavar="timm:NAME", default=None,
                        help="with --layers/--trunk: a timm trunk (random init) instead of the variant's own")
    args = parser.parse_args(argv)
    name = args.layers or args.trunk
    if name is not None and name not in list_variants():
        raise RtrainError(f"unknown variant {name!r}; known: {', '.join(list_variants())}")
    if args.backbone is not None and (name is None or not args.backbone.startswith("timm:")):
        raise RtrainError("--backbone: expected timm:NAME, with --layers or --trunk")
    if args.layers:
        model = build_model(name, args.num_classes, backbone=args.backbone)
        what = f"{name} with {args.backbone}" if args.backbone else name
        print(f"{what} layers at {args.size}x{args.size}, output shapes [B, C, H, W]:")
        print(format_layers(layer_table(model, args.size)))
    elif args.trunk:
        model = build_model(name, args.num_classes, backbone=args.backbone)
        taps = dict(zip(model.strides, model.backbone.out_channels, strict=True))
        print(f"{name} backbone convs; outputs {{stride: channels}} = {taps}:")
        print(format_trunk(trunk_convs(model.backbone)))
    else:
        print(f"{len(list_variants())} variants, {args.num_classes} classes.")
        print(format_variant_table(variant_table(args.num_classes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
