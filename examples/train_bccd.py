"""Train on BCCD (Pascal VOC blood cells): shard train/val with data_prep, then fit configs/bccd.yaml.

    python examples/train_bccd.py [--bccd ../shared/data/bccd] [--workers 2] [--gpus 1]
    python examples/train_bccd.py --smoke-test    # 320 px, 2 epochs, 1 worker
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data_prep.shard import build_parser as shard_parser
from data_prep.shard import shard
from rtrain.training.runner import fit

REPO = Path(__file__).resolve().parents[1]


def shard_split(bccd: Path, split: str, out: Path, size: int, classes_from: Path | None, *,
                limit: int | None = None, workers: int | None = None) -> Path:
    """Shard one VOC split (its first `limit` ids when given) unless its manifest already exists."""
    if (out / "manifest.json").is_file():
        return out
    split_file = bccd / "ImageSets" / "Main" / f"{split}.txt"
    if limit is not None:  # a smaller split file of the first ids, beside the shards
        ids = [line for line in split_file.read_text().splitlines() if line.strip()][:limit]
        split_file = out.parent / f"{split}_{limit}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("\n".join(ids) + "\n")
    argv = ["--format", "voc", "--root", str(bccd), "--split-file", str(split_file),
            "--out", str(out), "--size", str(size)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if classes_from is not None:
        argv += ["--classes-from", str(classes_from / "manifest.json")]
    shard(shard_parser().parse_args(argv))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bccd", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--data", type=Path, default=Path("data/bccd"), help="where the shards go")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--smoke-test", action="store_true", help="320 px shards, 2 epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    size = 320 if args.smoke_test else 640
    data = args.data.with_name(args.data.name + "_smoke") if args.smoke_test else args.data
    train = shard_split(args.bccd, "train", data / "train", size, None)
    val = shard_split(args.bccd, "val", data / "val", size, train)
    overrides = [f"data.train={train}", f"data.val={val}"]
    if args.smoke_test:
        overrides += ["data.img_size=320", "train.epochs=2", "eval.interval=1", "data.mosaic=0"]
    result = fit(REPO / "configs" / "bccd.yaml", overrides=overrides, workers=args.workers, gpus=args.gpus)
    print(result.summary())


if __name__ == "__main__":
    main()
