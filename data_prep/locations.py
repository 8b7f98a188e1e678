"""Local paths and bucket URIs behind one small API: the layer under `rtrain.storage`.

It lives in data_prep for the reason `data_prep.atomic` does: data_prep imports nothing of
rtrain, and both need it (`data_prep.shard --out s3://...` writes shards to a bucket, the shard
format's reader reads them from one). rtrain code uses `rtrain.storage`, which re-exports this
module with rtrain's error class; its docstring is the user-facing contract (schemes, settings,
what "atomic" means in a bucket).

    from data_prep import locations
    locations.check("s3://bucket/shards/train", "--out")   # LocationError (one line) if unsupported
    fs, path = locations.filesystem(uri)                   # (pyarrow FileSystem, path inside it)
    locations.write_bytes(uri, data); locations.read_bytes(uri); locations.list_dir(uri)

Schemes: a plain path or file://PATH is local disk; s3://BUCKET/KEY (pyarrow's S3FileSystem,
AWS_* settings) and gs://BUCKET/KEY (pyarrow's GcsFileSystem, see `_gcs`) are buckets; any
other scheme is refused with one line naming the location.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from data_prep.atomic import write_bytes_atomic
from data_prep.records import DatasetError

BUCKET_SCHEMES = ("s3", "gs")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
# GCS emulators: the Python client reads STORAGE_EMULATOR_HOST, google-cloud-cpp (inside pyarrow)
# CLOUD_STORAGE_EMULATOR_ENDPOINT; either points rtrain at one.
GCS_EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT")
# pyarrow's GCS client retries a failing request for 15 minutes by default (a missing credential
# included); S3's gives up after 3 attempts. Bounded here so a bad setting is an error, not a hang.
GCS_RETRY_S = 20.0


class LocationError(DatasetError, ValueError):
    """A location that cannot be used (an unsupported scheme, a URI without a bucket): one line."""


def scheme(location: str | os.PathLike) -> str:
    """The URI scheme in lower case ("s3"), "file" for file://, "" for a plain path."""
    m = _URI.match(str(location))
    return m.group(1).lower() if m else ""


def is_bucket(location: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://..., gs://...), False for local disk."""
    return scheme(location) in BUCKET_SCHEMES


def check(location: str | os.PathLike, what: str = "location") -> str:
    """`location` as a string, or LocationError (one line) when its scheme is not supported.

    `what` names the option in the message, e.g. "--out" or "data.train".
    """
    text = str(location)
    kind = scheme(text)
    if kind and kind != "file" and kind not in BUCKET_SCHEMES:
        raise LocationError(f"{what} {text}: the {kind}:// scheme is not supported (use a local path, "
                            f"file://PATH or {', '.join(s + '://BUCKET/PATH' for s in BUCKET_SCHEMES)})")
    if kind in BUCKET_SCHEMES:
        bucket = _URI.match(text).group(2).split("/", 1)[0]
        if not bucket:
            raise LocationError(f"{what} {text}: no bucket name (expected {kind}://BUCKET/PATH)")
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


def basename(location: str | os.PathLike) -> str:
    """The last name of a path or URI ("manifest.json")."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None):
    import pyarrow.fs as pafs

    # allow_delayed_open: an object under pyarrow's part size (10 MB) is one PutObject.
    kwargs = {"allow_delayed_open": True}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@lru_cache(maxsize=8)
def _gcs(emulator: str | None):
    """Real GCS with the default Google credentials, or (`emulator` = http://HOST:PORT) an
    emulator such as fake-gcs-server, anonymously."""
    from datetime import timedelta

    import pyarrow.fs as pafs

    retry = {"retry_time_limit": timedelta(seconds=GCS_RETRY_S)}
    if not emulator:
        return pafs.GcsFileSystem(**retry)
    url = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
    return pafs.GcsFileSystem(anonymous=True, scheme=url.scheme or "http", endpoint_override=url.netloc,
                              **retry)


def filesystem(location: str | os.PathLike, what: str = "location"):
    """(pyarrow FileSystem, path inside it) for `location`; LocationError for an unsupported scheme.

    S3 settings come from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_REGION /
    AWS_DEFAULT_REGION (credentials as every AWS client finds them); GCS from the default Google
    credentials, or an emulator named by STORAGE_EMULATOR_HOST / CLOUD_STORAGE_EMULATOR_ENDPOINT.
    """
    import pyarrow.fs as pafs

    text = check(location, what)
    kind = scheme(text)
    inner = _URI.match(text).group(2).rstrip("/") if kind in BUCKET_SCHEMES else ""
    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(endpoint, region), inner
    if kind == "gs":
        emulator = next((os.environ[v] for v in GCS_EMULATOR_VARS if os.environ.get(v)), None)
        return _gcs(emulator), inner
    return pafs.LocalFileSystem(), str(local_path(text))


def _info(location):
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    """A file, a folder, or (in a bucket) a key prefix with objects under it."""
    return is_file(location) or is_dir(location)


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int:
    """The size in bytes of a file; FileNotFoundError naming `location` when there is none."""
    import pyarrow.fs as pafs

    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "file not found", str(location))
    return int(info.size)


def mtime(location: str | os.PathLike) -> float | None:
    """Last modification time (seconds since the epoch) of a file; None when unknown or absent
    (a bucket "folder" has none)."""
    info = _info(location)
    return info.mtime.timestamp() if info.mtime is not None else None


def list_dir(location: str | os.PathLike) -> list[str]:
    """The names (not paths) one level under `location`, sorted; [] when it is not a folder.

    Hidden temp files of unfinished local writes (`.NAME.*.tmp`) are left out.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    # pyarrow 26's GCS listing leaves out "folders" that are only key prefixes (no marker object;
    # checked against fake-gcs-server, whose reply does hold them): list all keys under a gs://
    # path and keep the first name of each.
    deep = scheme(location) == "gs"
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=deep))
    except (NotADirectoryError, FileNotFoundError):
        return []
    if deep:
        names = {info.path[len(path):].lstrip("/").split("/", 1)[0] for info in infos}
        names.discard("")
    else:
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
    """Write `data` whole or not at all; returns `location` as a string.

    Local: `data_prep.atomic` (temp name, fsync, rename; folders made as needed). Bucket: one
    object upload of bytes already complete, so the object appears only with all of them (an
    upload cut short leaves the previous object, or none).
    """
    text = check(location)
    if not is_bucket(text):
        write_bytes_atomic(local_path(text), data)
        return text
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"{text}: write_bytes takes bytes, not {type(data).__name__}")
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
