"""Checkpoint dirs and weights files: exact resume, broken-dir detection, refusing unsafe pickles."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from rtrain.runs.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointError,
    capture_rng_state,
    check_compatible,
    find_latest_complete,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from rtrain.training.ema import ModelEMA
from rtrain.training.optim import build_optimizer
from rtrain.training.schedule import LRSchedule

CONFIG = {"model": {"variant": "sep-s", "width": 0.5}, "train": {"lr": 0.01, "epochs": 3}}
NAMES = ["cat", "dog"]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))


class _Run:
    """A tiny training process: model, EMA, optimizer, schedule, scaler, and its RNG use."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = _model()
        self.ema = ModelEMA(self.model, decay=0.9, tau=3.0)
        self.opt = build_optimizer(self.model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
        self.sched = LRSchedule(0.1, total_steps=20, warmup_steps=3)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.step = 0

    def train_step(self):
        # every random source is used, so RNG restore is tested, not just weights
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
        self.sched.apply(self.opt, self.step, elapsed=0.0)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        return float(loss.detach())

    def state(self):
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": 0,
            "step": self.step,
            "rng": capture_rng_state(),
            "config": CONFIG,
            "class_names": NAMES,
        }

    def restore(self, state):
        from rtrain.runs.checkpoint import restore_rng_state

        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        restore_rng_state(state["rng"])


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    ref = _Run()
    for _ in range(3):
        ref.train_step()
    save_checkpoint(tmp_path / "ck", ref.state())
    expected = [ref.train_step() for _ in range(3)]
    expected_w = {k: v.clone() for k, v in ref.model.state_dict().items()}

    resumed = _Run()  # a fresh process: other weights, other RNG position
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    state = load_checkpoint(tmp_path / "ck")
    check_compatible(state, CONFIG, NAMES)
    resumed.restore(state)
    got = [resumed.train_step() for _ in range(3)]
    assert got == expected
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected_w[k]), k
    assert resumed.ema.updates == ref.ema.updates
    assert torch.equal(resumed.ema.module[0].weight, ref.ema.module[0].weight)
    marker = json.loads((tmp_path / "ck" / "COMPLETE").read_text())
    assert marker["epoch"] == 0 and marker["step"] == 3 and len(marker["sha256"]) == 64


def test_rng_round_trip_next_numbers_equal():
    from rtrain.runs.checkpoint import restore_rng_state

    st = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    restore_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def _good(root, name, step):
    state = _Run().state()
    state["step"] = step
    state["epoch"] = step
    return save_checkpoint(root / name, state)


def test_find_latest_skips_broken_dirs_with_reasons(tmp_path):
    _good(tmp_path, "a", 1)
    _good(tmp_path, "b", 2)
    trunc = _good(tmp_path, "c", 3)
    with open(trunc / "state.pt", "r+b") as f:
        f.truncate(100)
    nomark = _good(tmp_path, "d", 4)
    (nomark / "COMPLETE").unlink()
    badhash = _good(tmp_path, "e", 5)
    data = bytearray((badhash / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (badhash / "state.pt").write_bytes(bytes(data))

    latest, skipped = find_latest_complete(sorted(tmp_path.iterdir()))
    assert latest == tmp_path / "b"
    reasons = {p.name: r for p, r in skipped}
    assert set(reasons) == {"c", "d", "e"}
    assert "truncated" in reasons["c"] and "no COMPLETE marker" in reasons["d"] and "sha256" in reasons["e"]
    assert all(str(tmp_path) in r and "\n" not in r for r in reasons.values())
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(badhash)
    assert find_latest_complete([tmp_path / "d"]) == (None, [(tmp_path / "d", reasons["d"])])


def test_interrupted_save_leaves_nothing_loadable(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    torch.save(_Run().state(), d / "state.pt.tmp")  # crash before the rename
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(d)
    assert find_latest_complete([d])[0] is None
    # overwriting a complete checkpoint drops its marker first
    good = _good(tmp_path, "g", 1)
    assert (good / "COMPLETE").exists()
    with pytest.raises(TypeError):
        save_checkpoint(good, {**_Run().state(), "extra": {"path": tmp_path}})  # fails before writing
    assert load_checkpoint(good)["step"] == 1


def test_unsafe_values_are_refused_at_save_time(tmp_path):
    state = _Run().state()
    state["config"] = {"data": {"root": tmp_path}}
    with pytest.raises(TypeError, match=r"state.config.data.root: PosixPath"):
        save_checkpoint(tmp_path / "ck", state)
    with pytest.raises(ValueError, match="missing"):
        save_checkpoint(tmp_path / "ck", {"model": {}})
    with pytest.raises(TypeError, match="ndarray"):
        save_weights(tmp_path / "w.pt", _model().state_dict(), {"mean": np.zeros(3)}, NAMES)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "best.pt"
    torch.save({"model": {}, "config": {}, "class_names": [], "x": _Evil(target)}, evil)
    assert not target.exists()
    with pytest.raises(CheckpointError) as e:
        load_weights(evil)
    msg = str(e.value)
    assert msg.startswith(f"{evil}: refusing to unpickle") and "system" in msg and "\n" not in msg
    assert not target.exists()
    # plain pickle (not a torch zip) with the same payload
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(target)))
    with pytest.raises(CheckpointError, match="refusing to unpickle|not a"):
        load_weights(raw)
    assert not target.exists()
    # and inside a checkpoint dir with a valid marker
    d = tmp_path / "ck"
    _good(tmp_path, "ck", 1)
    torch.save({"model": _Evil(target)}, d / "state.pt")
    import hashlib

    data = (d / "state.pt").read_bytes()
    info = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "epoch": 9, "step": 9}
    (d / "COMPLETE").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(d)
    assert not target.exists()


def test_weights_round_trip_and_errors(tmp_path):
    m = _model()
    p = save_weights(tmp_path / "run" / "best.pt", m.state_dict(), CONFIG, NAMES, {"mAP": 0.5})
    assert not list((tmp_path / "run").glob("*.tmp"))
    w = load_weights(p)
    assert w["class_names"] == NAMES and w["config"] == CONFIG and w["extra"] == {"mAP": 0.5}
    m2 = _model()
    m2.load_state_dict(w["model"])
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True)
    )

    with pytest.raises(CheckpointError, match="file not found"):
        load_weights(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello, not a torch file")
    with pytest.raises(CheckpointError, match=r"text.pt: not a"):
        load_weights(tmp_path / "text.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt/truncated"):
        load_weights(trunc)
    torch.save({"model": m.state_dict()}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['config', 'class_names'\]"):
        load_weights(tmp_path / "partial.pt")
    # a checkpoint dir works as a weights source too
    run = _Run()
    run.train_step()
    run.train_step()  # step 0 has LR 0 (warm-up): the second one moves the weights
    d = save_checkpoint(tmp_path / "ck", run.state())
    from_dir = load_weights(d)
    assert from_dir["extra"] == {"source": "ema", "epoch": 0, "step": 2}
    assert torch.equal(from_dir["model"]["0.weight"], run.ema.module[0].weight)
    assert not torch.equal(from_dir["model"]["0.weight"], run.model[0].weight)


def test_incompatible_config_or_classes_refused():
    saved = {"config": CONFIG, "class_names": NAMES}
    check_compatible(saved, {**CONFIG, "train": {"lr": 0.5}}, NAMES)  # training knobs may change
    with pytest.raises(
        IncompatibleCheckpointError, match=r"model.variant differs \(checkpoint: 'sep-s', now: 'x'\)"
    ):
        check_compatible(saved, {"model": {"variant": "x", "width": 0.5}}, NAMES)
    with pytest.raises(IncompatibleCheckpointError, match="2 classes, the data has 3"):
        check_compatible(saved, CONFIG, NAMES + ["bird"])
    with pytest.raises(IncompatibleCheckpointError, match="class 1 is 'dog', the data has 'cow'"):
        check_compatible(saved, CONFIG, ["cat", "cow"], source="weights")
