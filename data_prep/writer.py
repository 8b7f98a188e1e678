"""Stream reader records into Parquet shards in parallel, resumably, and write the manifest.

Flow: the reader's stream is cut, in its own order, into chunks of `rows_per_shard`
images (chunk k -> `part-{k:05d}.parquet`). Each chunk is split into small batches
that a process pool decodes/resizes/encodes (imaging.convert); the main process
only collects a finished chunk's rows, writes the shard to a temp name, renames it,
then writes `_stats/part-k.json` (counts + issues) the same way. A bounded window
of batches in flight keeps memory flat whatever the dataset size.

A rerun skips every chunk whose stats file exists with the same fingerprint
(source + options + classes) and the same digest of its input records, so a run
cut short by Ctrl-C or a kill continues where it stopped and ends with the same
shards and manifest. A folder made with other options or from another source is
refused, never mixed. manifest.json is written last: it is the set's complete marker.

`out` may be a bucket prefix (s3://BUCKET/PATH, gs://BUCKET/PATH; data_prep.locations) with the
same rules: each shard is serialised in memory and uploaded as one object once it is whole (an
object appears only when its upload completes, so there is no temp name to rename), then its
stats object, and manifest.json last. A run killed or failed part-way leaves whole shards and no
manifest, which every reader refuses; the same command continues it.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import imaging, locations
from data_prep.atomic import atomic_file
from data_prep.manifest import build_manifest, shard_stats, write_json_atomic
from data_prep.records import ClassInfo, DatasetError, Issue, SourceImage
from data_prep.shard_format import MANIFEST, SCHEMA

log = logging.getLogger(__name__)

_COMPRESSION = {n: ("NONE" if n == "jpeg" else "snappy") for n in SCHEMA.names}
CONFIG_NAME = "_shard_config.json"
STATS_DIR = "_stats"  # pyarrow and Ray Data skip names starting with "_" or "."
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


@dataclass
class Options:
    """What decides the output bytes (all in the fingerprint) plus how to run (workers, batch)."""

    size: int = 640
    rows_per_shard: int = 1000
    quality: int = imaging.JPEG_QUALITY
    classes_from: str | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch: int = 8  # images per pool task

    def fingerprinted(self) -> dict:
        return {"size": self.size, "rows_per_shard": self.rows_per_shard, "jpeg_quality": self.quality,
                "classes_from": self.classes_from}


@dataclass
class _Chunk:
    index: int
    records: list[SourceImage] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)  # reader issues with no record of their own

    def digest(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.image_id, r.file_name, r.boxes, r.labels, r.iscrowd,
                                 [i.to_dict() for i in r.issues]]).encode())
        h.update(json.dumps([i.to_dict() for i in self.issues]).encode())
        return h.hexdigest()


def remap_classes(
    stream: Iterable[SourceImage | Issue], classes: list[ClassInfo], frozen: list[ClassInfo]
) -> Iterator[SourceImage | Issue]:
    """Relabel records from the reader's class list onto `frozen` (matched by name).

    A box whose class is not in `frozen` is dropped and listed.
    """
    by_name = {c.name: c.index for c in frozen}
    mapping = {c.index: by_name.get(c.name) for c in classes}
    names = {c.index: c.name for c in classes}
    for rec in stream:
        if isinstance(rec, Issue):
            yield rec
            continue
        boxes, labels, crowd, issues = [], [], [], list(rec.issues)
        for i, (b, lab, cr) in enumerate(zip(rec.boxes, rec.labels, rec.iscrowd, strict=True)):
            new = mapping.get(lab)
            if new is None:
                issues.append(Issue(f"{rec.file_name} box {i}", "class not in --classes-from list", "dropped",
                                    names.get(lab, str(lab))))
                continue
            boxes.append(b)
            labels.append(new)
            crowd.append(cr)
        yield replace(rec, boxes=boxes, labels=labels, iscrowd=crowd, issues=issues)


def _chunks(stream: Iterable[SourceImage | Issue], rows: int, num_classes: int) -> Iterator[_Chunk]:
    """Cut the stream into chunks of `rows` records; trailing bare issues stay with the chunk before."""
    chunk = _Chunk(0)
    for item in stream:
        if isinstance(item, Issue):
            chunk.issues.append(item)
            continue
        if len(chunk.records) == rows:
            yield chunk
            chunk = _Chunk(chunk.index + 1)
        bad = [lab for lab in item.labels if not 0 <= lab < num_classes]
        if bad:  # readers must drop unknown classes themselves; this is a reader bug
            raise DatasetError(f"{item.file_name}: label {bad[0]} outside 0..{num_classes - 1} (reader bug)")
        chunk.records.append(item)
    yield chunk


def _at(out: Path | str, *parts: str) -> Path | str:
    """`out/part/...`: a Path on disk, a URI string in a bucket."""
    return locations.join(out, *parts) if locations.is_bucket(out) else Path(out, *parts)


def _prepare_out(out: Path | str, fingerprint: str, summary: dict) -> None:
    """Create `out`, refuse one that holds another dataset's shards, clean stale temp files."""
    if not locations.is_bucket(out):
        out.mkdir(parents=True, exist_ok=True)
        (out / STATS_DIR).mkdir(exist_ok=True)
    config = _at(out, CONFIG_NAME)
    if locations.is_file(config):
        try:
            old = json.loads(locations.read_bytes(config)).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            old = None
        if old != fingerprint:
            raise DatasetError(f"{out}: holds shards made from another source or with other options; "
                               "use another --out or empty it")
    elif any(_PART.match(n) for n in locations.list_dir(out)) or locations.is_file(_at(out, MANIFEST)):
        raise DatasetError(f"{out}: holds shards of unknown origin (no {CONFIG_NAME}); "
                           "use another --out or empty it")
    else:
        write_json_atomic(config, {"fingerprint": fingerprint, **summary})
    if locations.is_bucket(out):
        return  # a bucket has no temp names: an unfinished upload is no object
    for folder in (out, out / STATS_DIR):
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink()


def _offsets(lengths: list[int]) -> pa.Buffer:
    return pa.py_buffer(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _column(field: pa.Field, values: list) -> pa.Array:
    """One column from Python values, built from buffers.

    pa.array() imports pandas on first use (a second or more of every run's time), so
    the arrays are assembled from numpy buffers instead.
    """
    t, n = field.type, len(values)
    if pa.types.is_integer(t):
        return pa.Array.from_buffers(t, n, [None, pa.py_buffer(np.asarray(values, t.to_pandas_dtype()))])
    if pa.types.is_binary(t) or pa.types.is_string(t):
        data = [v.encode() if isinstance(v, str) else v for v in values]
        buffers = [None, _offsets([len(d) for d in data]), pa.py_buffer(b"".join(data))]
        return pa.Array.from_buffers(t, n, buffers)
    if pa.types.is_list(t):
        flat = [x for v in values for x in v]
        vt = t.value_type
        if pa.types.is_boolean(vt):
            bits = np.packbits(np.asarray(flat, dtype=bool), bitorder="little")
            child = pa.Array.from_buffers(vt, len(flat), [None, pa.py_buffer(bits)])
        else:
            data = pa.py_buffer(np.asarray(flat, vt.to_pandas_dtype()))
            child = pa.Array.from_buffers(vt, len(flat), [None, data])
        return pa.Array.from_buffers(t, n, [None, _offsets([len(v) for v in values])], children=[child])
    raise TypeError(f"no column builder for {t}")


def _write_parquet_atomic(path: Path | str, rows: list[dict]) -> None:
    """One shard, whole or not at all: on disk a temp name renamed; in a bucket the finished file's
    bytes as one upload (never a stream into the bucket, whose close would publish a part)."""
    table = pa.Table.from_arrays([_column(f, [r[f.name] for r in rows]) for f in SCHEMA], schema=SCHEMA)
    # JPEG bytes are compressed already: snappy and dictionary tries on them only cost time.
    how = {"row_group_size": 256, "compression": _COMPRESSION,
           "use_dictionary": [n for n in SCHEMA.names if n != "jpeg"]}
    if locations.is_bucket(path):
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, **how)
        locations.write_bytes(path, memoryview(buf.getvalue()))
        return
    with atomic_file(path) as f:
        pq.write_table(table, f, **how)


class _ShardSink:
    """Collects a chunk's converted rows (from any batch order) and writes the shard when complete."""

    def __init__(self, out: Path | str, fingerprint: str, num_classes: int):
        self.out, self.fingerprint, self.num_classes = out, fingerprint, num_classes
        self.pending: dict[int, tuple[_Chunk, str, list, int]] = {}  # index -> chunk, digest, slots, left
        self.stats: dict[int, dict] = {}

    def open(self, chunk: _Chunk, digest: str, batches: int) -> None:
        self.pending[chunk.index] = (chunk, digest, [None] * len(chunk.records), batches)

    def add(self, index: int, start: int, results: list) -> None:
        chunk, digest, slots, left = self.pending[index]
        slots[start:start + len(results)] = results
        left -= 1
        self.pending[index] = (chunk, digest, slots, left)
        if left == 0:
            del self.pending[index]
            self.finish(chunk, digest, slots)

    def finish(self, chunk: _Chunk, digest: str, results: list) -> None:
        rows, issues = [], list(chunk.issues)
        for rec, (row, row_issues) in zip(chunk.records, results, strict=True):
            issues.extend(rec.issues)
            issues.extend(row_issues)
            if row is not None:
                rows.append(row)
        name = f"part-{chunk.index:05d}.parquet"
        if rows:
            _write_parquet_atomic(_at(self.out, name), rows)
        stats = shard_stats(rows, issues, self.num_classes)
        stats.update(file=name, fingerprint=self.fingerprint, digest=digest)
        write_json_atomic(_at(self.out, STATS_DIR, f"part-{chunk.index:05d}.json"), stats)
        self.stats[chunk.index] = stats
        log.info("wrote %s: %d rows, %d issues", name, len(rows), len(issues))


def _finished_stats(out: Path | str, chunk: _Chunk, digest: str, fingerprint: str) -> dict | None:
    """The saved stats of a chunk a previous run finished, None if it must be (re)done."""
    path = _at(out, STATS_DIR, f"part-{chunk.index:05d}.json")
    try:
        stats = json.loads(locations.read_bytes(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if stats.get("fingerprint") != fingerprint or stats.get("digest") != digest:
        raise DatasetError(f"{out}: part-{chunk.index:05d} was made from different input records; "
                           "use another --out or empty it")
    if stats["rows"] and not locations.is_file(_at(out, stats["file"])):
        return None
    return stats


def start_pool(workers: int) -> cf.ProcessPoolExecutor | None:
    """A started pool of `workers` decode processes (None for workers <= 1: work inline).

    forkserver: workers fork from a small clean server that has imported PIL once (no
    copy of the parent's annotation set, no threads inherited from pyarrow). A no-op
    per worker makes them all start now, so they boot while the reader parses.
    """
    if workers <= 1:
        return None
    ctx = mp.get_context("forkserver")
    # "__main__" too: the server imports the main module once and every worker inherits it,
    # instead of each worker importing it (and its imports) again at start.
    ctx.set_forkserver_preload(["__main__", "data_prep.imaging"])
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                  initializer=imaging.watch_parent, initargs=(os.getpid(),))
    for _ in range(workers):
        pool.submit(int)
    return pool


def write_dataset(
    classes: list[ClassInfo],
    stream: Iterable[SourceImage | Issue],
    source: dict,
    out: str | os.PathLike,
    opts: Options,
    frozen_classes: list[ClassInfo] | None = None,
    pool: cf.Executor | None = None,
) -> dict:
    """Write every record of `stream` into Parquet shards under `out` (a folder or a bucket
    prefix, see the module doc); return the manifest dict.

    `classes`/`stream`/`source` are what a reader returned. With `frozen_classes`
    (another manifest's class list) labels are remapped onto it by name. `pool`: a
    started pool (start_pool) the caller owns; without it one is made and shut down here.
    Raises DatasetError (one line) for an empty dataset, an `out` holding other shards or with an
    unsupported scheme.
    """
    out = locations.check(out, "--out")
    if locations.is_bucket(out):
        out = out.rstrip("/")
    else:  # a relative folder stays relative in messages
        out = locations.local_path(out) if locations.scheme(out) == "file" else Path(out)
    if opts.size < 1 or opts.rows_per_shard < 1:
        raise DatasetError(f"--size and --rows-per-shard must be positive (got {opts.size}, "
                           f"{opts.rows_per_shard})")
    if frozen_classes is not None:
        stream = remap_classes(stream, classes, frozen_classes)
        classes = frozen_classes
    stream = iter(stream)
    head: list[SourceImage | Issue] = []
    for item in stream:  # find the first image before anything is written
        head.append(item)
        if isinstance(item, SourceImage):
            break
    if not any(isinstance(i, SourceImage) for i in head):
        where = source.get("annotations") or source.get("root") or "input"
        raise DatasetError(f"{where}: empty dataset, no usable images ({len(head)} skipped)")
    fp_obj = {"source": source, "options": opts.fingerprinted(),
              "classes": [[c.index, c.name, c.category_id] for c in classes]}
    fingerprint = hashlib.sha256(json.dumps(fp_obj, sort_keys=True).encode()).hexdigest()
    _prepare_out(out, fingerprint, fp_obj)

    sink = _ShardSink(out, fingerprint, len(classes))
    own_pool = pool is None
    window = max(2, opts.workers) * 3
    futures: dict[cf.Future, tuple[int, int]] = {}

    def drain(until: int) -> None:
        while len(futures) > until:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                index, start = futures.pop(fut)
                sink.add(index, start, fut.result())

    n_chunks = 0
    try:
        for chunk in _chunks(_chain(head, stream), opts.rows_per_shard, len(classes)):
            n_chunks += 1
            digest = chunk.digest()
            done_stats = _finished_stats(out, chunk, digest, fingerprint)
            if done_stats is not None:
                sink.stats[chunk.index] = done_stats
                continue
            if not chunk.records:  # only skipped items: stats, no shard
                sink.finish(chunk, digest, [])
                continue
            starts = list(range(0, len(chunk.records), opts.batch))
            sink.open(chunk, digest, len(starts))
            for start in starts:
                batch = chunk.records[start:start + opts.batch]
                if pool is None and own_pool and opts.workers > 1:
                    pool = start_pool(opts.workers)
                if pool is None:
                    sink.add(chunk.index, start, imaging.convert_batch(batch, opts.size, opts.quality))
                    continue
                drain(window - 1)
                fut = pool.submit(imaging.convert_batch, batch, opts.size, opts.quality)
                futures[fut] = (chunk.index, start)
        drain(0)
    finally:
        for fut in futures:
            fut.cancel()
        if own_pool and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    extra = [n for n in locations.list_dir(out) if (m := _PART.match(n)) and int(m.group(1)) >= n_chunks]
    if extra:
        raise DatasetError(f"{out}: holds shards this input does not make ({extra[0]}); "
                           "use another --out or empty it")
    stats = [sink.stats[k] for k in range(n_chunks)]
    manifest = build_manifest(classes, stats, source, opts.fingerprinted(), fingerprint)
    if manifest["counts"]["images"] == 0:
        raise DatasetError(f"{out}: no image could be used ({manifest['counts']['skipped_images']} skipped)")
    write_json_atomic(_at(out, MANIFEST), manifest)  # last: the set's complete marker
    return manifest


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest
