"""rtrain.deploy.inference: the standalone letterbox / decode / NMS agree with the training code on
real images."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_fixtures import BCCD_IDS, one_thread, spread_head
from PIL import Image
from torchvision.ops import nms as tv_nms

from rtrain.data.augment import Sample, letterbox
from rtrain.deploy import inference
from rtrain.models import build_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def bccd_image(shared_data) -> Path:
    return shared_data / "bccd" / "JPEGImages" / f"{BCCD_IDS[0]}.jpg"


def test_standalone_module_imports_nothing_else_from_rtrain():
    tree = ast.parse(Path(inference.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("rtrain")]
    assert {n.split(".")[0] for n in names} <= {"__future__", "json", "math", "os", "dataclasses", "pathlib",
                                                 "numpy", "PIL", "onnxruntime", "torch", "warnings"}


@pytest.mark.parametrize("name,size", [("bccd", 256), ("gray", 320), ("wide", 128)])
def test_letterbox_equals_training_letterbox(shared_data, bccd_image, name, size):
    path = {"bccd": bccd_image, "gray": shared_data / "raccoon" / "images" / "raccoon-150.jpg",
            "wide": shared_data / "raccoon" / "images" / "raccoon-1.jpg"}[name]
    rgb = np.asarray(inference.read_image(path))
    assert rgb.ndim == 3 and rgb.shape[2] == 3  # raccoon-150 is a grayscale JPEG
    canvas, scale, pad = inference.letterbox(rgb, size)
    ref = letterbox(Sample(rgb, np.zeros((0, 4)), [], []), size)
    assert np.array_equal(canvas, ref.image)
    assert scale == pytest.approx(ref.scale) and pad == pytest.approx(ref.pad)
    tensor, scale2, pad2 = inference.preprocess(path, size)
    assert tensor.shape == (1, 3, size, size) and tensor.dtype == np.float32
    assert np.allclose(tensor[0].transpose(1, 2, 0) * 255, ref.image, atol=1e-3)
    assert (scale2, pad2) == (scale, pad)


def test_read_image_applies_exif_and_converts_modes(bccd_image, tmp_path):
    src = Image.open(bccd_image)
    exif = src.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.jpg"
    src.save(rotated, exif=exif.tobytes())
    assert inference.read_image(rotated).size == (src.height, src.width)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(rgba)
    image = inference.read_image(rgba)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 255, 255)  # transparent -> white


def test_nms_equals_torchvision():
    gen = np.random.default_rng(0)
    xy = gen.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + gen.uniform(5, 60, (300, 2))], 1).astype(np.float32)
    scores = gen.uniform(0, 1, 300).astype(np.float32)
    for thr in (0.3, 0.5, 0.7):
        ours = inference.nms(boxes, scores, thr)
        ref = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("variant,size,conf", [("compact_s", 128, 0.2), ("seed", 128, 0.2),
                                               ("compact_s", 256, 0.001)])  # > pre_nms_topk candidates
def test_decode_equals_detector_postprocess(bccd_image, variant, size, conf):
    torch.manual_seed(0)
    model = spread_head(build_model(variant, 3)).eval()
    tensor, _, _ = inference.preprocess(bccd_image, size)
    batch = torch.from_numpy(np.concatenate([tensor, tensor[:, :, ::-1]]))  # + a flipped copy
    with torch.no_grad():
        cls_logits, box_dist = model.forward_raw(batch)
        ref = model.postprocess(cls_logits, box_dist, (size, size), score_thresh=conf, iou_thresh=0.5,
                                max_det=50)
    ours = inference.decode(cls_logits, box_dist, model.strides, model.reg_max, (size, size),
                            conf=conf, iou=0.5, max_det=50)
    assert len(ours) == 2
    for o, r in zip(ours, ref, strict=True):
        assert len(r["scores"]) > 5, "the test needs detections to compare"
        assert np.array_equal(o["labels"], r["labels"].numpy())
        np.testing.assert_allclose(o["scores"], r["scores"].numpy(), atol=1e-6)
        np.testing.assert_allclose(o["boxes"], r["boxes"].numpy(), atol=1e-3)
        assert o["boxes"].min() >= 0 and o["boxes"].max() <= size


def test_make_points_matches_box_ops():
    from rtrain.models.box_ops import level_sizes, make_points

    pts, strides = inference.make_points(96, 160, (8, 16, 32))
    ref_pts, ref_strides = make_points(level_sizes(96, 160, (8, 16, 32)), (8, 16, 32))
    assert np.array_equal(pts, ref_pts.numpy()) and np.array_equal(strides, ref_strides.numpy())


def test_to_original_inverts_letterbox():
    boxes = np.array([[10, 20, 110, 90]], np.float32)
    scale, pad = 0.5, (0.0, 32.0)
    inp = boxes * scale + np.array([pad[0], pad[1], pad[0], pad[1]])
    np.testing.assert_allclose(inference.to_original(inp, scale, pad, (256, 128)), [[10, 20, 110, 90]])
    clipped = inference.to_original(np.array([[-5, 0, 200, 200]]), 1.0, (0, 0), (100, 50))
    assert clipped.tolist() == [[0, 0, 100, 50]]


def test_load_exported_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="exported model not found"):
        inference.load_exported(tmp_path / "none.onnx")
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="sidecar not found"):
        inference.load_exported(lone)
    inference.sidecar_path(lone).write_text('{"format": "onnx"}')
    with pytest.raises(ValueError, match="malformed sidecar"):
        inference.load_exported(lone)
    inference.sidecar_path(lone).write_text(
        '{"format": "onnx", "class_names": ["a"], "img_size": 64, "strides": [8], "reg_max": 7}')
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        inference.load_exported(lone)
