"""Train-step and inference speed of rtrain variants against torchvision's SSDLite-MobileNetV3.

    python benchmarks/model_speed.py            # 320 px (batch 8) and 640 px (batch 2), ~3 min on 2 cores
    python benchmarks/model_speed.py --quick    # compact_s vs SSDLite at 320 only

Every model runs with the same threads (default 2), batch and synthetic images/targets.
A train step = forward + loss + backward + SGD step (rtrain: `Detector(images, targets)`, i.e. the
real DetectionLoss with its task-aligned assigner; SSDLite: its own matcher + losses). Inference =
eval forward including postprocess/NMS. Models are timed round-robin (one step of each per round,
after warm-up) and the median step is reported, so a noisy neighbour slows everyone alike.
SSDLite's transform is set to a fixed size equal to the benchmark size (it resizes to 320 by default).
GFLOPs = torch FlopCounterMode count / 1e9 for one image (2 x GMACs). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtrain.models import build_model, count_gflops, count_params  # noqa: E402

DEFAULT_VARIANT = "compact_s"
MAIN_VARIANTS = ("seed", "mv2_s", "compact_n", "compact_s", "compact_m")
SSD = "ssdlite320_mbv3"


def make_batch(batch: int, size: int, num_classes: int, gen: torch.Generator):
    """Random images [B, 3, S, S] in 0..1 and 3 random boxes (xyxy px) per image."""
    images = torch.rand(batch, 3, size, size, generator=gen)
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=gen) * size * 0.6
        wh = (torch.rand(3, 2, generator=gen) * 0.35 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (3,), generator=gen)})
    return images, targets


class Runner:
    """One model's train step and inference call on a fixed batch."""

    def __init__(self, name: str, model: torch.nn.Module, images, targets, is_ssd: bool):
        self.name, self.model, self.images, self.is_ssd = name, model, images, is_ssd
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if is_ssd:  # torchvision detection API: list of images, labels with 0 = background
            self.inputs = list(images)
            self.targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        else:
            self.inputs, self.targets = images, targets

    def train_step(self) -> None:
        self.model.train()
        losses = self.model(self.inputs, self.targets)
        loss = sum(losses.values()) if self.is_ssd else losses["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(self.inputs)


def ssd_gflops(model: torch.nn.Module, size: int) -> float:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model([torch.zeros(3, size, size)])
    return counter.get_total_flops() / 1e9


def time_round_robin(
    runners: list[Runner], method: str, warmup: int, iters: int
) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per call of `method` for each runner, calls interleaved.

    CPU seconds (all threads of this process) are the steadier figure on a shared, loaded machine.
    """
    wall: dict[str, list[float]] = {r.name: [] for r in runners}
    cpu: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(warmup + iters):
        for r in runners:
            start, start_cpu = time.perf_counter(), time.process_time()
            getattr(r, method)()
            if i >= warmup:
                wall[r.name].append(time.perf_counter() - start)
                cpu[r.name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in wall}


def bench_size(
    size: int, batch: int, variants: list[str], num_classes: int, warmup: int, iters: int
) -> list[dict]:
    gen = torch.Generator().manual_seed(size)
    images, targets = make_batch(batch, size, num_classes, gen)
    torch.manual_seed(0)
    ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes + 1
    )
    ssd.transform.fixed_size = (size, size)
    runners = [Runner(SSD, ssd, images, targets, is_ssd=True)]
    info = {SSD: (count_params(ssd), ssd_gflops(ssd, size))}
    for name in variants:
        model = build_model(name, num_classes)
        runners.append(Runner(name, model, images, targets, is_ssd=False))
        info[name] = (count_params(model), count_gflops(model, size))
    train = time_round_robin(runners, "train_step", warmup, iters)
    infer = time_round_robin(runners, "infer", warmup, iters)
    rows = []
    for r in runners:
        rows.append(
            {
                "variant": r.name,
                "size": size,
                "batch": batch,
                "params_m": info[r.name][0] / 1e6,
                "gflops": info[r.name][1],
                "train_ips": batch / train[r.name][0],
                "infer_ips": batch / infer[r.name][0],
                "train_cpu_s": train[r.name][1] / batch,
                "infer_cpu_s": infer[r.name][1] / batch,
            }
        )
    base = rows[0]
    for row in rows:
        row["train_ratio"] = row["train_ips"] / base["train_ips"]
        row["infer_ratio"] = row["infer_ips"] / base["infer_ips"]
        row["train_ratio_cpu"] = base["train_cpu_s"] / row["train_cpu_s"]
        row["infer_ratio_cpu"] = base["infer_cpu_s"] / row["infer_cpu_s"]
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'variant':<16} {'size':>4} {'batch':>5} {'params M':>8} {'GFLOPs':>7} {'train img/s':>11} "
        f"{'infer img/s':>11} {'train x SSD':>11} {'infer x SSD':>11} {'train x SSD cpu':>15} "
        f"{'infer x SSD cpu':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<16} {r['size']:>4} {r['batch']:>5} {r['params_m']:>8.3f} {r['gflops']:>7.3f} "
            f"{r['train_ips']:>11.2f} {r['infer_ips']:>11.2f} "
            f"{r['train_ratio']:>11.2f} {r['infer_ratio']:>11.2f} "
            f"{r['train_ratio_cpu']:>15.2f} {r['infer_ratio_cpu']:>15.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="compact_s vs SSDLite at 320 only")
    parser.add_argument("--variants", nargs="+", default=None, help=f"default: {' '.join(MAIN_VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="batch at 320 px (default 8)")
    parser.add_argument("--batch-640", type=int, default=2, help="batch at 640 px (default 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--num-classes", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants or ([DEFAULT_VARIANT] if args.quick else list(MAIN_VARIANTS))
    if DEFAULT_VARIANT not in variants:
        variants.append(DEFAULT_VARIANT)
    plan = [(320, args.batch)] + ([] if args.quick else [(640, args.batch_640)])
    rows = []
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    for size, batch in plan:
        rows += bench_size(size, batch, variants, args.num_classes, args.warmup, args.iters)
    print(
        f"threads={args.threads} num_classes={args.num_classes} warmup={args.warmup} timed={args.iters} "
        f"(median); GFLOPs = 2 x GMACs per image; {time.perf_counter() - start:.0f} s; "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("img/s = batch / median wall step; 'x SSD cpu' = ratio of process CPU seconds per image")
    print("(steadier on a loaded machine); ratios > 1 mean faster than SSDLite.")
    print(format_rows(rows))
    default = next(r for r in rows if r["variant"] == DEFAULT_VARIANT and r["size"] == 320)
    ssd = next(r for r in rows if r["variant"] == SSD and r["size"] == 320)
    summary = {
        "default_variant": DEFAULT_VARIANT,
        "train_speedup_vs_ssdlite": round(default["train_ratio"], 3),
        "train_speedup_vs_ssdlite_cpu_time": round(default["train_ratio_cpu"], 3),
        "infer_speedup_vs_ssdlite": round(default["infer_ratio"], 3),
        "infer_speedup_vs_ssdlite_cpu_time": round(default["infer_ratio_cpu"], 3),
        "default_gflops_320": round(default["gflops"], 4),
        "ssdlite_gflops_320": round(ssd["gflops"], 4),
        "default_train_ips_320": round(default["train_ips"], 2),
        "ssdlite_train_ips_320": round(ssd["train_ips"], 2),
        "threads": args.threads,
        "batch_320": args.batch,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
