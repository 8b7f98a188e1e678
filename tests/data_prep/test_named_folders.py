"""Readers take the folders a user names: each format on a layout (real BCCD / coco128 images copied
into tmp_path) whose folders have none of the guessed names, and the error naming the flag to pass."""

from __future__ import annotations

import json
import logging
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from coco_subset import coco_subset

from data_prep import shard

BCCD = ["BloodImage_00001", "BloodImage_00003", "BloodImage_00004"]
NAMES = ["Platelets", "RBC", "WBC"]


def run(*argv) -> int:
    return shard.main([str(a) for a in argv])


def rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]


def voc_boxes(shared_data: Path, stem: str) -> tuple[list[int], np.ndarray]:
    root = ET.parse(shared_data / "bccd" / "Annotations" / f"{stem}.xml").getroot()
    labels, boxes = [], []
    for o in root.iter("object"):
        labels.append(NAMES.index(o.findtext("name")))
        boxes.append([float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return labels, np.clip(np.array(boxes), 0, [640, 480, 640, 480])


def stored_boxes(row: dict) -> np.ndarray:
    b = np.array(row["boxes"], dtype=np.float64).reshape(-1, 4)
    sx, sy = row["orig_width"] / row["width"], row["orig_height"] / row["height"]
    return b * [sx, sy, sx, sy]


def check_bccd(shared_data: Path, out: Path, stems=BCCD) -> None:
    got = rows(out)
    assert len(got) == len(stems)
    for row, stem in zip(got, stems, strict=True):
        assert row["file_name"].endswith(f"{stem}.jpg") or row["file_name"].endswith(f"{stem}.JPEG")
        labels, ref = voc_boxes(shared_data, stem)
        assert sorted(row["labels"]) == sorted(labels)
        box = stored_boxes(row)
        for lab, b in zip(labels, ref, strict=True):  # every source box is there, within a stored pixel
            k = [i for i, x in enumerate(row["labels"]) if x == lab]
            assert np.abs(box[k] - b).max(axis=1).min() < 4.5


# -------------------------------------------------------------------------------------------- VOC

def _voc(shared_data: Path, root: Path) -> tuple[Path, Path]:
    xml, pics = root / "xml_v2", root / "pictures"
    xml.mkdir(parents=True)
    pics.mkdir()
    for stem in BCCD:
        shutil.copy(shared_data / "bccd" / "Annotations" / f"{stem}.xml", xml)
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{stem}.jpg", pics)
    return xml, pics


def test_voc_without_guessable_folders_names_the_flag(shared_data, tmp_path, capsys):
    root = tmp_path / "ds"
    _voc(shared_data, root)
    assert run("--format", "voc", "--root", root, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no annotation folder" in err and "--annotations DIR" in err
    assert run("--format", "voc", "--root", root, "--annotations", "xml_v2", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image folder" in err and "--images DIR" in err
    assert run("--format", "voc", "--root", root, "--annotations", "nowhere", "--images", "pictures",
               "--out", tmp_path / "o") == 2
    assert "--annotations nowhere: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_voc_honours_annotations_and_images_folders(shared_data, tmp_path):
    root = tmp_path / "ds"
    xml, pics = _voc(shared_data, root)
    out = tmp_path / "under_root"  # names relative to --root
    assert run("--format", "voc", "--root", root, "--annotations", "xml_v2", "--images", "pictures",
               "--out", out, "--size", 160, "--workers", 1) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in m["classes"]] == NAMES
    assert m["source"]["annotations"] == str(xml) and m["source"]["images"] == str(pics)
    check_bccd(shared_data, out)
    assert [r["file_name"] for r in rows(out)] == [f"{s}.jpg" for s in BCCD]
    out2 = tmp_path / "no_root"  # absolute folders, no --root at all
    assert run("--format", "voc", "--annotations", xml, "--images", pics, "--out", out2, "--size", 160,
               "--workers", 1) == 0
    check_bccd(shared_data, out2)


def test_a_flag_the_format_does_not_read_is_warned_about(shared_data, tmp_path, caplog):
    root = tmp_path / "ds"
    xml, pics = _voc(shared_data, root)
    with caplog.at_level(logging.WARNING, logger="data_prep.shard"):
        assert run("--format", "voc", "--annotations", xml, "--images", pics, "--data", "x.yaml",
                   "--out", tmp_path / "o", "--size", 96, "--workers", 1) == 0
    assert "--format voc does not read --data" in caplog.text


def test_help_names_every_formats_flags(capsys):
    try:
        shard.main(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for fmt in ("coco:", "voc:", "yolo:", "imagenet-loc:"):
        assert f"\n  {fmt} " in text
    voc_line = text[text.index("\n  voc: "):text.index("\n  yolo: ")]
    assert "--annotations DIR" in voc_line and "--images DIR" in voc_line and "--split-file" in voc_line


# ------------------------------------------------------------------------------------------- YOLO

def _yolo_labels(shared_data: Path, folder: Path) -> None:
    """BCCD images with their YOLO label files beside them (no images/ or labels/ folder)."""
    folder.mkdir(parents=True)
    for stem in BCCD:
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{stem}.jpg", folder)
        labels, boxes = voc_boxes(shared_data, stem)
        (folder / f"{stem}.txt").write_text("".join(
            f"{c} {(x1 + x2) / 1280:.6f} {(y1 + y2) / 960:.6f} {(x2 - x1) / 640:.6f} {(y2 - y1) / 480:.6f}\n"
            for c, (x1, y1, x2, y2) in zip(labels, boxes, strict=True)))


def test_yolo_any_yaml_name_split_key_and_images_folder(shared_data, tmp_path):
    root = tmp_path / "ds"
    _yolo_labels(shared_data, root / "pics" / "training")
    cfg = root / "bccd-dataset.yml"
    cfg.write_text(f"names: {NAMES}\ntraining: pics/training\n")
    out = tmp_path / "o1"
    assert run("--format", "yolo", "--data", cfg, "--split", "training", "--out", out, "--size", 160,
               "--workers", 1) == 0
    check_bccd(shared_data, out)
    assert [r["file_name"] for r in rows(out)] == [f"pics/training/{s}.jpg" for s in BCCD]
    other = tmp_path / "elsewhere" / "set_a"  # --images names the split's folder instead of the yaml
    _yolo_labels(shared_data, other)
    out2 = tmp_path / "o2"
    assert run("--format", "yolo", "--data", cfg, "--images", other, "--out", out2, "--size", 160,
               "--workers", 1) == 0
    check_bccd(shared_data, out2)
    assert json.loads((out2 / "manifest.json").read_text())["source"]["images_dir"] == str(other)


def test_yolo_missing_data_file_names_the_flag(tmp_path, capsys):
    assert run("--format", "yolo", "--data", tmp_path / "nope.yaml", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data" in err and "nope.yaml: no such file" in err


# ------------------------------------------------------------------------------------------- COCO

def test_coco_any_json_name_and_image_folder(shared_data, tmp_path):
    ids = [30, 86, 143]  # images of the in-repo coco128 fixture
    pics = tmp_path / "my pictures"
    data = coco_subset(shared_data, ids, pics)
    ann = tmp_path / "labels" / "boxes_v3.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(data))
    out = tmp_path / "o"
    assert run("--format", "coco", "--annotations", ann, "--images", pics, "--out", out, "--size", 96,
               "--workers", 1) == 0
    got = rows(out)
    assert [r["image_id"] for r in got] == ids
    assert [len(r["labels"]) for r in got] == [
        sum(a["image_id"] == i for a in data["annotations"]) for i in ids]


def test_coco_missing_image_folder_names_the_flag(tmp_path, capsys):
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    assert run("--format", "coco", "--annotations", ann, "--images", tmp_path / "none", "--out",
               tmp_path / "o") == 2
    assert "--images" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- ImageNet-LOC

def _imagenet(shared_data: Path, root: Path, images: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn02012849 crane\n")
    ids = [f"n01440764_{k}" for k in range(1, len(BCCD) + 1)]
    (images / "train" / "n01440764").mkdir(parents=True)
    for stem, iid in zip(BCCD, ids, strict=True):
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{stem}.jpg",
                    images / "train/n01440764" / f"{iid}.JPEG")
    return ids


def test_imagenet_loc_named_image_folder_and_csv(shared_data, tmp_path, capsys):
    root = tmp_path / "inet"
    ids = _imagenet(shared_data, root, root / "jpegs")
    csv = root / "boxes-train.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{iid},n01440764 {10 * k} 20 300 400\n" for k, iid in enumerate(ids, start=1)))
    assert run("--format", "imagenet-loc", "--root", root, "--images", "jpegs", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--annotations" in err
    out = tmp_path / "o"
    assert run("--format", "imagenet-loc", "--root", root, "--images", "jpegs", "--annotations", csv,
               "--out", out, "--size", 160, "--workers", 1) == 0
    got = rows(out)
    assert [r["file_name"] for r in got] == [f"jpegs/train/n01440764/{i}.JPEG" for i in ids]
    for k, r in enumerate(got, start=1):
        assert np.abs(stored_boxes(r) - [10 * k, 20, 300, 400]).max() < 4.5
    # an image folder outside the root: names relative to it; XML annotations from a named folder
    outside = tmp_path / "pixels"
    _imagenet(shared_data, root, outside)
    xml = tmp_path / "my_xml"
    xml.mkdir()
    for iid in ids:
        (xml / f"{iid}.xml").write_text(
            "<annotation><object><name>n01440764</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>200</xmax>"
            "<ymax>100</ymax></bndbox></object></annotation>")
    out2 = tmp_path / "o2"
    assert run("--format", "imagenet-loc", "--root", root, "--images", outside, "--annotations", xml,
               "--out", out2, "--size", 160, "--workers", 1) == 0
    got = rows(out2)
    assert [r["file_name"] for r in got] == [f"train/n01440764/{i}.JPEG" for i in ids]
    m = json.loads((out2 / "manifest.json").read_text())
    assert m["source"]["images"] == str(outside) and m["source"]["annotations"] == str(xml)
