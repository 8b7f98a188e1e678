"""Pascal VOC XML (and its common variants) -> SourceImage stream.

Layout under `--root`: an annotation folder (Annotations/, annotations/, ...) of
one XML per image and an image folder (JPEGImages/, images/, ...). Folders with
other names are named with `--annotations DIR` and `--images DIR` (absolute, from
the working directory, or under --root); given both, --root may be left out. The image is
found by the XML's <filename> (else its stem) under the image folder; stale
<path>/<folder> fields are ignored. `--split-file` selects and orders the images:
a .txt of ids (first word per line, as ImageSets/Main/*.txt) or a .csv with a
`filename` column (as raccoon's splits/*.csv, one row per box; a row without a
filename is skipped and listed). Without it, every XML, sorted by name.

Faults: a malformed or unreadable XML file skips its image (listed with the file
and line); an object with an unknown name or a bndbox that is not four finite
numbers is dropped. Only an unusable split file, or no readable XML at all, stops
the run.

Classes: `--classes a,b,c` in that order, else every name seen, sorted;
category_id = index + 1. <difficult>1</difficult> boxes are kept with iscrowd=True
(both mean "do not count against the detector" in evaluation). Image ids are
1..N in the stream's order.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from data_prep.paths import UnsafePathError, safe_join
from data_prep.records import ClassInfo, DatasetError, Issue, ReadResult, SourceImage

log = logging.getLogger(__name__)

FLAGS = ("--root DIR, --annotations DIR (XML folder, default: guessed under --root), --images DIR "
         "(default: guessed under --root), --split-file F (.txt of ids or .csv with a filename column), "
         "--classes a,b,c")
ANNOTATION_DIRS = ("Annotations", "annotations", "Annotation", "annotation", "xml", "labels")
IMAGE_DIRS = ("JPEGImages", "images", "Images", "JPEGimages", "imgs", "img")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".webp")


def _find_dir(root: Path, names: tuple[str, ...], what: str, flag: str) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise DatasetError(f"{root}: no {what} folder (looked for {', '.join(names)}); "
                       f"name yours with {flag} DIR")


def _named_dir(value: str, root: Path | None, flag: str) -> Path:
    """The folder a user named with `flag`: as given (absolute or from the working directory), else
    under --root; DatasetError naming the flag when it is no folder."""
    path = Path(value)
    if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
        path = root / path
    if not path.is_dir():
        raise DatasetError(f"{flag} {value}: no such folder")
    return path.resolve()


def read_split(path: Path, issues: list[Issue] | None = None) -> list[str]:
    """Image ids (file stems) listed by a split file, first occurrence order, no repeats.

    A CSV row without a filename raises DatasetError naming file:line, or, given `issues`, is
    appended there (skipped, with its file and line) and the rest is read.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such split file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read split file ({e})") from None
    ids: list[str] = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        try:
            header = [h.strip().lower() for h in next(reader)]
            col = header.index("filename")
        except (StopIteration, ValueError):
            raise DatasetError(f"{path}:1: CSV split file has no 'filename' column") from None
        for row in reader:
            if not row:
                continue
            if len(row) <= col or not row[col].strip():
                if issues is None:
                    raise DatasetError(f"{path}:{reader.line_num}: row has no filename")
                issues.append(Issue(f"{path.name}:{reader.line_num}", "split row without filename", "skipped",
                                    ",".join(row)[:80], file=path.name, line=reader.line_num))
                continue
            ids.append(Path(row[col].strip().replace("\\", "/")).stem)
    else:
        for line in text.splitlines():
            if line.strip():
                ids.append(line.split()[0])
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise DatasetError(f"{path}: split file lists no images")
    return ids


class XMLFault(DatasetError):
    """One annotation XML that cannot be parsed: `path`, `line` (0 if unknown) and the fault."""

    def __init__(self, path: Path, line: int, col: int, fault: str):
        where = f"{path}:{line}:{col}" if line else str(path)
        super().__init__(f"{where}: {fault}")
        self.path, self.line, self.fault = path, line, fault


def parse_xml(path: Path) -> tuple[str | None, list[tuple[str, list[float] | None, bool]]]:
    """(<filename> or None, [(class name, [x1,y1,x2,y2] or None if malformed, difficult)]).

    Raises XMLFault (a DatasetError naming file:line:col) for a file that is not
    well-formed XML or cannot be read; `read` turns it into a skipped image.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise XMLFault(path, line, col, f"malformed XML: {str(e).split(':')[0]}") from None
    except OSError as e:
        raise XMLFault(path, 0, 0, f"cannot read ({e.strerror})") from None
    fname = (root.findtext("filename") or "").strip() or None
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            box = None
        if box is not None and not all(math.isfinite(v) for v in box):
            box = None  # nan / inf
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
        objects.append((name, box, difficult))
    return fname, objects


def read(args: argparse.Namespace) -> ReadResult:
    """Reader for `--format voc --root DIR [--annotations DIR] [--images DIR] [--split-file F]
    [--classes a,b,c]` (see FLAGS)."""
    ann_arg, img_arg = getattr(args, "annotations", None), getattr(args, "images", None)
    if getattr(args, "root", None):
        root = Path(args.root).resolve()
        if not root.is_dir():
            raise DatasetError(f"--root {args.root}: no such folder")
    elif ann_arg and img_arg:
        root = None
    else:
        raise DatasetError("--format voc needs --root DIR (or both --annotations DIR and --images DIR)")
    ann_dir = _named_dir(ann_arg, root, "--annotations") if ann_arg else _find_dir(
        root, ANNOTATION_DIRS, "annotation", "--annotations")
    img_dir = _named_dir(img_arg, root, "--images") if img_arg else _find_dir(
        root, IMAGE_DIRS, "image", "--images")
    if root is None:  # file names in the manifest are relative to the annotations' parent
        root = ann_dir.parent
    split = getattr(args, "split_file", None)
    split_path = None
    front: list[Issue] = []  # split-file rows skipped: listed first
    if split:
        split_path = Path(split) if Path(split).is_absolute() else root / split
        if not split_path.exists() and Path(split).exists():
            split_path = Path(split)
        ids = read_split(split_path.resolve(), front)
    else:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise DatasetError(f"{ann_dir}: no XML files: empty dataset "
                               "(name the folder of XML files with --annotations DIR)")

    # One pass over the XML, before anything is written. A malformed file costs its own
    # image only (listed as skipped, with its line); the rest of the dataset is sharded.
    parsed: list[tuple[str, tuple | XMLFault | None]] = []
    for stem in ids:
        xml = ann_dir / f"{stem}.xml"
        try:
            parsed.append((stem, parse_xml(xml) if xml.is_file() else None))
        except XMLFault as e:
            parsed.append((stem, e))

    given = None
    if getattr(args, "classes", None):
        given = [c.strip() for c in args.classes.split(",") if c.strip()]
    good = [p for _, p in parsed if isinstance(p, tuple)]
    if not good:
        first = next((p for _, p in parsed if isinstance(p, XMLFault)), None)
        raise DatasetError(f"{ann_dir}: no readable XML among the selected files"
                           + (f" (first: {first})" if first else ""))
    names = given or sorted({o[0] for p in good for o in p[1] if o[0]})
    if not names:
        raise DatasetError(f"{ann_dir}: no object names in the selected XML files")
    if len(set(names)) != len(names):
        raise DatasetError(f"--classes lists a name twice: {','.join(names)}")
    classes = [ClassInfo(i, n, i + 1) for i, n in enumerate(names)]
    h = hashlib.sha256()
    for stem, p in parsed:
        h.update(repr((stem, str(p) if isinstance(p, XMLFault) else p)).encode())
    source = {"format": "voc", "root": str(root), "annotations": str(ann_dir), "images": str(img_dir),
              "split_file": str(split_path.resolve()) if split_path else None,
              "classes": given, "xml_sha256": h.hexdigest()}
    return classes, _stream(parsed, ann_dir, img_dir, {n: i for i, n in enumerate(names)},
                                  root, front), source


def _image_path(img_dir: Path, stem: str, fname: str | None) -> Path | None:
    if fname:
        p = safe_join(img_dir, fname)
        if p.is_file():
            return p
        if not Path(fname).suffix:  # some tools write the stem only
            for ext in IMAGE_EXTS:
                if (q := p.with_name(p.name + ext)).is_file():
                    return q
    for ext in IMAGE_EXTS:
        if (q := img_dir / f"{stem}{ext}").is_file():
            return q
    return None


def _rel(path: Path, base: Path) -> str:
    """`path` relative to `base` when under it (as the manifest lists files), else absolute."""
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def _stream(parsed: list, ann_dir: Path, img_dir: Path, index: dict[str, int], root: Path,
            front: list[Issue]) -> Iterator:
    yield from front
    image_id = 0
    for stem, p in parsed:
        if p is None:
            yield Issue(stem, "annotation XML missing", "skipped", str(ann_dir / f"{stem}.xml"),
                        file=_rel(ann_dir / f"{stem}.xml", root))
            continue
        if isinstance(p, XMLFault):
            yield Issue(stem, "malformed annotation XML", "skipped", p.fault, file=_rel(p.path, root),
                        line=p.line)
            continue
        fname, objects = p
        try:
            path = _image_path(img_dir, stem, fname)
        except UnsafePathError as e:
            yield Issue(fname or stem, "file name escapes the image root", "skipped", str(e))
            continue
        if path is None:
            yield Issue(fname or stem, "missing image file", "skipped", f"not under {img_dir}")
            continue
        image_id += 1
        rec = SourceImage(image_id=image_id, file_name=path.relative_to(img_dir).as_posix(), path=str(path))
        xml = _rel(ann_dir / f"{stem}.xml", root)
        for i, (name, box, difficult) in enumerate(objects):
            item = f"{rec.file_name} object {i}"
            if name not in index:
                rec.issues.append(Issue(item, "unknown class name", "dropped", name or "(empty)", file=xml))
            elif box is None:
                rec.issues.append(Issue(item, "malformed bndbox", "dropped", file=xml))
            else:
                rec.boxes.append(box)
                rec.labels.append(index[name])
                rec.iscrowd.append(difficult)
        yield rec
