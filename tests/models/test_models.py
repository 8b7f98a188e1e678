"""Model package: every variant's shapes, gradients, the seed trunk, postprocess, registry, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtrain.models import build_model, count_gflops, count_params, list_variants, register_variant
from rtrain.models.__main__ import main as models_cli
from rtrain.models.blocks import make_divisible, scale_depth
from rtrain.models.box_ops import level_sizes
from rtrain.models.summary import layer_table, trunk_convs, variant_table

NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _small_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _targets(batch: int, size: int) -> list[dict]:
    """Image 0 has two boxes (one crowd), the others none."""
    out = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "iscrowd": torch.zeros(0, dtype=torch.bool),
        }
        for _ in range(batch)
    ]
    out[0] = {
        "boxes": torch.tensor(
            [[4.0, 8.0, size * 0.6, size * 0.7], [size * 0.5, size * 0.5, size - 2.0, size - 1.0]]
        ),
        "labels": torch.tensor([2, 0]),
        "iscrowd": torch.tensor([False, True]),
    }
    return out


def test_core_variants_registered():
    names = list_variants()
    assert {"seed", "compact_n", "compact_s", "compact_m"} <= set(names)
    assert any(n.startswith("mv2") for n in names)


@pytest.mark.parametrize("name", list_variants())
def test_variant_output_shapes(name):
    model = build_model(name, NUM_CLASSES).eval()
    assert model.num_classes == NUM_CLASSES and model.reg_max == 7
    assert model.strides[:3] == (8, 16, 32)
    for height, width in [(128, 128), (160, 96)]:
        with torch.no_grad():
            cls_logits, box_dist = model.forward_raw(torch.rand(2, 3, height, width))
        n = sum(h * w for h, w in level_sizes(height, width, model.strides))
        assert cls_logits.shape == (2, n, NUM_CLASSES)
        assert box_dist.shape == (2, n, 4 * 8)
        assert torch.isfinite(cls_logits).all() and torch.isfinite(box_dist).all()


def test_overrides_change_the_model():
    base = build_model("compact_s", NUM_CLASSES)
    wide = build_model("compact_s", NUM_CLASSES, width=1.5, neck_channels=96, head_convs=1, reg_max=10)
    assert count_params(wide) > count_params(base)
    assert wide.reg_max == 10 and wide.spec.neck_channels == 96 and len(wide.head.tower) == 1
    assert wide.forward_raw(torch.rand(1, 3, 64, 64))[1].shape[-1] == 4 * 11
    for width in (0.25, 2.0):  # the compact family's documented width range
        thin_or_wide = build_model("compact_s", NUM_CLASSES, width=width, depth=0.5)
        assert thin_or_wide.forward_raw(torch.rand(1, 3, 64, 64))[0].shape == (1, 64 + 16 + 4, NUM_CLASSES)
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model("nope", NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("compact_s", 0)


def test_param_counts_table_and_ranges():
    rows = {r["variant"]: r for r in variant_table(NUM_CLASSES, sizes=())}
    assert set(rows) == set(list_variants())
    for name, row in rows.items():
        model = build_model(name, NUM_CLASSES)
        assert row["params"] == sum(p.numel() for p in model.parameters()) == count_params(model)
        assert 0.03e6 < row["params"] < 10e6, name
    assert rows["compact_n"]["params"] < rows["compact_s"]["params"] < rows["compact_m"]["params"]
    assert rows["mv2_s"]["params"] < rows["mv2_m"]["params"] < rows["seed"]["params"]


def test_gflops_count_two_per_mac():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8 out channels x 32 x 32 positions x 27 MACs each, 2 FLOPs per MAC
    assert count_gflops(conv, 32) == pytest.approx(2 * 8 * 32 * 32 * 27 / 1e9)
    model = build_model("compact_s", NUM_CLASSES)
    small, big = count_gflops(model, 128), count_gflops(model, 256)
    assert 3.5 < big / small < 4.5  # convs scale with area


def test_seed_trunk_is_the_research_trunk():
    model = build_model("seed", NUM_CLASSES)
    convs = [(r["in"], r["out"], r["kernel"], r["stride"], r["groups"]) for r in trunk_convs(model.backbone)]
    expected = [(3, 32, 3, 2, 1)]
    separable = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    separable += [(512, 512, 1)] * 5 + [(512, 1024, 2)]
    separable += [(1024, 512, 2), (512, 256, 2), (256, 128, 1)]  # extras
    for cin, cout, stride in separable:
        expected += [(cin, cin, 3, stride, cin), (cin, cout, 1, 1, 1)]  # 3x3 depthwise, 1x1 pointwise
    assert convs == expected
    assert model.strides == (8, 16, 32, 64, 128)
    assert model.backbone.out_channels == (256, 512, 1024, 512, 128)
    acts = {type(m) for m in model.backbone.modules() if isinstance(m, nn.ReLU | nn.ReLU6 | nn.Hardswish)}
    assert acts == {nn.ReLU}
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules()) == len(expected)


@pytest.mark.parametrize("name", list_variants())
def test_backward_reaches_every_parameter(name):
    model = build_model(name, NUM_CLASSES, width=0.5 if name == "seed" else None).train()
    losses = model(torch.rand(2, 3, 128, 128), _targets(2, 128))
    assert set(losses) >= {"loss", "loss_cls", "loss_box", "loss_dfl"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in model.named_parameters() if not p.grad.any()]
    assert not zero, zero


def test_eval_batch_of_two_with_zero_detections():
    model = build_model("compact_n", NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 128))
    assert len(out) == 2
    for det in out:  # the 0.01 class prior is below the 0.05 score threshold
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)
        assert det["labels"].dtype == torch.int64


def test_bad_inputs_are_refused():
    model = build_model("compact_n", NUM_CLASSES)
    with pytest.raises(ValueError, match="needs targets"):
        model.train()(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        model.eval()(torch.rand(1, 3, 64, 70))


def _peaked(bins: list[int], reg_max: int = 7) -> torch.Tensor:
    """DFL logits [4 * (reg_max + 1)] that decode to ~`bins` (stride units) per side."""
    logits = torch.full((4, reg_max + 1), -20.0)
    for side, b in enumerate(bins):
        logits[side, b] = 20.0
    return logits.flatten()


def test_postprocess_boxes_inside_image_and_max_det():
    model = build_model("compact_n", NUM_CLASSES).eval()
    height, width = 96, 128
    n = sum(h * w for h, w in level_sizes(height, width, model.strides))
    cls_logits = torch.randn(2, n, NUM_CLASSES) + 3.0
    box_dist = torch.randn(2, n, 32) * 3
    dets = model.postprocess(cls_logits, box_dist, (height, width), max_det=7, iou_thresh=0.9)
    for det in dets:
        assert 0 < len(det["boxes"]) <= 7
        b = det["boxes"]
        assert (
            (b[:, 0] >= 0).all()
            and (b[:, 1] >= 0).all()
            and (b[:, 2] <= width).all()
            and (b[:, 3] <= height).all()
        )
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_postprocess_decodes_and_nms_is_class_aware():
    model = build_model("compact_n", NUM_CLASSES).eval()
    height, width = 128, 128
    n = sum(h * w for h, w in level_sizes(height, width, model.strides))
    cls_logits = torch.full((1, n, NUM_CLASSES), -10.0)
    box_dist = torch.zeros(1, n, 32)
    # stride-8 level (16 x 16 points), row 4, column 4 -> centre (36, 36), and its right neighbour
    p, q = 4 * 16 + 4, 4 * 16 + 5
    box_dist[0, p] = _peaked([4, 4, 4, 4])
    box_dist[0, q] = _peaked([4, 4, 4, 4])
    cls_logits[0, p, 0] = 4.0  # class 0
    cls_logits[0, p, 1] = 3.0  # same box, class 1: must survive class-aware NMS
    cls_logits[0, q, 0] = 2.0  # shifted 8 px, class 0: IoU 0.78 with the best -> suppressed
    det = model.postprocess(cls_logits, box_dist, (height, width))[0]
    assert det["labels"].tolist() == [0, 1]
    torch.testing.assert_close(det["boxes"][0], torch.tensor([36.0 - 32, 36.0 - 32, 36.0 + 32, 36.0 + 32]))
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([4.0, 3.0])))


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):

        @register_variant("compact_s")
        def again(**kwargs):  # pragma: no cover - never registered
            return None

    assert list_variants().count("compact_s") == 1


def test_layer_table_and_cli(capsys):
    rows = dict(layer_table(build_model("compact_s", NUM_CLASSES), 128, 96))
    assert rows["backbone.stem"][2:] == (64, 48)
    assert rows["neck.p8"][2:] == (16, 12) and rows["neck.p32"][2:] == (4, 3)
    assert rows["head.cls.p16"] == (1, NUM_CLASSES, 8, 6)
    assert models_cli(["--trunk", "seed"]) == 0
    out = capsys.readouterr().out
    assert "512->1024" in out and "3->32" in out and "1024->512" in out
    assert models_cli(["--layers", "nope"]) == 2


def test_onnx_and_torchscript_parity(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = build_model("compact_s", NUM_CLASSES).eval()
    images = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        ref = model.forward_raw(images)

    class Raw(nn.Module):
        def __init__(self, det):
            super().__init__()
            self.det = det

        def forward(self, x):
            return self.det.forward_raw(x)

    raw = Raw(model).eval()
    path = tmp_path / "compact_s.onnx"
    torch.onnx.export(
        raw,
        (images,),
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["images"],
        output_names=["cls_logits", "box_dist"],
    )
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": images.numpy()})
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), r, atol=1e-4, rtol=1e-4)

    traced = torch.jit.trace(raw, images)
    path_ts = tmp_path / "compact_s.pt"
    traced.save(str(path_ts))
    loaded = torch.jit.load(str(path_ts))
    with torch.no_grad():
        got_ts = loaded(images)
    for r, g in zip(ref, got_ts, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_width_depth_helpers():
    assert make_divisible(32 * 0.75) == 24 and make_divisible(16 * 0.25) == 8 and make_divisible(100) == 104
    assert scale_depth(5, 1.0) == 5 and scale_depth(3, 0.5) == 2 and scale_depth(1, 0.1) == 1
