"""Reader for the ImageNet Object Localization Challenge layout (Kaggle's ILSVRC packaging).

    ROOT/LOC_synset_mapping.txt              "n01440764 tench, Tinca tinca", one synset a line
    ROOT/LOC_{train,val}_solution.csv        header "ImageId,PredictionString";
                                             rows "ImageId,syn x1 y1 x2 y2 syn x1 y1 x2 y2 ..."
    ROOT/ILSVRC/Data/CLS-LOC/train/<synset>/<ImageId>.JPEG
    ROOT/ILSVRC/Data/CLS-LOC/val/<ImageId>.JPEG
    ROOT/ILSVRC/Annotations/CLS-LOC/{train/<synset>,val}/<ImageId>.xml   (used when the CSV is absent)

Other folder names: `--images DIR` names the folder holding train/<synset>/ and
val/ (file names in the shards are then relative to ROOT when it is under it,
else to DIR), `--annotations` the split's solution CSV (any name) or XML folder.

Classes: one per mapping line, in file order; index = line index, category_id =
index + 1, name = the first name of the line ("tench"). ImageNet repeats a few
first names ("crane" is a bird and a machine): those get their synset appended,
"crane (n02012849)", so every name is unique.

The CSV is streamed line by line (the header is checked before `read` returns);
only the set of image ids already seen is kept, to catch duplicates. Rows are
emitted in file order. Boxes are pixel x1 y1 x2 y2 as given. A row with a token
count not a multiple of 5 or an unusable image id is skipped; a box with an
unknown synset or a non-numeric coordinate is dropped; an image left with no
box is skipped (ImageNet-LOC has no negative images: a row without boxes means
unlabelled, not empty). Each such Issue names `LOC_..._solution.csv:LINE` as its
item and carries `file` and `line`; a row whose bytes are not UTF-8 is a malformed
row like any other. With XML annotations instead, a file that is not well-formed
XML is skipped (file and line listed), its boxes checked as the CSV's are. Only
the synset mapping or an unusable CSV header stops the run.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from data_prep.records import ClassInfo, DatasetError, Issue, ReadResult, SourceImage

log = logging.getLogger(__name__)

HEADER = "ImageId,PredictionString"
_SYNSET = re.compile(r"^n\d{8}$")
_IMAGE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")  # ids become file names: no separators, no dots
DATA_DIR = "ILSVRC/Data/CLS-LOC"
XML_DIR = Path("ILSVRC/Annotations/CLS-LOC")


def read_synsets(path: Path) -> tuple[list[ClassInfo], dict[str, int]]:
    """Classes in mapping order and synset -> class index; DatasetError naming file:line on a fault."""
    synsets: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                synset, _, names = line.partition(" ")
                name = names.split(",")[0].strip()
                if not _SYNSET.match(synset) or not name:
                    raise DatasetError(f"{path}:{lineno}: expected 'nXXXXXXXX name, ...', got {line[:60]!r}")
                if synset in seen:
                    raise DatasetError(f"{path}:{lineno}: synset {synset} listed twice")
                seen.add(synset)
                synsets.append((synset, name))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not synsets:
        raise DatasetError(f"{path}: no synsets")
    counts: dict[str, int] = {}
    for _, name in synsets:
        counts[name] = counts.get(name, 0) + 1
    classes = [
        ClassInfo(i, name if counts[name] == 1 else f"{name} ({synset})", i + 1)
        for i, (synset, name) in enumerate(synsets)
    ]
    return classes, {synset: i for i, (synset, _) in enumerate(synsets)}


def image_file_name(image_id: str, split: str, data_dir: str = DATA_DIR) -> str:
    """Path of an image relative to ROOT (or `data_dir` absolute): train images sit in their synset's
    folder."""
    # Plain strings, not pathlib: this runs once per row of a 500k-row CSV.
    if split == "train":
        return f"{data_dir}/train/{image_id.split('_')[0]}/{image_id}.JPEG"
    return f"{data_dir}/{split}/{image_id}.JPEG"


def _image_ref(image_id: str, split: str, root: Path, data_dir: str) -> tuple[str, str]:
    """(file name as stored: relative to ROOT, or to the image folder outside it; absolute path)."""
    rel = image_file_name(image_id, split, data_dir)
    if data_dir == DATA_DIR or not Path(data_dir).is_absolute():
        return rel, f"{root}/{rel}"
    return rel[len(data_dir) + 1:], rel


def check_header(path: Path) -> None:
    """DatasetError unless the first line of the CSV is exactly the solution header."""
    try:
        with open(path, "rb") as f:  # the first line only: a bad byte in a later row is that row's fault
            header = f.readline().decode("utf-8-sig").strip()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason})") from None
    if header.replace(" ", "") != HEADER:
        raise DatasetError(f"{path}:1: expected header '{HEADER}', got {header[:60]!r}")


def _at(where: str) -> dict:
    """Issue(file=, line=) from a `name:LINE` or `path` location."""
    name, _, line = where.rpartition(":")
    return {"file": name, "line": int(line)} if line.isdigit() and name else {"file": where}


def _boxes(tokens: list[str], synsets: dict[str, int], where: str, rec: SourceImage) -> None:
    """Append each (synset x1 y1 x2 y2) group of `tokens` to `rec`, dropping bad groups as Issues."""
    for g in range(0, len(tokens), 5):
        synset, *coords = tokens[g:g + 5]
        if synset not in synsets:
            rec.issues.append(Issue(where, "unknown synset", "dropped", synset, **_at(where)))
            continue
        try:
            box = [float(v) for v in coords]
        except ValueError:
            box = [math.nan]
        if not all(math.isfinite(v) for v in box):
            rec.issues.append(Issue(where, "non-numeric box", "dropped", " ".join(tokens[g:g + 5]),
                                    **_at(where)))
            continue
        rec.boxes.append(box)
        rec.labels.append(synsets[synset])
        rec.iscrowd.append(False)


def _finish(rec: SourceImage, root: Path, where: str) -> Iterator[SourceImage | Issue]:
    """The record; or, when its image is missing or no box survived, the boxes' issues and the skip."""
    if not rec.boxes:
        yield from rec.issues
        yield Issue(where, "no valid boxes", "skipped", rec.file_name, **_at(where))
    elif not os.path.isfile(rec.path):
        yield from rec.issues
        yield Issue(rec.file_name, "missing image file", "skipped", where, **_at(where))
    else:
        yield rec


def _csv_records(
    path: Path, root: Path, split: str, synsets: dict[str, int], data_dir: str = DATA_DIR
) -> Iterator[SourceImage | Issue]:
    seen: set[str] = set()
    image_id = 0
    # surrogateescape: a row with bytes that are not UTF-8 fails the id / number checks
    # below and is skipped like any malformed row, instead of stopping the whole stream.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        f.readline()  # header, checked by read_imagenet_loc
        for lineno, line in enumerate(f, start=2):
            line = line.strip()
            if not line:
                continue
            where = f"{path.name}:{lineno}"
            name, comma, prediction = line.partition(",")
            name = name.strip()
            tokens = prediction.split()
            at = {"file": path.name, "line": lineno}
            if not comma or not _IMAGE_ID.match(name):
                yield Issue(where, "malformed row", "skipped", f"bad image id {name[:60]!r}", **at)
                continue
            if len(tokens) % 5:
                yield Issue(where, "malformed row", "skipped", f"{len(tokens)} tokens, not groups of 5", **at)
                continue
            if name in seen:
                yield Issue(where, "duplicate image id", "skipped", name, **at)
                continue
            seen.add(name)
            image_id += 1
            file_name, full = _image_ref(name, split, root, data_dir)
            rec = SourceImage(image_id=image_id, file_name=file_name, path=full)
            _boxes(tokens, synsets, where, rec)
            yield from _finish(rec, root, where)


def _xml_records(
    folder: Path, root: Path, split: str, synsets: dict[str, int], data_dir: str = DATA_DIR
) -> Iterator[SourceImage | Issue]:
    image_id = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in sorted(filenames):
            if not fname.endswith(".xml"):
                continue
            xml = Path(dirpath) / fname
            where = xml.relative_to(root).as_posix() if xml.is_relative_to(root) else str(xml)
            name = xml.stem  # the file name, not <filename>: XML fields go stale when data is moved
            if not _IMAGE_ID.match(name):
                yield Issue(where, "malformed annotation", "skipped", "bad image id", file=where)
                continue
            try:
                objects = ET.parse(xml).getroot().findall("object")
            except ET.ParseError as e:
                yield Issue(where, "malformed annotation", "skipped", str(e), file=where, line=e.position[0])
                continue
            except OSError as e:
                yield Issue(where, "malformed annotation", "skipped", str(e), file=where)
                continue
            tokens = []
            for obj in objects:
                bb = obj.find("bndbox")
                tokens.append(obj.findtext("name", "").strip() or "?")
                tokens += [(bb.findtext(k, "") if bb is not None else "").strip() or "?"
                           for k in ("xmin", "ymin", "xmax", "ymax")]
            image_id += 1
            file_name, full = _image_ref(name, split, root, data_dir)
            rec = SourceImage(image_id=image_id, file_name=file_name, path=full)
            _boxes(tokens, synsets, where, rec)
            yield from _finish(rec, root, where)


def _named(value: str | os.PathLike, root: Path) -> Path:
    """A user-named path: absolute, from the working directory, or else under ROOT."""
    path = Path(value)
    if not path.is_absolute() and not path.exists() and (root / path).exists():
        path = root / path
    return path.resolve()


def read_imagenet_loc(root: str | os.PathLike, split: str = "train", images: str | os.PathLike | None = None,
                      annotations: str | os.PathLike | None = None) -> ReadResult:
    """Classes (mapping order), a lazy stream of SourceImage (boxes xyxy pixels) / Issue, and the source.

    `images`: the folder holding train/<synset>/ and val/ (default ROOT/ILSVRC/Data/CLS-LOC);
    `annotations`: the split's solution CSV or its folder of XML (default: see the module doc).
    """
    root = Path(root).resolve()
    if split not in ("train", "val"):
        raise DatasetError(f"imagenet_loc: split must be train or val, got {split!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    mapping = root / "LOC_synset_mapping.txt"
    classes, synsets = read_synsets(mapping)
    data_dir = DATA_DIR
    if images is not None:
        img = _named(images, root)
        if not img.is_dir():
            raise DatasetError(f"--images {images}: no such folder")
        data_dir = img.relative_to(root).as_posix() if img.is_relative_to(root) else str(img)
    csv = root / f"LOC_{split}_solution.csv"
    xml_dir = root / XML_DIR / split
    if annotations is not None:
        ann = _named(annotations, root)
        if ann.is_file():
            csv, xml_dir = ann, None
        elif ann.is_dir():
            csv, xml_dir = None, ann
        else:
            raise DatasetError(f"--annotations {annotations}: no such CSV file or XML folder")
    if csv is not None and csv.is_file():
        check_header(csv)
        stat = csv.stat()
        stream = _csv_records(csv, root, split, synsets, data_dir)
        annotations_src = {"annotations": str(csv), "annotations_bytes": stat.st_size,
                           "annotations_mtime_ns": stat.st_mtime_ns}
    elif xml_dir is not None and xml_dir.is_dir():
        stream = _xml_records(xml_dir, root, split, synsets, data_dir)
        annotations_src = {"annotations": str(xml_dir)}
    else:
        raise DatasetError(f"{root}: neither LOC_{split}_solution.csv nor {XML_DIR / split} found "
                           "(name yours with --annotations FILE.csv or --annotations DIR)")
    if data_dir != DATA_DIR:
        annotations_src["images"] = data_dir
    source = {"format": "imagenet_loc", "root": str(root), "split": split,
              "synset_mapping_sha256": hashlib.sha256(mapping.read_bytes()).hexdigest(), **annotations_src}
    log.info("imagenet_loc %s: %d classes, annotations from %s", split, len(classes),
             annotations_src["annotations"])
    return classes, stream, source


FLAGS = ("--root DIR (holding LOC_synset_mapping.txt), --split train|val, --images DIR (the folder "
         "holding train/<synset>/ and val/, default ROOT/ILSVRC/Data/CLS-LOC), --annotations FILE.csv "
         "or DIR of XML (default ROOT/LOC_<split>_solution.csv, else "
         "ROOT/ILSVRC/Annotations/CLS-LOC/<split>)")


def read(args: argparse.Namespace) -> ReadResult:
    """Reader for `--format imagenet-loc --root DIR [--split train|val] [--images DIR]
    [--annotations FILE.csv|DIR]` (see FLAGS)."""
    if not getattr(args, "root", None):
        raise DatasetError("--format imagenet-loc needs --root DIR "
                           "(the folder holding LOC_synset_mapping.txt)")
    return read_imagenet_loc(args.root, _split_arg(args), getattr(args, "images", None),
                             getattr(args, "annotations", None))


def _split_arg(args: argparse.Namespace) -> str:
    """The split name: `--split NAME` (or `--opt split=NAME`), default train."""
    return getattr(args, "split", None) or (getattr(args, "opts", None) or {}).get("split") or "train"
