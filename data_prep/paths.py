"""Joining untrusted file names from annotation files onto an image root, safely."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path


class UnsafePathError(ValueError):
    """A file name from an annotation file that would leave the image root."""


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """`root / name` for a relative `name` that stays inside `root`.

    Refuses (UnsafePathError) empty names, absolute paths (also Windows drive or
    UNC forms), any `..` component and NUL bytes. Backslashes count as separators,
    since annotation tools on Windows write them. The check is on the name itself,
    not on resolved links: a dataset whose root holds symlinks still works.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"empty file name {name!r}")
    if "\0" in name:
        raise UnsafePathError(f"NUL byte in file name {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafePathError(f"absolute file name {name!r}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise UnsafePathError(f"file name {name!r} leaves the image root")
    return Path(root) / posixpath.join(*parts)
