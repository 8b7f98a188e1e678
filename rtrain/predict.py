"""python -m rtrain.predict: detect objects in images; pictures with boxes + a COCO results JSON.

    python -m rtrain.predict --weights runs/bccd/best.pt --source photo.jpg
    python -m rtrain.predict --weights RUN/best.pt --source "photos/**/*.jpg" --out preds --conf 0.3
    python -m rtrain.predict --weights RUN/best.pt --source data/val --workers 4    # Ray Data
    python -m rtrain.predict --weights RUN/best.pt --source big_folder/ --gpus 2 --address auto

--source: an image, a folder (searched recursively), a glob, or a shard folder (manifest.json).
More than 64 images, or --workers/--gpus, run as Ray Data batch inference (actors holding the
model); fewer run in this process. Unreadable images are skipped and listed, not fatal.
Writes OUT/<image name> (boxes, class names and scores drawn) and OUT/predictions.json:
{"images": [{id, file_name, width, height, picture}], "categories": [{id, name}], "results":
[COCO results: image_id, category_id, category_name, bbox [x, y, w, h] in original pixels,
score], "skipped", "category_ids_from"}. category_id is the source category id, as rtrain.evaluate
reports it: from the shards' manifest, or for plain images from the manifest of the shards the
weights were trained on (their config's data.train / data.val, found as written or from the
weights' folder upwards) when it names the same classes in order; else the class index
("category_ids_from": "class index", with a warning).
Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from rtrain.cli import OneLineParser, run_cli
from rtrain.config import add_config_arguments


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rtrain.predict", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="best.pt / last.pt, or a checkpoint directory")
    p.add_argument("--source", required=True, help="image, folder, glob (quote it) or shard folder")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.5, help="NMS IoU threshold (default 0.5)")
    p.add_argument("--size", type=int, help="input size, multiple of 32 (default: weights' data.img_size)")
    p.add_argument("--max-det", type=int, default=100, help="detections kept per image (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--workers", type=int, help="Ray Data CPU actors (forces the Ray path)")
    p.add_argument("--gpus", type=int, help="Ray Data actors with one GPU each (forces the Ray path)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of starting one")
    p.add_argument("--no-draw", action="store_true", help="write the JSON only, no pictures")
    p.add_argument("--device", help="in-process path: cpu, cuda ... (default: a GPU if there is one)")
    add_config_arguments(p)
    return p


@run_cli("rtrain.predict", also=(ValueError,), parser=build_parser)
def main(args: argparse.Namespace) -> int:
    from rtrain.deploy.predictor import predict, start_ray, wants_ray
    from rtrain.deploy.sources import resolve_source

    if not 0.0 <= args.conf <= 1.0 or not 0.0 <= args.iou <= 1.0:
        print("rtrain.predict: error: --conf and --iou must be in [0, 1]", file=sys.stderr)
        return 2
    started = False
    try:
        source = resolve_source(args.source)
        use_ray = wants_ray(source.num_images, args.workers, args.gpus)
        if use_ray:
            started = start_ray(args.address)
        report = predict(args.weights, args.source, out_dir=args.out, conf=args.conf, iou=args.iou,
                         img_size=args.size, max_det=args.max_det, batch_size=args.batch_size,
                         workers=args.workers, gpus=args.gpus, draw=not args.no_draw,
                         overrides=args.overrides, config_file=args.config, device=args.device,
                         address=args.address, use_ray=use_ray)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
