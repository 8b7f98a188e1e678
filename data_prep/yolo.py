"""Reader for the YOLO (Ultralytics) layout.

    ROOT/data.yaml                      names: [a, b] or {0: a, 1: b}; optional path:, train:, val:, nc:
    ROOT/images/<split>/*.jpg           (or wherever data.yaml's <split>: points: a folder,
    ROOT/labels/<split>/*.txt            a list of folders, or a .txt list of image paths)

A label file sits where its image does, with the last `images` folder of the path
replaced by `labels` and the extension by `.txt`. Each line is
`class cx cy w h`, normalised to the image's width and height (a polygon line
`class x1 y1 x2 y2 x3 y3 ...` counts as the box around its points). Without
data.yaml, class names come from ROOT/classes.txt (or obj.names), one per line.
Folder names are free: data.yaml (any file name, `--data`) may point a split at
any folder, and `--images DIR` overrides it; a label file then sits beside its
image when no `images` folder is on the path.

Mapping to records: class index = the YOLO class number, category_id = index + 1.
A missing label file makes a negative image. A malformed line (wrong column
count, non-numeric, NaN or inf, class out of range, non-positive size) is dropped
and listed as an Issue with `file` labels/...txt and its `line`; a label file that
cannot be read skips its image; a label file with no image is listed too. Only a
data.yaml (or classes.txt) that cannot be used stops the run.
YOLO's normalised coordinates refer to the upright image (EXIF orientation
applied), so the reader reads each labelled image's header (size and
orientation, no decoding) and returns boxes in the raw pixel frame the writer
expects.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import yaml
from PIL import Image

from data_prep.imaging import TOO_LARGE, orient_box
from data_prep.paths import UnsafePathError, safe_join
from data_prep.records import ClassInfo, DatasetError, Issue, ReadResult, SourceImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_SWAPS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_INVERSE = {6: 8, 8: 6}  # the other orientations are their own inverse


def load_data_yaml(path: Path) -> dict:
    """The parsed data.yaml mapping; DatasetError naming the file (and line) when it is unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DatasetError(f"{where}: malformed YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with a 'names:' key, got {type(data).__name__}")
    return data


def parse_names(names, source: Path, nc=None) -> list[str]:
    """Class names from a data.yaml `names:` value (list, or dict keyed 0..C-1)."""
    if isinstance(names, dict):
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: names: keys must be class numbers 0..C-1") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise DatasetError(f"{source}: names: keys must be 0..{len(keyed) - 1}, got {sorted(keyed)}")
        out = [keyed[i] for i in range(len(keyed))]
    elif isinstance(names, list):
        out = [str(n) for n in names]
    else:
        raise DatasetError(f"{source}: 'names:' must be a list or a mapping of class names")
    if not out:
        raise DatasetError(f"{source}: 'names:' is empty")
    if nc is not None and nc != len(out):
        raise DatasetError(f"{source}: nc: {nc} but {len(out)} names")
    return out


def _names_file(root: Path) -> list[str]:
    for name in ("classes.txt", "obj.names"):
        path = root / name
        if path.is_file():
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not names:
                raise DatasetError(f"{path}: no class names")
            return names
    raise DatasetError(f"{root}: no data.yaml, classes.txt or obj.names to name the classes")


def _listed_image(line: str, listing: Path, base: Path) -> Path | Issue:
    """One entry of a .txt image list: relative to the list's folder, and inside the dataset root."""
    try:
        path = Path(line) if Path(line).is_absolute() else safe_join(listing.parent, line)
    except UnsafePathError as e:
        return Issue(f"{listing.name}: {line}", "unsafe image path", "skipped", str(e))
    if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(base)):
        return Issue(f"{listing.name}: {line}", "unsafe image path", "skipped", f"outside {base}")
    return path


def _image_paths(entry, base: Path, source: Path) -> Iterator[Path | Issue]:
    """Image files of one data.yaml split entry (folder, list of folders, or .txt list), sorted."""
    entries = entry if isinstance(entry, list) else [entry]
    for item in entries:
        path = Path(str(item))
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                found.extend(Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES)
            yield from sorted(found)
        elif path.is_file() and path.suffix == ".txt":
            # surrogateescape: an entry that is not UTF-8 names no file and is skipped as missing
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield _listed_image(line, path, base)
        else:
            raise DatasetError(f"{source}: split folder or list {path} does not exist")


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` folder becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _header(path: Path) -> tuple[int, int, int]:
    """(raw width, raw height, EXIF orientation 1..8) from the file header, without decoding pixels."""
    with Image.open(path) as im:
        try:
            orientation = int(im.getexif().get(0x0112, 1))
        except Exception:  # a broken EXIF block: the writer ignores it too
            orientation = 1
        return im.width, im.height, orientation if 1 <= orientation <= 8 else 1


def parse_label_line(line: str, num_classes: int) -> tuple[int, float, float, float, float] | str:
    """(class, cx, cy, w, h) normalised, or the reason the line is malformed."""
    cols = line.split()
    if len(cols) != 5 and not (len(cols) >= 7 and len(cols) % 2 == 1):
        return f"expected 5 columns (or a polygon), got {len(cols)}"
    try:
        cls_f = float(cols[0])
        values = [float(v) for v in cols[1:]]
    except ValueError:
        return "non-numeric value"
    if not all(math.isfinite(v) for v in values) or not cls_f.is_integer():
        return "non-numeric value"
    cls = int(cls_f)
    if not 0 <= cls < num_classes:
        return f"class {cls} out of range 0..{num_classes - 1}"
    if len(values) == 4:
        cx, cy, w, h = values
    else:  # polygon: its bounding box
        xs, ys = values[0::2], values[1::2]
        cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    if w <= 0 or h <= 0:
        return "non-positive box size"
    return cls, cx, cy, w, h


def _record(image_id: int, image: Path, base: Path, num_classes: int) -> SourceImage | Issue:
    file_name = image.relative_to(base).as_posix() if image.is_relative_to(base) else image.as_posix()
    rec = SourceImage(image_id=image_id, file_name=file_name, path=str(image))
    labels = label_path(image)
    label_name = labels.relative_to(base).as_posix() if labels.is_relative_to(base) else str(labels)
    try:
        text = labels.read_text(encoding="utf-8")
    except FileNotFoundError:
        return rec  # no label file: a negative image
    except (OSError, UnicodeDecodeError) as e:
        return Issue(file_name, "unreadable label file", "skipped", f"{label_name}: {e}", file=label_name)
    parsed = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        result = parse_label_line(line, num_classes)
        if isinstance(result, str):
            rec.issues.append(Issue(f"{label_name}:{lineno}", "malformed label line", "dropped", result,
                                    file=label_name, line=lineno))
        else:
            parsed.append(result)
    if not parsed:
        return rec
    try:
        raw_w, raw_h, orientation = _header(image)
    except FileNotFoundError:
        return Issue(file_name, "missing image file", "skipped", str(image))
    except Image.DecompressionBombError as e:
        return Issue(file_name, TOO_LARGE, "skipped", str(e))
    except (OSError, ValueError, SyntaxError) as e:
        return Issue(file_name, "unreadable image", "skipped", str(e))
    up_w, up_h = (raw_h, raw_w) if orientation in _SWAPS else (raw_w, raw_h)
    for cls, cx, cy, w, h in parsed:
        upright = [(cx - w / 2) * up_w, (cy - h / 2) * up_h, (cx + w / 2) * up_w, (cy + h / 2) * up_h]
        # Back to the raw frame: the writer re-applies the orientation (imaging.orient_box).
        rec.boxes.append(orient_box(upright, _INVERSE.get(orientation, orientation), up_w, up_h))
        rec.labels.append(cls)
        rec.iscrowd.append(False)
    return rec


def _records(images: list[Path | Issue], base: Path, num_classes: int, label_dirs: set[Path]) -> Iterator:
    seen_labels = set()
    image_id = 0
    for image in images:
        if isinstance(image, Issue):
            yield image
            continue
        image_id += 1
        seen_labels.add(label_path(image))
        yield _record(image_id, image, base, num_classes)
    # Label files that belong to no listed image: say so rather than lose them silently.
    for folder in sorted(label_dirs):
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix == ".txt" and p not in seen_labels:
                    name = p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)
                    yield Issue(name, "label file without image", "skipped")


def read_yolo(root: str | os.PathLike, split: str = "train", data_yaml: str | os.PathLike | None = None,
              images: str | os.PathLike | None = None) -> ReadResult:
    """Classes, a lazy stream of SourceImage (boxes xyxy raw pixels) / Issue, and the source description.

    `root` is the dataset folder or its data.yaml; `split` names the data.yaml key
    (train, val, test) or, without one, the folder images/<split>. `images`, when
    given, is the split's image folder (or .txt list) instead of what data.yaml names.
    """
    root = Path(root)
    yaml_path = Path(data_yaml) if data_yaml else (root if root.suffix in (".yaml", ".yml") else None)
    if yaml_path is None:
        for name in ("data.yaml", "dataset.yaml"):
            if (root / name).is_file():
                yaml_path = root / name
                break
    if root.suffix in (".yaml", ".yml"):
        root = root.parent
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if yaml_path is not None:
        data = load_data_yaml(yaml_path)
        if "names" not in data:
            raise DatasetError(f"{yaml_path}: no 'names:' key")
        names = parse_names(data["names"], yaml_path, data.get("nc"))
        base = Path(str(data["path"])) if data.get("path") else yaml_path.parent
        base = base if base.is_absolute() else yaml_path.parent / base
        entry = data.get(split) or f"images/{split}"
        source_file = yaml_path
    else:
        names = _names_file(root)
        base, entry, source_file = root, f"images/{split}", root
    if images is not None:
        entry = str(Path(images).resolve())
        if not Path(entry).exists():
            raise DatasetError(f"--images {images}: no such folder or image list")
    listed = list(_image_paths(entry, base, source_file))
    if not any(isinstance(p, Path) for p in listed):
        raise DatasetError(f"{source_file}: split '{split}' lists no images")
    folders = {p.parent for p in listed if isinstance(p, Path)}
    label_dirs = {label_path(p / "x.jpg").parent for p in folders}
    label_dirs = {d for d in label_dirs if d.is_dir()}
    # Only top-level label folders: os.walk covers their children.
    label_dirs = {d for d in label_dirs if not any(o != d and d.is_relative_to(o) for o in label_dirs)}
    classes = [ClassInfo(i, n, i + 1) for i, n in enumerate(names)]
    source = {
        "format": "yolo", "root": str(base.resolve()), "split": split,
        **({"images_dir": entry} if images is not None else {}),
        "data_yaml": str(yaml_path.resolve()) if yaml_path else None,
        "data_yaml_sha256": hashlib.sha256(yaml_path.read_bytes()).hexdigest() if yaml_path else None,
        "images": sum(isinstance(p, Path) for p in listed),
    }
    log.info("yolo %s: %d images, %d classes under %s", split, len(listed), len(classes), base)
    return classes, _records(listed, base, len(classes), label_dirs), source


FLAGS = ("--root DIR and/or --data FILE.yaml (--annotations FILE.yaml is the same; any name), "
         "--split NAME (a data.yaml key, default train), --images DIR (the split's image folder or "
         ".txt list, instead of data.yaml's; labels: the Ultralytics rule, images/ -> labels/, else "
         "beside the images)")


def read(args: argparse.Namespace) -> ReadResult:
    """Reader for `--format yolo --root DIR [--data data.yaml] [--split val] [--images DIR]` (see FLAGS)."""
    root = getattr(args, "root", None)
    data_yaml = getattr(args, "data", None) or getattr(args, "annotations", None)
    if not root and not data_yaml:
        raise DatasetError("--format yolo needs --root DIR or --data FILE.yaml")
    if data_yaml and not Path(data_yaml).is_file():
        flag = "--data" if getattr(args, "data", None) else "--annotations"
        raise DatasetError(f"{flag} {data_yaml}: no such file")
    return read_yolo(root or Path(data_yaml).parent, _split_arg(args), data_yaml,
                     getattr(args, "images", None))


def _split_arg(args: argparse.Namespace) -> str:
    """The split name: `--split NAME` (or `--opt split=NAME`), default train."""
    return getattr(args, "split", None) or (getattr(args, "opts", None) or {}).get("split") or "train"
