"""Per-image CPU cost of decode and augment: the CPU path (`rtrain.data.batches.DecodeAugment`:
`rtrain.data.jpeg.decode_rgb` + numpy/PIL `Augmenter`), the same with every JPEG decoded at full
size (`reduced_decode=False`, the path before DCT-reduced decode), and torchvision.io decode +
`rtrain.data.augment_tensor.TensorAugmenter` (`rtrain.data.device_decode.DeviceDecodeAugment`), on
the same shard rows, one thread. (`pil` val is the reduced decode too; fit's validation decodes
at full size, the `pil_full` val row.)

Shards: BCCD when ../shared/data/bccd exists, else the synthetic shapes, stored at --stored px,
written to a temp dir. Each figure is the best of --repeats passes over the same batches.
Modes: val (letterbox), train (default recipe, no mosaic), train with mosaic 0.5.

    python benchmarks/augment_speed.py --images 64 --batch 32 --img-size 320

Prints a table, then as its last line one JSON object: {"pil": {mode: {decode_ms, augment_ms,
total_ms}}, "pil_full": {...}, "tensor": {...}, ...} in ms per image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_shards import make_bench_shards, read_rows, row_batches  # noqa: E402
from rtrain.data.augment import Augmenter, AugmentParams, Sample  # noqa: E402
from rtrain.data.augment_tensor import TensorAugmenter  # noqa: E402
from rtrain.data.device_decode import DeviceDecodeAugment, decode_jpegs, raw_collate  # noqa: E402
from rtrain.data.jpeg import decode_rgb  # noqa: E402

MODES = {"val": (False, 0.0), "train": (True, 0.0), "train_mosaic": (True, 0.5)}


def time_pil(batches, train: bool, params: AugmentParams, size: int,
             reduced: bool = True) -> dict[str, float]:
    from rtrain.data.batches import DecodeAugment  # imports Ray's collate base; the PIL path needs it anyway

    aug = Augmenter(size, train, params, seed=0)
    end_to_end = DecodeAugment(train=train, img_size=size, aug=params, seed=0, epoch=0,
                               reduced_decode=reduced)
    decode = augment = total = 0.0
    for b in batches:
        t0 = time.perf_counter()
        decoded = [decode_rgb(j, size if reduced else None) for j in b["jpeg"]]
        t1 = time.perf_counter()
        samples = [Sample(im, np.asarray(bx, np.float32), lb, cr, reduced=k, full_hw=hw)
                   for (im, k, hw), bx, lb, cr in zip(decoded, b["boxes"], b["labels"], b["iscrowd"],
                                                      strict=True)]
        aug(samples, [int(i) for i in b["image_id"]], 0)
        t2 = time.perf_counter()
        end_to_end(b)
        t3 = time.perf_counter()
        decode, augment, total = decode + t1 - t0, augment + t2 - t1, total + t3 - t2
    return {"decode_s": decode, "augment_s": augment, "total_s": total}


def time_tensor(batches, train: bool, params: AugmentParams, size: int) -> dict[str, float]:
    aug = TensorAugmenter(size, train, params, seed=0)
    end_to_end = DeviceDecodeAugment(size, train, params, seed=0)
    decode = augment = total = 0.0
    for b in batches:
        raw = raw_collate(b)
        t0 = time.perf_counter()
        images, kept, _ = decode_jpegs(raw["jpeg"], "cpu")
        t1 = time.perf_counter()
        aug(images, [raw["boxes"][i] for i in kept], [raw["labels"][i] for i in kept],
            [raw["iscrowd"][i] for i in kept], raw["image_id"].tolist(), 0)
        t2 = time.perf_counter()
        end_to_end(raw_collate(b), 0, "cpu")  # collate included: it is part of this path
        t3 = time.perf_counter()
        decode, augment, total = decode + t1 - t0, augment + t2 - t1, total + t3 - t2
    return {"decode_s": decode, "augment_s": augment, "total_s": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--stored", type=int, default=640, help="stored image side of the shards (px)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-bccd", action="store_true", help="use the synthetic shapes even if BCCD exists")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, source = make_bench_shards(Path(tmp), args.images, args.stored, not args.no_bccd)
        rows = read_rows(shard_dir, limit=args.images)
    batches = list(row_batches(rows, args.batch))
    n = sum(len(b["image_id"]) for b in batches)
    if n == 0:
        raise SystemExit(f"need at least --batch {args.batch} images, got {len(rows['image_id'])}")
    stored = sorted({(int(w), int(h)) for w, h in zip(rows["width"], rows["height"], strict=True)})
    results: dict[str, dict] = {"pil": {}, "pil_full": {}, "tensor": {}}
    full = partial(time_pil, reduced=False)
    for mode, (train, mosaic) in MODES.items():
        params = AugmentParams(mosaic=mosaic)
        for path, fn in (("pil", time_pil), ("pil_full", full), ("tensor", time_tensor)):
            fn(batches[:1], train, params, args.img_size)  # warm-up (imports, allocator, caches)
            runs = [fn(batches, train, params, args.img_size) for _ in range(args.repeats)]
            results[path][mode] = {
                k.replace("_s", "_ms"): round(min(r[k] for r in runs) / n * 1000, 2) for k in runs[0]
            }
    print(f"source {source}, {n} images stored {stored[:3]}{'...' if len(stored) > 3 else ''}, "
          f"out {args.img_size} px, batch {args.batch}, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'path':<8} {'mode':<13} {'decode ms/img':>14} {'augment ms/img':>15} {'end-to-end ms/img':>18}")
    for path, modes in results.items():
        for mode, r in modes.items():
            print(f"{path:<8} {mode:<13} {r['decode_ms']:>14.2f} {r['augment_ms']:>15.2f} "
                  f"{r['total_ms']:>18.2f}")
    print("end-to-end: DecodeAugment (pil: reduced decode; pil_full: reduced_decode=False) / raw_collate + "
          "DeviceDecodeAugment (tensor) on the same batches")
    print(json.dumps({
        "source": source, "images": n, "img_size": args.img_size, "batch": args.batch,
        "threads": args.threads, "repeats": args.repeats, **results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
