"""What `predict --source` points at: one image, a folder of images, a glob, or a shard folder.

    src = resolve_source("photos/")       # Source(kind="images", items=[ImageItem(id, name, path)...])
    src = resolve_source("data/val")      # has manifest.json: Source(kind="shards", shard_dir=...)

Image ids are 1..N in sorted path order; `name` is the path relative to the folder (or the file
name for single files and globs) and is what the predictions JSON maps to the id.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from rtrain.errors import RtrainError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MANIFEST = "manifest.json"


class SourceError(RtrainError, ValueError):
    """Nothing usable at --source: one line naming the path."""


@dataclass(frozen=True)
class ImageItem:
    id: int
    name: str  # relative name, unique within the source
    path: str


@dataclass
class Source:
    kind: str  # "images" or "shards"
    items: list[ImageItem] = field(default_factory=list)
    shard_dir: Path | None = None
    num_images: int = 0


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _items(paths: list[Path], root: Path | None) -> list[ImageItem]:
    paths = sorted(paths, key=str)
    names, items = set(), []
    for i, p in enumerate(paths, start=1):
        name = str(p.relative_to(root)) if root is not None else p.name
        if name in names:  # a glob over several folders: keep names unique
            alt = f"{p.parent.name}_{p.name}"
            name = alt if alt not in names else f"{i}_{p.name}"
        names.add(name)
        items.append(ImageItem(id=i, name=name, path=str(p)))
    return items


def resolve_source(source: str | os.PathLike) -> Source:
    """Classify `source` and list its images (or shard rows). SourceError if it holds none."""
    text = str(source)
    p = Path(text).expanduser()
    if p.is_file():
        if not _is_image(p):
            raise SourceError(f"{p}: not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        return Source("images", _items([p], None), num_images=1)
    if p.is_dir():
        if (p / MANIFEST).is_file():
            import pyarrow.parquet as pq

            from rtrain.data.batches import ShardError, list_shards

            try:
                files = list_shards(p)
            except ShardError as exc:
                raise SourceError(str(exc)) from None
            rows = sum(pq.read_metadata(f).num_rows for f in files)
            if rows == 0:
                raise SourceError(f"{p}: the shards hold no images")
            return Source("shards", shard_dir=p, num_images=rows)
        found = [q for q in p.rglob("*") if q.is_file() and _is_image(q)]
        if not found:
            raise SourceError(f"{p}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
        return Source("images", _items(found, p), num_images=len(found))
    if glob.has_magic(text):
        found = [Path(q) for q in glob.glob(os.path.expanduser(text), recursive=True)]
        found = [q for q in found if q.is_file() and _is_image(q)]
        if not found:
            raise SourceError(f"{text}: no images match this pattern")
        return Source("images", _items(found, None), num_images=len(found))
    raise SourceError(f"{p}: no such file or folder")
