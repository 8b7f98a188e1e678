"""python -m rtrain.predict on real BCCD / raccoon JPEGs: pictures, JSON, bad input, Ray Data parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from inference_fixtures import (  # noqa: F401  (the *_fixture names are module fixtures)
    BCCD_IDS,
    cli_error,
    copy_images,
    make_bccd_shards,
    make_weights,
    one_thread_module_fixture,
    weights_128_fixture,
)
from PIL import Image

from rtrain.deploy.inference import read_image
from rtrain.deploy.predictor import predict, wants_ray
from rtrain.predict import main


@pytest.fixture(scope="module")
def folder(shared_data, tmp_path_factory):
    """Real JPEGs (BCCD 640x480, raccoon incl. a grayscale one), an EXIF-rotated copy, an RGBA PNG
    in a sub-folder, and a corrupt file."""
    d = copy_images(shared_data, tmp_path_factory.mktemp("imgs"))
    src = Image.open(shared_data / "bccd" / "JPEGImages" / f"{BCCD_IDS[2]}.jpg")
    exif = src.getexif()
    exif[0x0112] = 6
    src.save(d / "rotated.jpg", exif=exif.tobytes())
    (d / "sub").mkdir()
    alpha = Image.open(shared_data / "raccoon" / "images" / "raccoon-10.jpg").convert("RGBA")
    alpha.save(d / "sub" / "alpha.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return d


def _by_image(data: dict) -> dict[str, list[tuple]]:
    names = {im["id"]: im["file_name"] for im in data["images"]}
    out = {n: [] for n in names.values()}
    for r in data["results"]:
        out[names[r["image_id"]]].append((r["category_id"], r["score"], *r["bbox"]))
    return {n: sorted(v, key=lambda t: -t[1]) for n, v in out.items()}


def test_folder_writes_pictures_and_json_and_skips_the_corrupt_file(weights, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--weights", str(weights), "--source", str(folder), "--out", str(out), "--conf", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped:     1" in printed and "broken.jpg" in printed
    data = json.loads((out / "predictions.json").read_text())
    assert data["skipped"][0]["file_name"] == "broken.jpg" and "unreadable" in data["skipped"][0]["reason"]
    assert [c["name"] for c in data["categories"]] == ["Platelets", "RBC", "WBC"]
    names = sorted(im["file_name"] for im in data["images"])
    assert names == sorted(["BloodImage_00000.jpg", "BloodImage_00002.jpg", "raccoon-150.jpg",
                            "raccoon-1.jpg", "rotated.jpg", "sub/alpha.png"])
    assert len({im["id"] for im in data["images"]}) == 6
    for im in data["images"]:
        original = read_image(folder / im["file_name"])  # EXIF applied
        assert (im["width"], im["height"]) == original.size
        with Image.open(out / im["file_name"]) as pic:
            assert pic.size == original.size and pic.mode == "RGB"
    rotated = next(im for im in data["images"] if im["file_name"] == "rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (480, 640)
    assert len(data["results"]) > 10 and all(r["score"] > 0.3 for r in data["results"])
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for r in data["results"]:
        x, y, w, h = r["bbox"]
        W, H = size[r["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W + 1e-3 and y + h <= H + 1e-3
        assert r["category_id"] in (0, 1, 2)
    # the drawn picture differs from the original where boxes are
    with Image.open(out / "BloodImage_00000.jpg") as pic:
        drawn = np.asarray(pic, np.int16)
    plain = np.asarray(read_image(folder / "BloodImage_00000.jpg"), np.int16)
    assert np.abs(drawn - plain).max() > 100


def test_single_image_glob_and_shards(weights, folder, shared_data, tmp_path):
    one = predict(weights, folder / "raccoon-1.jpg", out_dir=tmp_path / "one", conf=0.3)
    assert one.mode == "in-process" and one.images == 1 and (tmp_path / "one" / "raccoon-1.jpg").is_file()
    globbed = predict(weights, str(folder / "Blood*.jpg"), out_dir=tmp_path / "glob", conf=0.3, draw=False)
    assert globbed.images == 2 and not list((tmp_path / "glob").glob("*.jpg"))
    shards = make_bccd_shards(shared_data, tmp_path / "shards", ids=BCCD_IDS[:3])
    rep = predict(weights, shards, out_dir=tmp_path / "sh", conf=0.3)
    data = json.loads(rep.json_path.read_text())
    assert [im["file_name"] for im in data["images"]] == [f"{i}.jpg" for i in BCCD_IDS[:3]]
    assert all((im["width"], im["height"]) == (640, 480) for im in data["images"])  # original px
    assert {c["id"] for c in data["categories"]} == {1, 2, 3}  # the manifest's source ids
    assert data["results"] and all(r["category_id"] in (1, 2, 3) for r in data["results"])


def _error(capsys, argv) -> str:
    return cli_error(capsys, main, argv)


def test_bad_inputs(weights, folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    assert "no images found" in _error(capsys, ["--weights", str(weights), "--source", str(empty)])
    assert "no images match" in _error(capsys, ["--weights", str(weights), "--source", str(empty / "*.jpg")])
    assert "no such file" in _error(capsys, ["--weights", str(weights), "--source", str(tmp_path / "nope")])
    assert "file not found" in _error(capsys, ["--weights", str(tmp_path / "x.pt"), "--source", str(folder)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(weights.read_bytes()[:3000])  # truncated
    assert "corrupt" in _error(capsys, ["--weights", str(bad), "--source", str(folder)])
    assert "multiple of 32" in _error(capsys, ["--weights", str(weights), "--source", str(folder),
                                               "--size", "100"])


def test_ray_data_batch_inference_equals_in_process(ray_session, weights, folder, tmp_path):
    local = predict(weights, folder, out_dir=tmp_path / "local", conf=0.3, batch_size=3, draw=False)
    distributed = predict(weights, folder, out_dir=tmp_path / "ray", conf=0.3, batch_size=2, workers=2)
    assert local.mode == "in-process" and distributed.mode == "ray" and not distributed.started_ray
    a = json.loads(local.json_path.read_text())
    b = json.loads(distributed.json_path.read_text())
    assert [im["file_name"] for im in a["images"]] == [im["file_name"] for im in b["images"]]
    assert a["skipped"] == b["skipped"] and len(b["skipped"]) == 1
    da, db = _by_image(a), _by_image(b)
    assert sum(map(len, da.values())) > 10
    for name in da:
        assert len(da[name]) == len(db[name]), name
        for ra, rb in zip(da[name], db[name], strict=True):
            assert ra[0] == rb[0] and ra[1] == pytest.approx(rb[1], abs=1e-5)
            assert ra[2:] == pytest.approx(rb[2:], abs=1e-2)
    for im in b["images"]:  # the actors drew the pictures
        assert (tmp_path / "ray" / im["file_name"]).is_file()


def test_ray_is_used_for_more_than_64_images_or_when_asked():
    # (the Ray path itself is exercised above; a 65-image run would only add actor start-up time)
    assert not wants_ray(64, None, None) and wants_ray(65, None, None)
    assert wants_ray(3, 2, None) and wants_ray(3, None, 1)


def test_plain_images_carry_the_training_shards_category_ids_and_class_names(weights, folder, shared_data,
                                                                              tmp_path, caplog):
    # Weights whose config names their train shards by a path relative to the project folder
    # (runs/NAME/best.pt beside data/...), as rtrain.fit writes them; the same model as `weights`.
    (tmp_path / "data").mkdir()
    shards = make_bccd_shards(shared_data, tmp_path / "data" / "bccd_train", ids=BCCD_IDS[:3], size=128)
    trained = make_weights(tmp_path / "runs" / "r1" / "best.pt", img_size=128,
                           config_extra={"data": {"img_size": 128, "train": "data/bccd_train"}})
    rep = predict(trained, folder, out_dir=tmp_path / "ids", conf=0.3, draw=False)
    data = json.loads(rep.json_path.read_text())
    assert data["category_ids_from"] == str(shards / "manifest.json")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert data["categories"] == [{"id": c["category_id"], "name": c["name"]} for c in manifest["classes"]]
    assert data["categories"] == [{"id": 1, "name": "Platelets"}, {"id": 2, "name": "RBC"},
                                  {"id": 3, "name": "WBC"}]
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert data["results"] and all(r["category_name"] == names[r["category_id"]] for r in data["results"])

    # The same model without a reachable training manifest: class index ids, named, and a warning.
    with caplog.at_level("WARNING", logger="rtrain.deploy.predictor"):
        plain = predict(weights, folder, out_dir=tmp_path / "idx", conf=0.3, draw=False)
    assert "category ids = class index" in caplog.text
    fallback = json.loads(plain.json_path.read_text())
    assert fallback["category_ids_from"] == "class index"
    assert [c["id"] for c in fallback["categories"]] == [0, 1, 2]
    assert len(fallback["results"]) == len(data["results"])
    for a, b in zip(data["results"], fallback["results"], strict=True):  # same detections, ids shifted
        assert (a["image_id"], a["category_name"]) == (b["image_id"], b["category_name"])
        assert a["category_id"] == b["category_id"] + 1
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
