"""Shard sets written both on disk and into a bucket by `python -m data_prep.shard`, for the tests
that check a bucket set reads exactly as the local one."""

from __future__ import annotations

from pathlib import Path

from data_prep import locations


def synthetic_coco(root: Path, images: int = 30, seed: int = 1) -> Path:
    """Synthetic 96 px images with their COCO annotations (train split only) under `root`."""
    from data_prep.synthetic import make_synthetic

    if not (root / "annotations.json").is_file():
        make_synthetic(root, images=images, seed=seed, size=96, val_fraction=0.0)
    return root


def shard_argv(source: Path, out: str | Path, rows_per_shard: int = 8, *extra: str) -> list[str]:
    """data_prep.shard's arguments for `source` (synthetic_coco) into `out`: small shards (every
    object far below moto's 10 MB multipart limit), one process."""
    return ["--format", "coco", "--annotations", str(source / "annotations.json"), "--images",
            str(source / "images"), "--out", str(out), "--size", "96",
            "--rows-per-shard", str(rows_per_shard), "--workers", "1", *extra]


def shard_to(source: Path, out: str | Path, *extra: str) -> str | Path:
    from data_prep.shard import main

    assert main(shard_argv(source, out, 8, *extra)) == 0
    return out


def local_and_bucket_sets(bucket: str, tmp_path: Path, split: str) -> tuple[Path, str]:
    """The same synthetic source sharded to `tmp_path/split` and to `bucket/shards/split`."""
    source = synthetic_coco(tmp_path / "syn")
    return shard_to(source, tmp_path / split), shard_to(source, f"{bucket}/shards/{split}")


def all_files(root: str | Path) -> dict[str, bytes]:
    """Every file under a shard folder or bucket prefix (two levels: the shards and _stats/), by
    relative name."""
    out = {}
    for name in locations.list_dir(root):
        path = locations.join(root, name)
        if locations.is_dir(path):
            out.update({f"{name}/{k}": v for k, v in all_files(path).items()})
        else:
            out[name] = locations.read_bytes(path)
    return out
