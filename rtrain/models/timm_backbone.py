"""A timm model as the detector's trunk (`model.backbone: "timm:<name>"`), timm being optional.

    trunk = TimmBackbone("mobilenetv3_small_100", pretrained=False)
    trunk.strides, trunk.out_channels   # (8, 16, 32), timm's feature_info.channels() there
    feats = trunk(x)                    # [B, C_i, H / s_i, W / s_i] for s_i in 8, 16, 32

The trunk is `timm.create_model(name, features_only=True, out_indices=(-3, -2, -1))`, whose
`feature_info.reduction()` must be (8, 16, 32) (true of timm's CNNs; a ViT's all-16 maps are
refused) and whose `feature_info.channels()` feed the neck: the Backbone contract of rtrain.models.backbone
(maps in increasing stride order, attributes `strides` and `out_channels`), so the PAN neck and
the head are the same as for rtrain's own trunks. Its parameters are `backbone.body.*` in the
detector's state dict.

Weights: `pretrained=True` lets timm fetch its published weights (the Hugging Face Hub, cached
after the first download). `weights=PATH` loads a local file instead: a timm state dict as
`timm.create_model(name).state_dict()` saves it, or the hub's `model.safetensors` /
`pytorch_model.bin` (read with torch.load(weights_only=True) or safetensors). Every tensor the
trunk has must be in the file with its shape (the classifier the trunk drops may be there too),
else BackboneError says which does not fit.

Input normalisation: the detector feeds RGB in 0..1 and normalises it inside (rtrain.models.detector);
with a timm trunk it uses the trunk's `input_mean` / `input_std`, timm's pretrained_cfg mean/std,
so pretrained weights see inputs as they were trained on (ImageNet mean/std for most models,
0.5/0.5 for some).

timm is imported only here and only when a timm trunk is built: without it, building one raises
BackboneError saying `pip install -e ".[timm]"`; everything else works without it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from rtrain.errors import RtrainError

PREFIX = "timm:"
STRIDES = (8, 16, 32)  # the levels the PAN neck takes (rtrain.models.neck.PAN_LEVELS)
INSTALL_HINT = 'pip install -e ".[timm]"'
FIND_NAMES = "python -c \"import timm; print(timm.list_models('mobilenet*'))\""


class BackboneError(RtrainError, ValueError):
    """A timm trunk that cannot be built or loaded: one line naming the config key at fault."""


def is_timm(backbone: str) -> bool:
    return backbone.startswith(PREFIX)


def timm_name(backbone: str) -> str:
    """"timm:mobilenetv3_small_100" -> "mobilenetv3_small_100"."""
    return backbone[len(PREFIX):]


def import_timm():
    """The timm module, or BackboneError with the install command."""
    try:
        import timm
    except ImportError:
        raise BackboneError(f"model.backbone: a timm backbone needs the timm package: {INSTALL_HINT}") \
            from None
    return timm


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().endswith(":")),
                text.splitlines()[0] if text else type(exc).__name__)
    return line[:200]


def _create(timm, name: str, out_indices, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=pretrained)
    except Exception as exc:  # timm raises RuntimeError, AssertionError, hub errors, ... as it goes
        if pretrained:
            raise BackboneError(
                f"model.pretrained: cannot get timm's pretrained weights for {name} ({_first_line(exc)}); "
                "without internet, download them elsewhere and set model.backbone_weights to the file"
            ) from None
        raise BackboneError(f"model.backbone: timm:{name} gives no feature maps "
                            f"(features_only=True, out_indices={out_indices}): {_first_line(exc)}") from None


def _key(name: str) -> str:
    # timm's FeatureListNet flattens first-level Sequentials ("stages.0" -> "stages_0"); compare
    # names with both separators folded so a classification state dict maps onto the trunk.
    return name.replace(".", "_")


def read_state_dict(path: str | os.PathLike, timm) -> dict[str, torch.Tensor]:
    """A state dict from a local weights file (BackboneError naming model.backbone_weights otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"model.backbone_weights: {p}: no such file")
    try:
        from timm.models import load_state_dict  # .safetensors or torch.load(weights_only=True)

        sd = load_state_dict(str(p), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:
        why = _first_line(exc)
        raise BackboneError(f"model.backbone_weights: {p}: not a readable weights file ({why})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"model.backbone_weights: {p}: not a state dict of tensors")
    return sd


def load_trunk_weights(body: nn.Module, sd: dict[str, torch.Tensor], name: str, path) -> int:
    """Copy the file's tensors into the trunk strictly; return how many. BackboneError if any does not fit."""
    by_key = {_key(k): k for k in sd}
    target = body.state_dict()
    take, missing, shapes = {}, [], []
    for k, t in target.items():
        src = by_key.get(_key(k))
        if src is None:
            missing.append(k)
        elif tuple(sd[src].shape) != tuple(t.shape):
            shapes.append(f"{k}: file {list(sd[src].shape)}, trunk {list(t.shape)}")
        else:
            take[k] = sd[src]
    if missing or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the trunk's {len(target)} tensors missing (e.g. {missing[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        hint = ("; an rtrain run's weights go in model.init" if any(k.startswith("backbone.") for k in sd)
                else "")
        raise BackboneError(f"model.backbone_weights: {path}: not weights of timm model {name}: "
                            f"{'; '.join(parts)}{hint}")
    body.load_state_dict(take, strict=True)
    return len(take)


class TimmBackbone(nn.Module):
    """timm trunk with features at strides 8/16/32; attributes `strides`, `out_channels`, `input_mean`,
    `input_std` (timm's pretrained_cfg mean/std, used by the detector's normalisation)."""

    def __init__(self, name: str, *, pretrained: bool = False, weights: str | os.PathLike = ""):
        super().__init__()
        timm = import_timm()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            maybe = f" (close: {', '.join(close)})" if close else ""
            raise BackboneError(f"model.backbone: unknown timm model {name!r}{maybe}; "
                                f"list names with {FIND_NAMES}")
        # The file, when given, is read first: a bad path fails before any model is built.
        sd = read_state_dict(weights, timm) if weights else None
        from_hub = pretrained and not weights
        # (-3, -2, -1): the last three levels, strides 8/16/32 for the CNNs of timm (MobileNets,
        # LCNet, EfficientNets, ResNets, ConvNeXts, ...); ViTs (all 16) and EfficientViT-M (16/32/64)
        # are refused.
        body = _create(timm, name, (-3, -2, -1), from_hub)
        if tuple(body.feature_info.reduction()) != STRIDES:
            have = [int(i["reduction"]) for i in body.feature_info.info]
            raise BackboneError(f"model.backbone: timm:{name} has feature maps at strides {have}; the "
                                f"detector needs its last three at {list(STRIDES)} (timm CNNs do)")
        if sd is not None:
            load_trunk_weights(body, sd, name, weights)
        cfg = getattr(body, "pretrained_cfg", None) or {}
        self.body = body
        self.timm_name = name
        self.strides = tuple(int(s) for s in body.feature_info.reduction())
        self.out_channels = tuple(int(c) for c in body.feature_info.channels())
        self.input_mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.input_std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))
