"""Export `Detector.forward_raw` (NMS stays outside) to ONNX or TorchScript, with a parity check.

    report = export_weights("runs/bccd/best.pt", "onnx", size=320, check_images="photos/")
    report["file"], report["sidecar"], report["parity"]["detections_match"]

The exported graph takes float32 [B, 3, S, S] RGB in 0..1 (ImageNet normalisation is inside)
and returns cls_logits [B, N, C] and box_dist [B, N, 4(R+1)]; a timm trunk exports the same way
(its own mean/std inside). A JSON sidecar `<file>.json`
holds what a user needs without rtrain: class names, input size, strides, reg_max, the
letterbox and normalisation conventions, default thresholds. `rtrain.deploy.inference` reads it.

Parity: the same real letterboxed images (from `check_images`, else the weights' val shards,
else synthetic noise with a warning) go through PyTorch and the exported file (onnxruntime, or
the TorchScript module): the largest absolute difference of each raw output is reported, and the
final detections (PyTorch: `Detector.postprocess`; exported: `rtrain.deploy.inference.decode`, the
standalone decoder) must match: same count per image, same labels, boxes within 1e-3 relative
(at least 1e-3 px), scores within 1e-4.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from data_prep.atomic import atomic_path, write_text_atomic
from rtrain import storage
from rtrain.deploy import inference
from rtrain.errors import RtrainError

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}
ONNX_OPSET = 17
BOX_RTOL = 1e-3
SCORE_ATOL = 1e-4
PARITY_IMAGES = 4


class ExportError(RtrainError, RuntimeError):
    """Export impossible or parity check failed: one line."""


class RawDetector(torch.nn.Module):
    """forward(images) -> forward_raw(images): the graph to export."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.forward_raw(images)


def export_model(model: torch.nn.Module, fmt: str, size: int, dynamic_batch: bool, out: Path) -> None:
    """Write the exported graph to `out` atomically (data_prep.atomic: hidden temp name, fsync, rename)."""
    raw = RawDetector(model).eval()
    example = torch.rand(1, 3, size, size)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # torch 2.14 warns that both the TorchScript-based ONNX exporter and jit.trace are
        # deprecated; the dynamo exporter needs onnxscript, which is not a dependency.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        with torch.no_grad():
            if fmt == "onnx":
                axes = {"images": {0: "batch"}, "cls_logits": {0: "batch"}, "box_dist": {0: "batch"}}
                torch.onnx.export(raw, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["images"], output_names=["cls_logits", "box_dist"],
                                  dynamic_axes=axes if dynamic_batch else None, do_constant_folding=True)
            else:
                traced = torch.jit.trace(raw, (example,), check_trace=False)
                torch.jit.save(traced, str(tmp))


def _rgb(values: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values.flatten())


def sidecar(loaded, fmt: str, size: int, dynamic_batch: bool, out: Path) -> dict:
    """The metadata JSON that makes the exported file usable alone (see rtrain.deploy.inference)."""
    model, cfg = loaded.model, loaded.config
    points = sum(((size + s - 1) // s) ** 2 for s in model.strides)
    return {
        "format": fmt,
        "file": out.name,
        "model": cfg.model.name,
        "class_names": loaded.class_names,
        "num_classes": len(loaded.class_names),
        "img_size": size,
        "strides": list(model.strides),
        "reg_max": int(model.reg_max),
        "num_points": points,
        "input_name": "images",
        "input": {
            "shape": ["batch" if dynamic_batch else 1, 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB, values 0..1 (pixel / 255)",
            "normalisation": f"mean {_rgb(model.mean)} / std {_rgb(model.std)} (the backbone's: ImageNet's "
                             "unless a timm trunk says otherwise) is applied inside the model: do not "
                             "normalise again",
            "letterbox": f"resize so the longer side is {size} (aspect kept, bilinear), centre on a "
                         f"{size}x{size} canvas of gray {inference.PAD_VALUE}; "
                         "input_px = image_px * scale + pad",
        },
        "outputs": {
            "cls_logits": f"[B, {points}, {len(loaded.class_names)}] class logits (sigmoid -> score)",
            "box_dist": f"[B, {points}, {4 * (model.reg_max + 1)}] DFL logits: 4 sides (l, t, r, b) x "
                        f"{model.reg_max + 1} bins; distance = sum(softmax * bin) * stride",
            "points": "cell centres ((ix + 0.5) * s, (iy + 0.5) * s), levels in `strides` order, row-major",
        },
        "postprocess": {"conf": 0.25, "iou": 0.5, "max_det": 100,  # rtrain.predict's defaults
                        "pre_nms_topk": 1000, "nms": "class-aware"},
        "source_weights": str(loaded.path),
        "dynamic_batch": bool(dynamic_batch),
    }


def _check_images(check_images, loaded, size: int) -> tuple[np.ndarray, str]:
    """float32 [K, 3, S, S] letterboxed real images, and where they came from."""
    arrays = []
    if check_images:
        from rtrain.deploy.sources import resolve_source

        src = resolve_source(check_images)
        for item in src.items:
            try:
                arrays.append(np.asarray(inference.read_image(item.path)))
            except (OSError, ValueError) as exc:
                logger.warning("parity check: skipped %s (%s)", item.name, exc)
            if len(arrays) >= PARITY_IMAGES:
                break
        where = str(check_images)
    else:
        val = loaded.config.data.val
        where = val
        if val and storage.scheme(val) in ("", "file", *storage.BUCKET_SCHEMES) and storage.is_dir(val):
            from rtrain.data.batches import iter_batches_local

            try:
                batch = next(iter_batches_local(val, batch_size=PARITY_IMAGES, train=False, img_size=size))
                return batch["images"].float().div(255).numpy(), f"{val} (val shards)"
            except (StopIteration, ValueError, OSError) as exc:
                logger.warning("parity check: cannot read %s (%s)", val, exc)
    if not arrays:
        logger.warning("parity check on synthetic noise images: pass --check-images DIR for real ones")
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8) for _ in range(2)]
        where = "synthetic noise"
    tensors = [inference.preprocess(a, size)[0] for a in arrays]
    return np.concatenate(tensors), where


def compare_detections(a: list[dict], b: list[dict]) -> tuple[bool, float, str]:
    """(match, largest box difference px, first difference) for two lists of per-image detections.

    Each detection of `a` must pair with one of `b` of the same label whose box is within
    BOX_RTOL relative (>= 1e-3 px) and score within SCORE_ATOL; counts must be equal.
    """
    worst = 0.0
    for i, (da, db) in enumerate(zip(a, b, strict=True)):
        ba, bb = np.asarray(da["boxes"], np.float64), np.asarray(db["boxes"], np.float64)
        la, lb = np.asarray(da["labels"]), np.asarray(db["labels"])
        sa, sb = np.asarray(da["scores"], np.float64), np.asarray(db["scores"], np.float64)
        if len(ba) != len(bb):
            return False, worst, f"image {i}: {len(ba)} detections vs {len(bb)}"
        used = np.zeros(len(bb), bool)
        for k in range(len(ba)):
            diff = np.abs(bb - ba[k]).max(axis=1) if len(bb) else np.array([])
            tol = np.maximum(BOX_RTOL * np.abs(ba[k]).max(), 1e-3)
            ok = (~used) & (lb == la[k]) & (diff <= tol) & (np.abs(sb - sa[k]) <= SCORE_ATOL)
            if not ok.any():
                box = ba[k].round(2).tolist()
                return False, worst, f"image {i}: detection {k} (label {int(la[k])}, box {box}) unmatched"
            j = int(np.flatnonzero(ok)[np.argmin(diff[ok])])
            used[j] = True
            worst = max(worst, float(diff[j]))
    return True, worst, ""


def parity_check(loaded, exported: inference.ExportedModel, images: np.ndarray, conf: float = 0.05) -> dict:
    """Run PyTorch and the exported file on `images` [K, 3, S, S]; compare raw outputs and detections."""
    model = loaded.model
    size = images.shape[-1]
    results = {"cls_logits": 0.0, "box_dist": 0.0}
    dets_torch, dets_exp = [], []
    # A fixed-batch export takes one image per call.
    chunks = [images] if exported.meta.get("dynamic_batch") else [images[i:i + 1] for i in range(len(images))]
    for chunk in chunks:
        with torch.no_grad():
            t_cls, t_box = model.forward_raw(torch.from_numpy(chunk))
        e_cls, e_box = exported.raw(chunk)
        results["cls_logits"] = max(results["cls_logits"], float(np.abs(e_cls - t_cls.numpy()).max()))
        results["box_dist"] = max(results["box_dist"], float(np.abs(e_box - t_box.numpy()).max()))
        post = exported.meta["postprocess"]
        dets_torch += [{k: v.numpy() for k, v in d.items()} for d in model.postprocess(
            t_cls, t_box, (size, size), score_thresh=conf, iou_thresh=post["iou"], max_det=post["max_det"])]
        dets_exp += inference.decode(e_cls, e_box, exported.meta["strides"], exported.meta["reg_max"],
                                     (size, size), conf=conf, iou=post["iou"], max_det=post["max_det"])
    match, worst_box, why = compare_detections(dets_torch, dets_exp)
    return {
        "images": int(len(images)),
        "max_abs_diff": results,
        "detections_torch": [int(len(d["scores"])) for d in dets_torch],
        "detections_exported": [int(len(d["scores"])) for d in dets_exp],
        "max_box_diff_px": worst_box,
        "detections_match": bool(match),
        "first_difference": why,
        "conf": conf,
    }


def export_weights(
    weights: str | os.PathLike,
    fmt: str,
    *,
    size: int | None = None,
    dynamic_batch: bool = False,
    out: str | os.PathLike | None = None,
    check_images: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    config_file: str | os.PathLike | None = None,
    check: bool = True,
) -> dict:
    """Export, write the sidecar, run the parity check. Returns a report dict (module doc).

    Raises CheckpointError/ConfigError for bad weights, ExportError for a bad format/size.
    The caller decides what a failed parity check means (report["parity"]["detections_match"]).
    """
    from rtrain.runs.loading import load_detector

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    loaded = load_detector(weights, config_file=config_file, overrides=overrides, device="cpu")
    size = int(size or loaded.config.data.img_size)
    if size % 32 or size < 32:
        raise ExportError(f"--size {size} is not a positive multiple of 32")
    if not out and storage.is_bucket(weights):
        raise ExportError(f"--weights {weights}: pass --out (the export is written to local disk, not "
                          "beside weights in a bucket)")
    out_path = Path(out) if out else Path(weights).with_suffix(SUFFIX[fmt])
    if Path(weights).is_dir() and not out:
        out_path = Path(weights) / f"model{SUFFIX[fmt]}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    export_model(loaded.model, fmt, size, dynamic_batch, out_path)
    meta = sidecar(loaded, fmt, size, dynamic_batch, out_path)
    meta_path = inference.sidecar_path(out_path)

    write_text_atomic(meta_path, json.dumps(meta, indent=2))
    report = {"file": str(out_path), "sidecar": str(meta_path), "format": fmt, "img_size": size,
              "bytes": out_path.stat().st_size}
    if check:
        exported = inference.load_exported(out_path)
        images, where = _check_images(check_images, loaded, size)
        report["parity"] = parity_check(loaded, exported, images)
        report["parity"]["source"] = where
    return report


def format_report(report: dict) -> str:
    lines = [f"exported:  {report['file']} ({report['format']}, {report['img_size']} px, "
             f"{report['bytes'] / 1e6:.2f} MB)", f"sidecar:   {report['sidecar']}"]
    p = report.get("parity")
    if p:
        d = p["max_abs_diff"]
        lines += [
            f"parity on {p['images']} image(s) from {p['source']}:",
            f"  max |diff| cls_logits {d['cls_logits']:.3g}, box_dist {d['box_dist']:.3g}",
            f"  detections (score > {p['conf']}): torch {p['detections_torch']}, "
            f"exported {p['detections_exported']}, max box diff {p['max_box_diff_px']:.3g} px",
            f"  match: {'yes' if p['detections_match'] else 'NO: ' + p['first_difference']}",
        ]
    return "\n".join(lines)
