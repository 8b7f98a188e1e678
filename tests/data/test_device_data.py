"""Device decode + augment end to end on CPU, from real shards written by `python -m data_prep.shard`."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_prep.shard import main as shard_main
from data_prep.synthetic import make_synthetic
from rtrain.data.augment import AugmentParams
from rtrain.data.device_decode import (
    RAW_COLUMNS,
    DeviceDecodeAugment,
    RawCollate,
    decode_jpegs,
    numpy_batch_from_table,
    raw_collate,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shard_rows(tmp_path_factory) -> dict[str, np.ndarray]:
    """16 synthetic images sharded at 256 px, as Ray's numpy batch of the raw shard columns."""
    root = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic(root / "src", images=16, seed=4, size=320)
    out = root / "shards"
    assert shard_main([
        "--format", "coco", "--annotations", str(paths.annotations["all"]), "--images", str(paths.images),
        "--out", str(out), "--size", "256", "--workers", "1",
    ]) == 0
    table = pq.read_table(sorted(out.glob("*.parquet"))[0], columns=list(RAW_COLUMNS))
    return numpy_batch_from_table(table)


def _pil_path(rows: dict[str, np.ndarray], train: bool, params: AugmentParams, epoch: int) -> dict:
    from rtrain.data.batches import DecodeAugment, collate  # the PIL path this one twins

    return collate(DecodeAugment(train=train, img_size=128, aug=params, seed=3, epoch=epoch,
                                 reduced_decode=False)(rows))


def _jpeg(image: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("train", [False, True])
def test_matches_the_pil_data_path(shard_rows, train):
    params = AugmentParams(mosaic=0.5)
    raw = RawCollate()(shard_rows)
    assert isinstance(raw["jpeg"][0], torch.Tensor) and raw["jpeg"][0].dtype == torch.uint8
    assert raw["boxes"][0].shape[1:] == (4,) and raw["labels"][0].dtype == torch.int64
    step = DeviceDecodeAugment(128, train, params, seed=3)
    for epoch in (0, 1):
        ours = step(raw, epoch, "cpu")
        ref = _pil_path(shard_rows, train, params, epoch)
        assert set(ours) == set(ref)
        for key, value in ref.items():
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        for key in ("boxes", "labels", "iscrowd", "image_id", "stored_size", "orig_size", "pad"):
            assert torch.equal(ours[key], ref[key]), key
        torch.testing.assert_close(ours["scale"], ref["scale"])
        diff = (ours["images"].float() - ref["images"].float()).abs().mean((1, 2, 3))
        assert diff.max() < 3.0, diff  # decoder (libjpeg-turbo both) + resampling rounding only
        assert (ours["labels"] >= 0).sum() > 10
    assert step.skipped == 0
    if not train:  # val maps back exactly: stored = (input - pad) / scale
        k = int((ours["labels"][0] >= 0).sum())
        back = (ours["boxes"][0, :k] - ours["pad"][0].repeat(2)) / ours["scale"][0]
        torch.testing.assert_close(back, raw["boxes"][0], atol=1e-3, rtol=0)


def test_corrupt_jpeg_is_dropped_counted_and_named(shard_rows, caplog):
    rows = {k: v.copy() for k, v in shard_rows.items()}
    rows["jpeg"][2] = rows["jpeg"][2][: len(rows["jpeg"][2]) // 3]  # truncated
    rows["jpeg"][5] = b"not a jpeg"
    step = DeviceDecodeAugment(128, False)
    with caplog.at_level(logging.WARNING, logger="rtrain.data.device_decode"):
        out = step(raw_collate(rows), 0, "cpu")
    n = len(rows["image_id"])
    assert step.skipped == 2 and out["images"].shape[0] == n - 2
    keep = [i for i in range(n) if i not in (2, 5)]
    assert out["image_id"].tolist() == [int(rows["image_id"][i]) for i in keep]
    for i in (2, 5):
        assert any(str(rows["image_id"][i]) in r.message and rows["file_name"][i] in r.message
                   for r in caplog.records)
    # the kept rows come out as they do without the bad ones
    good = {k: v[keep] for k, v in shard_rows.items()}
    clean = DeviceDecodeAugment(128, False)(raw_collate(good), 0, "cpu")
    m = clean["boxes"].shape[1]
    assert torch.equal(out["images"], clean["images"]) and torch.equal(out["boxes"][:, :m], clean["boxes"])
    # nothing decodable: an empty batch of the same layout
    for i in range(n):
        rows["jpeg"][i] = b""
    empty = step(raw_collate(rows), 0, "cpu")
    assert empty["images"].shape == (0, 3, 128, 128) and empty["boxes"].shape == (0, 1, 4)
    assert empty["stored_size"].shape == (0, 2) and step.skipped == 2 + n


def test_decode_grayscale_comes_out_rgb():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)
    data = [_jpeg(image), _jpeg(image, "L"), _jpeg(image[:1, :1])]
    images, kept, skipped = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data])
    assert kept == [0, 1, 2] and skipped == 0
    assert [tuple(t.shape) for t in images] == [(3, 30, 41), (3, 30, 41), (3, 1, 1)]
    gray = images[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    ref = np.asarray(Image.open(io.BytesIO(data[1])).convert("RGB"))
    assert np.abs(gray.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1


def test_epoch_column_sets_the_augmentation(shard_rows):
    rows = dict(shard_rows)
    step = DeviceDecodeAugment(128, True, AugmentParams(), seed=1)
    rows["epoch"] = np.full(len(rows["image_id"]), 4, np.int64)
    from_rows = step(raw_collate(rows), None, "cpu")
    explicit = step(raw_collate(shard_rows), 4, "cpu")
    other = step(raw_collate(shard_rows), 5, "cpu")
    assert torch.equal(from_rows["images"], explicit["images"])
    assert not torch.equal(from_rows["images"], other["images"])
    rows["epoch"][0] = 3
    with pytest.raises(ValueError, match="different epochs"):
        step(raw_collate(rows), None, "cpu")


def test_imports_and_runs_without_ray(tmp_path):
    """The GPU benchmark machine has no Ray: this module must import and work without it."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError("ray hidden for this test")
        sys.meta_path.insert(0, _NoRay())
    """))
    code = textwrap.dedent("""
        import sys, numpy as np, torch
        from rtrain.data.device_decode import RawCollate, DeviceDecodeAugment, numpy_batch_from_table
        from rtrain import models
        from rtrain.training import engine
        from rtrain.data import augment_tensor  # what benchmarks/gpu_train.py imports
        assert RawCollate.__mro__[1] is object
        try:
            import ray  # noqa
        except ImportError:
            pass
        else:
            raise SystemExit("ray was importable")
        assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (60, 40), (200, 30, 30)).save(buf, "JPEG")
        rows = {"image_id": np.array([7]), "file_name": np.array(["a.jpg"], dtype=object),
                "jpeg": np.array([buf.getvalue()], dtype=object), "width": np.array([60]),
                "height": np.array([40]), "orig_width": np.array([60]), "orig_height": np.array([40]),
                "boxes": np.array([np.array([10, 5, 50, 35], np.float32)], dtype=object),
                "labels": np.array([np.array([1], np.int32)], dtype=object),
                "iscrowd": np.array([np.array([False])], dtype=object)}
        out = DeviceDecodeAugment(32, False)(RawCollate()(rows), 0, "cpu")
        assert out["images"].shape == (1, 3, 32, 32) and out["labels"].tolist() == [[1]]
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
