"""A run's weights with a timm trunk: they rebuild from their config alone (evaluate, predict, export,
resume) and fine-tune another run (`model.init`), without timm's download or the trunk's file."""

from __future__ import annotations

import pytest
import torch

from rtrain.config import config_from_dict, config_to_dict
from rtrain.runs.checkpoint import IncompatibleCheckpointError, check_compatible, save_weights
from rtrain.runs.loading import build_detector, init_from_weights, load_detector

timm = pytest.importorskip("timm")

TRUNK = "timm:mobilenetv3_small_050"
NAMES = ["cell", "platelet", "rbc"]


def _cfg(**model):
    return config_from_dict({"model": {"name": "compact_n", "backbone": TRUNK, **model}})


@pytest.fixture()
def run_weights(tmp_path):
    """best.pt of a run that started from a local timm weights file, which is gone afterwards."""
    torch.manual_seed(5)
    full = timm.create_model(TRUNK.removeprefix("timm:"))
    with torch.no_grad():  # other than any fresh build's
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trunk_file = tmp_path / "mnv3.pth"
    torch.save(full.state_dict(), trunk_file)
    cfg = _cfg(backbone_weights=str(trunk_file))
    model = build_detector(cfg, len(NAMES), pretrained=True)
    assert torch.equal(model.backbone.body.conv_stem.weight, full.conv_stem.weight)
    with torch.no_grad():  # "training": the head moves too
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_weights(tmp_path / "run" / "best.pt", model.state_dict(), config_to_dict(cfg), NAMES)
    trunk_file.unlink()  # a reload must not need it (another machine, a deleted download)
    return path, model


def test_best_pt_rebuilds_its_timm_trunk_from_the_config(run_weights):
    path, model = run_weights
    loaded = load_detector(path)
    assert loaded.config.model.backbone == TRUNK and loaded.class_names == NAMES
    assert loaded.model.spec == model.spec
    saved = model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    x = torch.rand(1, 3, 128, 128)
    model.eval()
    with torch.no_grad():
        for a, b in zip(loaded.model.forward_raw(x), model.forward_raw(x), strict=True):
            assert torch.isfinite(a).all() and torch.equal(a, b)


def test_another_run_fine_tunes_from_timm_trunk_weights(run_weights):
    path, model = run_weights
    other = build_detector(_cfg(), 2)  # other classes, random trunk
    report = init_from_weights(other, path, ["a", "b"], log=False)
    assert report.backbone_fit == 1.0 and report.classes_differ
    assert torch.equal(other.backbone.body.conv_stem.weight, model.backbone.body.conv_stem.weight)


def test_weights_of_the_variants_own_trunk_do_not_fit_a_timm_one(tmp_path):
    cfg = config_from_dict({"model": {"name": "compact_n"}})
    path = save_weights(tmp_path / "best.pt", build_detector(cfg, 3).state_dict(), config_to_dict(cfg), NAMES)
    with pytest.raises(IncompatibleCheckpointError, match="another architecture"):
        init_from_weights(build_detector(_cfg(), 3), path, NAMES, log=False)


def test_resume_ignores_the_trunks_starting_weights_but_not_the_trunk(run_weights):
    path, _ = run_weights
    saved = torch.load(path, weights_only=True)
    moved = config_to_dict(_cfg(backbone_weights="/elsewhere/mnv3.pth", pretrained=True))
    check_compatible(saved, moved, NAMES)  # where the starting weights came from is no architecture
    other = config_to_dict(_cfg(backbone="timm:lcnet_050"))
    with pytest.raises(IncompatibleCheckpointError, match="model.backbone differs"):
        check_compatible(saved, other, NAMES)


def test_a_checkpoint_from_before_model_backbone_still_resumes():
    cfg = config_to_dict(config_from_dict({"model": {"name": "compact_n"}}))
    old = {k: v for k, v in cfg["model"].items() if k not in ("backbone", "pretrained", "backbone_weights")}
    check_compatible({"class_names": NAMES, "config": {**cfg, "model": old}}, cfg, NAMES)


def test_fit_checks_the_trunk_and_its_file_before_ray(tmp_path):
    from rtrain.training.runner import FitError, check_model

    missing = tmp_path / "gone.pth"
    with pytest.raises(FitError, match=f"^model.backbone_weights: {missing}: no such file$"):
        check_model(_cfg(backbone_weights=str(missing)), 3, pretrained=True)
    check_model(_cfg(backbone_weights=str(missing)), 3, pretrained=False)  # resume: the file is not read
    with pytest.raises(FitError, match="^model.backbone: unknown timm model 'nope'"):
        check_model(_cfg(backbone="timm:nope"), 3, pretrained=False)
    with pytest.raises(FitError, match="^model: unknown model variant 'nope'"):
        check_model(config_from_dict({"model": {"name": "nope"}}), 3, pretrained=False)


def test_feature_map_pictures_pick_the_timm_trunks_output_maps():
    from rtrain.models.summary import layer_table
    from rtrain.runs.feature_maps import default_layers

    rows = layer_table(build_detector(_cfg(), 3), 64)
    assert rows[:3] == [("backbone.p8", (1, 16, 8, 8)), ("backbone.p16", (1, 24, 4, 4)),
                        ("backbone.p32", (1, 288, 2, 2))]
    assert default_layers([name for name, _ in rows]) == ["backbone.p8", "backbone.p16", "backbone.p32"]
