"""Helpers for the evaluate/predict/export/inference tests: real weights files and tiny real shards.

Weights are a freshly built model saved with `rtrain.runs.checkpoint.save_weights` (the real file
format). Its output convs are re-drawn with a larger spread (seeded) so that scores differ
clearly between points: an untrained head gives every point sigmoid ~0.01, and detections of
near-equal scores would make parity tests depend on float noise. The tests are about plumbing
and parity, not accuracy.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from rtrain.config import config_from_dict, config_to_dict
from rtrain.models import build_model
from rtrain.runs.checkpoint import save_weights

BCCD_CLASSES = ["Platelets", "RBC", "WBC"]  # data_prep.voc's order: every name seen, sorted
BCCD_IDS = ["BloodImage_00000", "BloodImage_00002", "BloodImage_00014", "BloodImage_00017",
            "BloodImage_00028", "BloodImage_00031"]


def spread_head(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Calibrate BatchNorm statistics on random images (as a short training run would: with the
    init stats the features shrink to ~1e-5 by the head), then re-draw the 1x1 output convs so
    scores and box distributions vary strongly across points."""
    gen = torch.Generator().manual_seed(seed)
    head = model.head
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model.forward_raw(torch.rand(2, 3, 192, 192, generator=gen))
    model.eval()
    seen = []
    hook = head.cls_out.register_forward_hook(lambda mod, args, out: seen.append(args[0].std().item()))
    with torch.no_grad():
        model.forward_raw(torch.rand(1, 3, 192, 192, generator=gen))
    hook.remove()
    feat_std = max(sum(seen) / len(seen), 1e-6)  # the head's input scale differs between variants
    with torch.no_grad():
        c = head.cls_out.weight.shape[1]
        scale = 1.0 / (math.sqrt(c) * feat_std)
        head.cls_out.weight.copy_(torch.randn(head.cls_out.weight.shape, generator=gen) * 2.5 * scale)
        head.cls_out.bias.fill_(-3.0)
        head.box_out.weight.copy_(torch.randn(head.box_out.weight.shape, generator=gen) * 2.0 * scale)
    return model


def make_weights(path: Path, variant: str = "compact_s", class_names=BCCD_CLASSES, img_size: int = 256,
                 seed: int = 0, config_extra: dict | None = None, backbone: str = "") -> Path:
    """A real weights file for `variant` (on `backbone`, e.g. "timm:NAME", if given) with a valid
    config (data.img_size = img_size)."""
    torch.manual_seed(seed)
    model = spread_head(build_model(variant, len(class_names), backbone=backbone or None), seed).eval()
    cfg = config_from_dict({"model": {"name": variant, "backbone": backbone}, "data": {"img_size": img_size},
                            "eval": {"score_thresh": 0.05, "batch_size": 4}, **(config_extra or {})})
    return save_weights(path, model.state_dict(), config_to_dict(cfg), list(class_names))


def make_bccd_shards(shared_data: Path, out: Path, ids=BCCD_IDS, size: int = 320) -> Path:
    """Real BCCD images -> Parquet shards + manifest via data_prep.shard (one process)."""
    from data_prep.shard import build_parser, shard

    split = out.parent / f"{out.name}_split.txt"
    split.write_text("\n".join(ids) + "\n")
    argv = ["--format", "voc", "--root", str(shared_data / "bccd"), "--split-file", str(split),
            "--out", str(out), "--size", str(size), "--workers", "1"]
    shard(build_parser().parse_args(argv))
    return out


def copy_images(shared_data: Path, out: Path, bccd: int = 2, raccoon: tuple[str, ...] = ("raccoon-150.jpg",
                "raccoon-1.jpg")) -> Path:
    """A folder with a few real JPEGs: BCCD (640x480) and raccoon (one of them grayscale)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in BCCD_IDS[:bccd]:
        shutil.copy(shared_data / "bccd" / "JPEGImages" / f"{name}.jpg", out / f"{name}.jpg")
    for name in raccoon:
        shutil.copy(shared_data / "raccoon" / "images" / name, out / name)
    return out


def one_thread():
    """Generator for an autouse fixture: torch on one thread (other tests share these 2 cores; with
    two threads under contention OpenMP spin-waits cost 10-20x the CPU time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_error(capsys, main, argv) -> str:
    """Run a CLI's main(argv) expecting exit 2 and one line on stderr; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.fixture(scope="module", autouse=True, name="one_thread_module")
def one_thread_module_fixture():
    """Import into a test module: torch on one thread for the whole module (see one_thread)."""
    yield from one_thread()


@pytest.fixture(scope="module", name="weights")
def weights_128_fixture(tmp_path_factory):
    """Import into a test module: `weights`, random compact weights at 128 px (make_weights)."""
    return make_weights(tmp_path_factory.mktemp("w") / "best.pt", img_size=128)
