"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation.

A config is five sections (model, data, train, eval, run). It is read from YAML
with `yaml.safe_load` (less YAML 1.1's base-60 numbers, see `ConfigLoader`), then
`--set section.key=value` overrides are applied, then every value is checked: unknown
keys, wrong types and out-of-range values raise `ConfigError` with one line naming the
key. Number of classes and their names are NOT part of a config: they come from the
train shards' manifest.

Worker counts (`run.workers`, `run.gpus`) are an int, or "MIN:MAX" for an elastic run
(`worker_range`); an elastic run keeps the global batch `train.batch_size` x MAX fixed
(`rtrain.training.elastic`), so that batch must split evenly over every count in MIN..MAX.

    cfg = load_config("configs/bccd.yaml", ["train.lr=0.01", "model.width=0.5"])
    dump_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_prep.atomic import write_text_atomic
from rtrain.errors import RtrainError


class ConfigError(RtrainError, ValueError):
    """A config problem, as one line naming the key (and file) at fault."""


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without YAML 1.1's base-60 numbers: `workers: 1:2` is the string "1:2".

    PyYAML reads `1:2` as the int 62 and `1:30.5` as 90.5 (sexagesimal, dropped in YAML 1.2),
    so an elastic `run.workers: 1:2` would silently ask for 62 workers. Every other scalar
    resolves as with safe_load.
    """


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# PyYAML's own int and float patterns (yaml/resolver.py) less their sexagesimal alternatives.
ConfigLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
ConfigLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str):
    """`yaml.load` with `ConfigLoader` (safe: plain data only)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)


def _range(lo: float | None = None, hi: float | None = None, choices: tuple | None = None) -> dict:
    return {"min": lo, "max": hi, "choices": choices}


@dataclass
class ModelConfig:
    """Which registered variant to build; `None` overrides keep the variant's own default.

    backbone: "" = the variant's own trunk; "timm:<name>" = a timm model's feature maps at
        strides 8/16/32 instead (`timm.create_model(name, features_only=True)`; needs
        `pip install -e ".[timm]"`; names: `timm.list_models("mobilenet*")`), e.g.
        "timm:mobilenetv3_small_100", "timm:mobilenetv4_conv_small", "timm:lcnet_100",
        "timm:efficientnet_b0". The variant (`name`) then gives only the neck and head sizes;
        `width` / `depth` (rtrain trunks' multipliers) must stay unset. The detector normalises
        its 0..1 input with the trunk's pretrained mean/std (rtrain.models.timm_backbone).
    pretrained: start a timm trunk from timm's published ImageNet weights (downloaded from the
        Hugging Face Hub on first use, then cached: needs internet once).
    backbone_weights: start a timm trunk from a local weights file instead (a timm state dict,
        e.g. the hub's model.safetensors or pytorch_model.bin); every trunk tensor must fit.
    These two only choose a new run's starting weights: a run's checkpoint and best.pt hold the
    trunk's weights, so evaluate/predict/export/resume never download or read them again.
    """

    name: str = "compact_s"
    width: float | None = field(default=None, metadata=_range(0.25, 2.0))
    depth: float | None = field(default=None, metadata=_range(0.25, 3.0))
    neck_channels: int | None = field(default=None, metadata=_range(8, 1024))
    head_convs: int | None = field(default=None, metadata=_range(0, 6))
    reg_max: int = field(default=7, metadata=_range(1, 32))
    # Fine-tuning: a best.pt/last.pt (or checkpoint dir) of any rtrain run; every tensor whose name
    # and shape fit is loaded before training, the class logits re-initialised when the classes
    # differ (rtrain.runs.loading.init_from_weights). "" = from scratch. A resumed run ignores it.
    init: str = ""
    backbone: str = ""  # "" or "timm:<name>" (see the docstring)
    pretrained: bool = False
    backbone_weights: str = ""


@dataclass
class DataConfig:
    """Shard directories and the augmentation recipe (train only; val is letterbox only)."""

    train: str = ""
    val: str = ""
    img_size: int = field(default=320, metadata=_range(64, 2048))
    multi_scale: float = field(default=0.0, metadata=_range(0.0, 0.5))  # +- fraction of img_size
    hflip: float = field(default=0.5, metadata=_range(0.0, 1.0))
    hsv_h: float = field(default=0.015, metadata=_range(0.0, 0.5))
    hsv_s: float = field(default=0.5, metadata=_range(0.0, 1.0))
    hsv_v: float = field(default=0.3, metadata=_range(0.0, 1.0))
    scale: float = field(default=0.5, metadata=_range(0.0, 0.9))  # random affine zoom +-
    translate: float = field(default=0.1, metadata=_range(0.0, 0.5))
    mosaic: float = field(default=0.0, metadata=_range(0.0, 1.0))  # probability
    # Close mosaic for the end of the run (rtrain.data.close_mosaic), so the model ends on the image
    # statistics it is tested on: the last `close_mosaic` epochs of train.epochs, or, for a
    # time-limited run, the last `close_mosaic_frac` of train.time_limit_min. 0 = mosaic to the end.
    close_mosaic: int = field(default=0, metadata=_range(0, 100_000))
    close_mosaic_frac: float = field(default=0.0, metadata=_range(0.0, 1.0))
    # Where JPEGs are decoded and augmented: "cpu" in Ray Data tasks (PIL), "gpu" in the train
    # worker on its device (torchvision.io + batched tensor ops; Ray Data streams compact rows),
    # "auto" = gpu when the workers have GPUs.
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    # CPU decode actors of the train stream; 0 = the CPUs Ray Train leaves free
    # (rtrain.training.runner.decode_actors).
    num_actors: int = field(default=0, metadata=_range(0, 1024))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.05, 64))
    prefetch_batches: int = field(default=2, metadata=_range(0, 64))
    # Compact (undecoded) rows one read task shuffles together each epoch; the order of the
    # windows and the files in them changes every epoch too (rtrain.data.epoch_stream).
    shuffle_window: int = field(default=4096, metadata=_range(1, 10_000_000))
    # An extra shuffle buffer of DECODED rows in each worker (0 = none, the default: rows are
    # already shuffled before decode). Ignored in deterministic runs.
    shuffle_buffer: int = field(default=0, metadata=_range(0, 1_000_000))
    # Same data order and augmentation every time for a given seed and epoch, on any restart:
    # Ray Data's preserve_order, so worker r gets the same rows of every epoch (the order itself
    # is always a function of seed and epoch). Costs some throughput (a slow decode task holds
    # back the later ones).
    deterministic: bool = False


@dataclass
class TrainConfig:
    """Optimisation.

    batch_size: per worker; an int, or "auto": the largest batch whose forward+backward fits
        `autobatch_fraction` of the GPU's memory, measured on the real model at the training
        image size (`rtrain.training.autobatch`); 16 on CPU. All workers use the smallest pick; it is
        at most the images one worker sees per epoch, and a fractional Ray GPU counts its share.
        With an elastic `run.workers`/`run.gpus` "MIN:MAX" it is the per-worker batch at MAX workers:
        the global batch batch_size x MAX stays fixed and W workers take global / W each ("auto"
        is refused there).
    lr: the peak LR at `nominal_batch_size`. It is scaled to the global batch (batch_size x
        workers) by the optimiser's rule (`rtrain.training.schedule.scale_lr`): linearly for SGD,
        by the square root of the ratio for AdamW.
    Warm-up (the first `warmup_epochs`): the LR rises linearly from `warmup_start_ratio` x peak
    to the peak; bias parameters start at the absolute LR `warmup_bias_lr` (SGD; under AdamW
    capped at the peak LR) and fall to the scheduled LR; momentum (SGD momentum, AdamW beta1)
    rises from `warmup_momentum` to `momentum`.
    """

    epochs: int = field(default=30, metadata=_range(1, 100_000))
    batch_size: int | Literal["auto"] = field(default=16, metadata=_range(1, 4096))  # per worker
    autobatch_fraction: float = field(default=0.6, metadata=_range(0.1, 0.95))  # of GPU memory
    lr: float = field(default=0.01, metadata=_range(0.0, 10.0))
    nominal_batch_size: int = field(default=64, metadata=_range(1, 65536))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = field(default=0.9, metadata=_range(0.0, 0.9999))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0, 1.0))
    warmup_epochs: float = field(default=1.0, metadata=_range(0.0, 1000))
    warmup_start_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))  # x peak LR at step 0
    warmup_bias_lr: float = field(default=0.1, metadata=_range(0.0, 10.0))  # absolute; 0 = off
    warmup_momentum: float = field(default=0.8, metadata=_range(0.0, 0.9999))
    final_lr_ratio: float = field(default=0.05, metadata=_range(0.0, 1.0))
    ema_decay: float = field(default=0.9998, metadata=_range(0.0, 1.0))
    # EMA warm-up ramp length in optimizer steps; 0 = auto: fit the run so the averaging window at
    # its end is ~20% of its expected total steps (rtrain.training.ema.ema_tau_for_run, at most 2000).
    ema_tau: float = field(default=0.0, metadata=_range(0.0, 1e9))
    grad_clip: float = field(default=10.0, metadata=_range(0.0, 1e6))  # 0 disables
    amp: bool = True  # bf16/fp16 autocast on GPU; ignored on CPU
    # Layout of the weights and input while training (rtrain.training.memory_format): "auto" is
    # channels_last on CPU (faster there: benchmarks/memory_format.py), contiguous on GPU.
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    time_limit_min: float = field(default=0.0, metadata=_range(0.0, 1e6))  # 0 = use epochs
    max_nonfinite: int = field(default=20, metadata=_range(1, 1_000_000))  # consecutive bad steps
    seed: int = 0


@dataclass
class EvalConfig:
    """COCO evaluation of the EMA model on val every `interval` epochs (and after the last)."""

    interval: int = field(default=1, metadata=_range(1, 100_000))
    score_thresh: float = field(default=0.01, metadata=_range(0.0, 1.0))
    iou_thresh: float = field(default=0.6, metadata=_range(0.0, 1.0))
    max_det: int = field(default=100, metadata=_range(1, 10_000))
    batch_size: int = field(default=16, metadata=_range(1, 4096))
    # Rectangular val and predict inputs: val rows sorted by aspect ratio and batched, each batch
    # letterboxed (longer side data.img_size, as before) into its largest resized height x width
    # rounded up to 32 instead of img_size x img_size; predict gives each image its own such
    # canvas. Boxes map back to original pixels as before. false = square inputs, as before.
    rect: bool = True


@dataclass
class RunConfig:
    """Where the run lives and what it runs on."""

    name: str = ""
    storage: str = "runs"
    keep_last: int = field(default=3, metadata=_range(1, 1000))
    max_failures: int = field(default=2, metadata=_range(-1, 1000))  # -1 = retry forever
    # Worker counts: an int, or "MIN:MAX" for an elastic run (Ray Train's elastic ScalingConfig):
    # it starts with as many workers as the cluster holds (at least MIN), restarts on fewer from
    # the last checkpoint when a node is lost, and grows again when the cluster does. The global
    # batch stays train.batch_size x MAX (rtrain.training.elastic).
    workers: int | str = field(default=1, metadata=_range(0, 4096))  # 0 = run the loop in the driver
    gpus: int | str = field(default=0, metadata=_range(0, 4096))  # >0: GPU workers (one GPU each)
    cpus_per_worker: float = field(default=1.0, metadata=_range(0.05, 256))
    # Heap memory Ray reserves for each worker (GiB; 0 = none). On CPU nodes it is what keeps
    # Ray (PACK placement, elastic sizing) from putting more workers on a node than its RAM holds.
    memory_per_worker_gb: float = field(default=0.0, metadata=_range(0.0, 65536.0))
    # Elastic runs: how often Ray Train checks whether the cluster now holds more workers (it then
    # restarts the group, larger, from the last checkpoint). Ray's default is 60 s.
    resize_interval_s: float = field(default=60.0, metadata=_range(1.0, 86_400.0))
    address: str = ""  # "" starts a local Ray; "auto" or host:port joins a cluster
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    # Ray Train's placement of the workers: PACK fills a node first; SPREAD / STRICT_SPREAD put
    # them on different nodes (STRICT_SPREAD fails to start if there are too few nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Experiment trackers fed every epoch's metrics row, the config and, at the end, the best
    # weights and plots (rtrain.training.trackers): TensorBoard event files in RUN/tensorboard/, MLflow to
    # `mlflow_uri` ("" = file:<storage>/mlruns, beside the run; a sweep's beside the sweep).
    loggers: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)
    mlflow_uri: str = ""
    # Preemption (rtrain.training.preempt): after a SIGTERM to the driver (`python -m rtrain.fit`) the
    # workers write a checkpoint at the next step boundary where the stream can resume exactly;
    # the driver waits at most `grace_s` seconds for it, then exits without one and says so.
    grace_s: float = field(default=30.0, metadata=_range(1.0, 86_400.0))
    # Also checkpoint inside an epoch once this many minutes passed since the last checkpoint
    # (0 = only at epoch ends); `--resume` then continues from that step of the epoch.
    checkpoint_every_min: float = field(default=0.0, metadata=_range(0.0, 1e6))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- values


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; accept ints for floats. Raise ConfigError."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item, key) for v in value]
        raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_range(value: Any, meta: dict, key: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range [{lo}, {hi}]")


def _build_section(cls: type, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]} (valid: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        kwargs[name] = _coerce(value, hints[name], key)
        _check_range(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Build and validate a Config from a plain dict (as YAML gives). Missing keys take defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (valid: {', '.join(sections)})")
    built = {}
    for name, factory in sections.items():
        built[name] = _build_section(type(factory()), data.get(name) or {}, name)
    cfg = Config(**built)
    _check_together(cfg)
    return cfg


def _check_model(m: ModelConfig) -> None:
    """model.backbone's form and the keys that go with it (the timm name itself is checked when the
    model is built: this module does not import timm)."""
    timm = m.backbone.startswith("timm:")
    if m.backbone and (not timm or not m.backbone[len("timm:"):].strip()):
        raise ConfigError(f"model.backbone: expected \"\" (the variant's own trunk) or \"timm:<name>\" "
                          f"(e.g. timm:mobilenetv3_small_100), got {m.backbone!r}")
    if not timm and (m.pretrained or m.backbone_weights):
        key = "model.pretrained" if m.pretrained else "model.backbone_weights"
        raise ConfigError(f"{key}: pretrained trunk weights come with a timm backbone; set model.backbone: "
                          "timm:<name> (or use model.init for an rtrain run's weights)")
    if timm and (m.width is not None or m.depth is not None):
        key = "model.width" if m.width is not None else "model.depth"
        raise ConfigError(f"{key}: multiplies rtrain's own trunks only; a timm backbone's size is in its "
                          "name (e.g. timm:mobilenetv3_small_050): leave it unset")


def parse_worker_count(value: int | str, key: str) -> int | tuple[int, int]:
    """`run.workers` / `run.gpus` as an int, or (MIN, MAX) for "MIN:MAX"; ConfigError naming `key`."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([^:]*?)\s*:\s*([^:]*?)\s*", value)
    if match is None:
        raise ConfigError(f"{key}: expected a whole number or MIN:MAX (e.g. 1:4), got {value!r}")
    if not all(re.fullmatch("[0-9]+", part) for part in match.groups()):
        raise ConfigError(f"{key}: {value!r}: MIN and MAX must be whole numbers (e.g. 1:4)")
    lo, hi = (int(part) for part in match.groups())
    if lo < 1:
        raise ConfigError(f"{key}: {value!r}: MIN must be at least 1")
    if lo > hi:
        raise ConfigError(f"{key}: {value!r}: MIN {lo} is above MAX {hi}")
    if hi > 4096:
        raise ConfigError(f"{key}: {value!r}: MAX {hi} is out of range [1, 4096]")
    return lo, hi


def uses_gpu(run: RunConfig) -> bool:
    """The run trains on GPU workers (`run.gpus` > 0 or a MIN:MAX range)."""
    gpus = parse_worker_count(run.gpus, "run.gpus")
    return isinstance(gpus, tuple) or gpus > 0


def worker_range(run: RunConfig) -> tuple[int, int]:
    """(MIN, MAX) Ray Train workers: from `run.gpus` on GPUs, else `run.workers` (0 runs as 1).
    A fixed count n is (n, n)."""
    count = parse_worker_count(run.gpus, "run.gpus") if uses_gpu(run) else parse_worker_count(
        run.workers, "run.workers")
    if isinstance(count, tuple):
        return count
    return max(1, count), max(1, count)


def is_elastic(run: RunConfig) -> bool:
    """The worker count in use is a MIN:MAX range (even MIN == MAX: Ray waits for workers)."""
    key = "gpus" if uses_gpu(run) else "workers"
    return isinstance(parse_worker_count(getattr(run, key), f"run.{key}"), tuple)


def _check_elastic(cfg: Config) -> None:
    """An elastic run: a fixed global batch that every worker count in MIN..MAX splits evenly."""
    parse_worker_count(cfg.run.workers, "run.workers")  # a malformed one fails even when unused
    if not is_elastic(cfg.run):
        return
    key = "run.gpus" if uses_gpu(cfg.run) else "run.workers"
    lo, hi = worker_range(cfg.run)
    batch = cfg.train.batch_size
    if not isinstance(batch, int):
        raise ConfigError(f"train.batch_size=auto cannot be used with an elastic {key}={lo}:{hi}: set the "
                          f"per-worker batch at {hi} workers (the global batch is it x {hi})")
    total = batch * hi
    uneven = [w for w in range(lo, hi + 1) if total % w]
    if uneven:
        step = math.lcm(*range(lo, hi + 1)) // math.gcd(math.lcm(*range(lo, hi + 1)), hi)
        fit = -(-batch // step) * step
        raise ConfigError(f"{key}={lo}:{hi}: the global batch train.batch_size x {hi} = {total} does not "
                          f"split evenly over {uneven[0]} workers; use a train.batch_size that is a multiple "
                          f"of {step} (e.g. {fit})")
    if cfg.run.placement_strategy in ("STRICT_PACK", "STRICT_SPREAD"):
        raise ConfigError(f"run.placement_strategy={cfg.run.placement_strategy} cannot be used with an "
                          f"elastic {key}={lo}:{hi}: Ray sizes an elastic group as if packed and would then "
                          "wait for a placement it cannot make; use PACK or SPREAD")


def _check_together(cfg: Config) -> None:
    """Keys that only make sense with others."""
    _check_model(cfg.model)
    _check_elastic(cfg)
    timed = cfg.train.time_limit_min > 0
    if cfg.data.close_mosaic and timed:
        raise ConfigError("data.close_mosaic counts epochs, but train.time_limit_min ends the run on its "
                          "budget: use data.close_mosaic_frac (the last fraction of the budget)")
    if cfg.data.close_mosaic_frac and not timed:
        raise ConfigError("data.close_mosaic_frac is a fraction of train.time_limit_min, which is 0: "
                          "use data.close_mosaic (the last N epochs)")


def config_to_dict(cfg: Config) -> dict:
    """The fully resolved config as plain data (what `config.yaml` and checkpoints hold)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- overrides


def parse_overrides(items: list[str] | None) -> dict:
    """`["train.lr=0.01", "model.width=0.5"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: keys look like section.key (e.g. train.lr=0.01)")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def merge(base: dict, overrides: dict) -> dict:
    """A new dict: `overrides` applied on top of `base` (two levels deep); neither is changed."""
    merged = {section: dict(values or {}) for section, values in base.items()}
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(merged.get(section, {}), dict):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return merged


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping read with safe_load; one-line ConfigError naming the file otherwise.

    `path` may be a bucket URI (s3://..., `rtrain.storage`), e.g. a run's config.yaml."""
    from rtrain import storage

    path = storage.location(path)
    try:
        text = storage.read_bytes(path).decode("utf-8") if storage.is_bucket(path) else path.read_text(
            encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where} {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if given) <- `--set` overrides, validated."""
    data = read_yaml(path) if path else {}
    try:
        return config_from_dict(merge(data, parse_overrides(overrides)))
    except ConfigError as exc:
        if path:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def dump_config(cfg: Config, path: str | os.PathLike) -> Path | str:
    """Write the resolved config as YAML atomically (temp file + rename; in a bucket one upload)."""
    from rtrain import storage

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if storage.is_bucket(path):
        return storage.write_bytes(path, text.encode("utf-8"))
    path = Path(path)
    write_text_atomic(path, text)
    return path


def add_config_arguments(parser) -> None:
    """The `--config FILE` and repeatable `--set k=v [k=v ...]` options every CLI shares."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override config values, e.g. --set train.lr=0.01 model.width=0.5 (repeatable)",
    )
