"""Images/s of rtrain's Ray Data path against a torch DataLoader over the raw JPEG files.

Both sides do the same work per image: decode a 640x480 BCCD JPEG, apply the same train recipe
(`rtrain.data.augment.Augmenter`: letterbox, random affine, HSV, flip), collate to the same batch
dict (`rtrain.data.batches.collate`). Ray: Parquet shards (written by `python -m data_prep.shard` in a
temp dir) -> the train stream `rtrain.fit` uses (`rtrain.data.epoch_stream`, N decode tasks, one
execution over all epochs) -> `iter_torch_batches`. DataLoader: a map-style Dataset over the
JPEG files + VOC XML, `num_workers` = N persistent workers, shuffled, decoding with PIL as
torchvision's references do; it runs before and after the Ray side and its figure is over both,
so a change of machine load between them does not read as a ratio. A third run gives the
DataLoader rtrain's own decode (`rtrain.data.jpeg.decode_rgb`: DCT-reduced JPEG decode when the
letterbox shrinks by 2 or more), so the ratio of the two paths at equal decode is printed too.
The first epoch of each run is a warm-up (process start, imports); the figure is over the
following epochs. Also printed:
img/s per decode process against one core's decode-only limit (`torchvision.io.decode_jpeg`, full
size; and PIL's reduced decode at the run's image size).

    python benchmarks/data_speed.py --actors 2 --epochs 4 --img-size 320

Last line: JSON with ray_img_s, dataloader_img_s, ratio (ray / dataloader), ratio_same_decode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtrain.data.augment import Augmenter, AugmentParams, Sample  # noqa: E402
from rtrain.data.batches import DetectionCollate, collate  # noqa: E402
from rtrain.data.jpeg import decode_rgb  # noqa: E402

BCCD = ROOT.parent / "shared" / "data" / "bccd"
CLASSES = ["RBC", "WBC", "Platelets"]


def make_shards(out: Path, rows_per_shard: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "data_prep.shard",
        "--format",
        "voc",
        "--root",
        str(BCCD),
        "--out",
        str(out),
        "--size",
        "640",
        "--rows-per-shard",
        str(rows_per_shard),
        "--workers",
        "2",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)


class VocJpegs(torch.utils.data.Dataset):
    """Raw BCCD: one item = decoded + augmented image as the same row dict DecodeAugment makes."""

    def __init__(self, root: Path, img_size: int, aug: AugmentParams, seed: int, epoch: int,
                 decode: str = "pil"):
        self.decode, self.img_size = decode, img_size
        self.items = []
        for i, xml in enumerate(sorted((root / "Annotations").glob("*.xml"))):
            r = ET.parse(xml).getroot()
            boxes, labels = [], []
            for o in r.iter("object"):
                b = o.find("bndbox")
                box = [float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                if box[2] > box[0] and box[3] > box[1]:
                    boxes.append(box)
                    labels.append(CLASSES.index(o.findtext("name").strip()))
            self.items.append((i + 1, root / "JPEGImages" / r.findtext("filename"), boxes, labels))
        self.augmenter = Augmenter(img_size=img_size, train=True, params=aug, seed=seed)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        from PIL import Image

        image_id, path, boxes, labels = self.items[k]
        if self.decode == "pil":
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
            (h, w), reduced = image.shape[:2], 1
        else:
            image, reduced, (h, w) = decode_rgb(path.read_bytes(), self.img_size)
        sample = Sample(image, boxes, labels, [False] * len(labels), reduced=reduced, full_hw=(h, w))
        s = self.augmenter([sample], [image_id], self.epoch)[0]
        return {
            "image": s.image,
            "boxes": s.boxes.reshape(-1),
            "labels": s.labels.astype(np.int32),
            "iscrowd": s.iscrowd,
            "image_id": image_id,
            "scale": np.float32(s.scale),
            "pad": np.asarray(s.pad, np.float32),
            "stored_size": np.array([w, h], np.int32),
            "orig_size": np.array([w, h], np.int32),
        }


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    batch["image"] = np.stack(batch["image"])
    return collate(batch)


def run_ray(shards: Path, args, aug: AugmentParams) -> list[tuple[float, int]]:
    """rtrain's train stream (rtrain.data.epoch_stream): one execution over all epochs, as fit runs it."""
    import itertools

    from rtrain.data.batches import DecodeAugment
    from rtrain.data.epoch_stream import StreamPlan, build_train_stream

    plan = StreamPlan.from_shards(shards, batch_rows=args.batch_size, world_size=1, seed=0)
    kwargs = {"train": True, "img_size": args.img_size, "aug": aug, "seed": 0}
    ds = build_train_stream(plan, epochs=args.epochs, decode_fn=DecodeAugment, decode_kwargs=kwargs,
                            decode_actors=args.actors, cpus_per_actor=1.0)
    stream = iter(ds.iter_torch_batches(batch_size=args.batch_size, collate_fn=DetectionCollate(),
                                        prefetch_batches=2))
    times = []
    for _ in range(args.epochs):
        t, n = time.perf_counter(), 0
        for batch in itertools.islice(stream, plan.steps_per_epoch):
            n += batch["images"].shape[0]
        times.append((time.perf_counter() - t, n))
    return times


def run_dataloader(args, aug: AugmentParams, decode: str = "pil") -> list[tuple[float, int]]:
    """The peer as its users run it: shuffled, `num_workers` processes kept across epochs."""
    ds = VocJpegs(BCCD, args.img_size, aug, seed=0, epoch=0, decode=decode)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, num_workers=args.actors, collate_fn=collate_rows,
        prefetch_factor=2, persistent_workers=True, drop_last=True,
    )
    times = []
    for _ in range(args.epochs):
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["images"].shape[0]
        times.append((time.perf_counter() - t, n))
    return times


def decode_only_img_s(shards: Path, longer_side: int | None = None, seconds: float = 5.0) -> float:
    """The decode-only limit of one core over the stored JPEGs: torchvision.io.decode_jpeg at full
    size, or (`longer_side`) `decode_rgb`'s DCT-reduced decode for that letterbox size."""
    import pyarrow.parquet as pq
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [b for f in sorted(shards.glob("*.parquet"))
           for b in pq.read_table(f, columns=["jpeg"])["jpeg"].to_pylist()]
    if longer_side:
        jpegs, decode = raw, lambda data: decode_rgb(data, longer_side)
    else:
        jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
        decode = lambda data: decode_jpeg(data, mode=ImageReadMode.RGB)  # noqa: E731
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for data in jpegs:
            decode(data)
            n += 1
    return n / (time.perf_counter() - t0)


def _rate(times: list[tuple[float, int]]) -> float:
    steady = times[1:] or times
    return sum(n for _, n in steady) / sum(t for t, _ in steady)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--actors", type=int, default=2, help="Ray decode actors = DataLoader workers")
    p.add_argument("--epochs", type=int, default=3, help="epochs per side (the first is a warm-up)")
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mosaic", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    aug = AugmentParams(mosaic=args.mosaic)

    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "bccd"
        t = time.perf_counter()
        make_shards(shards, rows_per_shard=64)
        print(f"shards: {len(list(shards.glob('*.parquet')))} files in {time.perf_counter() - t:.1f} s")
        decode_limit = decode_only_img_s(shards)
        reduced_limit = decode_only_img_s(shards, args.img_size)
        # The DataLoader runs before and after Ray, and its figure is the mean of both: on a shared
        # machine a change of load between two back-to-back runs would otherwise read as a ratio.
        dl_before = run_dataloader(args, aug)
        ray.init(
            address="local",  # its own cluster, even where another is running
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            configure_logging=False,
            log_to_driver=False,
        )
        try:
            rt = run_ray(shards, args, aug)
        finally:
            ray.shutdown()
        dl_after = run_dataloader(args, aug)
        dl_same = run_dataloader(args, aug, decode="rtrain")
    dl = dl_before + dl_after[1:]

    rows = [("ray data train stream (shards)", rt, _rate(rt)),
            ("torch DataLoader (jpegs), before", dl_before, _rate(dl_before)),
            ("torch DataLoader (jpegs), after", dl_after, _rate(dl_after)),
            ("DataLoader, rtrain's decode, after", dl_same, _rate(dl_same))]
    print(
        f"\nload average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"{args.actors} processes per side, img_size {args.img_size}, batch {args.batch_size}"
    )
    print(f"{'path':<36}{'epoch s (each)':<34}{'img/s (after warm-up)':>22}")
    for name, times, rate in rows:
        each = " ".join(f"{t:.1f}" for t, _ in times)
        print(f"{name:<36}{each:<34}{rate:>22.1f}")
    ray_rate, dl_rate = rows[0][2], _rate(dl)
    per_cpu = ray_rate / args.actors
    print(f"ray img/s per decode process {per_cpu:.1f}; decode-only limit of one core "
          f"(torchvision.io.decode_jpeg, stored 640 px JPEGs) {decode_limit:.1f} img/s "
          f"({per_cpu / decode_limit:.0%} of it); reduced decode for {args.img_size} px "
          f"(rtrain.data.jpeg) {reduced_limit:.1f} img/s")
    print(f"ratio ray / DataLoader: {ray_rate / dl_rate:.2f}x (PIL decode); "
          f"{ray_rate / rows[3][2]:.2f}x (both with rtrain's decode)")
    figures = {
        "ray_img_s": round(ray_rate, 1),
        "dataloader_img_s": round(dl_rate, 1),
        "dataloader_img_s_before_after": [round(rows[1][2], 1), round(rows[2][2], 1)],
        "ratio": round(ray_rate / dl_rate, 3),
        "dataloader_same_decode_img_s": round(rows[3][2], 1),
        "ratio_same_decode": round(ray_rate / rows[3][2], 3),
        "ray_img_s_per_decode_cpu": round(per_cpu, 1),
        "decode_only_img_s_one_core": round(decode_limit, 1),
        "reduced_decode_img_s_one_core": round(reduced_limit, 1),
        "first_epoch_s": {"ray": round(rt[0][0], 1), "dataloader": round(dl_before[0][0], 1)},
        "processes": args.actors,
        "img_size": args.img_size,
        "images_per_epoch": dl[-1][1],
        "load_avg": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
