"""Where rtrain's own files live: a local path or an object-store URI, behind one small API.

    from rtrain import storage
    storage.check("s3://bucket/runs", "--storage")     # StorageError (one line) for a scheme not supported
    fs, path = storage.filesystem("s3://bucket/runs")   # (pyarrow FileSystem, path inside it)
    storage.write_bytes("s3://bucket/runs/r1/best.pt", data)   # atomic, see below
    data = storage.read_bytes("s3://bucket/runs/r1/best.pt")   # FileNotFoundError naming the URI
    storage.exists(uri); storage.is_file(uri); storage.is_dir(uri); storage.list_dir(uri); storage.join(a, b)

Locations: a plain path (relative or absolute, `~` expanded) or `file://PATH` is local disk;
`s3://bucket/key` is S3 through `pyarrow.fs.S3FileSystem`. Every other `scheme://` (gs://,
hdfs://, ...) is refused by `check`/`filesystem` with one StorageError line naming the location
and the supported schemes: a URI is never turned into a local folder (`Path("s3://b/x")` would
be `./s3:/b/x`). gs:// is left out until it is tested against a server.

S3 settings come from the environment, as for every AWS client: credentials (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY or the usual config files), AWS_DEFAULT_REGION / AWS_REGION, and
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-protocol server other than AWS (MinIO, moto's
server on 127.0.0.1 in the tests). Ray workers inherit the environment of the process that
starts the cluster.

Atomic writes, the same promise on disk and in a bucket: a reader sees the old file or the whole
new one, never part of one.
- local: `data_prep.atomic` (hidden temp name in the same folder, fsync, rename); a full disk
  raises `StorageFullError` naming the file.
- bucket: one object upload. An S3 object appears only once its upload has finished (a single
  PutObject, or the CompleteMultipartUpload of a large one), so there is no temp name to rename;
  a killed writer leaves the previous object. The filesystem is opened with
  `allow_delayed_open`, so an object under pyarrow's part size (10 MB) is one PutObject.
Several files that belong together (a checkpoint directory, a shard set) are complete only once
their marker file exists, written last, on disk and in a bucket alike (`rtrain.runs.checkpoint`).

A bucket has no directories: `is_dir` is true when some object's key starts with `PATH/`, and
`list_dir` lists the next level of key names.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from data_prep.atomic import write_bytes_atomic
from rtrain.errors import RtrainError

logger = logging.getLogger(__name__)

BUCKET_SCHEMES = ("s3",)
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


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


class StorageError(RtrainError, ValueError):
    """A location rtrain cannot use (an unsupported scheme, a malformed URI): one line naming it."""


def scheme(location: str | os.PathLike) -> str:
    """The URI scheme in lower case ("s3"), "file" for file://, "" for a plain path."""
    m = _URI.match(str(location))
    return m.group(1).lower() if m else ""


def is_bucket(location: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://...), False for local disk (plain path or file://)."""
    return scheme(location) in BUCKET_SCHEMES


def check(location: str | os.PathLike, what: str = "location") -> str:
    """`location` as a string, or StorageError (one line) when its scheme is not supported.

    `what` names the option in the message, e.g. "--storage" or "data.train".
    """
    text = str(location)
    kind = scheme(text)
    if kind and kind != "file" and kind not in BUCKET_SCHEMES:
        raise StorageError(f"{what} {text}: the {kind}:// scheme is not supported (use a local path, "
                           f"file://PATH or {', '.join(s + '://BUCKET/PATH' for s in BUCKET_SCHEMES)})")
    if kind in BUCKET_SCHEMES:
        bucket = _URI.match(text).group(2).split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{what} {text}: no bucket name (expected {kind}://BUCKET/PATH)")
    return text


def local_path(location: str | os.PathLike) -> Path | None:
    """The absolute local Path of a plain path or file:// URI; None for a bucket URI."""
    text = check(location)
    kind = scheme(text)
    if kind in BUCKET_SCHEMES:
        return None
    if kind == "file":
        text = _URI.match(text).group(2)
    return Path(text).expanduser().absolute()


def normalize(location: str | os.PathLike) -> str:
    """A form that means the same from any working directory: an absolute path, or the URI
    without trailing slashes."""
    path = local_path(location)
    return str(path) if path is not None else str(location).rstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a path or a URI (URIs join with "/")."""
    if not is_bucket(base):
        return str(Path(local_path(base), *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


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


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None):
    import pyarrow.fs as pafs

    kwargs = {"allow_delayed_open": True}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(location: str | os.PathLike, what: str = "location"):
    """(pyarrow FileSystem, path inside it) for `location`; StorageError for an unsupported scheme."""
    import pyarrow.fs as pafs

    text = check(location, what)
    if is_bucket(text):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(endpoint, region), _URI.match(text).group(2).rstrip("/")
    return pafs.LocalFileSystem(), str(local_path(text))


def _info(location):
    fs, path = filesystem(location)
    return fs, path, fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    """A file, a folder, or (in a bucket) a key prefix with objects under it."""
    return is_file(location) or is_dir(location)


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location)[2].type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location)[2].type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int:
    """The size in bytes of a file; FileNotFoundError naming `location` when there is none."""
    import pyarrow.fs as pafs

    info = _info(location)[2]
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "file not found", str(location))
    return int(info.size)


def mtime(location: str | os.PathLike) -> float | None:
    """Last modification time (seconds since the epoch) of a file; None when unknown or absent
    (a bucket "folder" has none)."""
    info = _info(location)[2]
    return info.mtime.timestamp() if info.mtime is not None else None


def list_dir(location: str | os.PathLike) -> list[str]:
    """The names (not paths) one level under `location`, sorted; [] when it is not a folder.

    Hidden temp files of unfinished local writes (`.NAME.*.tmp`) are left out.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except (NotADirectoryError, FileNotFoundError):
        return []
    names = {info.base_name for info in infos}
    return sorted(n for n in names if not (n.startswith(".") and n.endswith(".tmp")))


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError naming `location` when there is none."""
    fs, path = filesystem(location)
    if not is_file(location):
        raise FileNotFoundError(2, "file not found", str(location))
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write `data` atomically (see the module doc); returns `location` as a string.

    Local: temp + fsync + rename, folders made as needed, StorageFullError on a full disk.
    Bucket: one object upload, the old object stays until it completes.
    """
    text = check(location)
    if not is_bucket(text):
        atomic_write_bytes(local_path(text), data)
        return text
    fs, path = filesystem(text)
    with fs.open_output_stream(path) as fh:
        fh.write(data)
    return text


def remove(location: str | os.PathLike) -> None:
    """Delete a file if it is there (missing is fine)."""
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
