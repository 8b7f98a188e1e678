"""Train-step time of the engine's step loop against an old-style loop that reads the host each step.

Both run the same detector (`compact_n` by default), batches, schedule-free SGD step, grad
clipping and EMA on one device. New: `rtrain.training.engine.train_one_epoch` (padded targets, fused SGD,
device-side skip flag, foreach EMA, metrics read at the end). Old-style: the loop this engine
replaced, re-created here: per-image target dicts, `bool(isfinite(loss))`, `float(grad_norm)`,
`float()` per loss part, a foreach (non-fused) SGD and a per-tensor EMA walk over `state_dict()`.
The losses are the current ones in both (the assigner's old label check is emulated by one
`bool()` per step). The first `--warmup` steps of each are not timed.

    python benchmarks/step_speed.py --img-size 128 --batch 8 --steps 20

Last line: JSON with old_ms, new_ms (per step) and speedup (old / new).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtrain.data.batches import batch_to_targets  # noqa: E402
from rtrain.models import build_model  # noqa: E402
from rtrain.precision import images_to_float  # noqa: E402
from rtrain.training.ema import ModelEMA  # noqa: E402
from rtrain.training.engine import train_one_epoch  # noqa: E402
from rtrain.training.optim import build_optimizer, param_groups  # noqa: E402


def make_batches(n: int, batch: int, size: int, boxes: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(batch, boxes, 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(batch, boxes, 2, generator=g) * size * 0.3
        labels = torch.randint(0, 3, (batch, boxes), generator=g)
        labels[:, boxes - 2 :] = -1  # padding
        out.append({
            "images": (torch.rand(batch, 3, size, size, generator=g) * 255).to(torch.uint8),
            "boxes": torch.cat([xy, (xy + wh).clamp(max=size)], -1),
            "labels": labels,
            "iscrowd": torch.zeros(batch, boxes, dtype=torch.bool),
        })
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def old_style(model, batches, device, warmup: int) -> float:
    """Seconds per step of the pre-change loop (host reads every step)."""
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True, foreach=True)
    ema_module = ModelEMA(model).module
    sums: dict[str, float] = {}
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        images = images_to_float(batch["images"], device)
        targets = batch_to_targets(batch, device)
        bool((torch.cat([t["labels"] for t in targets]) < 0).any())  # the old label check
        losses = model(images, targets)
        if not bool(torch.isfinite(losses["loss"].detach())):
            continue
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0))
        if norm != norm:
            continue
        opt.step()
        with torch.no_grad():
            src = model.state_dict()
            for name, t in ema_module.state_dict().items():
                if t.dtype.is_floating_point:
                    t.mul_(0.999).add_(src[name].detach(), alpha=0.001)
                else:
                    t.copy_(src[name])
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    _sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


def new_style(model, batches, device, warmup: int) -> float:
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9)
    ema = ModelEMA(model)
    train_one_epoch(model, opt, batches[:warmup], device=device, ema=ema, grad_clip=10.0)
    metrics = train_one_epoch(model, opt, batches[warmup:], device=device, ema=ema, grad_clip=10.0)
    return metrics["epoch_time_s"] / metrics["steps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="compact_n")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = make_batches(args.steps + args.warmup, args.batch, args.img_size)
    results = {}
    for name, fn in (("old", old_style), ("new", new_style)):
        torch.manual_seed(0)
        model = build_model(args.model, num_classes=3).to(device).train()
        results[name] = fn(model, batches, device, args.warmup)
    print(f"{'loop':<10}{'ms/step':>10}")
    for name, s in results.items():
        print(f"{name:<10}{s * 1e3:>10.1f}")
    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "batch": args.batch, "device": str(device),
        "steps": args.steps, "old_ms": round(results["old"] * 1e3, 2),
        "new_ms": round(results["new"] * 1e3, 2),
        "speedup": round(results["old"] / results["new"], 3),
    }))


if __name__ == "__main__":
    main()
