"""rtrain.storage on local disk, on a real S3-protocol server (moto) and on a real GCS JSON-API server
(fake-gcs-server), both on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rtrain import storage
from rtrain.storage import StorageError

BUCKET_FIXTURE = {"s3": "s3_bucket", "gs": "gcs_bucket"}


@pytest.fixture(params=["local", "s3", "gs"])
def root(request, tmp_path) -> str:
    """The same tests on a local folder, in an S3 bucket and in a GCS bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue(BUCKET_FIXTURE[request.param]) + "/runs"


def test_write_read_list_exists(root):
    a = storage.join(root, "r1", "metrics.jsonl")
    assert not storage.exists(a) and not storage.is_dir(storage.join(root, "r1"))
    assert storage.list_dir(root) == []
    storage.write_bytes(a, b'{"epoch": 0}\n')
    storage.write_bytes(storage.join(root, "r1", "ckpt", "state.pt"), b"\x00" * 1000)
    assert storage.read_bytes(a) == b'{"epoch": 0}\n'
    assert storage.is_file(a) and storage.exists(a) and not storage.is_dir(a)
    assert storage.is_dir(storage.join(root, "r1")) and storage.exists(storage.join(root, "r1"))
    assert storage.list_dir(storage.join(root, "r1")) == ["ckpt", "metrics.jsonl"]
    assert storage.size(storage.join(root, "r1", "ckpt", "state.pt")) == 1000
    storage.write_bytes(a, b"replaced")  # overwrite: the whole new content
    assert storage.read_bytes(a) == b"replaced"
    storage.remove(a)
    storage.remove(a)  # missing is fine
    assert not storage.exists(a)
    assert storage.list_dir(storage.join(root, "r1")) == ["ckpt"]


def test_missing_file_names_the_location(root):
    missing = storage.join(root, "nope", "best.pt")
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(missing)
    assert info.value.filename == missing
    with pytest.raises(FileNotFoundError):
        storage.size(missing)


def test_local_write_is_temp_then_rename(tmp_path):
    """A local write that fails half-way (here: data that is not bytes) leaves the old file and no temp."""
    target = tmp_path / "r" / "last.pt"
    storage.write_bytes(target, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(target, "not bytes")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(target.parent)) == ["last.pt"]


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_bucket_object_appears_only_whole(kind, request):
    """A writer killed before its upload completes leaves the old object: nothing is visible until close."""
    uri = f"{request.getfixturevalue(BUCKET_FIXTURE[kind])}/r/last.pt"
    storage.write_bytes(uri, b"old")
    fs, path = storage.filesystem(uri)
    stream = fs.open_output_stream(path)
    stream.write(b"half of the new one")
    assert storage.read_bytes(uri) == b"old"  # the upload has not completed
    stream.close()
    assert storage.read_bytes(uri) == b"half of the new one"


def test_refuses_unknown_schemes_in_one_line():
    for uri in ("az://bucket/runs", "hdfs://nn/x", "foo://a"):
        with pytest.raises(StorageError) as info:
            storage.check(uri, "--storage")
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"--storage {uri}:") and "not supported" in msg
        with pytest.raises(StorageError):
            storage.write_bytes(f"{uri}/f", b"x")
    with pytest.raises(StorageError, match="no bucket name"):
        storage.check("s3:///runs", "--storage")


def test_paths_and_uris_are_never_confused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.local_path("s3://bucket/runs") is None
    assert storage.is_bucket("s3://bucket/runs") and storage.is_bucket("S3://bucket/runs")
    assert storage.local_path("runs") == tmp_path / "runs"
    assert storage.local_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert storage.normalize("s3://b/runs/") == "s3://b/runs"
    assert storage.normalize("runs") == str(tmp_path / "runs")
    assert storage.join("s3://b/runs/", "r1", "best.pt") == "s3://b/runs/r1/best.pt"
    assert storage.join(Path("runs"), "r1") == str(tmp_path / "runs" / "r1")
    assert not (tmp_path / "s3:").exists()


def test_gcs_settings_come_from_the_emulator_variable(gcs_bucket, monkeypatch):
    """STORAGE_EMULATOR_HOST (the Python clients' name) and CLOUD_STORAGE_EMULATOR_ENDPOINT (the C++
    client's, inside pyarrow) each point rtrain at the server; a Parquet file round-trips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = os.environ["STORAGE_EMULATOR_HOST"]
    uri = f"{gcs_bucket}/shards/part-00000.parquet"
    fs, path = storage.filesystem(uri)
    assert type(fs).__name__ == "GcsFileSystem" and path == uri[len("gs://"):]
    pq.write_table(pa.table({"x": list(range(100))}), path, filesystem=fs)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
    fs2, _ = storage.filesystem(uri)
    assert pq.read_table(path, filesystem=fs2).column("x").to_pylist() == list(range(100))
    assert storage.list_dir(f"{gcs_bucket}/shards") == ["part-00000.parquet"]
