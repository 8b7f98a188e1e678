"""How close `python -m data_prep.shard` gets to the machine's decode/resize/encode limit.

For BCCD (VOC, 364 images) and coco128 (COCO, 128 images), at --size 640:
- limit: a plain multiprocessing pool, one process per core, already started, doing
  only imaging.convert (decode + orient + resize + JPEG encode) on the same files;
- shard: the whole command as a user runs it (reader, pool start-up, Parquet and
  stats writing, manifest) into a temp folder.
Each is timed `--repeat` times and the best kept (other work on the machine adds noise).

    python benchmarks/shard_speed.py [--repeat 2] [--workers N]

Last line: {"shard_img_s": ..., "limit_img_s": ..., "ratio": ...} over both datasets.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import imaging, shard  # noqa: E402
from data_prep.records import SourceImage  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "bccd": ["--format", "voc", "--root", str(DATA / "bccd")],
    "coco128": ["--format", "coco", "--images", str(DATA / "coco128/train2017"),
                "--annotations", str(DATA / "coco128/annotations/instances_train2017.json")],
}


def _convert(rec: SourceImage) -> int:
    row, _ = imaging.convert(rec, 640)
    return 0 if row is None else len(row["jpeg"])


def records(argv: list[str]) -> list[SourceImage]:
    args = shard.build_parser().parse_args([*argv, "--out", "unused"])
    args.opts = {}
    _, stream, _ = shard.READERS[args.format](args)
    return [r for r in stream if isinstance(r, SourceImage)]


def time_limit(pool, recs: list[SourceImage], workers: int) -> float:
    t = time.perf_counter()
    pool.map(_convert, recs, chunksize=max(1, len(recs) // (workers * 8)))
    return time.perf_counter() - t


def time_shard(argv: list[str], workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        args = shard.build_parser().parse_args([*argv, "--out", tmp, "--workers", str(workers)])
        t = time.perf_counter()
        manifest = shard.shard(args)
        return time.perf_counter() - t, manifest["counts"]["images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    results = {}
    with mp.get_context("forkserver").Pool(a.workers) as pool:
        pool.map(_convert, records(DATASETS["coco128"])[: a.workers])  # start and warm every worker
        for name, argv in DATASETS.items():
            recs = records(argv)
            limit = min(time_limit(pool, recs, a.workers) for _ in range(a.repeat))
            results[name] = {"images": len(recs), "limit_s": limit}
    for name, argv in DATASETS.items():
        runs = [time_shard(argv, a.workers) for _ in range(a.repeat)]
        results[name]["shard_s"] = min(t for t, _ in runs)
        assert runs[0][1] == results[name]["images"], "shard wrote a different number of images"

    print(f"{'dataset':10s} {'images':>7s} {'limit img/s':>12s} {'shard img/s':>12s} {'ratio':>6s}")
    for name, r in results.items():
        li, sh = r["images"] / r["limit_s"], r["images"] / r["shard_s"]
        print(f"{name:10s} {r['images']:7d} {li:12.1f} {sh:12.1f} {sh / li:6.2f}")
    n = sum(r["images"] for r in results.values())
    limit = n / sum(r["limit_s"] for r in results.values())
    shard_rate = n / sum(r["shard_s"] for r in results.values())
    print(f"{'total':10s} {n:7d} {limit:12.1f} {shard_rate:12.1f} {shard_rate / limit:6.2f}  "
          f"({a.workers} workers, best of {a.repeat})")
    print(json.dumps({"shard_img_s": round(shard_rate, 1), "limit_img_s": round(limit, 1),
                      "ratio": round(shard_rate / limit, 3)}))


if __name__ == "__main__":
    main()
