"""The shard format in one place: the Parquet schema and the manifest.json reader.

Shared by the writer (data_prep.writer), the tools that read shards (data_prep.inspect,
--classes-from) and rtrain (rtrain.data.batches, rtrain.evaluation.coco, rtrain.runs.compare), so a
shard folder is checked by one set of rules with one set of messages. rtrain imports this module; it imports
nothing of rtrain.

    from data_prep.shard_format import SCHEMA, ShardError, check_schema, read_manifest
    manifest = read_manifest("data/bccd/train")    # dict; ShardError (one line) if unusable
    check_schema(pq.read_metadata(path).schema.to_arrow_schema(), path)

The schema and the manifest's fields are described in docs/design.md ("Contracts").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

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
    """A manifest.json as a dict, with the keys `require` names present.

    When "classes" is required it must be a non-empty [{index, name, category_id}] with indices
    0..C-1 in order. One-line ShardError naming the file otherwise (ShardNotFoundError if absent).
    """
    path = Path(path)
    if not path.is_file():
        raise ShardNotFoundError(f"{path}: manifest not found (write shards with python -m data_prep.shard)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: unreadable manifest ({path.name}:{e.lineno}:{e.colno}: "
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
    """`shard_dir`/manifest.json by `read_manifest_file`; ShardNotFoundError if the folder is missing."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise ShardNotFoundError(f"{shard_dir}: shard directory not found (no {MANIFEST})")
    return read_manifest_file(shard_dir / MANIFEST, require)
