"""Train-step time in the two memory formats: contiguous (NCHW) against channels_last (NHWC).

The same detector, batches, AdamW/SGD step, grad clipping and EMA in
`rtrain.training.engine.train_one_epoch`; only the layout of the model's 4-D weights and of the
float input batch differs (`rtrain.training.memory_format`). The two formats alternate `--rounds` times,
each round from the same initial weights, so a drift in the machine's speed hits both alike. The
first `--warmup` steps of each round are not timed.

    python benchmarks/memory_format.py                       # compact_s, batch 8 at 320, 1 thread
    python benchmarks/memory_format.py --threads 2 --model compact_n

Last line: JSON with contiguous_ms and channels_last_ms (median per step over the rounds),
speedup (contiguous / channels_last) and the images/s of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_speed import make_batches  # noqa: E402

from rtrain.models import build_model  # noqa: E402
from rtrain.training.ema import ModelEMA  # noqa: E402
from rtrain.training.engine import train_one_epoch  # noqa: E402
from rtrain.training.memory_format import to_memory_format  # noqa: E402
from rtrain.training.optim import build_optimizer  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step_seconds(model, batches, fmt, device, warmup: int, optimizer: str) -> float:
    model = to_memory_format(copy.deepcopy(model).to(device), fmt)
    opt = build_optimizer(model, optimizer, lr=0.002, momentum=0.9, weight_decay=5e-4)
    ema = ModelEMA(model)
    kw = dict(device=device, ema=ema, grad_clip=10.0, memory_format=fmt)
    train_one_epoch(model, opt, batches[:warmup], **kw)
    metrics = train_one_epoch(model, opt, batches[warmup:], **kw)
    return metrics["epoch_time_s"] / metrics["steps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="compact_s")
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = make_batches(args.steps + args.warmup, args.batch, args.img_size)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=3).train()
    times: dict[str, list[float]] = {name: [] for name in FORMATS}
    for _ in range(args.rounds):
        for name, fmt in FORMATS.items():
            times[name].append(step_seconds(model, batches, fmt, device, args.warmup, args.optimizer))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{args.model}, batch {args.batch} at {args.img_size} px, {device}, "
          f"{torch.get_num_threads()} thread(s), {args.steps} timed steps x {args.rounds} rounds")
    print(f"{'format':<16}{'median ms/step':>16}{'img/s':>9}   rounds (ms)")
    for name, t in times.items():
        rounds = " ".join(f"{x * 1e3:.0f}" for x in t)
        print(f"{name:<16}{ms[name]:>16.1f}{args.batch * 1e3 / ms[name]:>9.1f}   {rounds}")
    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "batch": args.batch, "device": str(device),
        "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
        "contiguous_ms": round(ms["contiguous"], 1), "channels_last_ms": round(ms["channels_last"], 1),
        "contiguous_img_s": round(args.batch * 1e3 / ms["contiguous"], 2),
        "channels_last_img_s": round(args.batch * 1e3 / ms["channels_last"], 2),
        "speedup": round(ms["contiguous"] / ms["channels_last"], 3),
    }))


if __name__ == "__main__":
    main()
