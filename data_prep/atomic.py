"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

    from data_prep.atomic import atomic_file, atomic_path, write_bytes_atomic, write_text_atomic
    write_text_atomic(run / "config.yaml", text)
    with atomic_file(out / "part-00000.parquet") as fh:   # for writers that want a file object
        pq.write_table(table, fh)
    with atomic_path(out / "model.onnx") as tmp:           # for writers that want a file name
        torch.onnx.export(model, args, str(tmp))

The data is written to a hidden temp name in the same folder (`.<name>.<random>.tmp`, which
shard listings and Ray Data skip), flushed and fsynced (unless durable=False), then renamed over
the final name with os.replace. On any error, KeyboardInterrupt included, the temp file is
removed and the final name is left as it was. The new file gets the permissions a plain open()
would give it (0666 less the umask), not mkstemp's 0600.

This module is in data_prep because data_prep must not import rtrain; rtrain uses it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    """The process umask; read from /proc where it can be (os.umask alone must set it to read it,
    which briefly changes it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a hidden temp path beside `path`; on a clean exit fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, _FILE_MODE)
        os.close(fd)
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                durable: bool = True) -> Iterator[IO]:
    """Yield a file object open on a hidden temp name; on a clean exit flush, fsync and rename it."""
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, durable=False) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()
        if durable:
            os.fsync(fh.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    with atomic_file(path, "wb", durable=durable) as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      durable: bool = True) -> Path:
    with atomic_file(path, "w", encoding=encoding, durable=durable) as fh:
        fh.write(text)
    return Path(path)
