"""python -m rtrain.export: ONNX and TorchScript of every registered variant match PyTorch on real images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from inference_fixtures import BCCD_CLASSES, cli_error, copy_images, make_weights, one_thread

from rtrain.deploy.exporter import FORMATS, export_weights
from rtrain.deploy.inference import load_exported, read_image
from rtrain.deploy.predictor import predict
from rtrain.export import main
from rtrain.models import build_model, list_variants

SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def images(shared_data, tmp_path_factory):
    """Two real photos of different shapes: BCCD 640x480 and raccoon-1 650x417."""
    return copy_images(shared_data, tmp_path_factory.mktemp("check"), bccd=1, raccoon=("raccoon-1.jpg",))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list_variants())
def test_every_variant_exports_with_parity(variant, fmt, images, tmp_path):
    weights = make_weights(tmp_path / "best.pt", variant=variant, img_size=SIZE)
    report = export_weights(weights, fmt, size=SIZE, dynamic_batch=True, check_images=images)
    parity = report["parity"]
    assert parity["images"] == 2 and parity["source"] == str(images)
    assert parity["detections_match"], parity["first_difference"]
    assert min(parity["detections_torch"]) > 0, "parity of empty detection lists proves nothing"
    assert parity["max_abs_diff"]["cls_logits"] < 2e-3 and parity["max_abs_diff"]["box_dist"] < 2e-3
    meta = json.loads((tmp_path / f"best.{fmt}.json").read_text())
    model = build_model(variant, 3)
    assert meta["class_names"] == BCCD_CLASSES and meta["img_size"] == SIZE and meta["format"] == fmt
    assert meta["strides"] == list(model.strides) and meta["reg_max"] == model.reg_max
    assert "inside the model" in meta["input"]["normalisation"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_timm_trunk_exports_with_parity(fmt, images, tmp_path):
    pytest.importorskip("timm")
    weights = make_weights(tmp_path / "best.pt", backbone="timm:mobilenetv3_small_050", img_size=SIZE)
    report = export_weights(weights, fmt, size=SIZE, dynamic_batch=False, check_images=images)
    parity = report["parity"]
    assert parity["detections_match"], parity["first_difference"]
    assert min(parity["detections_torch"]) > 0
    meta = json.loads((tmp_path / f"best.{fmt}.json").read_text())
    assert meta["strides"] == [8, 16, 32]
    assert meta["input"]["normalisation"].startswith("mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)")


def test_exported_file_is_usable_alone_and_agrees_with_predict(images, tmp_path):
    weights = make_weights(tmp_path / "run" / "best.pt", img_size=SIZE)
    assert main(["--weights", str(weights), "--format", "onnx", "--dynamic-batch",
                 "--check-images", str(images)]) == 0
    edge = tmp_path / "edge"  # only the .onnx and its sidecar travel
    edge.mkdir()
    for name in ("best.onnx", "best.onnx.json"):
        shutil.copy(tmp_path / "run" / name, edge / name)
    model = load_exported(edge / "best.onnx")
    cls_logits, box_dist = model.raw(np.zeros((3, 3, SIZE, SIZE), np.float32))  # dynamic batch
    assert cls_logits.shape[0] == box_dist.shape[0] == 3 and cls_logits.shape[2] == 3
    # an export has a fixed square input: predict on the same square canvas (rect=False) to compare
    report = predict(weights, images, out_dir=tmp_path / "pred", conf=0.3, iou=0.5, draw=False, rect=False)
    data = json.loads(report.json_path.read_text())
    for im in data["images"]:
        det = model.detect(images / im["file_name"], conf=0.3, iou=0.5)
        ours = sorted(([r["category_id"], r["score"], *r["bbox"]] for r in data["results"]
                       if r["image_id"] == im["id"]), key=lambda t: -t[1])
        assert len(det["scores"]) == len(ours) > 0
        w, h = read_image(images / im["file_name"]).size
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h and det["boxes"].min() >= 0
        for (label, score, x, y, bw, bh), box, s, lab in zip(ours, det["boxes"], det["scores"], det["labels"],
                                                           strict=True):
            assert label == lab and score == pytest.approx(float(s), abs=1e-4)
            assert [x, y, x + bw, y + bh] == pytest.approx(box.tolist(), abs=0.05)


def test_torchscript_cli_with_fixed_batch_and_default_output(images, tmp_path, capsys):
    weights = make_weights(tmp_path / "best.pt", variant="compact_n", img_size=SIZE)
    assert main(["--weights", str(weights), "--format", "torchscript", "--check-images", str(images)]) == 0
    out = capsys.readouterr().out
    assert "match: yes" in out and "max |diff|" in out
    meta = json.loads((tmp_path / "best.torchscript.json").read_text())
    assert meta["input"]["shape"] == [1, 3, SIZE, SIZE] and not meta["dynamic_batch"]


def _error(capsys, argv) -> str:
    return cli_error(capsys, main, argv)


def test_bad_inputs(tmp_path, capsys):
    weights = make_weights(tmp_path / "best.pt", variant="compact_n", img_size=SIZE)
    assert "file not found" in _error(capsys, ["--weights", str(tmp_path / "no.pt"), "--format", "onnx"])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(weights.read_bytes()[:1000])
    assert "corrupt" in _error(capsys, ["--weights", str(corrupt), "--format", "onnx"])
    argv = ["--weights", str(weights), "--format", "onnx"]
    assert "multiple of 32" in _error(capsys, [*argv, "--size", "100"])
    with pytest.raises(SystemExit) as exc:
        main(["--weights", str(weights), "--format", "tflite"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert "do not fit" in _error(capsys, ["--weights", str(weights), "--format", "onnx",
                                           "--set", "model.name=compact_s"])
