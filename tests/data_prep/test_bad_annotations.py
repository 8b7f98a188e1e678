"""One bad annotation never stops `python -m data_prep.shard`: real BCCD / coco128 images copied into
tmp_path, each format fed broken annotations; the bad ones are skipped or dropped and listed (file,
line where there is one, reason), the rest is sharded. Only a whole-dataset file stops the run."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from coco_subset import coco_subset

from data_prep import shard

BCCD = ["BloodImage_00001", "BloodImage_00003", "BloodImage_00004", "BloodImage_00005"]


def run(*argv) -> int:
    return shard.main([str(a) for a in argv])


def rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def bccd_objects(shared_data: Path, stem: str) -> list[tuple[str, list[float]]]:
    root = ET.parse(shared_data / "bccd" / "Annotations" / f"{stem}.xml").getroot()
    keys = ("xmin", "ymin", "xmax", "ymax")
    return [(o.findtext("name"), [float(o.find("bndbox").findtext(k)) for k in keys])
            for o in root.iter("object")]


# ------------------------------------------------------------------------------------------- YOLO

def _yolo(shared_data: Path, root: Path) -> Path:
    """BCCD images in the Ultralytics layout, labels converted from the VOC XML (640x480)."""
    names = ["Platelets", "RBC", "WBC"]
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    (root / "data.yaml").write_text(f"names: {names}\n")
    for stem in BCCD:
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{stem}.jpg", root / "images/train")
        lines = []
        for name, (x1, y1, x2, y2) in bccd_objects(shared_data, stem):
            x2, y2 = min(x2, 640), min(y2, 480)
            lines.append(f"{names.index(name)} {(x1 + x2) / 1280:.6f} {(y1 + y2) / 960:.6f} "
                         f"{(x2 - x1) / 640:.6f} {(y2 - y1) / 480:.6f}")
        (root / "labels/train" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_yolo_bad_label_lines_are_dropped_with_file_and_line(shared_data, tmp_path):
    root = _yolo(shared_data, tmp_path / "yolo")
    label = root / "labels/train" / f"{BCCD[1]}.txt"
    good = label.read_text().splitlines()
    label.write_text("\n".join([good[0], "1 0.5 0.5 0.2", "nan 0.5 0.5 0.1 0.1", "1 0.5 inf 0.1 0.1",
                                "2 0.5 0.5 0.1 0.1 0.3", *good[1:]]) + "\n")
    (root / "labels/train" / f"{BCCD[2]}.txt").write_bytes(b"\xff\xfe\x00 not text\n")
    out = tmp_path / "out"
    assert run("--format", "yolo", "--root", root, "--out", out, "--size", 96, "--workers", 1) == 0
    m = manifest(out)
    got = {r["file_name"]: r for r in rows(out)}
    assert sorted(got) == sorted(f"images/train/{s}.jpg" for s in (BCCD[0], BCCD[1], BCCD[3]))
    assert len(got[f"images/train/{BCCD[1]}.jpg"]["labels"]) + sum(
        i["item"].startswith(f"images/train/{BCCD[1]}.jpg box") for i in m["issues"]) == len(good)
    lines = sorted((i["file"], i["line"], i["detail"]) for i in m["issues"]
                   if i["reason"] == "malformed label line")
    name = f"labels/train/{BCCD[1]}.txt"
    assert [(f, n) for f, n, _ in lines] == [(name, 2), (name, 3), (name, 4), (name, 5)]
    assert "got 4" in lines[0][2] and "non-numeric" in lines[1][2] and "non-numeric" in lines[2][2]
    assert "got 6" in lines[3][2]
    unreadable = [i for i in m["issues"] if i["reason"] == "unreadable label file"]
    assert [(i["item"], i["action"], i["file"]) for i in unreadable] == [
        (f"images/train/{BCCD[2]}.jpg", "skipped", f"labels/train/{BCCD[2]}.txt")]
    assert m["counts"]["skipped_images"] == 1


def test_yolo_unreadable_data_yaml_still_stops_the_run(shared_data, tmp_path, capsys):
    root = _yolo(shared_data, tmp_path / "yolo")
    (root / "data.yaml").write_text("names: [a, b\n")
    assert run("--format", "yolo", "--root", root, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.yaml" in err and "malformed YAML" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- COCO

COCO_IDS = [30, 86, 143, 149]  # images of the in-repo coco128 fixture


@pytest.fixture
def coco(shared_data, tmp_path) -> tuple[Path, Path, dict]:
    images = tmp_path / "train2017"
    data = coco_subset(shared_data, COCO_IDS, images)
    return tmp_path / "instances.json", images, data


def test_coco_bad_annotations_are_dropped_and_listed(coco, tmp_path):
    path, images, data = coco
    base = next(a for a in data["annotations"] if a["image_id"] == 30)
    bad = {
        801: dict(base, id=801, bbox=[1, 2, 3]),  # three numbers
        802: dict(base, id=802, bbox=[1, 2, float("nan"), 4]),  # NaN (Python's json writes it)
        803: dict(base, id=803, bbox=[1, 2, float("inf"), 4]),
        804: dict(base, id=804, bbox="1234"),  # a string of four characters
        805: dict(base, id=805, bbox=[1, 2, True, 4]),
        806: dict(base, id=806, bbox=[1, 2, "3", 4]),
        807: dict(base, id=807, image_id=123456),  # unknown image
        808: dict(base, id=808, category_id=4242),  # unknown category
        809: dict(base, id=809, category_id=[1]),  # unhashable
        810: dict(base, id=810, image_id=[30]),
        811: dict(base, id=811, image_id=30.5),
    }
    data["annotations"] += list(bad.values()) + ["not an annotation"]
    data["images"].append({"id": "x", "file_name": "nothing.jpg"})
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert run("--format", "coco", "--annotations", path, "--images", images, "--out", out,
               "--size", 96, "--workers", 1) == 0
    m = manifest(out)
    got = {r["image_id"]: r for r in rows(out)}
    assert sorted(got) == COCO_IDS
    for iid in COCO_IDS:  # every good annotation made it (coco128's boxes are inside their images)
        n = sum(1 for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") == iid
                and a["id"] not in bad)
        assert len(got[iid]["labels"]) == n
    by_item = {i["item"]: i for i in m["issues"] if i["item"].startswith("annotation ")}
    reasons = {int(k.split()[1]): v["reason"] for k, v in by_item.items() if k.split()[1].isdigit()}
    assert reasons == {801: "malformed bbox", 802: "malformed bbox", 803: "malformed bbox",
                       804: "malformed bbox", 805: "malformed bbox", 806: "malformed bbox",
                       807: "annotation of an unknown image id", 808: "unknown category id",
                       809: "unknown category id", 810: "malformed annotation", 811: "malformed annotation"}
    assert all(i["file"] == "instances.json" and i["action"] == "dropped" for i in by_item.values())
    assert m["issue_counts"]["malformed annotation"] == 3  # 810, 811 and the bare string
    assert m["issue_counts"]["malformed image entry"] == 1
    assert m["counts"]["images"] == len(COCO_IDS)


def test_coco_unreadable_json_still_stops_the_run(coco, tmp_path, capsys):
    path, images, _ = coco
    path.write_bytes(b'{"images": [\xff]}')
    assert run("--format", "coco", "--annotations", path, "--images", images, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- ImageNet-LOC

MAPPING = "n01440764 tench, Tinca tinca\nn02012849 crane\n"


def _imagenet(shared_data: Path, root: Path) -> list[str]:
    """BCCD images as ImageNet-LOC train images of synset n01440764; returns the image ids."""
    root.mkdir()
    (root / "LOC_synset_mapping.txt").write_text(MAPPING)
    ids = [f"n01440764_{k}" for k in range(1, len(BCCD) + 1)]
    folder = root / "ILSVRC/Data/CLS-LOC/train/n01440764"
    folder.mkdir(parents=True)
    for stem, iid in zip(BCCD, ids, strict=True):
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{stem}.jpg", folder / f"{iid}.JPEG")
    return ids


def test_imagenet_loc_bad_csv_rows_are_skipped_with_line(shared_data, tmp_path):
    root = tmp_path / "inet"
    ids = _imagenet(shared_data, root)
    (root / "LOC_train_solution.csv").write_bytes(b"\n".join([
        b"ImageId,PredictionString",
        f"{ids[0]},n01440764 10 20 300 400".encode(),  # line 2: good
        f"{ids[1]},n01440764 10 20 nan 400".encode(),  # line 3: NaN: no box left
        f"{ids[2]},n01440764 10 20 300".encode(),  # line 4: 4 tokens
        b"n01440764_\xff\xfe,n01440764 1 2 3 4",  # line 5: not UTF-8
        f"{ids[3]},n01440764 5 6 200 100 n02012849 1 2 inf 4".encode(),  # line 6: one good box
    ]) + b"\n")
    out = tmp_path / "out"
    assert run("--format", "imagenet-loc", "--root", root, "--out", out, "--size", 96, "--workers", 1) == 0
    m = manifest(out)
    got = rows(out)
    assert [r["file_name"].rsplit("/", 1)[1] for r in got] == [f"{ids[0]}.JPEG", f"{ids[3]}.JPEG"]
    assert [len(r["labels"]) for r in got] == [1, 1]
    listed = sorted((i.get("file"), i.get("line"), i["reason"], i["action"]) for i in m["issues"])
    csv = "LOC_train_solution.csv"
    assert listed == [(csv, 3, "no valid boxes", "skipped"), (csv, 3, "non-numeric box", "dropped"),
                      (csv, 4, "malformed row", "skipped"), (csv, 5, "malformed row", "skipped"),
                      (csv, 6, "non-numeric box", "dropped")]


def test_imagenet_loc_malformed_xml_is_skipped_with_line(shared_data, tmp_path):
    root = tmp_path / "inet"
    ids = _imagenet(shared_data, root)
    xml_dir = root / "ILSVRC/Annotations/CLS-LOC/train/n01440764"
    xml_dir.mkdir(parents=True)
    for iid in ids:
        (xml_dir / f"{iid}.xml").write_text(
            f"<annotation><filename>{iid}</filename><object><name>n01440764</name><bndbox>"
            "<xmin>10</xmin><ymin>20</ymin><xmax>300</xmax><ymax>400</ymax></bndbox></object></annotation>\n")
    (xml_dir / f"{ids[1]}.xml").write_text("<annotation>\n<object>\n<name>n01440764</object>\n")
    (xml_dir / f"{ids[2]}.xml").write_text(
        "<annotation><object><name>n01440764</name><bndbox><xmin>inf</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    out = tmp_path / "out"
    assert run("--format", "imagenet-loc", "--root", root, "--out", out, "--size", 96, "--workers", 1) == 0
    m = manifest(out)
    assert [r["file_name"].rsplit("/", 1)[1] for r in rows(out)] == [f"{ids[0]}.JPEG", f"{ids[3]}.JPEG"]
    rel = "ILSVRC/Annotations/CLS-LOC/train/n01440764"
    listed = sorted((i["file"], i.get("line", 0), i["reason"]) for i in m["issues"])
    assert listed == [(f"{rel}/{ids[1]}.xml", 3, "malformed annotation"),
                      (f"{rel}/{ids[2]}.xml", 0, "no valid boxes"),
                      (f"{rel}/{ids[2]}.xml", 0, "non-numeric box")]
