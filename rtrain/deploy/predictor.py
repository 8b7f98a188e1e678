"""Detections on new images: in-process for a few images, Ray Data batch inference for many.

    report = predict("runs/bccd/best.pt", "photos/", out_dir="preds", conf=0.25)
    report.json_path      # preds/predictions.json (COCO results + image id <-> file name)
    report.skipped        # [(file name, one-line reason)] of unreadable images

Both paths run the same `process_rows` on batches of rows: read (EXIF-rotated, RGB) or decode a
shard's JPEG, letterbox exactly as evaluation does (`rtrain.data.augment.letterbox`; with `rect`, the
default, each image into its own canvas: longer side img_size, the other rounded up to 32, and
images of one canvas shape in one model call), run the model
through `rtrain.evaluation.predict_loop.predict_batches` (the evaluation code path), map boxes back to the
original image's pixels, draw the picture, and return flat columns. The Ray path puts that in
`PredictActor`s (the weights are loaded once per actor) behind `map_batches` with an
`ActorPoolStrategy`, streaming; actors ask for one GPU each when `gpus` > 0.

A JPEG file whose longer side is at least 2 * DECODE_MAX px is decoded by libjpeg at 1/2, 1/4
or 1/8 scale (its longer side still >= DECODE_MAX, as data_prep.shard does for shards): a 100 MP
photo costs ~75 MB instead of ~1 GB; its boxes are still mapped to the original pixels, only its
picture is drawn at the decoded size. An image over PIL's pixel limit is skipped, not decoded.

Output columns per image (row): id int64, name str, width/height int64 (original pixels), boxes
float32 flat [x1, y1, x2, y2, ...] original px, scores float32, labels int32, error str ("" when
fine), picture str (written file, "" when none).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep.atomic import atomic_file
from rtrain import storage
from rtrain.data.augment import Sample, letterbox, rect_canvas
from rtrain.deploy.inference import read_image
from rtrain.deploy.sources import Source, resolve_source
from rtrain.ray_session import start_ray  # noqa: F401  (rtrain.deploy.predictor.start_ray: re-exported)

logger = logging.getLogger(__name__)

RAY_THRESHOLD = 64  # more images than this go through Ray Data
SHARD_COLUMNS = ["image_id", "file_name", "jpeg", "width", "height", "orig_width", "orig_height"]
PREDICTIONS_JSON = "predictions.json"
_KEEP_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DECODE_MAX = 4096  # JPEGs of twice this (longer side) or more are decoded at a reduced scale


@dataclass(frozen=True)
class PredictSettings:
    img_size: int = 320
    conf: float = 0.25
    iou: float = 0.5
    max_det: int = 100
    batch_size: int = 8
    rect: bool = True  # each image letterboxed into its own canvas (rtrain.data.augment.rect_canvas)


@dataclass
class PredictReport:
    out_dir: Path
    json_path: Path
    mode: str  # "in-process" or "ray"
    images: int = 0
    detections: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    started_ray: bool = False

    def summary(self) -> str:
        lines = [
            f"images:      {self.images} ({self.mode}, {self.seconds:.1f} s, "
            f"{self.images / max(self.seconds, 1e-9):.1f} img/s)",
            f"detections:  {self.detections}",
            f"pictures:    {self.out_dir}",
            f"predictions: {self.json_path}",
        ]
        if self.skipped:
            lines.append(f"skipped:     {len(self.skipped)} unreadable image(s):")
            lines += [f"  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- one batch of rows


def _ragged(arrays: list[np.ndarray], dtype) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)  # 1-D arrays per row (an Arrow list column for Ray)
    for i, a in enumerate(arrays):
        out[i] = np.asarray(a, dtype=dtype).reshape(-1)
    return out


def _picture_path(out_dir: Path, name: str) -> Path:
    p = out_dir / name
    return p if p.suffix.lower() in _KEEP_SUFFIXES else p.with_name(p.name + ".png")


def _save_picture(image: Image.Image, path: Path) -> None:
    """Atomic write (temp name + rename); the format follows the final suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]
    with atomic_file(path, durable=False) as fh:  # one per image: no fsync, as before
        image.save(fh, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


def _read_file(path: str) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original upright (w, h)) as `read_image` gives, except that a JPEG with a longer
    side of 2 * DECODE_MAX px or more is decoded at the smallest DCT scale keeping it >= DECODE_MAX."""
    with Image.open(path) as im:
        w, h = im.size
        if im.format != "JPEG" or max(w, h) < 2 * DECODE_MAX:
            image = read_image(ImageOps.exif_transpose(im))  # what read_image(path) does
            return image, image.size
        s = DECODE_MAX / max(w, h)
        im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
        swap = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # the orientations exif_transpose swaps
        image = read_image(ImageOps.exif_transpose(im))
    return image, ((h, w) if swap else (w, h))


def _load_rows(rows: dict[str, np.ndarray]) -> list[tuple[Image.Image | None, str, tuple[int, int]]]:
    """Per row: (RGB image or None, error, original (w, h)). Files or shard JPEG bytes."""
    out = []
    n = len(rows["id"]) if "id" in rows else len(rows["image_id"])
    for i in range(n):
        try:
            if "path" in rows:
                image, size = _read_file(str(rows["path"][i]))
                out.append((image, "", size))
            else:
                with Image.open(io.BytesIO(rows["jpeg"][i])) as im:
                    image = im.convert("RGB")
                out.append((image, "", (int(rows["orig_width"][i]), int(rows["orig_height"][i]))))
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            first = (str(e).splitlines() or [""])[0] or type(e).__name__
            what = "image over PIL's pixel limit" if isinstance(e, Image.DecompressionBombError) else \
                "unreadable image"
            out.append((None, f"{what} ({first})", (0, 0)))
    return out


def process_rows(model: torch.nn.Module, class_names: list[str], settings: PredictSettings,
                 rows: dict[str, np.ndarray], out_dir: Path | None, device: torch.device) -> dict:
    """Predict one batch of rows (files: id/name/path; shards: SHARD_COLUMNS); see the module doc."""
    from data_prep.draw import draw_boxes
    from rtrain.evaluation.predict_loop import predict_batches

    files = "path" in rows
    ids = np.asarray(rows["id"] if files else rows["image_id"], np.int64)
    names = [str(x) for x in (rows["name"] if files else rows["file_name"])]
    loaded = _load_rows(rows)
    ok = [i for i, (image, _, _) in enumerate(loaded) if image is not None]
    size = settings.img_size
    by_canvas: dict[tuple[int, int], list[int]] = {}  # rect: one model call per canvas shape
    for i in ok:
        h, w = loaded[i][0].size[::-1]
        by_canvas.setdefault(rect_canvas([(h, w)], size) if settings.rect else (size, size), []).append(i)
    dets_by_row: dict[int, dict] = {}
    for canvas, rows_here in by_canvas.items():
        samples = [letterbox(Sample(np.asarray(loaded[i][0]), np.zeros((0, 4)), [], []), size, canvas)
                   for i in rows_here]
        images = torch.from_numpy(np.stack([s.image for s in samples]).transpose(0, 3, 1, 2).copy())
        (_, dets), = predict_batches(model, [{"images": images}], device=device, score_thresh=settings.conf,
                                     iou_thresh=settings.iou, max_det=settings.max_det)
        for i, sample, det in zip(rows_here, samples, dets, strict=True):
            dets_by_row[i] = {"det": det, "scale": sample.scale, "pad": sample.pad}
    cols = {k: [] for k in ("width", "height", "boxes", "scores", "labels", "error", "picture")}
    for i, (image, error, (ow, oh)) in enumerate(loaded):
        boxes = np.zeros((0, 4), np.float32)
        scores, labels, picture = np.zeros(0, np.float32), np.zeros(0, np.int32), ""
        if image is not None:
            d = dets_by_row[i]
            sw, sh = image.size
            b = d["det"]["boxes"].detach().float().cpu().numpy().reshape(-1, 4).astype(np.float64)
            b = (b - np.array([*d["pad"], *d["pad"]])) / d["scale"]
            b = np.clip(b, 0.0, [sw, sh, sw, sh])
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            scores = d["det"]["scores"].detach().float().cpu().numpy()[keep]
            labels = d["det"]["labels"].detach().cpu().numpy().astype(np.int32)[keep]
            b = b[keep]
            if out_dir is not None:
                picture_path = _picture_path(out_dir, names[i])
                _save_picture(draw_boxes(image, b.tolist(), labels.tolist(), class_names, scores.tolist()),
                              picture_path)
                picture = str(picture_path)
            boxes = (b * [ow / sw, oh / sh, ow / sw, oh / sh]).astype(np.float32)  # shards: stored -> orig
        cols["width"].append(ow)
        cols["height"].append(oh)
        cols["boxes"].append(boxes)
        cols["scores"].append(scores)
        cols["labels"].append(labels)
        cols["error"].append(error)
        cols["picture"].append(picture)
    return {
        "id": ids,
        "name": np.asarray(names, dtype=object),
        "width": np.asarray(cols["width"], np.int64),
        "height": np.asarray(cols["height"], np.int64),
        "boxes": _ragged(cols["boxes"], np.float32),
        "scores": _ragged(cols["scores"], np.float32),
        "labels": _ragged(cols["labels"], np.int32),
        "error": np.asarray(cols["error"], dtype=object),
        "picture": np.asarray(cols["picture"], dtype=object),
    }


class PredictActor:
    """Ray Data callable class: loads the weights once, then `process_rows` on every batch."""

    def __init__(self, weights: str, settings: dict, out_dir: str | None, overrides: list[str] | None = None,
                 config_file: str | None = None, threads: int = 1) -> None:
        from rtrain.runs.loading import load_detector, pick_device

        torch.set_num_threads(max(1, threads))
        self.device = pick_device(None)  # Ray sets CUDA_VISIBLE_DEVICES for actors with num_gpus
        loaded = load_detector(weights, config_file=config_file, overrides=overrides, device=self.device)
        self.model, self.class_names = loaded.model, loaded.class_names
        self.settings = PredictSettings(**settings)
        self.out_dir = Path(out_dir) if out_dir else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return process_rows(self.model, self.class_names, self.settings, batch, self.out_dir, self.device)


# --------------------------------------------------------------------------- sources -> row batches


def _file_batches(source: Source, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    items = source.items
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        yield {"id": np.asarray([it.id for it in chunk], np.int64),
               "name": np.asarray([it.name for it in chunk], dtype=object),
               "path": np.asarray([it.path for it in chunk], dtype=object)}


def _shard_batches(shard_dir: Path, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    from rtrain.data.batches import list_shards

    for f in list_shards(shard_dir):
        pf = pq.ParquetFile(f)
        for rb in pf.iter_batches(batch_size=batch_size, columns=SHARD_COLUMNS):
            cols = rb.to_pydict()
            yield {k: np.asarray(v, dtype=object if k in ("jpeg", "file_name") else np.int64)
                   for k, v in cols.items()}


def _manifest_ids(shard_dir: Path | str, class_names: list[str]) -> tuple[list[int] | None, str]:
    """(source category ids, "") when `shard_dir`'s manifest names `class_names` in order, else
    (None, why not)."""
    from rtrain.data.batches import ShardError, read_manifest

    try:
        classes = read_manifest(shard_dir)["classes"]
    except ShardError as exc:
        return None, str(exc)
    names = [str(c["name"]) for c in classes]
    if names != list(class_names):
        return None, f"{shard_dir}: classes {names} differ from the weights' {list(class_names)}"
    try:
        return [int(c["category_id"]) for c in classes], ""
    except (TypeError, ValueError):
        return None, f"{shard_dir}: a category_id is not an integer"


def _training_dirs(data_paths: list[str], weights: str | os.PathLike) -> list[Path | str]:
    """Where the weights' own train/val shards may be: each path as written (from the working
    directory), else from the weights file's folder and the folders above it (runs/NAME/best.pt
    written from the project folder), first hit per path."""
    out = []
    # weights in a bucket (s3://...): only the working directory is a local place to look from
    base = Path.cwd() if storage.is_bucket(weights) else Path(weights).resolve().parent
    for raw in data_paths:
        if not raw:
            continue
        if storage.is_bucket(raw):  # a bucket prefix is where it says, from anywhere
            if storage.is_file(storage.join(raw, "manifest.json")) and raw not in out:
                out.append(raw)
            continue
        p = Path(raw)
        tries = [p] if p.is_absolute() else [p, *(d / p for d in [base, *base.parents][:4])]
        hit = next((t for t in tries if (t / "manifest.json").is_file()), None)
        if hit is not None and hit not in out:
            out.append(hit)
    return out


def category_ids(source: Source, class_names: list[str], data_paths: list[str] | None = None,
                 weights: str | os.PathLike = ".") -> tuple[list[int], str]:
    """[C] class index -> source category id, and where the ids come from (a manifest.json path, or
    "class index").

    As rtrain.evaluate: the ids of a manifest that names the weights' classes in order. For a shard
    source, its own manifest; for plain images (or shards of other classes), the manifest of the
    shards the weights were trained on (config data.train, then data.val; `data_paths`). When none
    is found, the class index, with a warning saying why.
    """
    why = []
    dirs = [source.shard_dir] if source.kind == "shards" else []
    dirs += _training_dirs(list(data_paths or []), weights)
    for d in dirs:
        ids, reason = _manifest_ids(d, class_names)
        if ids is not None:
            return ids, str(storage.child(d, "manifest.json"))
        why.append(reason)
    logger.warning("category ids = class index (%s)",
                   "; ".join(why) or "the weights' train/val shards were not found")
    return list(range(len(class_names))), "class index"


# --------------------------------------------------------------------------- Ray


def wants_ray(num_images: int, workers: int | None, gpus: int | None, threshold: int = RAY_THRESHOLD) -> bool:
    """Ray Data batch inference for more than `threshold` images or when workers/gpus are asked for."""
    return num_images > threshold or bool(workers) or bool(gpus)


def _ray_rows(weights: str, source: Source, settings: PredictSettings, out_dir: Path | None,
              workers: int, gpus: int, overrides, config_file) -> Iterator[dict[str, np.ndarray]]:
    import ray

    if source.kind == "shards":
        from rtrain.data.batches import list_shards

        ds = ray.data.read_parquet(list_shards(source.shard_dir)).select_columns(SHARD_COLUMNS)
    else:
        ds = ray.data.from_items([{"id": it.id, "name": it.name, "path": it.path} for it in source.items])
    # Cut blocks to a batch each so every actor of the pool gets work (one block per actor call).
    ds = ds.repartition(target_num_rows_per_block=settings.batch_size)
    size = gpus if gpus else workers
    threads = 1 if gpus else max(1, (os.cpu_count() or 1) // size)
    ds = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={"weights": weights, "settings": asdict(settings),
                               "out_dir": str(out_dir) if out_dir else None, "overrides": overrides,
                               "config_file": config_file, "threads": threads},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# --------------------------------------------------------------------------- the whole command


def _write_json(path: Path, obj) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh)


def collect(batches, class_names: list[str], category_ids: list[int]) -> dict:
    """The predictions JSON from output batches: images (id <-> file name, original size), categories,
    COCO results (bbox [x, y, w, h] original px, category_id, category_name), skipped images."""
    images, results, skipped = [], [], []
    for batch in batches:
        for i in range(len(batch["id"])):
            name, error = str(batch["name"][i]), str(batch["error"][i])
            if error:
                skipped.append({"file_name": name, "reason": error})
                continue
            image_id = int(batch["id"][i])
            images.append({"id": image_id, "file_name": name, "width": int(batch["width"][i]),
                           "height": int(batch["height"][i]), "picture": str(batch["picture"][i])})
            boxes = np.asarray(batch["boxes"][i], np.float64).reshape(-1, 4)
            for box, score, label in zip(boxes, batch["scores"][i], batch["labels"][i], strict=True):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append({"image_id": image_id, "category_id": category_ids[int(label)],
                                "category_name": class_names[int(label)],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    images.sort(key=lambda r: r["id"])
    results.sort(key=lambda r: (r["image_id"], -r["score"]))
    skipped.sort(key=lambda r: r["file_name"])
    return {"images": images, "results": results, "skipped": skipped,
            "categories": [{"id": c, "name": n} for c, n in zip(category_ids, class_names, strict=True)]}


def predict(
    weights: str | os.PathLike,
    source: str | os.PathLike,
    *,
    out_dir: str | os.PathLike = "predictions",
    conf: float = 0.25,
    iou: float = 0.5,
    img_size: int | None = None,
    max_det: int = 100,
    batch_size: int = 8,
    workers: int | None = None,
    gpus: int | None = None,
    draw: bool = True,
    overrides: list[str] | None = None,
    config_file: str | os.PathLike | None = None,
    device: str | None = None,
    address: str | None = None,
    use_ray: bool | None = None,
    rect: bool | None = None,
) -> PredictReport:
    """Predict every image of `source` (image, folder, glob, or shard folder); see the module doc.

    img_size defaults to the weights' `data.img_size`, `rect` (each image in its own
    rectangular canvas, else img_size x img_size) to their `eval.rect`. `use_ray` None decides
    by `wants_ray`.
    The Ray path starts a local Ray when none is running (report.started_ray); it never shuts
    Ray down: the caller does, if it wants to. Raises SourceError, CheckpointError, ConfigError.
    """
    from rtrain.runs.loading import load_detector, pick_device

    start = time.perf_counter()
    src = resolve_source(source)
    dev = pick_device(device)
    loaded = load_detector(weights, config_file=config_file, overrides=overrides, device=dev)
    size = int(img_size or loaded.config.data.img_size)
    if size % 32:
        raise ValueError(f"--size {size} is not a multiple of 32")
    settings = PredictSettings(img_size=size, conf=conf, iou=iou, max_det=max_det, batch_size=batch_size,
                               rect=loaded.config.eval.rect if rect is None else bool(rect))
    out = Path(out_dir)
    pictures = out if draw else None
    ray_path = wants_ray(src.num_images, workers, gpus) if use_ray is None else use_ray
    report = PredictReport(out_dir=out, json_path=out / PREDICTIONS_JSON,
                           mode="ray" if ray_path else "in-process")
    if ray_path:
        report.started_ray = start_ray(address)
        n_workers = workers or max(1, min(4, (os.cpu_count() or 1)))
        logger.info("Ray Data batch inference: %d images, %d %s actor(s)", src.num_images,
                    gpus or n_workers, "GPU" if gpus else "CPU")
        batches = _ray_rows(str(weights), src, settings, pictures, n_workers, gpus or 0, overrides,
                            str(config_file) if config_file else None)
    else:
        if src.kind == "shards":
            rows = _shard_batches(src.shard_dir, batch_size)
        else:
            rows = _file_batches(src, batch_size)
        batches = (process_rows(loaded.model, loaded.class_names, settings, r, pictures, dev) for r in rows)
    cat_ids, cat_from = category_ids(src, loaded.class_names,
                                     [loaded.config.data.train, loaded.config.data.val], weights)
    data = collect(batches, loaded.class_names, cat_ids)
    data["category_ids_from"] = cat_from
    data["settings"] = {**asdict(settings), "weights": str(weights), "source": str(source)}
    _write_json(report.json_path, data)
    report.images = len(data["images"])
    report.detections = len(data["results"])
    report.skipped = [(s["file_name"], s["reason"]) for s in data["skipped"]]
    report.seconds = time.perf_counter() - start
    for name, why in report.skipped:
        logger.warning("skipped %s: %s", name, why)
    return report
