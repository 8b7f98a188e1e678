"""Inference speed on CPU: compact_s in PyTorch eager, TorchScript and ONNX Runtime, vs SSDLite eager.

    python benchmarks/infer_speed.py                 # 320 and 640 px, batch 1, 1 thread (~1 min)
    python benchmarks/infer_speed.py --quick         # fewer iterations
    python benchmarks/infer_speed.py --variant compact_n --batch 4 --threads 2

Default 1 thread: on a 2-core host shared with other jobs, torch's OpenMP spin-waiting with 2
threads made eager runs erratic (1-2 s per 320 px image in one run, 70 ms in the next), while
1 thread gave stable figures.

What is timed (all on the same random batch, same torch/ORT thread count, round-robin so a noisy
neighbour slows every runner alike; median of the iterations):
- `raw`: the network only. rtrain: `forward_raw` (what export writes; NMS outside) in eager,
  TorchScript (`torch.jit.trace`) and ONNX Runtime (CPUExecutionProvider). SSDLite: normalise +
  backbone + head (its own `forward` minus transform and postprocess).
- `full`: images in, detections out. rtrain eager: `forward_raw` + `Detector.postprocess`;
  rtrain ONNX: ORT + `rtrain.deploy.inference.decode` (numpy); SSDLite: its eval `forward` with its
  transform fixed to the benchmark size (no resize).
Untrained weights (torchvision `weights=None, weights_backbone=None`): speed does not depend on
the values, except for NMS, which sees few boxes from either untrained model at these thresholds.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtrain.deploy import inference  # noqa: E402
from rtrain.deploy.exporter import export_model  # noqa: E402
from rtrain.models import build_model  # noqa: E402


def time_round_robin(runners: dict, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each runner, calls interleaved."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runners}
    for _ in range(iters):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def build_runners(variant: str, size: int, batch: int, num_classes: int, threads: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    np_images = images.numpy()
    model = build_model(variant, num_classes).eval()
    ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes + 1).eval()
    ssd.transform.fixed_size = (size, size)
    onnx_path, ts_path = tmp / f"{variant}_{size}.onnx", tmp / f"{variant}_{size}.torchscript"
    export_model(model, "onnx", size, True, onnx_path)
    export_model(model, "torchscript", size, True, ts_path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_path)).eval()
    ssd_list = list(images)

    def ssd_raw():
        x = ssd.transform.normalize(images)  # what its transform does besides resizing
        feats = list(ssd.backbone(x).values())
        return ssd.head(feats)

    def eager_full():
        cls_logits, box_dist = model.forward_raw(images)
        return model.postprocess(cls_logits, box_dist, (size, size), score_thresh=0.25, iou_thresh=0.5)

    def onnx_full():
        cls_logits, box_dist = session.run(None, {"images": np_images})
        return inference.decode(cls_logits, box_dist, model.strides, model.reg_max, (size, size), conf=0.25)

    return {
        "ssdlite_eager_raw": ssd_raw,
        "ssdlite_eager_full": lambda: ssd(ssd_list),
        "eager_raw": lambda: model.forward_raw(images),
        "torchscript_raw": lambda: scripted(images),
        "onnxruntime_raw": lambda: session.run(None, {"images": np_images}),
        "eager_full": eager_full,
        "onnxruntime_full": onnx_full,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="compact_s")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="warm-up 2, 8 iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 2, 8
    torch.set_num_threads(args.threads)
    summary = {"variant": args.variant, "batch": args.batch, "threads": args.threads, "classes": args.classes,
               "iters": args.iters, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    print(f"{args.variant} vs SSDLite-MobileNetV3 (untrained), batch {args.batch}, {args.threads} threads, "
          f"median of {args.iters} round-robin iterations")
    header = f"{'size':>5}  {'runner':<20} {'ms/batch':>9} {'img/s':>8} {'vs SSDLite':>10}"
    print(header + "\n" + "-" * len(header))
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            runners = build_runners(args.variant, size, args.batch, args.classes, args.threads, Path(tmp))
            med = time_round_robin(runners, args.warmup, args.iters)
            for name, sec in med.items():
                ips = args.batch / sec
                peer = "ssdlite_eager_full" if name.endswith("full") else "ssdlite_eager_raw"
                ratio = med[peer] / sec
                print(f"{size:>5}  {name:<20} {sec * 1e3:>9.2f} {ips:>8.1f} {ratio:>9.2f}x")
                summary[f"{name}_ips_{size}"] = round(ips, 2)
                if not name.startswith("ssdlite"):
                    summary[f"{name}_vs_ssdlite_{size}"] = round(ratio, 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
