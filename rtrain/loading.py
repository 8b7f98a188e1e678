"""A weights file (`best.pt`/`last.pt` or a checkpoint directory) -> a ready Detector and its config.

    loaded = load_detector("runs/bccd/best.pt", overrides=["eval.score_thresh=0.3"])
    loaded.model            # Detector in eval mode, on `device`
    loaded.config           # rtrain.config.Config: the saved config <- --config file <- --set overrides
    loaded.class_names      # [C] names, index = label

Used by evaluate, predict and export. Every fault is one line: CheckpointError for a missing,
corrupt or foreign file (including weights of another architecture than their config names),
ConfigError for bad overrides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rtrain.checkpoint import CheckpointError, IncompatibleCheckpointError, load_weights
from rtrain.config import Config, ConfigError, config_from_dict, merge, parse_overrides, read_yaml
from rtrain.models import build_model

logger = logging.getLogger(__name__)


@dataclass
class LoadedDetector:
    model: torch.nn.Module
    config: Config
    class_names: list[str]
    path: Path
    extra: dict


def resolve_config(saved: dict, config_file: str | os.PathLike | None = None,
                   overrides: list[str] | None = None, where: str = "weights") -> Config:
    """The weights' saved config, then a YAML file's values, then `--set` overrides, validated."""
    data = dict(saved)
    if config_file:
        data = merge(data, read_yaml(config_file))
    try:
        return config_from_dict(merge(data, parse_overrides(overrides)))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _mismatch(model_sd: dict, saved_sd: dict) -> str | None:
    """One phrase describing how two state dicts differ (None when keys and shapes agree)."""
    missing = [k for k in model_sd if k not in saved_sd]
    unexpected = [k for k in saved_sd if k not in model_sd]
    shapes = [k for k in model_sd if k in saved_sd and tuple(model_sd[k].shape) != tuple(saved_sd[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: weights {list(saved_sd[k].shape)}, "
                     f"model {list(model_sd[k].shape)})")
    return "; ".join(parts) or None


def build_from_config(cfg: Config, num_classes: int, path: Path | str = "weights") -> torch.nn.Module:
    """The Detector the config's model section describes; CheckpointError if the variant is unknown."""
    m = cfg.model
    try:
        return build_model(m.name, num_classes, width=m.width, depth=m.depth, neck_channels=m.neck_channels,
                           head_convs=m.head_convs, reg_max=m.reg_max)
    except ValueError as exc:
        raise CheckpointError(f"{path}: cannot build its model: {exc}") from None


def load_detector(
    path: str | os.PathLike,
    *,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedDetector:
    """Load weights, rebuild the architecture their config names, load the state dict strictly.

    Raises CheckpointError (missing/corrupt file), IncompatibleCheckpointError (weights of another
    architecture: says which tensors differ), ConfigError (bad overrides).
    """
    p = Path(path)
    obj = load_weights(p)
    cfg = resolve_config(obj["config"], config_file, overrides, where=str(p))
    names = list(obj["class_names"])
    if not names:
        raise CheckpointError(f"{p}: the weights name no classes")
    model = build_from_config(cfg, len(names), p)
    saved_sd = obj["model"]
    why = _mismatch(model.state_dict(), saved_sd)
    if why:
        m = cfg.model
        raise IncompatibleCheckpointError(
            f"{p}: weights do not fit the model their config names ({m.name}, width={m.width}, "
            f"depth={m.depth}, neck_channels={m.neck_channels}, head_convs={m.head_convs}, "
            f"reg_max={m.reg_max}, {len(names)} classes): {why}"
        )
    model.load_state_dict(saved_sd, strict=True)
    model.to(device).eval()
    logger.info("loaded %s: %s, %d classes", p, cfg.model.name, len(names))
    extra = dict(obj.get("extra", {}))
    return LoadedDetector(model=model, config=cfg, class_names=names, path=p, extra=extra)


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else the first GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
