"""VOC reader on BCCD (split .txt) and raccoon (variant folder names + CSV split), and bad XML/CSV."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_prep import shard

BCCD_IDS = ["BloodImage_00001", "BloodImage_00003", "BloodImage_00004", "BloodImage_00005",
            "BloodImage_00008", "BloodImage_00010", "BloodImage_00011", "BloodImage_00013",
            "BloodImage_00014", "BloodImage_00015"]


def rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]


def run(*argv) -> int:
    return shard.main([str(a) for a in argv])


def xml_boxes(path: Path) -> tuple[list[str], np.ndarray, tuple[int, int]]:
    root = ET.parse(path).getroot()
    names, boxes = [], []
    for o in root.iter("object"):
        names.append(o.findtext("name"))
        boxes.append([float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    size = int(root.find("size").findtext("width")), int(root.find("size").findtext("height"))
    return names, np.array(boxes).reshape(-1, 4), size


def test_bccd_split_round_trip(shared_data, tmp_path):
    bccd = shared_data / "bccd"
    split = tmp_path / "ten.txt"
    split.write_text("\n".join(BCCD_IDS) + "\n")
    out = tmp_path / "out"
    assert run("--format", "voc", "--root", bccd, "--split-file", split, "--out", out,
               "--size", 160, "--rows-per-shard", 4, "--workers", 2) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [(c["index"], c["name"], c["category_id"]) for c in m["classes"]] == [
        (0, "Platelets", 1), (1, "RBC", 2), (2, "WBC", 3)]
    assert [s["rows"] for s in m["shards"]] == [4, 4, 2]
    got = rows(out)
    assert [r["file_name"] for r in got] == [f"{i}.jpg" for i in BCCD_IDS]
    assert [r["image_id"] for r in got] == list(range(1, 11))
    names = [c["name"] for c in m["classes"]]
    dropped = {i["item"] for i in m["issues"] if i["action"] == "dropped"}
    for r in got:
        assert (r["width"], r["height"], r["orig_width"], r["orig_height"]) == (160, 120, 640, 480)
        src_names, src, _ = xml_boxes(bccd / "Annotations" / r["file_name"].replace(".jpg", ".xml"))
        keep = [i for i in range(len(src)) if f"{r['file_name']} box {i}" not in dropped]
        box = np.array(r["boxes"], dtype=np.float64).reshape(-1, 4) * 4.0  # 640 / 160
        ref = np.clip(src[keep], 0, [640, 480, 640, 480])
        assert np.abs(box - ref).max() < 1.0
        assert [names[lab] for lab in r["labels"]] == [src_names[i] for i in keep]
    assert sum(c["boxes"] for c in m["classes"]) == m["counts"]["boxes"] == sum(len(r["labels"]) for r in got)


def test_raccoon_variant_folders_and_csv_split(shared_data, tmp_path):
    raccoon = shared_data / "raccoon"
    lines = (raccoon / "splits" / "train_labels.csv").read_text().splitlines()
    wanted = ["raccoon-150.jpg", "raccoon-17.jpg", "raccoon-11.jpg"]  # 150 is grayscale
    csv = tmp_path / "split.csv"
    csv.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in wanted]) + "\n")
    out = tmp_path / "out"
    assert run("--format", "voc", "--root", raccoon, "--split-file", csv, "--out", out,
               "--size", 128, "--workers", 2) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in m["classes"]] == ["raccoon"]
    got = rows(out)
    # CSV order kept (the file's order), one row per image even with several boxes.
    csv_order = list(dict.fromkeys(ln.split(",")[0] for ln in csv.read_text().splitlines()[1:]))
    assert [r["file_name"] for r in got] == csv_order
    assert m["issue_counts"] == {"L image converted to RGB": 1}
    for r in got:
        _, src, (w, h) = xml_boxes(raccoon / "annotations" / r["file_name"].replace(".jpg", ".xml"))
        assert (r["orig_width"], r["orig_height"]) == (w, h)
        box = np.array(r["boxes"], dtype=np.float64).reshape(-1, 4)
        box[:, [0, 2]] *= w / r["width"]
        box[:, [1, 3]] *= h / r["height"]
        assert np.abs(box - np.clip(src, 0, [w, h, w, h])).max() < 1.0


def _mini_voc(shared_data, tmp_path, n=3) -> Path:
    """A VOC tree in tmp_path with the first n BCCD images (so the XML can be damaged)."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i in BCCD_IDS[:n]:
        shutil.copy(shared_data / "bccd" / "Annotations" / f"{i}.xml", root / "Annotations")
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{i}.jpg", root / "JPEGImages")
    return root


def test_malformed_xml_is_skipped_and_listed_with_its_line(shared_data, tmp_path, capsys):
    root = _mini_voc(shared_data, tmp_path, n=4)
    bad = root / "Annotations" / f"{BCCD_IDS[1]}.xml"
    bad.write_text("<annotation>\n<filename>x.jpg</filename>\n<object><name>RBC</object>\n</annotation>\n")
    nan = root / "Annotations" / f"{BCCD_IDS[2]}.xml"
    text = nan.read_text()
    first = text.index("<xmin>")
    nan.write_text(text[:first] + "<xmin>nan</xmin>" + text[text.index("</xmin>", first) + 7:])
    out = tmp_path / "out"
    assert run("--format", "voc", "--root", root, "--out", out, "--size", 96, "--workers", 1) == 0
    assert "malformed annotation XML" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    kept = (BCCD_IDS[0], BCCD_IDS[2], BCCD_IDS[3])
    assert [r["file_name"] for r in rows(out)] == [f"{i}.jpg" for i in kept]
    skipped = [i for i in m["issues"] if i["action"] == "skipped"]
    assert skipped == [{"item": BCCD_IDS[1], "reason": "malformed annotation XML", "action": "skipped",
                        "detail": "malformed XML: mismatched tag", "file": f"Annotations/{BCCD_IDS[1]}.xml",
                        "line": 3}]
    nan_issue = [i for i in m["issues"] if i["reason"] == "malformed bndbox"]
    assert nan_issue == [{"item": f"{BCCD_IDS[2]}.jpg object 0", "reason": "malformed bndbox",
                          "action": "dropped", "file": f"Annotations/{BCCD_IDS[2]}.xml"}]
    names, src, _ = xml_boxes(shared_data / "bccd" / "Annotations" / f"{BCCD_IDS[2]}.xml")
    row = rows(out)[1]
    assert len(row["labels"]) + sum(1 for i in m["issues"] if i["item"].startswith(f"{BCCD_IDS[2]}.jpg")
                                    and i["action"] == "dropped") == len(names)
    assert m["counts"]["skipped_images"] == 1


def test_only_malformed_xml_is_a_one_line_error(shared_data, tmp_path, capsys):
    root = _mini_voc(shared_data, tmp_path, n=1)
    bad = root / "Annotations" / f"{BCCD_IDS[0]}.xml"
    bad.write_text("<annotation>\n<object>\n")
    out = tmp_path / "out"
    assert run("--format", "voc", "--root", root, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:3:" in err and "malformed XML" in err
    assert not out.exists()


def test_csv_without_filename_column(shared_data, tmp_path, capsys):
    root = _mini_voc(shared_data, tmp_path)
    csv = tmp_path / "s.csv"
    csv.write_text("name,width\nBloodImage_00001.jpg,640\n")
    assert run("--format", "voc", "--root", root, "--split-file", csv, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"{csv}:1:" in err and "filename" in err


def test_csv_row_without_filename_is_skipped_with_its_line(shared_data, tmp_path):
    root = _mini_voc(shared_data, tmp_path)
    csv = tmp_path / "s.csv"
    csv.write_text(f"filename,width\n{BCCD_IDS[0]}.jpg,640\n,640\n{BCCD_IDS[2]}.jpg,640\n")
    out = tmp_path / "o"
    assert run("--format", "voc", "--root", root, "--split-file", csv, "--out", out, "--size", 96,
               "--workers", 1) == 0
    assert [r["file_name"] for r in rows(out)] == [f"{BCCD_IDS[0]}.jpg", f"{BCCD_IDS[2]}.jpg"]
    m = json.loads((out / "manifest.json").read_text())
    assert [i for i in m["issues"] if i["action"] == "skipped"] == [
        {"item": "s.csv:3", "reason": "split row without filename", "action": "skipped", "detail": ",640",
         "file": "s.csv", "line": 3}]


def test_given_classes_stale_path_and_missing_files(shared_data, tmp_path):
    root = _mini_voc(shared_data, tmp_path, n=4)
    # Stale <path>/<folder> point nowhere: the image is found by <filename> under JPEGImages.
    x = root / "Annotations" / f"{BCCD_IDS[0]}.xml"
    x.write_text(x.read_text().replace("/home/pi/", "/nonexistent/"))
    (root / "JPEGImages" / f"{BCCD_IDS[2]}.jpg").unlink()  # missing image
    (root / "Annotations" / "evil.xml").write_text(
        "<annotation><filename>../../../etc/passwd</filename></annotation>")
    split = tmp_path / "s.txt"
    split.write_text("\n".join(BCCD_IDS[:4] + ["evil", "not_there"]) + "\n")
    out = tmp_path / "out"
    assert run("--format", "voc", "--root", root, "--split-file", split, "--classes", "WBC,RBC",
               "--out", out, "--size", 96, "--workers", 1) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [(c["name"], c["category_id"]) for c in m["classes"]] == [("WBC", 1), ("RBC", 2)]
    assert m["counts"]["images"] == 3
    ic = m["issue_counts"]
    assert ic["missing image file"] == 1
    assert ic["annotation XML missing"] == 1
    assert ic["file name escapes the image root"] == 1
    assert ic["unknown class name"] > 0  # the Platelets boxes
    assert m["counts"]["skipped_images"] == 3
