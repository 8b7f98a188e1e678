"""A run that lives in a bucket (moto's S3 server on 127.0.0.1) on the two-node Ray cluster: its
train/val shards are written there by `data_prep.shard --out s3://...` and read from there by Ray
Data, validation and evaluate; checkpoints, metrics and weights land in the bucket, a driver
SIGKILLed in epoch 2 is resumed from the bucket, and the result equals the same deterministic run
on local disk from local shards; evaluate then scores the bucket's best.pt on the bucket's val
shards as training did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fit_configs import deterministic_fit_config

from data_prep.shard import main as shard_main
from rtrain import storage
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, load_weights, read_marker
from rtrain.training.quickstart import prepare_synthetic
from rtrain.training.runner import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 3
REPO = Path(__file__).resolve().parents[2]


def _config(train: Path | str, val: Path | str) -> dict:
    return deterministic_fit_config(train, val, EPOCHS, img_size=96, workers=1)


def _wait_for_checkpoint(out: str, epoch: int, driver, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        latest, _ = find_latest_complete(checkpoint_dirs(out))
        if latest is not None and int(read_marker(latest)["epoch"]) >= epoch:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no complete checkpoint of epoch {epoch} in {out} (driver rc {driver.poll()})")


def test_bucket_run_killed_and_resumed_equals_the_local_run(s3_server, ray_session, s3_bucket, tmp_path,
                                                            monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    train, val = prepare_synthetic(tmp_path / "data", images=40, size=96, seed=11)
    local = fit(_config(train, val), name="local", storage=tmp_path / "runs", plots=False)
    local_rows = run_dir.read_metrics(local.run_dir)

    # the same images sharded into the bucket, as prepare_synthetic sharded them on disk
    shards = f"{s3_bucket}/shards"
    root = tmp_path / "data"
    for split, extra in (("train", []), ("val", ["--classes-from", f"{shards}/train/manifest.json"])):
        assert shard_main(["--format", "coco", "--annotations", str(root / f"annotations_{split}.json"),
                           "--images", str(root / "images"), "--out", f"{shards}/{split}", "--size", "96",
                           "--workers", "1", *extra]) == 0
        for part in storage.list_dir(f"{shards}/{split}"):  # the same bytes: the same training data
            if part.endswith(".parquet"):
                local_part = root / "shards" / split / part
                assert storage.read_bytes(f"{shards}/{split}/{part}") == local_part.read_bytes()
    cfg = _config(f"{shards}/train", f"{shards}/val")

    runs = f"{s3_bucket}/runs"
    out = storage.join(runs, "bucket")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "rtrain.fit", "--config", str(config), "--address",
           ray.get_runtime_context().gcs_address, "--name", "bucket", "--storage", runs, "--no-plots"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # AWS_* from the s3_server fixture
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for_checkpoint(out, 0, driver)
            time.sleep(0.3)  # into epoch 2
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert len(run_dir.read_metrics(out)) < EPOCHS, "the driver finished before it was killed"
    deadline = time.monotonic() + 60  # the dead driver's job takes its Train worker with it
    while ray.available_resources().get("CPU", 0) < 3.5 and time.monotonic() < deadline:
        time.sleep(0.5)

    result = fit(None, name="bucket", storage=runs, resume=True, plots=True)
    rows = run_dir.read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS)), "an epoch is missing or doubled"
    assert rows[0]["run_starts"] == 1 and rows[-1]["run_starts"] == 2
    assert [r["step"] for r in rows] == [r["step"] for r in local_rows]
    assert [round(r["lr"], 9) for r in rows] == [round(r["lr"], 9) for r in local_rows]
    assert [round(r["mAP"], 6) for r in rows] == [round(r["mAP"], 6) for r in local_rows]
    got, want = load_weights(result.last_weights)["model"], load_weights(local.last_weights)["model"]
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want
                if want[k].is_floating_point())
    print(f"\nbucket vs local: max |weight diff| {worst:.3g}; mAP per epoch bucket "
          f"{[round(r['mAP'], 4) for r in rows]} local {[round(r['mAP'], 4) for r in local_rows]}; "
          f"run_starts {[r['run_starts'] for r in rows]}")
    assert worst < 1e-4, f"bucket weights differ from the local run by up to {worst:.3g}"
    assert result.last_weights == storage.join(out, "last.pt")
    assert result.best_weights == storage.join(out, "best.pt")
    assert storage.is_file(storage.join(out, "plots", "curves.png"))
    names = storage.list_dir(out)
    assert {"config.yaml", "metrics.jsonl", "metrics.csv", "best.pt", "last.pt"} <= set(names)
    assert ".lock" not in names  # the lease is released
    assert sum(n.startswith("checkpoint_") for n in names) >= 1
    assert not (tmp_path / "s3:").exists()

    # evaluate --weights s3://.../best.pt scores what training scored for that epoch
    best_epoch = torch.load(local.best_weights, weights_only=True)["extra"]["epoch"]
    best_row = next(r for r in rows if r["epoch"] == best_epoch)
    done = subprocess.run([sys.executable, "-m", "rtrain.evaluate", "--weights", result.best_weights,
                           "--shards", f"{shards}/val", "--out", str(tmp_path / "m.json"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text())["mAP"] == pytest.approx(best_row["mAP"], abs=1e-6)
