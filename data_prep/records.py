"""What every source-format reader yields, and what the shard writer consumes.

A reader (one module per format) turns its annotation files into a stream of
`SourceImage` records, in a deterministic order, plus the list of classes. It
never decodes images: the writer does that in parallel. Problems a reader finds
in annotations (unknown category, duplicate image id, path escaping the root, a
malformed per-image XML file or label line...) are reported as `Issue`s, never
raised: one bad annotation costs that box or that image, not the run. Only a
fault in a file the whole dataset depends on (a COCO instances JSON, a YOLO
data.yaml, a class list, a split file's header) or an empty dataset raises
`DatasetError`, before anything is written.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


class DatasetError(Exception):
    """The input as a whole cannot be read: one line naming the file (and line) and the fault."""


@dataclass(frozen=True)
class ClassInfo:
    """One class of the output: contiguous `index` 0..C-1, its `name`, and its id in the source.

    `category_id` is the integer id evaluation reports (COCO's own category id for
    COCO input, index + 1 for formats that have no numeric ids).
    """

    index: int
    name: str
    category_id: int


@dataclass
class Issue:
    """One skipped or repaired item, listed in the manifest.

    `file` and `line` say where in the annotations the fault is (the XML, label
    or CSV file, relative to the dataset root where it is under it, and its
    1-based line) when the reader knows; they are left out of the manifest when unset.
    """

    item: str  # file name or annotation id the fault belongs to
    reason: str  # short and fixed (the manifest counts by it): e.g. "missing image file"
    action: str  # "skipped" (a whole image) | "repaired" | "dropped" (one box or annotation)
    detail: str = ""  # optional specifics (the exception text, the clipped values...)
    file: str = ""  # the annotation file holding the fault
    line: int = 0  # its line in `file` (0: unknown or not line-based)

    def to_dict(self) -> dict:
        d = {"item": self.item, "reason": self.reason, "action": self.action}
        if self.detail:
            d["detail"] = self.detail
        if self.file:
            d["file"] = self.file
        if self.line:
            d["line"] = self.line
        return d


@dataclass
class SourceImage:
    """One image as its annotations describe it, before decoding.

    boxes: [x1, y1, x2, y2] in the original image's pixels, as annotated (the
    writer clips, drops degenerate boxes and applies EXIF orientation).
    labels: class indices (ClassInfo.index), one per box.
    """

    image_id: int
    file_name: str  # relative to the image root, as stored in the shard
    path: str  # absolute path of the image file (already checked to be inside the root)
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    iscrowd: list[bool] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)  # annotation-level faults found by the reader


# What a reader returns. The stream holds SourceImages in a deterministic order;
# a bare Issue in the stream reports something that has no record of its own (an
# image the reader skipped, an annotation pointing at no image). `source` is a
# JSON-able dict that identifies the input (paths, file sizes/hashes, options):
# it goes into the manifest, and a rerun into the same --out must give the same.
ReadResult = tuple[list[ClassInfo], Iterator["SourceImage | Issue"], dict]

# A reader takes the parsed CLI arguments of `python -m data_prep.shard` and raises
# DatasetError (one line, naming the file) before returning if the input is unusable.
Reader = Callable[[argparse.Namespace], ReadResult]
