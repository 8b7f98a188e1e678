"""python -m data_prep.shard --out s3://... (and gs://): shards written to a real S3 server (moto) or
GCS server (fake-gcs-server) on 127.0.0.1 are byte for byte the shards written to disk, with the
manifest last, so a run that fails part-way leaves a set every reader refuses, and its rerun ends
with the whole set; broken sets in a bucket are refused in one line naming the URI."""

from __future__ import annotations

import json

import pytest
from bucket_shards import all_files, shard_argv, shard_to, synthetic_coco

from data_prep import coco, locations, shard
from data_prep.records import DatasetError
from data_prep.shard_format import ShardError, ShardNotFoundError, read_manifest, shard_files
from data_prep.writer import Options, write_dataset

BUCKET_FIXTURE = {"s3": "s3_bucket", "gs": "gcs_bucket"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return synthetic_coco(tmp_path_factory.mktemp("syn"))


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_a_bucket_set_is_the_local_set_byte_for_byte(kind, request, source, tmp_path, capsys):
    bucket = request.getfixturevalue(BUCKET_FIXTURE[kind])
    local, remote = tmp_path / "train", f"{bucket}/shards/train"
    shard_to(source, local)
    shard_to(source, remote)
    want, got = all_files(local), all_files(remote)
    assert sorted(got) == sorted(want) and "manifest.json" in got and len(shard_files(remote)) == 4
    assert got == want  # shards, per-shard stats, config and manifest: the same bytes
    assert read_manifest(remote) == read_manifest(local)
    # --classes-from a manifest in the bucket, as a val split takes its classes from train's
    shard_to(source, f"{bucket}/shards/val", "--classes-from", f"{remote}/manifest.json")
    assert read_manifest(f"{bucket}/shards/val")["classes"] == read_manifest(local)["classes"]

    # an existing set: the same command again is a no-op (as on disk), other options are refused
    assert shard.main(shard_argv(source, remote)) == 0
    assert all_files(remote) == want
    capsys.readouterr()
    assert shard.main(shard_argv(source, remote, 5)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"data_prep.shard: error: {remote}: holds shards made from another source or with "
                   "other options; use another --out or empty it")
    assert all_files(remote) == want


class _ReaderFailed(OSError):
    pass


def _failing(stream, after: int):
    """The reader's stream, failing after `after` records (as a network read of the images might)."""
    for n, item in enumerate(stream):
        if n == after:
            raise _ReaderFailed("connection reset while reading the source")
        yield item


def test_a_run_that_fails_part_way_leaves_no_manifest_and_its_rerun_completes(s3_bucket, source, tmp_path):
    local, remote = tmp_path / "train", f"{s3_bucket}/shards/train"
    shard_to(source, local)
    args = shard.build_parser().parse_args(shard_argv(source, remote))
    args.opts = {}
    classes, stream, src = coco.read(args)
    with pytest.raises(_ReaderFailed):
        write_dataset(classes, _failing(stream, 20), src, remote,
                      Options(size=96, rows_per_shard=8, workers=1))
    names = locations.list_dir(remote)
    assert names == ["_shard_config.json", "_stats", "part-00000.parquet", "part-00001.parquet"]
    assert locations.read_bytes(f"{remote}/part-00001.parquet") == (local / "part-00001.parquet").read_bytes()
    with pytest.raises(ShardNotFoundError) as info:
        read_manifest(remote)
    assert str(info.value).startswith(f"{remote}/manifest.json: manifest not found")

    shard_to(source, remote)  # the same command continues: the two whole shards are kept
    assert all_files(remote) == all_files(local)


def test_broken_bucket_sets_are_refused_in_one_line(s3_bucket, source, tmp_path, capsys):
    good = f"{s3_bucket}/good"
    shard_to(source, good)
    part = locations.read_bytes(f"{good}/part-00000.parquet")

    def error(call) -> str:
        with pytest.raises((ShardError, DatasetError)) as info:
            call()
        assert "\n" not in str(info.value)
        return str(info.value)

    missing = f"{s3_bucket}/nothing/here"
    assert error(lambda: read_manifest(missing)) == f"{missing}: shard directory not found (no manifest.json)"
    assert error(lambda: shard_files(missing)) == f"{missing}: shard directory not found"
    nobucket = "s3://no-such-bucket-here/shards"
    assert error(lambda: read_manifest(nobucket)).startswith(f"{nobucket}: shard directory not found")
    bad = f"{s3_bucket}/bad"
    locations.write_bytes(f"{bad}/manifest.json", b'{"classes": [')
    assert error(lambda: read_manifest(bad)).startswith(
        f"{bad}/manifest.json: unreadable manifest (manifest.json:1:")
    assert error(lambda: shard_files(bad)) == f"{bad}: no *.parquet shards"

    # a prefix holding shards data_prep did not write there is refused, not mixed
    foreign = f"{s3_bucket}/foreign"
    locations.write_bytes(f"{foreign}/part-00000.parquet", part)
    assert shard.main(shard_argv(source, foreign)) == 2
    assert capsys.readouterr().err.strip() == (
        f"data_prep.shard: error: {foreign}: holds shards of unknown origin (no _shard_config.json); "
        "use another --out or empty it")
    assert locations.list_dir(foreign) == ["part-00000.parquet"]
    # a bucket that does not exist: one line, nothing written
    assert shard.main(shard_argv(source, f"{nobucket}/train")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"data_prep.shard: error: {nobucket}/train: ") and "\n" not in err
    assert "no manifest written" in err
    json.loads(locations.read_bytes(f"{good}/manifest.json"))  # the good set is untouched
