"""What the data path must deliver for 1, 8 and 64 GPUs: a capacity table computed from per-image costs.

Inputs, each either measured here or stated as a target (the table says which):
- the images/s one GPU's train step consumes at 320 and 640 px (`--gpu-img-s-320`; default the
  5,000 img/s goal for compact_s at 320 px; 640 px scaled by the pixel count unless given);
- the CPU decode + augment rate per core at 320 and 640 px (`--cpu-img-s-per-core-320/640`,
  from `benchmarks/data_speed.py`'s `ray_img_s_per_decode_cpu` at that `--img-size`);
- the mean stored row (`--row-kib`; JPEG at 640 px, measured on shards of the source data:
  `--shards DIR` measures it).

Per row: images/s the GPUs consume, the storage read rate that needs (MB/s), the CPU cores CPU
decoding needs (GPU decoding needs none for the decode itself), and one COCO train2017 epoch
(118,287 images).

    python benchmarks/capacity.py --cpu-img-s-per-core-320 60 --cpu-img-s-per-core-640 25 --shards DIR

Last line: JSON with the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COCO_TRAIN_IMAGES = 118_287


def mean_row_kib(shards: Path) -> float:
    import pyarrow.parquet as pq

    rows = size = 0
    for f in sorted(shards.glob("*.parquet")):
        col = pq.read_table(f, columns=["jpeg"])["jpeg"]
        rows += len(col)
        size += sum(len(b) for b in col.to_pylist())
    if not rows:
        raise SystemExit(f"{shards}: no shard rows")
    return size / rows / 1024


def table(gpu_rate: dict[int, float], cpu_per_core: dict[int, float], row_kib: float) -> list[dict]:
    out = []
    for size in (320, 640):
        for gpus in (1, 8, 64):
            img_s = gpus * gpu_rate[size]
            out.append({
                "gpus": gpus, "img_size": size, "img_s": round(img_s),
                "read_mb_s": round(img_s * row_kib * 1024 / 1e6, 1),
                "cpu_cores_cpu_decode": round(img_s / cpu_per_core[size], 1),
                "cpu_cores_gpu_decode": 0,
                "coco_epoch_s": round(COCO_TRAIN_IMAGES / img_s, 1),
            })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-img-s-320", type=float, default=5000.0, help="img/s one GPU trains at 320 px")
    p.add_argument("--gpu-img-s-640", type=float, help="img/s at 640 px (default: 320 figure / 4)")
    p.add_argument("--gpu-measured", action="store_true", help="the GPU figures were measured, not targets")
    p.add_argument("--cpu-img-s-per-core-320", type=float, required=True)
    p.add_argument("--cpu-img-s-per-core-640", type=float, required=True)
    p.add_argument("--cpu-640-extrapolated", action="store_true",
                   help="the 640 px CPU rate was extrapolated from the 320 px one, not measured")
    p.add_argument("--row-kib", type=float, help="mean stored row (KiB); or --shards")
    p.add_argument("--shards", type=Path, help="shard folder whose mean JPEG size to measure")
    args = p.parse_args()
    row_kib = mean_row_kib(args.shards) if args.shards else args.row_kib
    if row_kib is None:
        raise SystemExit("give --row-kib or --shards")
    gpu = {320: args.gpu_img_s_320, 640: args.gpu_img_s_640 or args.gpu_img_s_320 / 4}
    cpu = {320: args.cpu_img_s_per_core_320, 640: args.cpu_img_s_per_core_640}
    rows = table(gpu, cpu, row_kib)
    kind = "measured" if args.gpu_measured else "target (not measured)"
    print(f"GPU demand: {gpu[320]:.0f} img/s at 320 px, {gpu[640]:.0f} at 640 px per GPU ({kind}); "
          f"CPU decode+augment {cpu[320]:.1f} img/s per core at 320 px (measured), {cpu[640]:.1f} at 640 px "
          f"({'extrapolated' if args.cpu_640_extrapolated else 'measured'}); "
          f"{row_kib:.1f} KiB per stored row")
    print(f"{'GPUs':>5} {'px':>4} {'img/s':>9} {'read MB/s':>10} {'cores (CPU decode)':>19} "
          f"{'cores (GPU decode)':>19} {'COCO epoch':>11}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['img_size']:>4} {r['img_s']:>9} {r['read_mb_s']:>10} "
              f"{r['cpu_cores_cpu_decode']:>19} {r['cpu_cores_gpu_decode']:>19} {r['coco_epoch_s']:>10}s")
    print(json.dumps({"gpu_demand": kind, "row_kib": round(row_kib, 1), "rows": rows}))


if __name__ == "__main__":
    main()
