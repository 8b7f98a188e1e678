"""Human-readable views of the variants: the size/cost table, named layer outputs, the trunk's convs."""

from __future__ import annotations

import torch
from torch import nn

from .flops import count_gflops, count_params
from .registry import build_model, list_variants


def variant_table(num_classes: int = 80, sizes: tuple[int, ...] = (320, 640)) -> list[dict]:
    """One row per registered variant: name, params (M), GFLOPs (2 x GMACs) at each square size, strides.

    `params` is the exact count; `gflops_{size}` keys follow `sizes` (empty: no FLOP count).
    """
    rows = []
    for name in list_variants():
        model = build_model(name, num_classes)
        params = count_params(model)
        row = {"variant": name, "params": params, "params_m": params / 1e6, "strides": model.strides}
        for size in sizes:
            row[f"gflops_{size}"] = count_gflops(model, size)
        rows.append(row)
    return rows


def capture_layers(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named intermediate outputs of `model.forward_raw(images)`, in execution order.

    Names: `backbone.stem`, `backbone.stage{i}` (a timm trunk: `backbone.p{stride}`, its output
    maps), `neck.p{stride}`, `head.tower{j}.p{stride}`,
    `head.cls.p{stride}` / `head.box.p{stride}` (the per-level maps before flattening).
    Used by the layer table and by feature-map pictures.
    """
    out: dict[str, torch.Tensor] = {}
    strides = model.strides
    hooks = []

    def keep(name):
        return lambda _m, _i, y: out.__setitem__(name, y.detach())

    def keep_per_level(prefix):
        calls = []

        def hook(_m, _i, y):
            out[f"{prefix}.p{strides[len(calls)]}"] = y.detach()
            calls.append(1)

        return hook

    def keep_levels(_m, _i, ys):
        for s, y in zip(strides, ys, strict=True):
            out[f"neck.p{s}"] = y.detach()

    def keep_trunk_levels(_m, _i, ys):
        for s, y in zip(strides, ys, strict=True):
            out[f"backbone.p{s}"] = y.detach()

    if hasattr(model.backbone, "stages"):  # rtrain's stage-table trunks
        hooks.append(model.backbone.stem.register_forward_hook(keep("backbone.stem")))
        for i, stage in enumerate(model.backbone.stages):
            hooks.append(stage.register_forward_hook(keep(f"backbone.stage{i}")))
    else:  # a timm trunk: its output maps
        hooks.append(model.backbone.register_forward_hook(keep_trunk_levels))
    hooks.append(model.neck.register_forward_hook(keep_levels))
    for j, conv in enumerate(model.head.tower):
        hooks.append(conv.register_forward_hook(keep_per_level(f"head.tower{j}")))
    hooks.append(model.head.cls_out.register_forward_hook(keep_per_level("head.cls")))
    hooks.append(model.head.box_out.register_forward_hook(keep_per_level("head.box")))
    try:
        with torch.no_grad():
            model.forward_raw(images)
    finally:
        for h in hooks:
            h.remove()
    return out


def layer_table(model: nn.Module, height: int = 320, width: int | None = None) -> list[tuple[str, tuple]]:
    """(name, output shape) of each named layer for one [1, 3, H, W] input (model left in its mode)."""
    width = height if width is None else width
    was_training = model.training
    model.eval()
    try:
        feats = capture_layers(model, torch.zeros(1, 3, height, width))
    finally:
        model.train(was_training)
    return [(name, tuple(t.shape)) for name, t in feats.items()]


def trunk_convs(backbone: nn.Module) -> list[dict]:
    """Every conv of the backbone in order: name, in/out channels, kernel, stride, groups, output stride."""
    rows, total = [], 1
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            total *= m.stride[0]
            rows.append(
                {
                    "name": name,
                    "in": m.in_channels,
                    "out": m.out_channels,
                    "kernel": m.kernel_size[0],
                    "stride": m.stride[0],
                    "groups": m.groups,
                    "out_stride": total,
                }
            )
    return rows


def format_variant_table(rows: list[dict]) -> str:
    """The variant table as text (rows from `variant_table` with sizes 320 and 640)."""
    lines = [
        "GFLOPs = FlopCounterMode count / 1e9 of forward_raw on one image = 2 x GMACs",
        f"{'variant':<10} {'params M':>8} {'GFLOPs@320':>10} {'GFLOPs@640':>10}  strides",
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<10} {r['params_m']:>8.3f} {r['gflops_320']:>10.3f} {r['gflops_640']:>10.3f}  "
            f"{r['strides']}"
        )
    return "\n".join(lines)


def format_trunk(rows: list[dict]) -> str:
    """`trunk_convs` rows as text: one conv a line, dw = depthwise (groups = in channels)."""
    lines = [f"{'name':<20} {'in->out':>10} {'k':>2} {'s':>2} {'type':>4} {'out stride':>10}"]
    for r in rows:
        kind = "dw" if r["groups"] == r["in"] > 1 else "conv"
        io = f"{r['in']}->{r['out']}"
        lines.append(
            f"{r['name']:<20} {io:>10} {r['kernel']:>2} {r['stride']:>2} {kind:>4} {r['out_stride']:>10}"
        )
    return "\n".join(lines)


def format_layers(rows: list[tuple[str, tuple]]) -> str:
    """`layer_table` rows as text."""
    return "\n".join(f"{name:<24} {list(shape)}" for name, shape in rows)
