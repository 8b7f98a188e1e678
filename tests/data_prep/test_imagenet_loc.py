"""ImageNet-LOC reader on a tiny Kaggle-layout tree: classes, CSV rows, faults with line numbers, XML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.imagenet_loc import read_imagenet_loc
from data_prep.records import DatasetError, Issue, SourceImage

MAPPING = "n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n"


def _jpeg(path: Path, w: int = 80, h: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 200, 30)).save(path)


def _split(stream) -> tuple[list[SourceImage], list[Issue]]:
    items = list(stream)
    return [x for x in items if isinstance(x, SourceImage)], [x for x in items if isinstance(x, Issue)]


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "LOC_synset_mapping.txt").write_text(MAPPING)
    data = tmp_path / "ILSVRC/Data/CLS-LOC"
    for name in ("n01440764_1", "n01440764_2", "n01440764_3", "n01440764_4", "n02012849_5", "n02012849_7"):
        _jpeg(data / "train" / name.split("_")[0] / f"{name}.JPEG")
    _jpeg(data / "val/ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "LOC_train_solution.csv").write_text("\n".join([
        "ImageId,PredictionString",
        "n01440764_1,n01440764 10 20 30 40 n02012849 1 2 50 60 ",  # line 2: good, two boxes
        "n01440764_2,n01440764 10 20 30",  # line 3: 4 tokens
        "n01440764_3,n09999999 1 1 5 5 n03126707 2 2 9 9",  # line 4: one unknown synset
        "n01440764_4,n01440764 1 one 5 5",  # line 5: non-numeric: no box left
        "n02012849_6,n02012849 1 1 5 5",  # line 6: image file missing
        "n01440764_1,n01440764 1 1 5 5",  # line 7: duplicate id
        "../../etc/passwd,n01440764 1 1 5 5",  # line 8: id that would leave the root
        "",
        "n02012849_7,n02012849 3 4 70 50",  # line 10: good
    ]) + "\n")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n03126707 5 6 70 50 \n")
    return tmp_path


def test_classes_in_mapping_order_with_unique_names(root):
    classes, _, source = read_imagenet_loc(root, "train")
    assert [(c.index, c.name, c.category_id) for c in classes] == [
        (0, "tench", 1), (1, "crane (n02012849)", 2), (2, "crane (n03126707)", 3)]
    assert source["format"] == "imagenet_loc" and source["split"] == "train"


def test_train_rows_and_faults_with_line_numbers(root):
    _, stream, _ = read_imagenet_loc(root, "train")
    recs, issues = _split(stream)
    assert [r.file_name for r in recs] == [
        "ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_1.JPEG",
        "ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_3.JPEG",
        "ILSVRC/Data/CLS-LOC/train/n02012849/n02012849_7.JPEG",
    ]
    first, third, last = recs
    assert first.boxes == [[10, 20, 30, 40], [1, 2, 50, 60]] and first.labels == [0, 1]
    assert Path(first.path) == root.resolve() / first.file_name
    assert third.boxes == [[2, 2, 9, 9]] and third.labels == [2]
    assert [(i.item, i.reason, i.action) for i in third.issues] == [
        ("LOC_train_solution.csv:4", "unknown synset", "dropped")]
    assert last.labels == [1] and last.iscrowd == [False]
    assert len({r.image_id for r in recs}) == 3
    got = {(i.item, i.reason) for i in issues}
    assert got == {
        ("LOC_train_solution.csv:3", "malformed row"),
        ("LOC_train_solution.csv:5", "no valid boxes"),
        ("LOC_train_solution.csv:5", "non-numeric box"),  # the box that left it with none
        ("ILSVRC/Data/CLS-LOC/train/n02012849/n02012849_6.JPEG", "missing image file"),
        ("LOC_train_solution.csv:7", "duplicate image id"),
        ("LOC_train_solution.csv:8", "malformed row"),
    }


def test_val_split(root):
    _, stream, _ = read_imagenet_loc(root, "val")
    recs, issues = _split(stream)
    assert not issues
    val_file = "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG"
    assert [(r.file_name, r.labels, r.boxes) for r in recs] == [(val_file, [2], [[5, 6, 70, 50]])]


@pytest.mark.parametrize("header", ["ImageId;PredictionString", "id,boxes", ""])
def test_malformed_header_is_one_line_error_before_streaming(root, header):
    (root / "LOC_train_solution.csv").write_text(f"{header}\nn01440764_1,n01440764 1 1 5 5\n")
    with pytest.raises(DatasetError, match=r"LOC_train_solution\.csv:1: expected header") as err:
        read_imagenet_loc(root, "train")
    assert "\n" not in str(err.value)


def test_bad_mapping_and_missing_annotations(root, tmp_path):
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench\nnot-a-synset fish\n")
    with pytest.raises(DatasetError, match=r"LOC_synset_mapping\.txt:2: expected"):
        read_imagenet_loc(root, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "LOC_synset_mapping.txt").write_text(MAPPING)
    with pytest.raises(DatasetError, match="neither LOC_train_solution.csv nor"):
        read_imagenet_loc(empty, "train")
    with pytest.raises(DatasetError, match="split must be train or val"):
        read_imagenet_loc(empty, "test")


def test_xml_annotations_when_no_csv(root):
    (root / "LOC_val_solution.csv").unlink()
    xml_dir = root / "ILSVRC/Annotations/CLS-LOC/val"
    xml_dir.mkdir(parents=True)
    (xml_dir / "ILSVRC2012_val_00000001.xml").write_text(
        "<annotation><filename>stale</filename>"
        "<object><name>n01440764</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax>"
        "</bndbox></object><object><name>n99999999</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax>"
        "<ymax>4</ymax></bndbox></object></annotation>")
    (xml_dir / "ILSVRC2012_val_00000002.xml").write_text("<annotation><object>")
    _, stream, source = read_imagenet_loc(root, "val")
    recs, issues = _split(stream)
    assert source["annotations"].endswith("Annotations/CLS-LOC/val")
    assert [(r.boxes, r.labels) for r in recs] == [([[1, 2, 30, 40]], [0])]
    assert [i.reason for i in recs[0].issues] == ["unknown synset"]
    assert [(i.item, i.reason) for i in issues] == [
        ("ILSVRC/Annotations/CLS-LOC/val/ILSVRC2012_val_00000002.xml", "malformed annotation")]


def test_round_trip_through_shard_cli(root, tmp_path):
    _jpeg(root / "ILSVRC/Data/CLS-LOC/train/n02012849/n02012849_7.JPEG", 200, 100)  # a wide one
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "data_prep.shard", "--format", "imagenet-loc", "--root",
                           str(root), "--out", str(out), "--size", "50", "--workers", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["counts"]["images"] == 3
    assert manifest["issue_counts"]["malformed row"] == 2
    assert manifest["issue_counts"]["unknown synset"] == 1
    rows = {r["file_name"].split("/")[-1]: r for p in sorted(out.glob("part-*.parquet"))
            for r in pq.read_table(p).to_pylist()}
    wide = rows["n02012849_7.JPEG"]
    assert (wide["width"], wide["height"], wide["orig_width"], wide["orig_height"]) == (50, 25, 200, 100)
    assert wide["boxes"] == pytest.approx([3 / 4, 4 / 4, 70 / 4, 50 / 4], abs=1.0)
    first = rows["n01440764_1.JPEG"]  # 80x60 -> 50x38 (rounded)
    sx, sy = first["width"] / 80, first["height"] / 60
    assert first["labels"] == [0, 1]
    want = [10 * sx, 20 * sy, 30 * sx, 40 * sy, 1 * sx, 2 * sy, 50 * sx, 60 * sy]
    assert first["boxes"] == pytest.approx(want, abs=1.0)
