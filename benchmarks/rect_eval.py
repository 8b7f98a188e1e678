"""Square vs rectangular evaluation (`eval.rect`) on a wide-image set: mAP, grey padding, img/s.

    python benchmarks/rect_eval.py                       # ~5 min BCCD training + the comparison
    python benchmarks/rect_eval.py --weights RUN/last.pt # an existing BCCD model: comparison only
    python benchmarks/rect_eval.py --smoke               # 0.3 min training on 32 images (plumbing)

The wide set: every image of BCCD's `val` and `test` splits (ImageSets/Main, 640x480) cropped
to its central 640x360 band (16:9), boxes clipped to the band and kept when at least half of
their area is inside; written as COCO JSON + JPEGs in a work folder (never into the shared data)
and sharded with data_prep.shard (--size 640, classes from the train shards). The model:
configs/bccd.yaml (compact_s, 416 px, its recipe) trained in this process (the training loop's
engine, LR schedule and EMA over `rtrain.data.batches.iter_batches_local`, no Ray) on the BCCD `train`
split for `--budget-min` minutes (nothing of the wide set is seen in training), or `--weights`.

Both modes score the same weights on the same shards with `rtrain.evaluation.weights.evaluate_weights`
(`eval.rect=false` / `true`; pycocotools in original pixels, so the mAPs are comparable):
- grey: the share of input pixels that are letterbox padding (exact, from each image's resized
  size and its batch canvas);
- eval img/s: images / `eval_time_s` of the whole evaluation (decode, letterbox, model, NMS,
  pycocotools), the median of `--reps` alternating runs;
- model img/s: the model + NMS alone over the decoded batches (`predict_loop.predict_batches`), median
  of `--reps`.
Timing on a shared, loaded machine: read the rect/square RATIOS of one run, not the absolute
rates. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_shards import find_bccd, work_dir  # noqa: E402

CONFIG = ROOT / "configs" / "bccd.yaml"
CLASSES = ["RBC", "WBC", "Platelets"]
BAND = 360  # crop height of the 640-wide BCCD images: 16:9


def _voc_boxes(xml: Path) -> list[tuple[str, float, float, float, float]]:
    out = []
    for obj in ET.parse(xml).getroot().iter("object"):
        name = obj.findtext("name", "").strip()
        bb = obj.find("bndbox")
        if name not in CLASSES or bb is None:
            continue
        x1, y1, x2, y2 = (float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 > x1 and y2 > y1:
            out.append((name, x1, y1, x2, y2))
    return out


def make_coco(bccd: Path, ids: list[str], out: Path, crop: bool) -> Path:
    """BCCD images `ids` -> out/images/*.jpg + out/annotations.json; `crop`: the 16:9 band."""
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    images, anns = [], []
    for k, name in enumerate(ids, 1):
        with Image.open(bccd / "JPEGImages" / f"{name}.jpg") as im:
            im = im.convert("RGB")
            w, h = im.size
            top = (h - BAND) // 2 if crop and h > BAND else 0
            bottom = top + BAND if crop and h > BAND else h
            im.crop((0, top, w, bottom)).save(out / "images" / f"{name}.jpg", quality=95)
        for cls, x1, y1, x2, y2 in _voc_boxes(bccd / "Annotations" / f"{name}.xml"):
            cy1, cy2 = max(y1 - top, 0.0), min(y2 - top, float(bottom - top))
            if cy2 - cy1 < 0.5 * (y2 - y1) or cy2 - cy1 < 2:
                continue
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": CLASSES.index(cls) + 1,
                         "bbox": [x1, cy1, x2 - x1, cy2 - cy1], "area": (x2 - x1) * (cy2 - cy1),
                         "iscrowd": 0})
        images.append({"id": k, "file_name": f"{name}.jpg", "width": w, "height": bottom - top})
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def shard_coco(ann: Path, images: Path, out: Path, classes_from: Path | None = None) -> Path:
    from data_prep.shard import main as shard_main

    argv = ["--format", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(out),
            "--size", "640", "--workers", "2"]
    if classes_from is not None:
        argv += ["--classes-from", str(classes_from / "manifest.json")]
    if shard_main(argv) != 0:
        raise SystemExit(f"rect_eval: sharding {ann} failed")
    return out


def train(work: Path, train_dir: Path, minutes: float) -> Path:
    """configs/bccd.yaml's model and recipe trained in this process for `minutes` (no Ray: the
    training loop's engine, schedule and EMA on `iter_batches_local`), saved as a weights file."""
    from rtrain.config import config_to_dict, load_config
    from rtrain.data.augment import AugmentParams
    from rtrain.data.batches import iter_batches_local, read_manifest
    from rtrain.runs.checkpoint import save_weights
    from rtrain.runs.loading import build_from_config
    from rtrain.training.ema import ModelEMA
    from rtrain.training.engine import train_one_epoch
    from rtrain.training.optim import build_optimizer
    from rtrain.training.schedule import LRSchedule

    cfg = load_config(CONFIG, [f"data.train={train_dir}", f"train.time_limit_min={minutes}"])
    names = [c["name"] for c in read_manifest(train_dir)["classes"]]
    rows = int(read_manifest(train_dir)["counts"]["images"])
    model = build_from_config(cfg, len(names)).train()
    t, bs = cfg.train, cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else 16
    opt = build_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
    per_epoch = max(1, rows // bs)
    guess = per_epoch * 12  # ~ the steps of 12 epochs: only the warm-up length and EMA ramp use it
    schedule = LRSchedule.from_config(t, t.lr, guess, int(t.warmup_epochs * per_epoch),
                                      time_limit=minutes * 60)
    ema = ModelEMA(model, decay=t.ema_decay, tau=ModelEMA.tau_for_run(guess))
    aug = AugmentParams.from_obj(cfg.data)
    step = epoch = 0
    while not schedule.finished(step, schedule.elapsed()):
        batches = iter_batches_local(train_dir, batch_size=bs, train=True, img_size=cfg.data.img_size,
                                     aug=aug, epoch=epoch, shuffle=True, drop_last=True)
        m = train_one_epoch(model, opt, batches, device="cpu", schedule=schedule, ema=ema,
                            grad_clip=t.grad_clip, step_offset=step, stop_when_finished=True, epoch=epoch)
        step += int(m["steps"])
        epoch += 1
        print(f"  epoch {epoch}: {int(m['steps'])} steps, loss {m.get('loss', float('nan')):.3f}, "
              f"{schedule.elapsed() / 60:.1f} min", flush=True)
    out = work / "weights" / "last.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, ema.module.state_dict(), config_to_dict(cfg), names)
    return out


def padding(batches, size: int) -> tuple[float, float]:
    """(grey share of the input pixels, input pixels per image) of collated val batches."""
    from rtrain.data.augment import resized_shape

    image_px = canvas_px = n = 0
    for b in batches:
        h, w = b["images"].shape[-2:]
        for sw, sh in b["stored_size"].tolist():
            nh, nw = resized_shape(sh, sw, size)
            image_px += nh * nw
            canvas_px += h * w
            n += 1
    return 1.0 - image_px / canvas_px, canvas_px / n


def compare(weights: Path, wide: Path, reps: int) -> dict:
    import torch

    from rtrain.evaluation import predict_loop
    from rtrain.evaluation.sharded import val_batches
    from rtrain.evaluation.weights import evaluate_weights
    from rtrain.runs.loading import load_detector

    loaded = load_detector(weights, device="cpu")
    cfg = loaded.config
    size, bs = cfg.data.img_size, cfg.eval.batch_size
    rows: dict[str, dict] = {}
    eval_rates: dict[str, list[float]] = {"square": [], "rect": []}
    model_rates: dict[str, list[float]] = {"square": [], "rect": []}
    decoded = {m: list(val_batches(wide, batch_size=bs, img_size=size, rect=m == "rect"))
               for m in eval_rates}
    for _ in range(reps):
        for mode in ("square", "rect"):
            metrics = evaluate_weights(weights, wide, overrides=[f"eval.rect={str(mode == 'rect').lower()}"],
                                       device="cpu")
            eval_rates[mode].append(metrics["eval_images"] / metrics["eval_time_s"])
            rows.setdefault(mode, {k: metrics[k] for k in ("mAP", "mAP50", "mAP_small", "AR100",
                                                           "eval_images", "eval_detections")})
            start = time.perf_counter()
            n = 0
            ev = cfg.eval
            with torch.inference_mode():
                for _, dets in predict_loop.predict_batches(loaded.model, decoded[mode], device="cpu",
                                                      score_thresh=ev.score_thresh, iou_thresh=ev.iou_thresh,
                                                      max_det=ev.max_det):
                    n += len(dets)
            model_rates[mode].append(n / (time.perf_counter() - start))
    for mode in rows:
        grey, px = padding(decoded[mode], size)
        rows[mode].update(grey=grey, input_px_per_image=px, eval_img_s=statistics.median(eval_rates[mode]),
                          model_img_s=statistics.median(model_rates[mode]))
    return {"img_size": size, "batch_size": bs, "model": cfg.model.name, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="a BCCD weights file (skips training)")
    p.add_argument("--budget-min", type=float, default=5.0, help="BCCD training minutes (default 5)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per mode, alternating (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--bccd", help="BCCD root (VOC layout; default: ../shared/data/bccd)")
    p.add_argument("--work", help="keep data and the run here (default: a temp dir, removed)")
    p.add_argument("--smoke", action="store_true", help="18 s training on 32 images, 1 rep: plumbing only")
    args = p.parse_args(argv)
    if args.smoke:
        args.budget_min, args.reps = min(args.budget_min, 0.3), 1
    import torch

    torch.set_num_threads(args.threads)
    bccd = find_bccd(args.bccd, "rect_eval")
    if bccd is None:
        return 2
    with work_dir(args.work, "rect-eval-") as work:
        split = {s: (bccd / "ImageSets" / "Main" / f"{s}.txt").read_text().split()
                 for s in ("train", "val", "test")}
        if args.smoke:
            split = {s: ids[:32 if s == "train" else 12] for s, ids in split.items()}
        train_dir = work / "shards" / "train"
        if not (train_dir / "manifest.json").is_file():
            ann = make_coco(bccd, split["train"], work / "coco_train", crop=False)
            shard_coco(ann, work / "coco_train" / "images", train_dir)
        wide = work / "shards" / "wide"
        if not (wide / "manifest.json").is_file():
            ann = make_coco(bccd, split["val"] + split["test"], work / "coco_wide", crop=True)
            shard_coco(ann, work / "coco_wide" / "images", wide, classes_from=train_dir)
        weights = Path(args.weights) if args.weights else None
        if weights is None:
            print(f"training configs/bccd.yaml on BCCD train for {args.budget_min:g} min ...", flush=True)
            weights = train(work, train_dir, args.budget_min)
        result = compare(weights, wide, args.reps)

    rows = result["rows"]
    print(f"\nwide set: BCCD val+test cropped to 640x360 (16:9), {rows['rect']['eval_images']} images; "
          f"{result['model']} at {result['img_size']} px, eval batch {result['batch_size']}, "
          f"{args.threads} torch thread(s){' (SMOKE)' if args.smoke else ''}")
    header = (f"{'mode':<7} {'mAP':>6} {'mAP50':>6} {'mAP_s':>6} {'AR100':>6} {'grey':>6} {'px/img':>7} "
              f"{'eval img/s':>10} {'model img/s':>11}")
    print(header + "\n" + "-" * len(header))
    for mode in ("square", "rect"):
        r = rows[mode]
        print(f"{mode:<7} {r['mAP']:>6.3f} {r['mAP50']:>6.3f} {r['mAP_small']:>6.3f} {r['AR100']:>6.3f} "
              f"{r['grey']:>6.1%} {r['input_px_per_image']:>7.0f} {r['eval_img_s']:>10.1f} "
              f"{r['model_img_s']:>11.1f}")
    sq, rc = rows["square"], rows["rect"]
    summary = {
        "benchmark": "rect_eval", "smoke": args.smoke, "images": rc["eval_images"], **{
            k: result[k] for k in ("model", "img_size", "batch_size")},
        "mAP_square": sq["mAP"], "mAP_rect": rc["mAP"], "mAP_delta": rc["mAP"] - sq["mAP"],
        "mAP50_square": sq["mAP50"], "mAP50_rect": rc["mAP50"],
        "grey_square": sq["grey"], "grey_rect": rc["grey"],
        "eval_speedup": rc["eval_img_s"] / sq["eval_img_s"],
        "model_speedup": rc["model_img_s"] / sq["model_img_s"],
        "timing_note": "ratios of one run on a shared, loaded machine; absolute img/s are not comparable",
    }
    print("speed-ups are ratios within this run (shared machine: absolute rates are not comparable)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
