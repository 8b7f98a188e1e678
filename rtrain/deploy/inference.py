"""Run an exported rtrain detector (ONNX or TorchScript) without the training code.

    from rtrain.deploy.inference import load_exported
    model = load_exported("runs/bccd/best.onnx")        # reads best.onnx.json beside it
    det = model.detect("photo.jpg", conf=0.25)         # boxes in the photo's own pixels
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
        print(model.class_names[label], score, box)    # box = [x1, y1, x2, y2]

This file needs numpy and Pillow, plus onnxruntime (for .onnx) or torch (for TorchScript); it
imports nothing else from rtrain, so it can be copied next to an exported model onto a device.
The exported network is `Detector.forward_raw`: input float32 [B, 3, S, S], RGB in 0..1 (ImageNet
normalisation happens inside), outputs `cls_logits [B, N, C]` and `box_dist [B, N, 4(R+1)]`.
`decode` does what `rtrain.models.postprocess.postprocess` does (tests check they agree):
DFL expectation -> ltrb distances x stride around each point -> boxes; sigmoid scores; the
`pre_nms_topk` best (point, class) pairs above `conf`; class-aware NMS; the `max_det` best.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PAD_VALUE = 114  # letterbox gray, as in training (rtrain.data.augment.PAD_VALUE)
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json


# ------------------------------------------------------------------------------- pre-processing


def read_image(source) -> Image.Image:
    """An RGB PIL image from a path or PIL image: EXIF orientation applied, gray/RGBA/P converted."""
    if isinstance(source, Image.Image):
        image = source
        image.load()
    else:
        with Image.open(source) as im:
            image = ImageOps.exif_transpose(im)  # a loaded copy, rotated as the EXIF tag says
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P", "PA"):  # alpha: composite on white, not black
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    return image


def _resize_exact(image: np.ndarray, r: float) -> np.ndarray:
    """Resize by exactly `r` to (floor(w r), floor(h r)), bilinear: the same call training makes."""
    h, w = image.shape[:2]
    if r == 1.0:
        return image
    nw, nh = max(1, math.floor(w * r + 1e-6)), max(1, math.floor(h * r + 1e-6))
    box = (0.0, 0.0, min(nw / r, w), min(nh / r, h))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR, box=box))


def letterbox(image, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """uint8 [size, size, 3]: longer side resized to `size` (aspect kept), centred on gray.

    `image` is an HxWx3 uint8 array or a PIL image. Returns (canvas, scale, (pad_x, pad_y)) with
    `input_px = image_px * scale + pad`, exactly as `rtrain.data.augment.letterbox` in evaluation.
    """
    array = np.asarray(read_image(image) if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {array.shape}")
    h, w = array.shape[:2]
    r = size / max(h, w)
    resized = _resize_exact(array, r)
    nh, nw = resized.shape[:2]
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top : top + nh, left : left + nw] = resized
    return canvas, float(r), (float(left), float(top))


def preprocess(image, size: int = 320) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(float32 [1, 3, size, size] RGB 0..1, scale, (pad_x, pad_y)) for a path, PIL image or array."""
    if not isinstance(image, np.ndarray):
        image = read_image(image)
    canvas, scale, pad = letterbox(image, size)
    tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(tensor), scale, pad


# ------------------------------------------------------------------------------------ decoding


def make_points(height: int, width: int, strides) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre points [N, 2] (x, y input px) and their strides [N], levels in `strides` order."""
    points, point_strides = [], []
    for s in strides:
        h, w = (height + s - 1) // s, (width + s - 1) // s
        xs = (np.arange(w, dtype=np.float32) + 0.5) * s
        ys = (np.arange(h, dtype=np.float32) + 0.5) * s
        xx, yy = np.meshgrid(xs, ys)  # [h, w], row-major
        points.append(np.stack([xx.reshape(-1), yy.reshape(-1)], axis=-1))
        point_strides.append(np.full(h * w, float(s), dtype=np.float32))
    return np.concatenate(points), np.concatenate(point_strides)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS (highest score first), as torchvision.ops.nms: drop IoU > `iou`."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode(
    cls_logits,
    box_dist,
    strides,
    reg_max: int,
    image_size: tuple[int, int],
    conf: float = 0.25,
    iou: float = 0.5,
    max_det: int = 100,
    pre_nms_topk: int = 1000,
) -> list[dict[str, np.ndarray]]:
    """Detections per image from raw outputs (numpy arrays or torch tensors).

    cls_logits [B, N, C], box_dist [B, N, 4(reg_max+1)], `image_size` = (H, W) of the model input.
    Returns a list (len B) of {"boxes" float32 [K, 4] xyxy input px, "scores" [K], "labels" int64 [K]},
    sorted by score.
    """
    cls_logits, box_dist = _to_numpy(cls_logits), _to_numpy(box_dist)
    batch, num_points, num_classes = cls_logits.shape
    height, width = int(image_size[0]), int(image_size[1])
    points, point_strides = make_points(height, width, strides)
    if points.shape[0] != num_points:
        raise ValueError(f"{num_points} outputs per image, but strides {tuple(strides)} at {height}x{width} "
                         f"give {points.shape[0]} points")
    logits = box_dist.reshape(batch, num_points, 4, reg_max + 1)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ltrb = (probs * np.arange(reg_max + 1, dtype=np.float32)).sum(-1) * point_strides[:, None]
    boxes = np.concatenate([points - ltrb[..., :2], points + ltrb[..., 2:]], axis=-1)
    boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))
    flat = cls_logits.reshape(batch, -1)  # index = point * C + label
    results = []
    for b in range(batch):
        # "top-k of all, then > conf" equals "top-k of those > conf": threshold first, sort few.
        top = np.flatnonzero(1.0 / (1.0 + np.exp(-flat[b])) > conf)
        scores = 1.0 / (1.0 + np.exp(-flat[b, top]))
        if top.size > pre_nms_topk:
            part = np.argpartition(-scores, pre_nms_topk - 1)[:pre_nms_topk]
            top, scores = top[part], scores[part]
        point_idx, labels = top // num_classes, top % num_classes
        cand_boxes, cand_scores = boxes[b, point_idx], scores
        # Class-aware NMS in one call: shift each class to its own region (torchvision's trick).
        offset = labels[:, None].astype(np.float64) * (float(max(width, height)) + 1.0)
        kept = nms(cand_boxes + offset, cand_scores, iou)[:max_det]
        results.append({
            "boxes": cand_boxes[kept].astype(np.float32).reshape(-1, 4),
            "scores": cand_scores[kept].astype(np.float32),
            "labels": labels[kept].astype(np.int64),
        })
    return results


def to_original(boxes: np.ndarray, scale: float, pad, image_size: tuple[int, int]) -> np.ndarray:
    """Boxes [K, 4] xyxy from letterboxed input px back to the image's px, clipped to (W, H)."""
    w, h = image_size
    out = (np.asarray(boxes, np.float64).reshape(-1, 4) - [pad[0], pad[1], pad[0], pad[1]]) / scale
    return np.clip(out, 0.0, [w, h, w, h]).astype(np.float32)


# ------------------------------------------------------------------------------ exported model


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where the metadata JSON of an exported model lives: `<file>.json` beside it."""
    p = Path(model_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


@dataclass
class ExportedModel:
    """An exported network plus its sidecar metadata; `raw` runs it, `detect` does everything."""

    path: Path
    meta: dict
    runner: object  # onnxruntime.InferenceSession or a torch.jit.ScriptModule

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def img_size(self) -> int:
        return int(self.meta["img_size"])

    def raw(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cls_logits [B, N, C], box_dist [B, N, 4(R+1)]) numpy, for images float32 [B, 3, S, S] in 0..1."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.meta["format"] == "onnx":
            cls_logits, box_dist = self.runner.run(None, {self.meta["input_name"]: images})
            return cls_logits, box_dist
        import torch

        with torch.no_grad():
            cls_logits, box_dist = self.runner(torch.from_numpy(images))
        return cls_logits.numpy(), box_dist.numpy()

    def detect(self, image, conf: float | None = None, iou: float | None = None,
               max_det: int | None = None) -> dict[str, np.ndarray]:
        """Detections in the image's own pixels: {"boxes" [K, 4] xyxy, "scores" [K], "labels" [K]}.

        Boxes that lie wholly in the letterbox padding (empty once clipped to the image) are dropped,
        as rtrain.predict does.

        `image`: a path, PIL image or HxWx3 uint8 RGB array. Thresholds default to the sidecar's.
        """
        rgb = image if isinstance(image, np.ndarray) else np.asarray(read_image(image))
        tensor, scale, pad = preprocess(rgb, self.img_size)
        cls_logits, box_dist = self.raw(tensor)
        post = self.meta.get("postprocess", {})
        det = decode(
            cls_logits, box_dist, self.meta["strides"], self.meta["reg_max"], (self.img_size, self.img_size),
            conf=post.get("conf", 0.25) if conf is None else conf,
            iou=post.get("iou", 0.5) if iou is None else iou,
            max_det=post.get("max_det", 100) if max_det is None else max_det,
        )[0]
        boxes = to_original(det["boxes"], scale, pad, (rgb.shape[1], rgb.shape[0]))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes lying in the padding
        return {"boxes": boxes[keep], "scores": det["scores"][keep], "labels": det["labels"][keep]}


def load_exported(path: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """Load `path` (.onnx via onnxruntime, otherwise TorchScript via torch.jit.load) and its sidecar.

    Raises FileNotFoundError / ValueError with one line naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: exported model not found")
    meta_path = sidecar_path(p)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: sidecar not found (python -m rtrain.export writes it)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        for key in ("format", "class_names", "img_size", "strides", "reg_max"):
            meta[key]  # noqa: B018 - presence check
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: malformed sidecar ({type(e).__name__}: {e})") from None
    if meta["format"] == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            runner = ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"{p}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        meta.setdefault("input_name", runner.get_inputs()[0].name)
    elif meta["format"] == "torchscript":
        import warnings

        import torch

        try:
            with warnings.catch_warnings():  # torch 2.14 marks jit.load deprecated; it still works
                warnings.simplefilter("ignore", FutureWarning)
                runner = torch.jit.load(str(p), map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001 - torch.jit.load fails in many ways on bad files
            raise ValueError(f"{p}: not a loadable TorchScript file ({str(e).splitlines()[0]})") from None
    else:
        raise ValueError(f"{meta_path}: unknown format {meta['format']!r} (expected onnx or torchscript)")
    return ExportedModel(path=p, meta=meta, runner=runner)
