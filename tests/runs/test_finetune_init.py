"""Fine-tuning (`model.init`): real rtrain weights files loaded into models of other classes and sizes."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch

from rtrain.config import config_from_dict, config_to_dict
from rtrain.runs.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointError,
    check_compatible,
    save_weights,
)
from rtrain.runs.loading import CLASS_LOGITS_PREFIX, build_detector, init_from_weights
from rtrain.training.ema import ModelEMA

SIX = ["a", "b", "c", "d", "e", "f"]


def _cfg(name="compact_n", **model):
    return config_from_dict({"model": {"name": name, **model}})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """best.pt of a compact_n with 6 classes whose every tensor differs from a fresh build."""
    torch.manual_seed(1)
    cfg = _cfg()
    model = build_detector(cfg, len(SIX))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn_like(t) * 0.1 + 0.5)
    path = save_weights(tmp_path_factory.mktemp("run") / "best.pt", model.state_dict(), config_to_dict(cfg),
                        SIX, {"epoch": 3})
    return path, model.state_dict()


def _equal(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def test_other_classes_load_everything_but_the_logits(pretrained, caplog):
    path, saved = pretrained
    torch.manual_seed(2)
    model = build_detector(_cfg(), 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="rtrain.runs.loading"):
        report = init_from_weights(model, path, ["x", "y", "z"])
    now = model.state_dict()
    logits = [k for k in now if k.startswith(CLASS_LOGITS_PREFIX)]
    assert logits == ["head.cls_out.weight", "head.cls_out.bias"]
    for k, v in now.items():
        if k in logits:
            assert _equal(v, fresh[k]), k  # the fresh initialisation (prior bias), not the file's
        else:
            assert _equal(v, saved[k]), k
    assert report.classes_differ and sorted(report.left) == sorted(logits)
    assert len(report.loaded) == len(now) - 2 and report.backbone_fit == 1.0 and not report.unused
    line = caplog.records[-1].getMessage()
    assert f"init from {path}: loaded {len(now) - 2}/{len(now)} tensors" in line
    assert "class logits re-initialised (6 classes" in line and "head.cls_out.weight" in line


def test_same_count_other_names_still_reinitialises_the_logits(pretrained):
    path, saved = pretrained
    model = build_detector(_cfg(), 6)
    fresh_bias = model.state_dict()["head.cls_out.bias"].clone()
    report = init_from_weights(model, path, list("uvwxyz"))
    assert report.classes_differ and "head.cls_out.bias" in report.left
    assert _equal(model.state_dict()["head.cls_out.bias"], fresh_bias)


def test_same_classes_load_every_tensor_and_the_ema_starts_from_them(pretrained):
    path, saved = pretrained
    model = build_detector(_cfg(), 6)
    report = init_from_weights(model, path, SIX)
    assert not report.classes_differ and not report.left
    assert all(_equal(v, saved[k]) for k, v in model.state_dict().items())
    ema = ModelEMA.for_run(model, 100)  # what train_loop builds after the init
    assert all(_equal(v, saved[k]) for k, v in ema.module.state_dict().items())


def test_another_architecture_is_one_line_naming_the_file(pretrained):
    path, _ = pretrained
    model = build_detector(_cfg("compact_s", width=1.0), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError) as e:
        init_from_weights(model, path, ["x", "y", "z"])
    msg = str(e.value)
    assert msg.startswith(f"{path}: cannot initialise from these weights: another architecture (compact_n)")
    assert "backbone tensors fit" in msg and "\n" not in msg
    assert all(_equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_wider_neck_keeps_the_backbone_and_reports_what_it_left(pretrained):
    path, saved = pretrained
    model = build_detector(_cfg(neck_channels=48), 6)
    report = init_from_weights(model, path, SIX)
    assert report.backbone_fit == 1.0 and report.left
    assert all(k.startswith(("neck.", "head.")) for k in report.left)
    assert all(_equal(model.state_dict()[k], saved[k]) for k in report.loaded)
    assert f"left {len(report.left)}: " in report.summary()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_pickled_files_are_refused(pretrained, tmp_path):
    path, _ = pretrained
    model = build_detector(_cfg(), 3)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{trunc}: not a"):
        init_from_weights(model, trunc, SIX)
    with pytest.raises(CheckpointError, match="file not found"):
        init_from_weights(model, tmp_path / "nope.pt", SIX)

    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil(), "config": {}, "class_names": []}))
    with pytest.raises(CheckpointError, match="refusing to unpickle|not a"):
        init_from_weights(model, evil, SIX)
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"model": {}, "config": {}, "class_names": [], "x": Evil()}, evil_zip)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        init_from_weights(model, evil_zip, SIX)
    assert not target.exists()


def test_model_init_is_not_part_of_the_architecture():
    with_init = config_to_dict(config_from_dict({"model": {"init": "/runs/a/best.pt"}}))
    plain = config_to_dict(config_from_dict({}))
    assert plain["model"]["init"] == ""
    check_compatible({"config": with_init, "class_names": SIX}, plain, SIX)  # resume may drop/change it
    old = {**plain, "model": {k: v for k, v in plain["model"].items() if k != "init"}}  # before the key
    check_compatible({"config": old, "class_names": SIX}, with_init, SIX)


def test_fit_refuses_foreign_init_weights_before_ray(pretrained):
    from rtrain.training.runner import FitError, check_init

    path, _ = pretrained
    check_init(config_from_dict({"model": {"name": "compact_n", "init": str(path)}}), ["x"])
    with pytest.raises(FitError, match=f"^model.init: {path}: cannot initialise"):
        check_init(config_from_dict({"model": {"name": "compact_s", "width": 1.0, "init": str(path)}}), ["x"])
