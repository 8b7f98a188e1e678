"""A weights file (`best.pt`/`last.pt` or a checkpoint directory) -> a ready Detector and its config.

    loaded = load_detector("runs/bccd/best.pt", overrides=["eval.score_thresh=0.3"])
    loaded.model            # Detector in eval mode, on `device`
    loaded.config           # rtrain.config.Config: the saved config <- --config file <- --set overrides
    loaded.class_names      # [C] names, index = label

Used by evaluate, predict, export and the feature-map pictures. It is also the one place that
turns a config into a model (`build_detector`, used by training too) and weights into a model
(`load_model_weights`: the one "weights do not fit" message). Every fault is one line:
CheckpointError for a missing, corrupt or foreign file (including weights of another
architecture than their config names), ConfigError for bad overrides.

Fine-tuning (`model.init`): `init_from_weights(model, path, class_names)` copies every tensor of
a weights file whose name and shape fit the model, except the class logits when the classes
differ (number, names or order): those keep the model's fresh initialisation. It refuses
(IncompatibleCheckpointError naming the file) weights of another architecture: fewer than
`MIN_BACKBONE_FIT` of the model's backbone tensors fit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtrain import storage
from rtrain.config import Config, ConfigError, config_from_dict, merge, parse_overrides, read_yaml
from rtrain.models import build_model
from rtrain.runs.checkpoint import CheckpointError, IncompatibleCheckpointError, load_weights

logger = logging.getLogger(__name__)


@dataclass
class LoadedDetector:
    model: torch.nn.Module
    config: Config
    class_names: list[str]
    path: Path | str  # a local Path, or the weights' bucket URI
    extra: dict

    @property
    def img_size(self) -> int:
        """The square input side the weights were trained at (`data.img_size`)."""
        return int(self.config.data.img_size)

    @property
    def variant(self) -> str:
        return self.config.model.name


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


def build_detector(cfg: Config, num_classes: int, *, pretrained: bool = False) -> torch.nn.Module:
    """The Detector the config's model section describes (ValueError if the variant or a timm
    backbone is unknown, BackboneError for timm's own faults).

    `pretrained`: give a timm trunk the starting weights `model.pretrained` / `model.backbone_weights`
    name (a new run). False (the default) when weights are loaded into the model next (evaluate,
    predict, export, resume, fine-tuning): nothing is downloaded and no weights file is read then.
    """
    m = cfg.model
    return build_model(m.name, num_classes, width=m.width, depth=m.depth, neck_channels=m.neck_channels,
                       head_convs=m.head_convs, reg_max=m.reg_max, backbone=m.backbone or None,
                       pretrained=pretrained and m.pretrained,
                       backbone_weights=m.backbone_weights if pretrained else "")


def build_from_config(cfg: Config, num_classes: int, path: Path | str = "weights") -> torch.nn.Module:
    """`build_detector`, with CheckpointError naming `path` if the variant is unknown."""
    try:
        return build_detector(cfg, num_classes)
    except ValueError as exc:
        raise CheckpointError(f"{path}: cannot build its model: {exc}") from None


def _num_classes(model: torch.nn.Module) -> int | str:
    return getattr(model, "num_classes", "?")


def load_model_weights(model: torch.nn.Module, state_dict: dict, source: str | os.PathLike,
                       cfg: Config | None = None) -> None:
    """load_state_dict strictly, with a one-line IncompatibleCheckpointError when the architecture
    differs: which tensors are missing, unexpected or of another shape (and, given `cfg`, the
    model options the weights were checked against)."""
    why = _mismatch(model.state_dict(), state_dict)
    if why is None:
        try:
            model.load_state_dict(state_dict, strict=True)
            return
        except RuntimeError as exc:  # same keys and shapes, still refused (e.g. a non-tensor value)
            why = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))[:160]
    if cfg is not None:
        m = cfg.model
        trunk = f", backbone={m.backbone}" if m.backbone else ""
        what = (f"the model their config names ({m.name}{trunk}, width={m.width}, depth={m.depth}, "
                f"neck_channels={m.neck_channels}, head_convs={m.head_convs}, reg_max={m.reg_max}, "
                f"{_num_classes(model)} classes)")
    else:
        what = "the model built now (the model variant or its options changed)"
    raise IncompatibleCheckpointError(f"{source}: weights do not fit {what}: {why}")


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
    p = storage.location(path)  # a local Path, or an s3:// URI (rtrain.storage)
    obj = load_weights(p)
    cfg = resolve_config(obj["config"], config_file, overrides, where=str(p))
    names = list(obj["class_names"])
    if not names:
        raise CheckpointError(f"{p}: the weights name no classes")
    model = build_from_config(cfg, len(names), p)
    load_model_weights(model, obj["model"], p, cfg)
    model.to(device).eval()
    logger.info("loaded %s: %s, %d classes", p, cfg.model.name, len(names))
    extra = dict(obj.get("extra", {}))
    return LoadedDetector(model=model, config=cfg, class_names=names, path=p, extra=extra)


# The class-logit layer of the Detector head (rtrain.models.head): re-initialised when classes differ.
CLASS_LOGITS_PREFIX = "head.cls_out."
BACKBONE_PREFIX = "backbone."
MIN_BACKBONE_FIT = 0.5  # below this fraction of backbone tensors fitting, the weights are foreign


@dataclass
class InitReport:
    """What `init_from_weights` did: model tensors loaded and left at their fresh initialisation."""

    path: Path | str
    loaded: list[str]
    left: list[str]  # model tensors not loaded (absent, other shape, or re-initialised logits)
    unused: list[str]  # tensors of the file the model has no place for
    classes_differ: bool
    backbone_fit: float  # fraction of the model's backbone tensors that were loaded
    source_classes: list[str] = field(default_factory=list)

    def summary(self, names: int = 4) -> str:
        """One line: counts, and the first few names left out."""
        total = len(self.loaded) + len(self.left)
        line = f"init from {self.path}: loaded {len(self.loaded)}/{total} tensors"
        if self.classes_differ:
            line += (f"; class logits re-initialised ({len(self.source_classes)} classes in the file, "
                     "other than the data's)")
        if self.left:
            shown = ", ".join(self.left[:names]) + (", ..." if len(self.left) > names else "")
            line += f"; left {len(self.left)}: {shown}"
        if self.unused:
            line += f"; {len(self.unused)} of the file's tensors unused"
        return line


def _weight_tensors(sd: dict) -> list[str]:
    """Names of real parameters/buffers (BatchNorm's 0-d step counters fit anything: not evidence)."""
    return [k for k, v in sd.items() if v.ndim > 0]


def init_from_weights(model: torch.nn.Module, path: str | os.PathLike, class_names: list[str],
                      log: bool = True) -> InitReport:
    """Load into `model` every tensor of the weights file `path` whose name and shape fit.

    `path`: a best.pt/last.pt of any rtrain run, or a checkpoint directory (its EMA weights),
    loaded with weights_only=True (`rtrain.runs.checkpoint.load_weights`). When the file's classes
    differ from `class_names` (count, names or order) the class logits (`CLASS_LOGITS_PREFIX`)
    are not copied, so they keep the model's fresh initialisation. Raises CheckpointError for a
    missing, corrupt or unsafe file and IncompatibleCheckpointError when fewer than
    `MIN_BACKBONE_FIT` of the backbone tensors fit (another architecture). Logs `summary()`
    (unless `log` is False).
    """
    p = storage.location(path)  # a local Path, or an s3:// URI (rtrain.storage)
    obj = load_weights(p)
    saved = obj["model"]
    source_classes = list(obj["class_names"])
    classes_differ = source_classes != list(class_names)
    target = model.state_dict()
    take, left = {}, []
    for name, tensor in target.items():
        src = saved.get(name)
        fits = (src is not None and tuple(src.shape) == tuple(tensor.shape)
                and src.dtype.is_floating_point == tensor.dtype.is_floating_point)
        if fits and not (classes_differ and name.startswith(CLASS_LOGITS_PREFIX)):
            take[name] = src
        else:
            left.append(name)
    weights = _weight_tensors(target)
    backbone = [k for k in weights if k.startswith(BACKBONE_PREFIX)] or weights
    fit = sum(k in take for k in backbone) / max(1, len(backbone))
    if fit < MIN_BACKBONE_FIT:
        variant = obj["config"].get("model", {}).get("name", "?") if isinstance(obj["config"], dict) else "?"
        raise IncompatibleCheckpointError(
            f"{p}: cannot initialise from these weights: another architecture ({variant}); only "
            f"{sum(k in take for k in backbone)} of the model's {len(backbone)} backbone tensors fit "
            f"(at least {MIN_BACKBONE_FIT:.0%} needed)")
    model.load_state_dict(take, strict=False)
    report = InitReport(path=p, loaded=sorted(take), left=left, unused=sorted(set(saved) - set(target)),
                        classes_differ=classes_differ, backbone_fit=fit, source_classes=source_classes)
    if log:
        logger.info("%s", report.summary())
    return report


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else the first GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
