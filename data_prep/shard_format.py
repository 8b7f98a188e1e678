"""The shard format in one place: the Parquet schema and the manifest.json reader.

Shared by the writer (data_prep.writer), the tools that read shards (data_prep.inspect,
--classes-from) and rtrain (rtrain.data.batches, rtrain.evaluation.coco, rtrain.runs.compare), so a
shard folder is checked by one set of rules with one set of messages. rtrain imports this module; it imports
nothing of rtrain.

    from data_prep.shard_format import SCHEMA, ShardError, check_schema, read_manifest
    manifest = read_manifest("data/bccd/train")    # dict; ShardError (one line) if unusable
    files = shard_files("s3://bucket/shards/train")  # sorted *.parquet URIs (or local paths)
    table = read_shard_table(files[0], columns=["image_id", "jpeg"])
    check_schema(pq.read_metadata(path).schema.to_arrow_schema(), path)

A shard folder is a local folder or a bucket prefix (s3://BUCKET/PATH, gs://BUCKET/PATH, through
data_prep.locations); every reader here takes either. manifest.json is the set's complete marker:
the writer writes it last, so a set without one is refused, never half read.

The schema and the manifest's fields are described in docs/design.md ("Contracts").
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import locations
from data_prep.records import DatasetError

MANIFEST = "manifest.json"
SHARD_GLOB = "*.parquet"

# What the writer writes. Readers accept the wider types of check_schema (int32 or int64 sizes,
# large strings/binaries/lists), which other Parquet writers may produce.
SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("jpeg", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("boxes", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int32())),
    ("iscrowd", pa.list_(pa.bool_())),
])
COLUMNS = SCHEMA.names


class ShardError(DatasetError, ValueError):
    """Shards or manifest unusable: one line naming the file and the fault."""


class ShardNotFoundError(ShardError, FileNotFoundError):
    """The shard folder or its manifest.json does not exist."""


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_int32(t) or pa.types.is_int64(t)


def _list_of(pred):
    return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pred(t.value_type)


# column -> (check, what it should be)
CHECKS = {
    "image_id": (pa.types.is_int64, "int64"),
    "file_name": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "jpeg": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary"),
    "width": (_is_int, "int32/int64"),
    "height": (_is_int, "int32/int64"),
    "orig_width": (_is_int, "int32/int64"),
    "orig_height": (_is_int, "int32/int64"),
    "boxes": (_list_of(pa.types.is_float32), "list<float32>"),
    "labels": (_list_of(pa.types.is_int32), "list<int32>"),
    "iscrowd": (_list_of(pa.types.is_boolean), "list<bool>"),
}


def check_schema(schema: pa.Schema, path: str | os.PathLike) -> None:
    """Raise ShardError naming `path` if a column of the shard schema is missing or mistyped."""
    missing = [name for name in CHECKS if schema.get_field_index(name) < 0]
    if missing:
        raise ShardError(f"{path}: not a shard: missing column(s) {', '.join(missing)}")
    for name, (ok, want) in CHECKS.items():
        got = schema.field(name).type
        if not ok(got):
            raise ShardError(f"{path}: column {name!r} is {got}, expected {want}")


def read_manifest_file(path: str | os.PathLike, require: tuple[str, ...] = ("classes",)) -> dict:
    """A manifest.json (a local path or a bucket URI) as a dict, with the keys `require` names present.

    When "classes" is required it must be a non-empty [{index, name, category_id}] with indices
    0..C-1 in order. One-line ShardError naming the file otherwise (ShardNotFoundError if absent).
    """
    name = locations.basename(path)
    if not locations.is_file(path):
        raise ShardNotFoundError(f"{path}: manifest not found (a shard set is complete only once "
                                 "python -m data_prep.shard has written it)")
    try:
        manifest = json.loads(locations.read_bytes(path).decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: unreadable manifest ({name}:{e.lineno}:{e.colno}: "
                         f"malformed JSON: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest: {str(e).splitlines()[0]}") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a shard manifest (a JSON {type(manifest).__name__}, not an object)")
    missing = [k for k in require if k not in manifest]
    if missing:
        raise ShardError(f"{path}: not a shard manifest (missing {', '.join(missing)})")
    if "classes" in require:
        classes = manifest["classes"]
        if not isinstance(classes, list) or not classes:
            raise ShardError(f"{path}: manifest has no 'classes' list")
        for i, c in enumerate(classes):
            if not isinstance(c, dict) or not {"index", "name", "category_id"} <= c.keys():
                raise ShardError(f"{path}: classes[{i}] needs index, name and category_id")
            if c["index"] != i:
                raise ShardError(f"{path}: classes[{i}] has index {c['index']}, expected {i} "
                                 "(contiguous 0..C-1)")
    return manifest


def read_manifest(shard_dir: str | os.PathLike, require: tuple[str, ...] = ("classes",)) -> dict:
    """`shard_dir`/manifest.json by `read_manifest_file`; ShardNotFoundError if the folder (or, in a
    bucket, the key prefix) is missing."""
    _check_location(shard_dir)
    if not locations.is_dir(shard_dir):
        raise ShardNotFoundError(f"{shard_dir}: shard directory not found (no {MANIFEST})")
    return read_manifest_file(_join(shard_dir, MANIFEST), require)


def shard_files(shard_dir: str | os.PathLike) -> list[str]:
    """The `*.parquet` files of `shard_dir`, sorted: local paths, or URIs for a bucket.

    Hidden names (writers' temp files) and `_`-names are left out. ShardError naming the folder
    when it is missing or holds none; the files themselves are not opened (see
    rtrain.data.batches.list_shards for the footer and schema checks).
    """
    _check_location(shard_dir)
    if not locations.is_dir(shard_dir):
        raise ShardNotFoundError(f"{shard_dir}: shard directory not found")
    names = [n for n in locations.list_dir(shard_dir)
             if fnmatch.fnmatch(n, SHARD_GLOB) and not n.startswith((".", "_"))]
    if not names:
        raise ShardError(f"{shard_dir}: no {SHARD_GLOB} shards")
    return [_join(shard_dir, n) for n in names]


def _check_location(location) -> None:
    try:
        locations.check(location, "shards")
    except locations.LocationError as e:
        raise ShardError(str(e)) from None


def _join(base, name: str) -> str:
    """`base/name`, spelled as `base` is (a relative local path stays relative)."""
    return locations.join(base, name) if locations.is_bucket(base) else str(Path(base, name))


def read_shard_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """One shard (a local path or a bucket URI) as a table; pyarrow's errors as they are."""
    if not locations.is_bucket(path):
        return pq.read_table(path, columns=columns)
    fs, inner = locations.filesystem(path)
    return pq.read_table(inner, columns=columns, filesystem=fs)


def read_shard_metadata(path: str | os.PathLike) -> pq.FileMetaData:
    """The Parquet footer of one shard (a local path or a bucket URI)."""
    if not locations.is_bucket(path):
        return pq.read_metadata(path)
    fs, inner = locations.filesystem(path)
    with fs.open_input_file(inner) as fh:
        return pq.read_metadata(fh)
