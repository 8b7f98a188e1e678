"""Variant registry: one keyword-only builder per variant, registered by a decorator that refuses duplicates.

Builders have the signature
`(*, num_classes, width=None, depth=None, neck_channels=None, head_convs=None, reg_max=7,
backbone=None, pretrained=False, backbone_weights="") -> Detector`, where `None` means the
variant's default; `backbone="timm:<name>"` swaps in a timm trunk (rtrain.models.timm_backbone),
whose starting weights are timm's (`pretrained`) or a local file's (`backbone_weights`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_variant(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `fn` as the builder of variant `name`; raises ValueError if the name is taken."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(
                f"model variant {name!r} is already registered (by {_BUILDERS[name].__module__})"
            )
        _BUILDERS[name] = fn
        return fn

    return wrap


def list_variants() -> list[str]:
    """Registered variant names, sorted."""
    return sorted(_BUILDERS)


def build_model(
    name: str,
    num_classes: int,
    *,
    width: float | None = None,
    depth: float | None = None,
    neck_channels: int | None = None,
    head_convs: int | None = None,
    reg_max: int = 7,
    backbone: str | None = None,
    pretrained: bool = False,
    backbone_weights: str = "",
) -> nn.Module:
    """Build variant `name` for `num_classes` classes; `None` keeps the variant's default.

    Raises ValueError (BackboneError for a timm trunk: unknown name, timm missing, weights that
    do not fit) with one line."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model variant {name!r}; known: {', '.join(list_variants())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if reg_max < 1:
        raise ValueError(f"reg_max must be >= 1, got {reg_max}")
    return _BUILDERS[name](
        num_classes=num_classes,
        width=width,
        depth=depth,
        neck_channels=neck_channels,
        head_convs=head_convs,
        reg_max=reg_max,
        backbone=backbone or None,
        pretrained=pretrained,
        backbone_weights=str(backbone_weights or ""),
    )
