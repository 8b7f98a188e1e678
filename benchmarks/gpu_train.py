"""Does the device data path keep a GPU busy? Train steps fed by decode + augment on the device.

Makes shards in a temp dir (BCCD when ../shared/data/bccd exists, else the synthetic shapes) at
--img-size px, reads them with pyarrow (no Ray), and a background thread prefetches batches of
raw rows (`rtrain.data.device_decode.raw_collate`). Decode (nvJPEG on CUDA) and augment
(`DeviceDecodeAugment`, train recipe) run on the device, in that thread on its own CUDA stream
(`--augment-in thread`, default) or in the training loop (`--augment-in loop`), feeding
`rtrain.training.engine.train_one_epoch` (bf16 autocast on CUDA) for two models on the same path:
rtrain's `compact_s` and torchvision's `ssdlite320_mobilenet_v3_large` (random init). Per model:
warm-up steps, then measured steps. Also the data path alone (decode + augment, no model).

Figures: img/s; data-wait fraction (engine's: time the loop waits for its next batch; with
`loop` that includes launching decode/augment); queue-wait fraction (of that, blocked on the
prefetch queue); host syncs per step (`torch.cuda.set_sync_debug_mode("warn")` warnings, both
threads, counted; n/a off CUDA); peak GPU memory (n/a off CUDA).

    python benchmarks/gpu_train.py                     # CUDA, batch 128, ends within 5 minutes
    python benchmarks/gpu_train.py --device cpu --smoke

Needs torch, torchvision, pyarrow (no Ray, no pycocotools). Prints a table, then as its last line
one JSON object: {"device", "source", "batch", "img_size", "data_path": {...},
"models": {name: {img_s, data_wait_frac, queue_wait_frac, host_syncs_per_step, peak_mem_gib, ...}}}.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_shards import make_bench_shards, num_classes, read_rows, row_batches  # noqa: E402
from rtrain.data.augment import AugmentParams  # noqa: E402
from rtrain.data.device_decode import DeviceDecodeAugment, raw_collate  # noqa: E402
from rtrain.models import build_model  # noqa: E402
from rtrain.training.engine import train_one_epoch  # noqa: E402

SYNC_WARNING = "synchroniz"  # set_sync_debug_mode("warn") messages: "called a synchronizing CUDA operation"


class Prefetcher:
    """Batches from a background thread, cycling over the rows (epoch += 1 per pass).

    transform=None: yields (epoch, raw batch) (CPU). Otherwise yields transform(raw, epoch): with
    CUDA the thread runs it on its own stream, so host-side planning and the decode/augment
    kernels overlap the training step; the consumer waits on the batch's event, and the tensors
    are marked as used by its stream so the allocator does not recycle them early.
    """

    def __init__(self, rows, batch: int, transform=None, device=None, depth: int = 3) -> None:
        self.rows, self.batch, self.transform = rows, batch, transform
        self.device = torch.device(device) if device is not None else None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.wait_s = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _make(self, epoch: int, raw):
        if self.transform is None:
            return epoch, raw
        if self.device is None or self.device.type != "cuda":
            return self.transform(raw, epoch), None
        with torch.cuda.stream(self.stream):
            batch = self.transform(raw, epoch)
            event = torch.cuda.Event()
            event.record(self.stream)
        return batch, event

    def _run(self) -> None:
        try:
            if self.device is not None and self.device.type == "cuda":
                self.stream = torch.cuda.Stream(self.device)
            epoch = 0
            while not self.stop.is_set():
                for b in row_batches(self.rows, self.batch):
                    item = self._make(epoch, raw_collate(b))
                    while not self.stop.is_set():
                        try:
                            self.queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self.stop.is_set():
                        return
                epoch += 1
        except BaseException as e:  # surfaced in get(), not lost in the thread
            self.error = e
            self.queue.put(None)

    def get(self):
        t0 = time.perf_counter()
        item = self.queue.get()
        self.wait_s += time.perf_counter() - t0
        if item is None:
            raise RuntimeError("prefetch thread failed") from self.error
        return item

    def batches(self, step=None, device=None):
        """Device batches: made here by `step` (transform=None), or taken ready from the thread."""
        while True:
            first, second = self.get()
            if self.transform is None:
                yield step(second, first, device)
                continue
            batch, event = first, second
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in batch.values():
                    t.record_stream(current)
            yield batch

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def targets_on_device(batch, device) -> list[dict]:
    """Unpadded targets with one host sync per batch (the box counts), not one per image."""
    counts = (batch["labels"] >= 0).sum(1).tolist()
    return [
        {"boxes": batch["boxes"][i, :k], "labels": batch["labels"][i, :k], "iscrowd": batch["iscrowd"][i, :k]}
        for i, k in enumerate(counts)
    ]


class TorchvisionDetector(nn.Module):
    """A torchvision detection model behind rtrain's training interface:
    `model(images float [B, 3, S, S] 0..1, targets)` -> {"loss": total, **parts}; labels + 1
    because torchvision's class 0 is the background."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        losses = self.model(list(images), [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets])
        return {"loss": sum(losses.values()), **losses}


def ssdlite(num_classes: int) -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    return TorchvisionDetector(
        ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    )


def make_prefetcher(rows, args, step: DeviceDecodeAugment, device: torch.device) -> Prefetcher:
    """--augment-in thread: decode + augment in the prefetch thread; loop: in the training loop."""
    if args.augment_in == "thread":
        return Prefetcher(rows, args.batch, lambda raw, epoch: step(raw, epoch, device), device)
    return Prefetcher(rows, args.batch)


def run_model(model, rows, args, device, params) -> dict:
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    step = DeviceDecodeAugment(args.img_size, True, params, seed=0)
    prefetch = make_prefetcher(rows, args, step, device)
    batches = prefetch.batches(step, device)
    common = {"device": device, "amp": True, "grad_clip": 10.0, "to_targets": targets_on_device}
    try:
        train_one_epoch(model, optimizer, batches, max_steps=args.warmup, **common)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        prefetch.wait_s = 0.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                m = train_one_epoch(model, optimizer, batches, max_steps=args.steps, **common)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs = sum(SYNC_WARNING in str(w.message) for w in caught)
    finally:
        prefetch.close()
    steps = max(int(m["steps"]), 1)
    cuda = device.type == "cuda"
    return {
        "img_s": round(m["images_per_s"], 1),
        "data_wait_frac": round(m["data_wait_frac"], 3),
        "queue_wait_frac": round(prefetch.wait_s / m["epoch_time_s"], 3) if m["epoch_time_s"] > 0 else 0.0,
        "host_syncs_per_step": round(syncs / steps, 1) if cuda else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "steps": int(m["steps"]),
        "skipped": int(m["skipped"]),
        "loss": round(m.get("loss", float("nan")), 4),
        "skipped_jpegs": step.skipped,
    }


def run_data_path(rows, args, device, params) -> dict:
    """Decode + augment alone: img/s of the device path with the prefetch thread feeding it."""
    step = DeviceDecodeAugment(args.img_size, True, params, seed=0)
    prefetch = make_prefetcher(rows, args, step, device)
    try:
        gen = prefetch.batches(step, device)
        next(gen)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            n += next(gen)["images"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    finally:
        prefetch.close()
    return {"img_s": round(n / elapsed, 1), "ms_per_batch": round(elapsed / args.steps * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs (CPU, < 1 min)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (smoke 4)")
    ap.add_argument("--img-size", type=int, default=None, help="default 320 (smoke 128)")
    ap.add_argument("--images", type=int, default=None, help="shard images; default 4 batches (smoke 12)")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 (smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per model; default 30 (smoke 2)")
    ap.add_argument("--mosaic", type=float, default=0.5)
    ap.add_argument("--augment-in", choices=("thread", "loop"), default="thread",
                    help="where decode + augment run: the prefetch thread (own CUDA stream) or the loop")
    args = ap.parse_args(argv)
    defaults = {"batch": 4, "img_size": 128, "warmup": 1, "steps": 2} if args.smoke else \
        {"batch": 128, "img_size": 320, "warmup": 5, "steps": 30}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.images is None:
        args.images = 12 if args.smoke else 4 * args.batch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_train: CUDA not available (use --device cpu)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    params = AugmentParams(mosaic=args.mosaic)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, source = make_bench_shards(Path(tmp), args.images, args.img_size, use_bccd=not args.smoke)
        rows = read_rows(shard_dir)
        classes = num_classes(shard_dir)
    if len(rows["image_id"]) < args.batch:
        raise SystemExit(f"gpu_train: {len(rows['image_id'])} images, fewer than one batch of {args.batch}")
    setup_s = time.perf_counter() - start
    data_path = run_data_path(rows, args, device, params)
    models = {
        "compact_s": run_model(build_model("compact_s", classes), rows, args, device, params),
        "ssdlite320_mobilenet_v3_large": run_model(ssdlite(classes), rows, args, device, params),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {source} shards ({len(rows['image_id'])} images, {classes} classes) at "
          f"{args.img_size} px, batch {args.batch}, {args.warmup} warm-up + {args.steps} measured steps, "
          f"mosaic {args.mosaic}, decode + augment in the {args.augment_in}, setup {setup_s:.1f} s")
    print(f"data path alone (decode + augment on {device.type}): {data_path['img_s']} img/s, "
          f"{data_path['ms_per_batch']} ms/batch")
    print(f"{'model':<32} {'img/s':>8} {'data wait':>10} {'queue wait':>11} {'syncs/step':>11} "
          f"{'peak GiB':>9}")

    def fmt(v):
        return "n/a" if v is None else v

    for model_name, r in models.items():
        print(f"{model_name:<32} {r['img_s']:>8} {r['data_wait_frac']:>10} {r['queue_wait_frac']:>11} "
              f"{fmt(r['host_syncs_per_step']):>11} {fmt(r['peak_mem_gib']):>9}")
    print(json.dumps({
        "device": name, "smoke": args.smoke, "source": source, "batch": args.batch, "img_size": args.img_size,
        "steps": args.steps, "mosaic": args.mosaic, "augment_in": args.augment_in,
        "wall_s": round(time.perf_counter() - start, 1), "data_path": data_path, "models": models,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
