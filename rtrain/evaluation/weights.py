"""COCO metrics of a weights file on a shard folder, through the in-training evaluation code path.

    metrics = evaluate_weights("runs/bccd/best.pt", "data/bccd/shards/val")
    print(format_metrics(metrics))

The numbers come from `rtrain.evaluation.predict_loop.evaluate` with the batches validation during
training scores
(`rtrain.evaluation.sharded.val_batches` on one rank: letterbox only, rectangular per batch of similar
aspect unless `eval.rect=false`) and the weights' saved `data.img_size` and `eval.*` settings
(overridable), so they equal the figures logged during training for the same weights, data and
eval.batch_size (rect batches depend on it). Optional PR curves (one PNG per class, from
COCOeval's precision array) need the COCO results themselves, which `predict_loop.evaluate` does not
return: they take a second prediction pass (`predict_loop.predict_batches` +
`evaluation.to_coco_results`, the same functions).

The shards and the weights may each be local or in a bucket (`s3://BUCKET/shards/val`,
`rtrain.storage`).
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import numpy as np

from rtrain import storage
from rtrain.runs.checkpoint import IncompatibleCheckpointError

logger = logging.getLogger(__name__)

STAT_LABELS = (
    ("mAP", "AP  @[IoU=0.50:0.95 | area=   all | maxDets=100]"),
    ("mAP50", "AP  @[IoU=0.50      | area=   all | maxDets=100]"),
    ("mAP75", "AP  @[IoU=0.75      | area=   all | maxDets=100]"),
    ("mAP_small", "AP  @[IoU=0.50:0.95 | area= small | maxDets=100]"),
    ("mAP_medium", "AP  @[IoU=0.50:0.95 | area=medium | maxDets=100]"),
    ("mAP_large", "AP  @[IoU=0.50:0.95 | area= large | maxDets=100]"),
    ("AR1", "AR  @[IoU=0.50:0.95 | area=   all | maxDets=  1]"),
    ("AR10", "AR  @[IoU=0.50:0.95 | area=   all | maxDets= 10]"),
    ("AR100", "AR  @[IoU=0.50:0.95 | area=   all | maxDets=100]"),
    ("AR_small", "AR  @[IoU=0.50:0.95 | area= small | maxDets=100]"),
    ("AR_medium", "AR  @[IoU=0.50:0.95 | area=medium | maxDets=100]"),
    ("AR_large", "AR  @[IoU=0.50:0.95 | area= large | maxDets=100]"),
)


def _classes(shards: str | Path, class_names: list[str]) -> list[int]:
    """The manifest's source category ids, after checking it names the weights' classes in order."""
    from rtrain.data.batches import read_manifest

    classes = read_manifest(shards)["classes"]
    names = [c["name"] for c in classes]
    if names != list(class_names):
        raise IncompatibleCheckpointError(
            f"{storage.join(shards, 'manifest.json')}: classes {names} differ from the weights' "
            f"{list(class_names)}")
    return [int(c["category_id"]) for c in classes]


def evaluate_weights(
    weights: str | os.PathLike,
    shards: str | os.PathLike,
    *,
    batch_size: int | None = None,
    overrides: list[str] | None = None,
    config_file: str | os.PathLike | None = None,
    device: str | None = None,
    pr_curves: str | os.PathLike | None = None,
) -> dict:
    """COCO metrics of `weights` on the shards in `shards` (module doc).

    Returns `predict_loop.evaluate`'s dict (the 12 STAT_NAMES, per_class AP, eval_images, ...) plus
    "per_class_ap50", "settings" and, with `pr_curves`, "pr_curves": [png paths].
    Raises CheckpointError / ConfigError / ShardError with one line.
    """
    from rtrain.evaluation import predict_loop
    from rtrain.evaluation.coco import coco_gt_from_shards
    from rtrain.runs.loading import load_detector, pick_device

    dev = pick_device(device)
    loaded = load_detector(weights, config_file=config_file, overrides=overrides, device=dev)
    cfg, names = loaded.config, loaded.class_names
    shards = storage.location(storage.check(shards, "--shards"))  # a Path, or a bucket URI as it is
    category_ids = _classes(shards, names)
    gt = coco_gt_from_shards(shards)
    bs = batch_size or cfg.eval.batch_size
    settings = dict(img_size=cfg.data.img_size, score_thresh=cfg.eval.score_thresh,
                    iou_thresh=cfg.eval.iou_thresh, max_det=cfg.eval.max_det, rect=cfg.eval.rect)

    def batches():
        from rtrain.evaluation.sharded import val_batches

        return val_batches(shards, batch_size=bs, img_size=cfg.data.img_size, device=dev, rect=cfg.eval.rect)

    start = time.perf_counter()
    metrics = predict_loop.evaluate(
        loaded.model, batches(), gt, category_ids, names, device=dev,
        score_thresh=settings["score_thresh"], iou_thresh=settings["iou_thresh"], max_det=settings["max_det"],
        amp=cfg.train.amp,
    )
    logger.info("evaluated %d images in %.1f s", metrics.get("eval_images", 0), time.perf_counter() - start)
    metrics["settings"] = {**settings, "batch_size": bs, "weights": str(weights), "shards": str(shards),
                           "model": cfg.model.name, "device": str(dev)}
    if pr_curves:
        results = []
        for batch, dets in predict_loop.predict_batches(
            loaded.model, batches(), device=dev, score_thresh=settings["score_thresh"],
            iou_thresh=settings["iou_thresh"], max_det=settings["max_det"], amp=cfg.train.amp,
        ):
            from rtrain.evaluation.coco import to_coco_results

            results.extend(to_coco_results(batch["image_id"], dets, batch["scale"], batch["pad"],
                                           batch["stored_size"], batch["orig_size"], category_ids))
        precision = coco_precision(gt, results)
        metrics["per_class_ap50"] = per_class_ap50(precision, names)
        metrics["pr_curves"] = [str(p) for p in plot_pr_curves(precision, names, Path(pr_curves))]
    return metrics


def coco_precision(gt, results: list[dict]) -> np.ndarray | None:
    """COCOeval's precision array [T=10 IoUs, R=101 recalls, K classes, A=4 areas, M=3 maxDets]."""
    from pycocotools.cocoeval import COCOeval

    from rtrain.evaluation.coco import quiet_pycocotools

    if not results:
        return None
    with quiet_pycocotools():
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"]


def per_class_ap50(precision: np.ndarray | None, names: list[str]) -> dict[str, float]:
    out = {}
    for k, name in enumerate(names):
        p = precision[0, :, k, 0, -1] if precision is not None else np.array([])
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else (0.0 if precision is None else -1.0)
    return out


def plot_pr_curves(precision: np.ndarray | None, names: list[str], out_dir: Path) -> list[Path]:
    """One PNG per class: precision against recall at IoU 0.5, 0.75 and averaged over 0.5:0.95."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rtrain.runs.run_dir import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    recall = np.linspace(0.0, 1.0, 101)
    paths = []
    for k, name in enumerate(names):
        fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
        if precision is not None:
            curves = {"IoU 0.50": precision[0, :, k, 0, -1], "IoU 0.75": precision[5, :, k, 0, -1]}
            mean = precision[:, :, k, 0, -1]
            curves["IoU 0.50:0.95 (mean)"] = np.where((mean > -1).all(0), mean.mean(0), -1)
            for label, p in curves.items():
                if (p > -1).any():
                    ap = float(p[p > -1].mean())
                    ax.plot(recall[p > -1], p[p > -1], label=f"{label}  AP {ap:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"PR curve: {name}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no detections or no ground truth", ha="center", va="center")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        path = out_dir / f"pr_{k:02d}_{safe}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def format_metrics(metrics: dict) -> str:
    """The 12 COCO numbers as pycocotools names them, then a per-class AP table."""
    lines = []
    s = metrics.get("settings", {})
    if s:
        n = metrics.get("eval_images", "?")
        lines.append(f"{s.get('model', '?')} on {s.get('shards', '?')}: {n} images, "
                     f"{s.get('img_size')} px{' rect' if s.get('rect') else ''}, "
                     f"score>{s.get('score_thresh')}, NMS IoU {s.get('iou_thresh')}, "
                     f"max {s.get('max_det')} det")
    for key, label in STAT_LABELS:
        lines.append(f" {label} = {metrics[key]:.3f}")
    per_class = metrics.get("per_class", {})
    ap50 = metrics.get("per_class_ap50", {})
    width = max([len("class")] + [len(n) for n in per_class])
    header = f"{'class':<{width}}  AP@[.5:.95]" + ("  AP@.5" if ap50 else "")
    lines += ["", header, "-" * len(header)]
    for name, ap in per_class.items():
        row = f"{name:<{width}}  {ap:>11.3f}"
        if ap50:
            row += f"  {ap50.get(name, float('nan')):>6.3f}"
        lines.append(row)
    return "\n".join(lines)
