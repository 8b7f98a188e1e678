"""Checkpoint directories (resume exactly) and weights files (predict/evaluate/export).

Checkpoint directory layout:
    <dir>/state.pt    torch.save of one dict (see REQUIRED_STATE_KEYS / OPTIONAL_STATE_KEYS)
    <dir>/COMPLETE    json {"format": 1, "sha256": <hex of state.pt>, "size": bytes, "epoch": int,
                            "step": int}, written LAST
state.pt is written to a temp name and renamed; COMPLETE only appears once
state.pt is in place, so a crash at any moment leaves either a complete
checkpoint or one `find_latest_complete` recognises as broken and skips. A full
disk raises `rtrain.runs.run_dir.StorageFullError` (one line naming the file) and
removes the temp file; the directory it was writing then has no marker.

A checkpoint directory or weights file may also be in a bucket (s3://..., `rtrain.storage`):
Ray Train uploads the directory one object per file, in any order, so a driver killed during
the upload can leave the marker without state.pt or state.pt without the marker; both are
skipped, and the marker's size and sha256 refuse any other mix. Reading, verifying and
`find_latest_complete` work the same on both; `save_checkpoint` writes a local directory only.

Weights file (`best.pt`, `last.pt`): torch.save of
    {"format": "rtrain.weights", "version": 1, "model": state_dict, "config": dict,
     "class_names": [str], "extra": dict}

Everything is loaded with `torch.load(weights_only=True)`: only tensors, numbers,
strings, None, lists/tuples and dicts. `save_*` refuse anything else up front
(e.g. a Path or numpy array inside the config) so a run never writes a
checkpoint it cannot load back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rtrain import storage
from rtrain.errors import RtrainError
from rtrain.runs.run_dir import atomic_write_bytes, full_storage

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE"
CHECKPOINT_FORMAT = 1
WEIGHTS_FORMAT = "rtrain.weights"
WEIGHTS_VERSION = 1

REQUIRED_STATE_KEYS = ("model", "optimizer", "epoch", "step", "rng", "config", "class_names")
OPTIONAL_STATE_KEYS = ("ema", "scheduler", "scaler", "guard", "extra")
REQUIRED_WEIGHTS_KEYS = ("model", "config", "class_names")

_SAFE_LEAVES = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.Size)


class CheckpointError(RtrainError):
    """A checkpoint or weights file cannot be used: one line naming the file and the fault."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint/weights were made for another model or other classes."""


# ---------------------------------------------------------------------------------------------- io


def _check_plain(obj, where: str) -> None:
    """Raise TypeError unless `obj` holds only what weights_only loading accepts."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(
                    f"{where}: key {k!r} of type {type(k).__name__} cannot be saved (use str/int)"
                )
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _SAFE_LEAVES):
        raise TypeError(
            f"{where}: {type(obj).__name__} cannot be saved in a weights_only file; "
            "convert it to a tensor, number, string, list or dict"
        )


def _atomic_write(path: Path, data: bytes) -> None:
    """`rtrain.runs.run_dir.atomic_write_bytes`: temp name, fsync, rename; a full disk raises
    `rtrain.runs.run_dir.StorageFullError` naming `path`."""
    atomic_write_bytes(path, data)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise full_storage(exc, path) or exc from None


def _serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safe_load(path: Path | str, map_location) -> object:
    """torch.load(weights_only=True) with every failure turned into a one-line CheckpointError.

    `path` is a local Path or a bucket URI (read whole into memory, `rtrain.storage`)."""
    if not storage.is_file(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_bucket(path) else path
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refusing to unpickle: it holds objects other than tensors and plain data{what}, "
                "which could run code"
            ) from None
        raise CheckpointError(f"{path}: not a valid torch file ({msg.splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - garbage input makes the unpickler fail in many ways
        first = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise CheckpointError(f"{path}: not a torch file, or corrupt/truncated ({first})") from None


def _sha256(path: Path | str) -> str:
    if storage.is_bucket(path):
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict:
    """Global RNG states of torch, numpy, python `random` (and every CUDA device), as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(x) for x in py_state], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored when present and CUDA is available."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].cpu().numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        if n < len(cuda):
            logger.warning("checkpoint has CUDA RNG states for %d devices, restoring %d", len(cuda), n)
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].to(torch.uint8), device=i)


# ------------------------------------------------------------------------------ checkpoint dirs


def save_checkpoint(ckpt_dir: str | os.PathLike, state: Mapping) -> Path:
    """Write `state` to `ckpt_dir`/state.pt, then the COMPLETE marker; returns the directory.

    state: {"model", "optimizer", "epoch", "step", "rng", "config", "class_names"} required,
    {"ema", "scheduler", "scaler", "guard", "extra"} optional; all values plain data/tensors.
    Raises ValueError for missing/unknown keys and TypeError for values weights_only can't load.
    """
    missing = [k for k in REQUIRED_STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing {missing}")
    unknown = [k for k in state if k not in REQUIRED_STATE_KEYS + OPTIONAL_STATE_KEYS]
    if unknown:
        raise ValueError(f"checkpoint state has unknown keys {unknown}; put extras under 'extra'")
    _check_plain(state, "state")
    d = Path(ckpt_dir)
    _make_dir(d)
    marker = d / MARKER_FILE
    marker.unlink(missing_ok=True)  # overwriting: the dir is incomplete until the new marker lands
    data = _serialize(dict(state))
    _atomic_write(d / STATE_FILE, data)
    info = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
    }
    _atomic_write(marker, json.dumps(info).encode())
    return d


def read_marker(ckpt_dir: str | os.PathLike) -> dict:
    """The parsed COMPLETE marker of `ckpt_dir`; CheckpointError if it is missing or malformed."""
    marker = storage.child(ckpt_dir, MARKER_FILE)
    if not storage.is_file(marker):
        raise CheckpointError(f"{marker}: no COMPLETE marker (the save was interrupted or never finished)")
    try:
        info = json.loads(storage.read_bytes(marker).decode())
        for key in ("sha256", "epoch", "step"):
            info[key]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker}: malformed COMPLETE marker ({type(e).__name__}: {e})") from None
    return info


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> dict:
    """Check marker, size and sha256 of state.pt without loading it; returns the marker."""
    info = read_marker(ckpt_dir)
    path = storage.child(ckpt_dir, STATE_FILE)
    if not storage.is_file(path):
        raise CheckpointError(f"{path}: file not found (COMPLETE marker present)")
    size = storage.size(path)
    if "size" in info and size != info["size"]:
        raise CheckpointError(
            f"{path}: size {size} bytes, marker says {info['size']} (truncated or replaced)"
        )
    if _sha256(path) != info["sha256"]:
        raise CheckpointError(f"{path}: sha256 does not match the COMPLETE marker (corrupt or replaced)")
    return info


def _load_dict(path: Path, map_location, required, what: str, missing_msg: str) -> dict:
    """`_safe_load`, then CheckpointError unless it is a dict with every key of `required`."""
    obj = _safe_load(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected {what}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: " + missing_msg.format(missing))
    return obj


def load_checkpoint(ckpt_dir: str | os.PathLike, map_location="cpu") -> dict:
    """Verify and load `ckpt_dir`/state.pt (weights_only). Raises CheckpointError with one line."""
    verify_checkpoint(ckpt_dir)
    path = storage.child(ckpt_dir, STATE_FILE)
    return _load_dict(path, map_location, REQUIRED_STATE_KEYS, "a dict", "missing keys {}")


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path] | list[str]:
    """Ray Train's `checkpoint_*` directories in a run dir, sorted (not checkpoint_manager_snapshot.json).

    Local Paths for a local run dir, URIs for one in a bucket."""
    if storage.is_bucket(run_dir):
        found = [storage.child(run_dir, n) for n in storage.list_dir(run_dir) if n.startswith("checkpoint_")]
        return [d for d in found if storage.is_dir(d)]
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) if run_dir.is_dir() else []


def find_latest_complete(
    dirs: Iterable[str | os.PathLike],
) -> tuple[Path | str | None, list[tuple[Path | str, str]]]:
    """The newest (by epoch, step in the marker) verified checkpoint among `dirs`, and the skipped ones.

    Returns (dir or None, [(dir, one-line reason), ...]). Broken dirs without a marker are always
    reported; verified-older dirs are not looked at once a newer one verifies. The caller warns.
    """
    candidates, skipped = [], []
    for d in map(storage.location, dirs):
        try:
            info = read_marker(d)
            candidates.append((int(info["epoch"]), int(info["step"]), d))
        except (CheckpointError, ValueError) as e:
            skipped.append((d, str(e)))
    candidates.sort(key=lambda c: (c[0], c[1], str(c[2])), reverse=True)
    for _, _, d in candidates:
        try:
            verify_checkpoint(d)
            return d, skipped
        except CheckpointError as e:
            skipped.append((d, str(e)))
    return None, skipped


# ------------------------------------------------------------------------------------ weights files


def save_weights(
    path: str | os.PathLike,
    model_state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    class_names: Sequence[str],
    extra: Mapping | None = None,
) -> Path:
    """Atomically write a weights file (`best.pt`/`last.pt`) for predict/evaluate/export."""
    obj = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "model": dict(model_state_dict),
        "config": dict(config),
        "class_names": [str(n) for n in class_names],
        "extra": dict(extra or {}),
    }
    _check_plain(obj, "weights")
    if storage.is_bucket(path):
        return storage.write_bytes(path, _serialize(obj))  # one object upload, whole or not at all
    p = Path(path)
    _make_dir(p.parent)
    _atomic_write(p, _serialize(obj))
    return p


def load_weights(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a weights file with weights_only=True; CheckpointError (one line) on any fault.

    Also accepts a checkpoint directory: its EMA weights when it has them (what best.pt/last.pt
    hold, and what is evaluated), else the raw model weights; extra = {"source", "epoch", "step"}.
    """
    p = storage.location(path)
    if storage.is_dir(p):
        state = load_checkpoint(p, map_location)
        ema = state.get("ema")
        use_ema = isinstance(ema, dict) and isinstance(ema.get("model"), dict)
        return {
            "format": WEIGHTS_FORMAT,
            "version": WEIGHTS_VERSION,
            "model": ema["model"] if use_ema else state["model"],
            "config": state["config"],
            "class_names": state["class_names"],
            "extra": {
                "source": "ema" if use_ema else "model",
                "epoch": state["epoch"],
                "step": state["step"],
            },
        }
    obj = _load_dict(p, map_location, REQUIRED_WEIGHTS_KEYS, "a weights dict",
                     "not an rtrain weights file (missing keys {})")
    if not isinstance(obj["model"], dict) or not all(
        isinstance(v, torch.Tensor) for v in obj["model"].values()
    ):
        raise CheckpointError(f"{p}: 'model' is not a state dict of tensors")
    if not isinstance(obj["config"], dict):
        raise CheckpointError(f"{p}: 'config' is a {type(obj['config']).__name__}, expected a dict")
    names = obj["class_names"]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{p}: 'class_names' is not a list of strings")
    obj.setdefault("extra", {})
    return obj


# ----------------------------------------------------------------------------------- compatibility


def _first_difference(a, b, prefix: str) -> tuple[str, object, object] | None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                return key, a.get(k, "<absent>"), b.get(k, "<absent>")
            diff = _first_difference(a[k], b[k], key)
            if diff:
                return diff
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return None if a == b else (prefix, a, b)


# Config keys that are not part of the architecture: a run may resume whatever they say (the
# starting weights of a fine-tuned run or of a timm trunk: its checkpoint holds every weight).
NOT_ARCHITECTURE = frozenset({"model.init", "model.pretrained", "model.backbone_weights"})


def _without(section: str, values: Mapping) -> dict:
    return {k: v for k, v in dict(values).items() if f"{section}.{k}" not in NOT_ARCHITECTURE}


def _with_defaults(section: str, values: Mapping) -> dict:
    """A section with its absent keys at their defaults (an older checkpoint has no model.backbone,
    and means the default: the variant's own trunk)."""
    from rtrain.config import Config, config_to_dict

    defaults = config_to_dict(Config()).get(section)
    return {**defaults, **values} if isinstance(defaults, Mapping) else dict(values)


def check_compatible(
    saved: Mapping,
    config: Mapping,
    class_names: Sequence[str],
    sections: Sequence[str] = ("model",),
    source: str = "checkpoint",
) -> None:
    """Refuse to resume/fine-tune from `saved` when it was made for another model or other classes.

    saved: a loaded checkpoint state or weights dict (has "config" and "class_names").
    config: the current full config as a plain dict; `sections` are its top-level keys that
        must match exactly (default: the model architecture), but for `NOT_ARCHITECTURE` keys.
    Raises IncompatibleCheckpointError with a one-line reason.
    """
    old_names = list(saved["class_names"])
    new_names = list(class_names)
    if old_names != new_names:
        if len(old_names) != len(new_names):
            why = f"{len(old_names)} classes, the data has {len(new_names)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(old_names, new_names, strict=True)) if a != b)
            why = f"class {i} is {old_names[i]!r}, the data has {new_names[i]!r}"
        raise IncompatibleCheckpointError(
            f"cannot use this {source}: it was trained on other classes ({why})"
        )
    old_cfg = saved["config"]
    for section in sections:
        old_values, new_values = old_cfg.get(section, {}), config.get(section, {})
        if isinstance(old_values, Mapping) and isinstance(new_values, Mapping):
            old_values = _without(section, _with_defaults(section, old_values))
            new_values = _without(section, _with_defaults(section, new_values))
        diff = _first_difference(old_values, new_values, section)
        if diff:
            key, old, new = diff
            raise IncompatibleCheckpointError(
                f"cannot use this {source}: {key} differs ({source}: {old!r}, now: {new!r})"
            )
