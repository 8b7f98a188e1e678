"""Shards for the benchmarks, made in a temp dir: BCCD (../shared/data/bccd) when present, else the
synthetic shapes of `data_prep.synthetic`; read back with pyarrow as Ray's numpy batches (no Ray).

    shard_dir, source = make_bench_shards(tmp, images=64, stored=640)
    rows = read_rows(shard_dir)            # dict of numpy columns, `rtrain.data.device_decode.RAW_COLUMNS`
    for batch in row_batches(rows, 32): ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd"
# BCCD beside the checkout (../shared/data/bccd), or beside the worktrees' parent.
BCCD_CANDIDATES = [BCCD, ROOT.parents[1] / "shared" / "data" / "bccd"]


@contextlib.contextmanager
def work_dir(keep: str | None, prefix: str):
    """The benchmark's working folder: `keep` (--work, made if absent, kept) or a temp dir removed after."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def find_bccd(explicit: str | None, prog: str) -> Path | None:
    """The BCCD root: `explicit` (--bccd) or the first candidate found; None after one stderr line."""
    import sys

    found = next((c for c in BCCD_CANDIDATES if c.is_dir()), BCCD_CANDIDATES[0])
    bccd = Path(explicit) if explicit else found
    if not bccd.is_dir():
        print(f"{prog}: {bccd}: BCCD not found (--bccd PATH)", file=sys.stderr)
        return None
    return bccd


def shard_bccd_splits(bccd: Path, out_root: Path, n_train: int | None, n_test: int | None,
                      prog: str) -> tuple[Path, Path]:
    """BCCD's train and test splits -> out_root/{train,test} shards with `python -m data_prep.shard`
    (640 px; test with train's classes); n_* keep the first n ids of a split (None: all)."""
    from data_prep.shard import main as shard_main

    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ids = (bccd / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        out_root.mkdir(parents=True, exist_ok=True)
        split_file = out_root / f"{split}.txt"
        split_file.write_text("\n".join(ids[:n] if n else ids) + "\n")
        out[split] = out_root / split
        argv = ["--format", "voc", "--root", str(bccd), "--split-file", str(split_file),
                "--out", str(out[split]), "--size", "640"]
        if split == "test":
            argv += ["--classes-from", str(out["train"] / "manifest.json")]
        if shard_main(argv) != 0:
            raise SystemExit(f"{prog}: sharding the BCCD {split} split failed")
    return out["train"], out["test"]


def make_bench_shards(tmp: Path, images: int, stored: int, use_bccd: bool = True) -> tuple[Path, str]:
    """Write shards under `tmp` with data_prep's reader + shard writer (what `python -m
    data_prep.shard` runs), in-process and without a pool: the CLI module also imports the YOLO
    reader's PyYAML, which a bare GPU host may lack. Returns (shard dir, source name)."""
    from data_prep import coco, voc
    from data_prep.writer import Options, write_dataset

    out = Path(tmp) / "shards"
    args = argparse.Namespace(annotations=None, images=None, root=None, split_file=None, classes=None,
                              data=None, split=None, opt=[], opts={})
    if use_bccd and BCCD.is_dir():
        args.root, reader, source = str(BCCD), voc.read, "bccd"
    else:
        from data_prep.synthetic import make_synthetic

        paths = make_synthetic(Path(tmp) / "synthetic", images=images, seed=0, size=stored)
        args.annotations, args.images = str(paths.annotations["all"]), str(paths.images)
        reader, source = coco.read, "synthetic"
    classes, stream, src = reader(args)
    write_dataset(classes, stream, src, out, Options(size=stored, workers=1))
    return out, source


def num_classes(shard_dir: Path) -> int:
    return len(json.loads((Path(shard_dir) / "manifest.json").read_text())["classes"])


def read_rows(shard_dir: Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """All rows of the shards (at most `limit`) as one numpy batch of the raw columns."""
    from rtrain.data.device_decode import RAW_COLUMNS, numpy_batch_from_table

    tables = [pq.read_table(p, columns=list(RAW_COLUMNS)) for p in sorted(Path(shard_dir).glob("*.parquet"))]
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    return numpy_batch_from_table(table)


def row_batches(rows: dict[str, np.ndarray], batch: int, drop_last: bool = True):
    """Consecutive slices of `rows` of `batch` rows (the last partial one unless drop_last)."""
    n = len(rows["image_id"])
    stop = n - n % batch if drop_last else n
    for start in range(0, stop, batch):
        yield {k: v[start : start + batch] for k, v in rows.items()}
