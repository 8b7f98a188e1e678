"""rtrain.visualize / rtrain.runs.feature_maps: layer grids for every variant, the score overlay,
bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtrain import visualize as cli
from rtrain.config import config_from_dict, config_to_dict
from rtrain.models import list_variants
from rtrain.models.summary import capture_layers
from rtrain.runs.checkpoint import save_weights
from rtrain.runs.feature_maps import (
    BACKGROUND,
    CAPTION,
    GAP,
    HEADER,
    TILE,
    default_layers,
    grid_shape,
    grid_size,
    load_detector,
    prepare_input,
    score_map,
    visualize,
)
from rtrain.training.train_loop import build_detector

SIZE = 128
CLASSES = ["RBC", "WBC", "Platelets"]


@pytest.fixture(scope="module")
def image_path(shared_data) -> Path:
    path = shared_data / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
    assert path.is_file()
    return path


def _weights(tmp: Path, variant: str) -> Path:
    cfg = config_to_dict(config_from_dict({"model": {"name": variant}, "data": {"img_size": SIZE}}))
    torch.manual_seed(0)
    model = build_detector(config_from_dict(cfg), len(CLASSES))
    return save_weights(tmp / f"{variant}.pt", model.state_dict(), cfg, CLASSES)


def _tiles_drawn(png: Path, n_slots: int) -> list[bool]:
    """For each grid slot (row-major), whether its tile area holds anything but background."""
    arr = np.asarray(Image.open(png).convert("RGB"))
    _, cols = grid_shape(n_slots)
    drawn = []
    for k in range(n_slots):
        r, q = divmod(k, cols)
        x0, y0 = GAP + q * (TILE + GAP), HEADER + r * (TILE + CAPTION + GAP)
        drawn.append(bool((arr[y0 : y0 + TILE, x0 : x0 + TILE] != BACKGROUND).any()))
    return drawn


@pytest.mark.parametrize("variant", list_variants())
def test_every_variant_gets_one_grid_per_layer_with_n_tiles(variant, image_path, tmp_path):
    torch.set_num_threads(1)
    det = load_detector(_weights(tmp_path, variant))
    assert det.img_size == SIZE and det.class_names == CLASSES
    n = 5
    layers = [*default_layers(_layer_names(det.model)), f"neck.p{det.model.strides[0]}"]
    pictures, overlay = visualize(det, image_path, tmp_path / "out", layers=layers, channels=n)

    assert [p.layer for p in pictures] == layers
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(
        [f"{name}.png" for name in layers] + ["score_map.png"]
    )
    # The same forward pass, independently: the chosen channels are the n largest means.
    tensor, _ = prepare_input(np.asarray(Image.open(image_path).convert("RGB")), SIZE)
    feats = capture_layers(det.model, tensor)
    for pic in pictures:
        with Image.open(pic.path) as im:
            assert im.size == grid_size(n)
            stored = [int(c) for c in im.text["channels"].split(",")]
        means = feats[pic.layer][0].mean(dim=(1, 2))
        assert stored == pic.channels and len(stored) == n == len(set(stored))
        assert pic.shape == tuple(feats[pic.layer].shape)
        chosen = means[stored]
        assert torch.all(chosen[:-1] >= chosen[1:])  # most active first
        others = torch.ones_like(means, dtype=torch.bool)
        others[stored] = False
        assert chosen.min() >= means[others].max()  # none left out is more active
        rows, cols = grid_shape(n)
        slots = _tiles_drawn(pic.path, rows * cols)
        assert slots == [True] * n + [False] * (rows * cols - n)  # exactly n tiles drawn
    with Image.open(overlay) as im, Image.open(image_path) as src:
        assert im.size == (src.width, src.height + HEADER)


def _layer_names(model) -> list[str]:
    return list(capture_layers(model, torch.zeros(1, 3, 64, 64)))


def test_more_channels_than_the_layer_has_shows_all(image_path, tmp_path):
    det = load_detector(_weights(tmp_path, "compact_n"))
    name = "head.cls.p8"  # 3 classes -> 3 channels
    pictures, _ = visualize(det, image_path, tmp_path / "out", layers=[name], channels=16)
    assert len(pictures[0].channels) == 3
    with Image.open(pictures[0].path) as im:
        assert im.size == grid_size(3)


def test_score_map_is_sigmoid_max_over_classes_and_levels():
    fine = torch.full((1, 2, 4, 4), -10.0)
    fine[0, 1, 0, 0] = 10.0  # one confident cell at the top-left of the stride-8 level
    coarse = torch.zeros((1, 2, 2, 2))  # sigmoid(0) = 0.5 everywhere at stride 16
    scores = score_map({"head.cls.p8": fine, "head.cls.p16": coarse, "head.box.p8": fine * 100}, 32)
    assert scores.shape == (32, 32)
    assert torch.isclose(scores[31, 31], torch.tensor(0.5))  # coarse level dominates elsewhere
    assert scores[0, 0] > 0.99  # the confident cell (bilinear, clamped at the border)
    assert float(scores.min()) >= 0.5 - 1e-6


def test_cli_writes_pictures_and_unknown_layer_lists_valid_ones(image_path, tmp_path, capsys):
    weights = _weights(tmp_path, "compact_n")
    out = tmp_path / "cli"
    rc = cli.main(["--weights", str(weights), "--source", str(image_path), "--out", str(out),
                   "--channels", "4", "--layers", "backbone.stem", "head.tower0.p16"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"backbone.stem.png", "head.tower0.p16.png", "score_map.png"}

    capsys.readouterr()
    rc = cli.main(["--weights", str(weights), "--source", str(image_path), "--out", str(out),
                   "--layers", "backbone.stage99"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "unknown layer 'backbone.stage99'" in err and "backbone.stem" in err and "head.cls.p32" in err


def test_cli_bad_weights_and_image_give_one_line(image_path, tmp_path, capsys):
    weights = _weights(tmp_path, "compact_n")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    w, img = str(weights), str(image_path)
    cases = [
        (["--weights", str(tmp_path / "missing.pt"), "--source", img], "missing.pt: file not found"),
        (["--weights", w, "--source", str(tmp_path / "nope.jpg")], "nope.jpg: image file not found"),
        (["--weights", w, "--source", str(garbage)], "garbage.jpg: cannot read image"),
        (["--weights", str(garbage), "--source", img], "garbage.jpg: "),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        rc = cli.main([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and expected in err and "\n" not in err, err
