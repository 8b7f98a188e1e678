"""python -m data_prep.shard: any detection dataset -> Parquet shards + manifest.json.

    python -m data_prep.shard --format coco --annotations instances.json --images DIR --out OUT
    python -m data_prep.shard --format voc --root DIR [--split-file ImageSets/Main/train.txt] --out OUT
    python -m data_prep.shard --format voc --annotations XML_DIR --images IMG_DIR --out OUT
    python -m data_prep.shard --format yolo --root DIR --data data.yaml --split val --out OUT
    python -m data_prep.shard --format imagenet-loc --root DIR --split train|val --out OUT
    python -m data_prep.shard --format coco ... --out s3://bucket/shards/train   # into a bucket
    ... [--size 640] [--rows-per-shard 1000] [--workers N] [--classes-from TRAIN_OUT/manifest.json]

A new format is one line in READERS: a function `read(args) -> (classes, stream, source)`
(see data_prep.records.Reader), plus its module's FLAGS line (what `--help` prints for
it) and its entry in READS (the reader options it reads). Reader options are the shared
ones below; one given that the format does not read is warned about, not an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections import Counter

from data_prep import coco, imagenet_loc, locations, voc, yolo
from data_prep.manifest import load_classes
from data_prep.records import DatasetError, Reader

READERS: dict[str, Reader] = {
    "coco": coco.read,
    "voc": voc.read,
    "yolo": yolo.read,
    "imagenet-loc": imagenet_loc.read,
    "imagenet_loc": imagenet_loc.read,  # the spelling of the module name, kept as an alias
}


FLAGS: dict[str, str] = {"coco": coco.FLAGS, "voc": voc.FLAGS, "yolo": yolo.FLAGS,
                         "imagenet-loc": imagenet_loc.FLAGS}


# The reader options (argparse dests) each format reads; any other one given is warned about.
READS: dict[str, set[str]] = {
    "coco": {"annotations", "images"},
    "voc": {"root", "annotations", "images", "split_file", "classes"},
    "yolo": {"root", "data", "annotations", "split", "images"},
    "imagenet-loc": {"root", "split", "images", "annotations"},
}
READS["imagenet_loc"] = READS["imagenet-loc"]
_READER_OPTIONS = ("annotations", "images", "root", "split_file", "classes", "data", "split")


def unread_options(args: argparse.Namespace) -> list[str]:
    """The reader flags given on the command line that --format's reader does not read."""
    reads = READS.get(args.format, set(_READER_OPTIONS))
    return [f"--{d.replace('_', '-')}" for d in _READER_OPTIONS if getattr(args, d, None) and d not in reads]


def _epilog() -> str:
    return "flags each format reads:\n" + "\n".join(
        textwrap.fill(f"{fmt}: {flags}", width=100, initial_indent="  ", subsequent_indent="      ")
        for fmt, flags in FLAGS.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m data_prep.shard", description=__doc__.split("\n")[0], epilog=_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=sorted(READERS), help="source format")
    p.add_argument("--out", required=True, help="output folder for part-*.parquet and manifest.json, "
                   "or a bucket prefix (s3://BUCKET/PATH, gs://BUCKET/PATH)")
    p.add_argument("--size", type=int, default=640, help="longer side of the stored images (px)")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="images per Parquet file")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    p.add_argument("--classes-from", help="manifest.json whose class list to reuse (val/test from train)")
    g = p.add_argument_group("reader options (which format reads which: see the list at the end)")
    g.add_argument("--annotations", help="coco: the instances JSON; voc: the XML folder; imagenet-loc: the "
                   "split's solution CSV or XML folder; yolo: same as --data")
    g.add_argument("--images", help="image folder (imagenet-loc: the one holding train/ and val/); "
                   "voc, yolo, imagenet-loc: default found under --root")
    g.add_argument("--root", help="dataset root folder (voc, yolo, imagenet-loc)")
    g.add_argument("--split-file", help="voc: ids to use: a .txt of ids or a .csv with a filename column")
    g.add_argument("--classes", help="voc: comma-separated class names, in index order")
    g.add_argument("--data", help="yolo: the data.yaml naming classes and split folders")
    g.add_argument("--split", help="yolo / imagenet-loc: which split to read (train, val, ...)")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra reader-specific option (repeatable), seen by readers as args.opts[KEY]")
    return p


def shard(args: argparse.Namespace) -> dict:
    """Read with the chosen reader and write the shards; return the manifest dict."""
    opts = dict(kv.split("=", 1) for kv in args.opt if "=" in kv)
    bad = [kv for kv in args.opt if "=" not in kv]
    if bad:
        raise DatasetError(f"--opt {bad[0]!r} is not KEY=VALUE")
    args.opts = opts
    # A bucket URI is written there (data_prep.writer); another scheme is one line, never a local
    # folder named "s3:".
    locations.check(args.out, "--out")
    if args.classes_from:
        locations.check(args.classes_from, "--classes-from")
    unread = unread_options(args)
    if unread:
        reads = ", ".join(f"--{d.replace('_', '-')}" for d in _READER_OPTIONS if d in READS[args.format])
        logging.getLogger("data_prep.shard").warning(
            "--format %s does not read %s (it reads %s)", args.format, ", ".join(unread), reads)
    # Imported here, not at the top: worker processes import this module again, and need
    # neither pyarrow nor numpy.
    from data_prep.writer import Options, start_pool, write_dataset

    frozen = load_classes(args.classes_from) if args.classes_from else None
    classes_from = None
    if args.classes_from:
        classes_from = (args.classes_from.rstrip("/") if locations.is_bucket(args.classes_from)
                        else os.path.abspath(args.classes_from))
    options = Options(size=args.size, rows_per_shard=args.rows_per_shard, workers=args.workers,
                      classes_from=classes_from)
    pool = start_pool(args.workers)  # the workers boot while the reader parses the annotations
    try:
        classes, stream, source = READERS[args.format](args)
        return write_dataset(classes, stream, source, args.out, options, frozen, pool=pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def summary(manifest: dict, out: str) -> str:
    c = manifest["counts"]
    lines = [f"{c['images']} images written to {out} ({len(manifest['shards'])} shards, {c['boxes']} boxes, "
             f"{c['negatives']} without boxes, {manifest['num_classes']} classes)",
             f"{c['skipped_images']} images skipped, {c['dropped_boxes']} boxes/annotations dropped, "
             f"{c['repaired']} items repaired"]
    reasons = Counter()
    for i in manifest["issues"]:
        reasons[(i["action"], i["reason"])] += 1
    for (action, reason), n in sorted(reasons.items()):
        lines.append(f"  {action:9s} {n:6d}  {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = shard(args)
    except DatasetError as e:
        print(f"data_prep.shard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("data_prep.shard: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except OSError as e:  # a disk or a bucket that failed part-way: no manifest was written
        what = (str(e).splitlines() or [type(e).__name__])[0][:300]
        print(f"data_prep.shard: error: {args.out}: {what} (no manifest written; the same command "
              "continues)", file=sys.stderr)
        return 1
    print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
