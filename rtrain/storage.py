"""Where rtrain's own files live: a local path or an object-store URI, behind one small API.

    from rtrain import storage
    storage.check("s3://bucket/runs", "--storage")     # StorageError (one line) for a scheme not supported
    fs, path = storage.filesystem("s3://bucket/runs")   # (pyarrow FileSystem, path inside it)
    storage.write_bytes("s3://bucket/runs/r1/best.pt", data)   # atomic, see below
    data = storage.read_bytes("s3://bucket/runs/r1/best.pt")   # FileNotFoundError naming the URI
    storage.exists(uri); storage.is_file(uri); storage.is_dir(uri); storage.list_dir(uri); storage.join(a, b)
    pq.read_table(path, filesystem=fs)                  # shards: see data_prep.shard_format.read_shard_table

Locations: a plain path (relative or absolute, `~` expanded) or `file://PATH` is local disk;
`s3://bucket/key` is S3 through `pyarrow.fs.S3FileSystem`, `gs://bucket/key` Google Cloud
Storage through `pyarrow.fs.GcsFileSystem`. Every other `scheme://` (hdfs://, az://, ...) is
refused by `check`/`filesystem` with one StorageError line naming the location and the supported
schemes: a URI is never turned into a local folder (`Path("s3://b/x")` would be `./s3:/b/x`).

The implementation is `data_prep.locations` (data_prep imports nothing of rtrain, and
`data_prep.shard` writes shard sets to buckets and the shard format's reader reads them there);
this module re-exports it with rtrain's StorageError and its StorageFullError for full disks.
What lives in a bucket: run directories (`--storage`), weights, and shard sets (`data.train`,
`data.val`, `rtrain.evaluate --shards`, `data_prep.shard --out`).

S3 settings come from the environment, as for every AWS client: credentials (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY or the usual config files), AWS_DEFAULT_REGION / AWS_REGION, and
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-protocol server other than AWS (MinIO, moto's
server on 127.0.0.1 in the tests). GCS: the default Google credentials, or an emulator named by
STORAGE_EMULATOR_HOST (the Python clients' variable) or CLOUD_STORAGE_EMULATOR_ENDPOINT (the one
pyarrow's C++ client reads), used anonymously (fake-gcs-server on 127.0.0.1 in the tests); a GCS
request that keeps failing gives up after 20 s (pyarrow's default is 15 minutes, which a missing
credential would spend). Tested on GCS: this module's calls and the shard writer, against the
emulator only; the Ray runs in a bucket are tested on S3. Ray workers inherit the environment of
the process that starts the cluster.

Atomic writes, the same promise on disk and in a bucket: a reader sees the old file or the whole
new one, never part of one.
- local: `data_prep.atomic` (hidden temp name in the same folder, fsync, rename); a full disk
  raises `StorageFullError` naming the file.
- bucket: one object upload of bytes that are already whole. An object appears only once its
  upload has finished (S3: a single PutObject, or the CompleteMultipartUpload of a large one;
  GCS: the upload's final request), so there is no temp name to rename; a killed writer leaves
  the previous object. The S3 filesystem is opened with `allow_delayed_open`, so an object under
  pyarrow's part size (10 MB) is one PutObject. Never stream a file into a bucket through an
  output stream that an error could close: closing it publishes what was written so far.
Several files that belong together (a checkpoint directory, a shard set) are complete only once
their marker file exists, written last, on disk and in a bucket alike (`rtrain.runs.checkpoint`;
a shard set's marker is its manifest.json, `data_prep.writer`).

A bucket has no directories: `is_dir` is true when some object's key starts with `PATH/`, and
`list_dir` lists the next level of key names (on GCS by listing every key under PATH, as
pyarrow's GCS listing leaves out prefixes without a marker object).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from pathlib import Path

from data_prep import locations
from data_prep.atomic import write_bytes_atomic
from data_prep.locations import BUCKET_SCHEMES, GCS_EMULATOR_VARS  # noqa: F401
from rtrain.errors import RtrainError

logger = logging.getLogger(__name__)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFullError(OSError):
    """A write failed because the disk (or the quota) is full; str() is one line naming the file.

    An OSError with errno ENOSPC/EDQUOT and `filename` set, so `except OSError` still catches it;
    it pickles (it crosses from a Ray worker to the driver).
    """

    def __str__(self) -> str:
        what = "over its disk quota" if self.errno == errno.EDQUOT else "no space left on the device"
        return f"{self.filename}: {what}"


def full_storage(exc: BaseException, path: str | os.PathLike) -> StorageFullError | None:
    """`exc` as a StorageFullError naming `path` when it is ENOSPC/EDQUOT; None otherwise."""
    if isinstance(exc, StorageFullError):
        return exc
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return StorageFullError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (data_prep.atomic: hidden temp name, fsync, rename).

    A full disk (ENOSPC/EDQUOT) raises StorageFullError naming `path`; the temp file is removed.
    """
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        full = full_storage(exc, path)
        if full is not None:
            raise full from None
        raise


class StorageError(RtrainError, locations.LocationError):
    """A location rtrain cannot use (an unsupported scheme, a malformed URI): one line naming it.

    Also a `data_prep.locations.LocationError` (a ValueError), the class the layer below raises."""


def _rtrain_error(fn):
    """`fn` of data_prep.locations, raising StorageError (an RtrainError) for its LocationError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except locations.LocationError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(str(exc)) from None

    return wrapper


scheme = locations.scheme
is_bucket = locations.is_bucket
basename = locations.basename
check = _rtrain_error(locations.check)
local_path = _rtrain_error(locations.local_path)
normalize = _rtrain_error(locations.normalize)
join = _rtrain_error(locations.join)
filesystem = _rtrain_error(locations.filesystem)
exists = _rtrain_error(locations.exists)
is_file = _rtrain_error(locations.is_file)
is_dir = _rtrain_error(locations.is_dir)
size = _rtrain_error(locations.size)
mtime = _rtrain_error(locations.mtime)
list_dir = _rtrain_error(locations.list_dir)
read_bytes = _rtrain_error(locations.read_bytes)
remove = _rtrain_error(locations.remove)


def child(base: str | os.PathLike, *parts: str) -> str | Path:
    """`base/part/...`: a Path for local disk (as `Path(base, *parts)`, relative stays relative), a
    URI string for a bucket. What rtrain's own modules build file locations with."""
    if is_bucket(base):
        return join(base, *parts)
    return Path(base, *parts)


def location(value: str | os.PathLike) -> str | Path:
    """A Path for a local location, the URI string for a bucket (StorageError for other schemes)."""
    text = check(value)
    return text.rstrip("/") if is_bucket(text) else Path(local_path(text) if scheme(text) else text)


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write `data` atomically (see the module doc); returns `location` as a string.

    Local: temp + fsync + rename, folders made as needed, StorageFullError on a full disk.
    Bucket: one object upload, the old object stays until it completes.
    """
    text = check(location)
    if not is_bucket(text):
        atomic_write_bytes(local_path(text), data)
        return text
    return _rtrain_error(locations.write_bytes)(text, data)
