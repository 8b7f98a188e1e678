"""timm trunks (`backbone="timm:<name>"`): real timm models, random init or weights from a local file.

Nothing downloads here: `pretrained=True` is only checked to fail with one line when offline.
"""

from __future__ import annotations

import sys

import pytest
import torch

from rtrain.models import build_model
from rtrain.models.timm_backbone import BackboneError

SMALL = "mobilenetv3_small_050"  # 0.27M trunk parameters: the smallest real MobileNet in timm


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def _batch(n=2, size=320, classes=3):
    torch.manual_seed(0)
    boxes = torch.tensor([[40.0, 50.0, 200.0, 220.0], [0.0, 0.0, 0.0, 0.0]]).expand(n, 2, 4).clone()
    labels = torch.tensor([[1, -1]]).expand(n, 2).clone()
    targets = {"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(n, 2, dtype=torch.bool)}
    return torch.rand(n, 3, size, size), targets


def test_detector_on_a_timm_trunk_forward_shapes_and_a_train_step(timm):
    model = build_model("compact_s", 3, backbone=f"timm:{SMALL}")
    assert model.spec.backbone == f"timm:{SMALL}" and model.spec.neck_channels == 96
    assert model.strides == (8, 16, 32)
    assert model.backbone.out_channels == tuple(model.backbone.body.feature_info.channels()) == (16, 24, 288)
    images, targets = _batch()
    feats = model.backbone(images)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 40, 40), (2, 24, 20, 20), (2, 288, 10, 10)]
    cls_logits, box_dist = model.forward_raw(images)
    assert cls_logits.shape == (2, 40 * 40 + 20 * 20 + 10 * 10, 3)
    assert box_dist.shape == (2, 2100, 4 * 8)
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    stem = model.backbone.body.conv_stem.weight.grad
    assert stem is not None and torch.isfinite(stem).all() and stem.abs().sum() > 0
    model.eval()
    dets = model(images)
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}


def test_input_normalisation_is_the_trunks_pretrained_mean_and_std(timm):
    # mobilevit was trained on unnormalised 0..1 input (mean 0, std 1), unlike ImageNet's mean/std
    model = build_model("compact_n", 2, backbone="timm:mobilevit_xxs")
    cfg = model.backbone.body.pretrained_cfg
    assert tuple(cfg["mean"]) == (0.0, 0.0, 0.0) and tuple(cfg["std"]) == (1.0, 1.0, 1.0)
    assert model.mean.flatten().tolist() == [0.0, 0.0, 0.0]
    assert model.std.flatten().tolist() == [1.0, 1.0, 1.0]
    imagenet = build_model("compact_n", 2, backbone=f"timm:{SMALL}")
    assert imagenet.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert imagenet.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("name,suffix", [(SMALL, ".pth"), (SMALL, ".safetensors"), ("test_convnext", ".pth")])
def test_weights_from_a_local_file_are_the_trunks(timm, tmp_path, name, suffix):
    # the classification model's state dict, as timm publishes it (the trunk drops its head);
    # test_convnext's trunk renames stages.0 -> stages_0 (timm's FeatureListNet)
    torch.manual_seed(3)
    full = timm.create_model(name)
    with torch.no_grad():
        for t in full.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn_like(t))
    sd = full.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    model = build_model("compact_s", 3, backbone=f"timm:{name}", backbone_weights=str(path))
    trunk = model.backbone.body.state_dict()
    folded = {k.replace(".", "_"): v for k, v in sd.items()}
    assert len(trunk) > 20
    for k, v in trunk.items():
        assert torch.equal(v, folded[k.replace(".", "_")]), k


def test_a_weights_file_of_another_model_is_one_line(timm, tmp_path):
    path = tmp_path / "lcnet.pth"
    torch.save(timm.create_model("lcnet_050").state_dict(), path)
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", backbone_weights=str(path))
    msg = _one_line(exc)
    assert msg.startswith(f"model.backbone_weights: {path}: not weights of timm model {SMALL}: ")
    assert "105 of another shape (e.g. conv_stem.weight: file [8, 3, 3, 3], trunk [16, 3, 3, 3])" in msg


def test_a_partial_file_is_refused_not_loaded_in_part(timm, tmp_path):
    # timm's own file loading accepts this silently (non-strict); the trunk must not
    sd = timm.create_model(SMALL).state_dict()
    del sd["blocks.0.0.conv_dw.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", backbone_weights=str(path))
    assert "1 of the trunk's 240 tensors missing (e.g. blocks.0.0.conv_dw.weight)" in _one_line(exc)


def test_an_rtrain_run_weights_file_points_at_model_init(timm, tmp_path):
    model = build_model("compact_s", 3, backbone=f"timm:{SMALL}")
    path = tmp_path / "best_model.pth"
    torch.save({"model": model.state_dict()}, path)  # "model" key: unwrapped like timm's own checkpoints
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", backbone_weights=str(path))
    assert _one_line(exc).endswith("an rtrain run's weights go in model.init")


@pytest.mark.parametrize("content,why", [
    (b"not a checkpoint", "not a readable weights file"),
    (None, "no such file"),
])
def test_a_broken_or_missing_weights_file_is_one_line(timm, tmp_path, content, why):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", backbone_weights=str(path))
    assert _one_line(exc).startswith(f"model.backbone_weights: {path}: {why}")


def test_unpicklable_weights_are_refused_by_weights_only(timm, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "x": _Foreign()}, path)
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", backbone_weights=str(path))
    assert "not a readable weights file" in _one_line(exc)


class _Foreign:  # a pickled object of this class cannot load under weights_only=True
    pass


def test_unknown_timm_name_is_one_line_with_how_to_list_names(timm):
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone="timm:mobilenetv3_smal_100")
    msg = _one_line(exc)
    assert msg.startswith("model.backbone: unknown timm model 'mobilenetv3_smal_100' (close: ")
    assert "mobilenetv3_small_100" in msg and "timm.list_models(" in msg


def test_a_trunk_without_strides_8_16_32_is_one_line(timm):
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone="timm:test_vit")
    assert "has feature maps at strides [16, 16, 16, 16, 16, 16]; the detector needs" in _one_line(exc)


def test_pretrained_offline_is_one_line_naming_backbone_weights(timm, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no retries: fail at once, as offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", pretrained=True)
    msg = _one_line(exc)
    assert msg.startswith(f"model.pretrained: cannot get timm's pretrained weights for {SMALL} (")
    assert "set model.backbone_weights" in msg


def test_without_timm_installed_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(BackboneError) as exc:
        build_model("compact_s", 3, backbone=f"timm:{SMALL}")
    assert _one_line(exc) == ('model.backbone: a timm backbone needs the timm package: '
                              'pip install -e ".[timm]"')
    assert build_model("compact_s", 3).strides == (8, 16, 32)  # rtrain's own trunks need no timm


def test_width_or_pretrained_without_a_timm_trunk_is_refused():
    with pytest.raises(ValueError, match="a timm backbone's size is in its name"):
        build_model("compact_s", 3, backbone=f"timm:{SMALL}", width=0.5)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("compact_s", 3, pretrained=True)
