"""BCCD, same wall-clock training budget: rtrain's configs/bccd.yaml vs torchvision SSDLite from scratch.

    python benchmarks/train_bccd.py                  # 12 min each + sharding, Ray start, evaluation
    python benchmarks/train_bccd.py --budget-min 30
    python benchmarks/train_bccd.py --smoke          # 0.5 min each on 32 train / 16 test images

Both train on the BCCD `train` split and are scored by pycocotools on the `test` split
(ImageSets/Main/test.txt) in ORIGINAL pixels, from the same Parquet shards (made here in a temp dir
with data_prep.shard, test with --classes-from train) and the same GT (`coco_gt_from_shards`).

- rtrain: `rtrain.training.runner.fit(configs/bccd.yaml, workers=1)` with `train.time_limit_min=BUDGET`,
  data.val = the test shards and `eval.interval` so large that the only evaluation is the one after
  the last epoch: nothing is selected on the test split. Its last.pt (EMA) is then scored with
  `rtrain.evaluation.weights.evaluate_weights`. Ray Train worker: 1 torch thread, decode in a Ray task.
- SSDLite: `ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)`
  (labels 1..3, 0 is background) trained in-process (torch.set_num_threads(2)) with torchvision's
  reference recipe: SGD momentum 0.9, weight decay 4e-5, lr 0.15 at global batch 192 scaled linearly
  to our batch, linear warm-up from 0.001x over min(1000, steps/epoch - 1) steps, cosine to 0 fitted
  to the time budget, horizontal flip, 320x320 input, its own loss (`model(images, targets)`).
  Images come from `rtrain.data.batches.iter_batches_local` letterboxed to 320 (the reference stretches to
  320x320 instead); predictions (its default score 0.001, 300 per image) are mapped back to
  original pixels with `evaluation.to_coco_results` and scored with `evaluation.coco_evaluate`.
Both budgets count from the first training batch (rtrain's schedule does so: Ray's start-up is not
training). images/s = images trained / training seconds, data loading included.
GFLOPs = torch FlopCounterMode / 1e9 for one image of the model's input size, network only
(no NMS; for SSDLite its backbone + head). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_shards import shard_bccd_splits, work_dir  # noqa: E402

from rtrain.data.augment import AugmentParams  # noqa: E402
from rtrain.data.batches import iter_batches_local, list_shards, read_manifest  # noqa: E402
from rtrain.evaluation.coco import coco_evaluate, coco_gt_from_shards, to_coco_results  # noqa: E402
from rtrain.training.runner import FitError  # noqa: E402

BCCD = ROOT.parent / "shared" / "data" / "bccd"
CONFIG = ROOT / "configs" / "bccd.yaml"
SSD_SIZE = 320
SSD_LR_REF, SSD_BATCH_REF = 0.15, 192  # torchvision references/detection: 8 GPUs x 24, --lr 0.15



# ----------------------------------------------------------------------------- rtrain


def run_rtrain(train_dir: Path, test_dir: Path, budget_min: float, work: Path) -> dict:
    from rtrain.evaluation.weights import evaluate_weights
    from rtrain.models import count_gflops, count_params
    from rtrain.runs import run_dir
    from rtrain.training.runner import fit
    from rtrain.training.train_loop import build_detector

    overrides = [f"train.time_limit_min={budget_min}", "train.epochs=100000", "eval.interval=100000",
                 f"data.train={train_dir}", f"data.val={test_dir}"]
    result = fit(str(CONFIG), overrides=overrides, workers=1, storage=work / "runs", plots=False)
    weights = result.last_weights or result.best_weights
    if weights is None:
        raise SystemExit(f"train_bccd: rtrain left no weights in {result.run_dir}")
    metrics = evaluate_weights(weights, test_dir, device="cpu")
    rows = run_dir.read_metrics(result.run_dir)
    train_s = sum(r.get("epoch_time_s", 0.0) for r in rows)
    images = sum(r.get("images", 0) for r in rows)
    cfg = result.config
    model = build_detector(cfg, len(read_manifest(train_dir)["classes"]))
    return {"model": f"rtrain {cfg.model.name}", "params": count_params(model), "size": cfg.data.img_size,
            "gflops": count_gflops(model, cfg.data.img_size), "images_per_s": images / max(train_s, 1e-9),
            "train_s": train_s, "epochs": len(rows), "images": images, "mAP": metrics["mAP"],
            "mAP50": metrics["mAP50"]}


# ----------------------------------------------------------------------------- SSDLite


def build_ssdlite(num_classes: int) -> torch.nn.Module:
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes + 1)
    model.transform.fixed_size = (SSD_SIZE, SSD_SIZE)  # our letterboxed 320 input: its resize is a no-op
    return model


def ssd_gflops(model: torch.nn.Module) -> float:
    model.eval()
    x = torch.zeros(1, 3, SSD_SIZE, SSD_SIZE)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.head(list(model.backbone(model.transform.normalize(x)).values()))
    return counter.get_total_flops() / 1e9


def ssd_targets(batch: dict) -> list[dict]:
    """Collated batch -> torchvision targets: crowd/difficult and degenerate boxes left out, labels + 1."""
    out = []
    for boxes, labels, crowd in zip(batch["boxes"], batch["labels"], batch["iscrowd"], strict=True):
        keep = (labels >= 0) & ~crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out.append({"boxes": boxes[keep], "labels": labels[keep] + 1})
    return out


def train_ssdlite(model, train_dir: Path, budget_s: float, batch_size: int) -> dict:
    """Its reference recipe for `budget_s` seconds of training (module doc); returns the train figures."""
    steps_per_epoch = sum(pq.read_metadata(f).num_rows for f in list_shards(train_dir)) // batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"train_bccd: {train_dir} holds fewer than {batch_size} images")
    warmup = min(1000, max(steps_per_epoch - 1, 1))  # references/detection: in epoch 0, from 0.001x
    lr0 = SSD_LR_REF * batch_size / SSD_BATCH_REF
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr0, momentum=0.9, weight_decay=4e-5)
    aug = AugmentParams(hflip=0.5, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, scale=0.0, translate=0.0, mosaic=0.0)
    model.train()
    start, step, images, epoch = None, 0, 0, 0
    done = False
    while not done:
        batches = iter_batches_local(train_dir, batch_size=batch_size, train=True, img_size=SSD_SIZE, aug=aug,
                                     seed=0, epoch=epoch, shuffle=True, drop_last=True)
        epoch_steps = 0
        for batch in batches:
            if start is None:
                start = time.perf_counter()
            frac = min(1.0, (time.perf_counter() - start) / budget_s)
            factor = 0.5 * (1.0 + math.cos(math.pi * frac))
            if step < warmup:
                factor *= 0.001 + (1 - 0.001) * step / warmup
            for group in opt.param_groups:
                group["lr"] = lr0 * factor
            losses = model(list(batch["images"].float().div(255)), ssd_targets(batch))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise SystemExit(f"train_bccd: SSDLite loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, epoch_steps, images = step + 1, epoch_steps + 1, images + len(batch["image_id"])
            if time.perf_counter() - start >= budget_s:
                done = True
                break
        if epoch_steps == 0:
            raise SystemExit(f"train_bccd: {train_dir} gave no batch of {batch_size} images")
        epoch += 1
    train_s = time.perf_counter() - start
    return {"images_per_s": images / train_s, "train_s": train_s, "epochs": epoch, "steps": step,
            "images": images}


def evaluate_ssdlite(model, test_dir: Path) -> dict:
    classes = read_manifest(test_dir)["classes"]
    category_ids = [int(c["category_id"]) for c in classes]
    results = []
    model.eval()
    with torch.no_grad():
        for batch in iter_batches_local(test_dir, batch_size=8, train=False, img_size=SSD_SIZE):
            out = model(list(batch["images"].float().div(255)))
            dets = [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1} for o in out]
            results += to_coco_results(batch["image_id"], dets, batch["scale"], batch["pad"],
                                       batch["stored_size"], batch["orig_size"], category_ids)
    return coco_evaluate(coco_gt_from_shards(test_dir), results, [c["name"] for c in classes])


def run_ssdlite(train_dir: Path, test_dir: Path, budget_min: float, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = build_ssdlite(len(read_manifest(train_dir)["classes"]))
    info = {"model": "SSDLite320 MobileNetV3", "params": sum(p.numel() for p in model.parameters()),
            "size": SSD_SIZE, "gflops": ssd_gflops(model)}
    info.update(train_ssdlite(model, train_dir, budget_min * 60.0, batch_size))
    metrics = evaluate_ssdlite(model, test_dir)
    return {**info, "mAP": metrics["mAP"], "mAP50": metrics["mAP50"]}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-min", type=float, default=12.0, help="training minutes for each model")
    p.add_argument("--batch-size", type=int, default=16, help="SSDLite batch (rtrain: the config's)")
    p.add_argument("--work", help="keep shards and the rtrain run here (default: a temp dir, removed)")
    p.add_argument("--smoke", action="store_true", help="0.5 min each on 32 train / 16 test images")
    args = p.parse_args(argv)
    if args.smoke:
        args.budget_min = min(args.budget_min, 0.5)
    if not BCCD.is_dir():
        print(f"train_bccd: {BCCD}: BCCD not found", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    with work_dir(args.work, "train-bccd-") as work:
        train_dir, test_dir = shard_bccd_splits(
            BCCD, work, 32 if args.smoke else None, 16 if args.smoke else None, "train_bccd")
        print(f"SSDLite: training {args.budget_min:g} min in-process ...", flush=True)
        ssd = run_ssdlite(train_dir, test_dir, args.budget_min, args.batch_size)
        ssd["load_avg"] = os.getloadavg()[1]  # 5-minute mean, taken as each side's training ends
        print(f"SSDLite: mAP {ssd['mAP']:.4f}. rtrain: training {args.budget_min:g} min", flush=True)
        try:
            ours = run_rtrain(train_dir, test_dir, args.budget_min, work)
            ours["load_avg"] = os.getloadavg()[1]
        except FitError as exc:
            print(f"train_bccd: rtrain: {exc}", file=sys.stderr)
            return 1

    print(f"\nBCCD test split, {args.budget_min:g} min training budget each"
          f"{' (SMOKE: 32 train / 16 test images)' if args.smoke else ''}")
    header = (f"{'model':<24} {'params M':>8} {'GFLOPs@input':>13} {'epochs':>6} {'images':>7} "
              f"{'train s':>7} {'img/s':>6} {'load':>5} {'mAP':>6} {'mAP50':>6}")
    print(header + "\n" + "-" * len(header))
    for r in (ours, ssd):
        flops = f"{r['gflops']:.3f}@{r['size']}"
        print(f"{r['model']:<24} {r['params'] / 1e6:>8.3f} {flops:>13} {r['epochs']:>6} {r['images']:>7} "
              f"{r['train_s']:>7.0f} {r['images_per_s']:>6.1f} {r['load_avg']:>5.1f} {r['mAP']:>6.3f} "
              f"{r['mAP50']:>6.3f}")
    print(f"rtrain / SSDLite mAP: {ours['mAP'] / max(ssd['mAP'], 1e-9):.2f}x; load = 5-minute load average "
          f"as each side's training ended, on {os.cpu_count()} cores")
    summary = {"rtrain_mAP": round(ours["mAP"], 4), "ssdlite_mAP": round(ssd["mAP"], 4),
               "budget_min": args.budget_min, "rtrain_mAP50": round(ours["mAP50"], 4),
               "ssdlite_mAP50": round(ssd["mAP50"], 4), "rtrain_images_per_s": round(ours["images_per_s"], 2),
               "ssdlite_images_per_s": round(ssd["images_per_s"], 2), "rtrain_epochs": ours["epochs"],
               "ssdlite_epochs": ssd["epochs"], "rtrain_images": ours["images"],
               "ssdlite_images": ssd["images"],
               "mAP_ratio": round(ours["mAP"] / max(ssd["mAP"], 1e-9), 3),
               "load_avg": [round(ssd["load_avg"], 1), round(ours["load_avg"], 1)], "smoke": args.smoke}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
