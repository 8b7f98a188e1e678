"""A run's own files in a bucket (moto's S3 server on 127.0.0.1), without Ray: checkpoints found and
verified there, weights loaded from there (evaluate/predict/export --weights s3://), metrics
rows, the run lease, and finding a run to resume."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from inference_fixtures import make_bccd_shards, make_weights, one_thread

from rtrain import storage
from rtrain.runs import run_dir, run_lock
from rtrain.runs.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    find_latest_complete,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from rtrain.runs.loading import load_detector


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def _upload_dir(local, uri, marker_last=True):
    """Copy a local checkpoint dir into the bucket as Ray does (each file one object)."""
    names = sorted(p.name for p in local.iterdir())
    if marker_last:
        names = [n for n in names if n != "COMPLETE"] + ["COMPLETE"]
    for n in names:
        storage.write_bytes(storage.join(uri, n), (local / n).read_bytes())


def _state(epoch, weights):
    obj = torch.load(weights, weights_only=True)
    return {"model": obj["model"], "optimizer": {}, "epoch": epoch, "step": 10 * epoch, "rng": {},
            "config": obj["config"], "class_names": obj["class_names"], "ema": {"model": obj["model"]}}


def test_checkpoints_in_a_bucket_are_verified_like_on_disk(s3_bucket, tmp_path):
    weights = make_weights(tmp_path / "w.pt", variant="compact_n", img_size=64)
    run = f"{s3_bucket}/runs/r1"
    for epoch in (0, 1, 2):
        local = save_checkpoint(tmp_path / f"c{epoch}", _state(epoch, weights))
        _upload_dir(local, storage.join(run, f"checkpoint_00000{epoch}"))
    # epoch 2's upload was cut off after its marker: its state.pt never arrived
    storage.remove(storage.join(run, "checkpoint_000002", "state.pt"))
    # epoch 3: state.pt uploaded, marker never written (the driver was killed in between)
    local = save_checkpoint(tmp_path / "c3", _state(3, weights))
    storage.write_bytes(storage.join(run, "checkpoint_000003", "state.pt"), (local / "state.pt").read_bytes())
    storage.write_bytes(storage.join(run, "checkpoint_manager_snapshot.json"), b"{}")

    dirs = checkpoint_dirs(run)
    assert dirs == [storage.join(run, f"checkpoint_00000{i}") for i in range(4)]
    latest, skipped = find_latest_complete(dirs)
    assert latest == storage.join(run, "checkpoint_000001")
    reasons = dict(skipped)
    assert "no COMPLETE marker" in reasons[dirs[3]] and "file not found" in reasons[dirs[2]]
    assert all(r.startswith("s3://") and "\n" not in r for r in reasons.values())
    assert load_checkpoint(latest)["epoch"] == 1
    # a state.pt replaced by other bytes: refused by its sha256
    storage.write_bytes(storage.join(latest, "state.pt"), (tmp_path / "c0" / "state.pt").read_bytes())
    with pytest.raises(CheckpointError, match="size|sha256"):
        load_checkpoint(latest)
    assert find_latest_complete(dirs)[0] == storage.join(run, "checkpoint_000000")
    # a checkpoint dir in the bucket loads as weights (its EMA), as a local one does
    assert load_weights(dirs[0])["extra"] == {"source": "ema", "epoch": 0, "step": 0}


def test_weights_from_a_bucket_give_the_same_model_and_metrics(s3_bucket, tmp_path, shared_data):
    weights = make_weights(tmp_path / "best.pt", img_size=128)
    uri = f"{s3_bucket}/runs/r1/best.pt"
    storage.write_bytes(uri, weights.read_bytes())
    local, remote = load_detector(weights), load_detector(uri)
    assert remote.path == uri and remote.class_names == local.class_names
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a, b = local.model(x), remote.model(x)
    assert all(torch.equal(u, v) for u, v in zip(torch.utils._pytree.tree_leaves(a),
                                                 torch.utils._pytree.tree_leaves(b), strict=True))
    from rtrain.evaluate import main

    shards = make_bccd_shards(shared_data, tmp_path / "val")
    out_local, out_remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert main(["--weights", str(weights), "--shards", str(shards), "--out", str(out_local)]) == 0
    assert main(["--weights", uri, "--shards", str(shards), "--out", str(out_remote)]) == 0
    m_local, m_remote = json.loads(out_local.read_text()), json.loads(out_remote.read_text())
    assert m_remote["mAP"] == m_local["mAP"] and m_remote["eval_detections"] == m_local["eval_detections"] > 0
    with pytest.raises(CheckpointError, match=f"{s3_bucket}/runs/r1/nope.pt: file not found"):
        load_weights(f"{s3_bucket}/runs/r1/nope.pt")


def test_metrics_rows_in_a_bucket_equal_local_ones(s3_bucket, tmp_path):
    rows = [{"epoch": e, "loss": 1.0 / (e + 1), "mAP": 0.1 * e, "evaluated": e % 2 == 1} for e in range(4)]
    run = f"{s3_bucket}/runs/r1"
    for row in rows:
        run_dir.append_metrics(run, row)
        run_dir.append_metrics(tmp_path, row)
    assert run_dir.read_metrics(run) == run_dir.read_metrics(tmp_path) == rows
    assert run_dir.truncate_metrics(run, 2) == 2 and run_dir.read_metrics(run) == rows[:2]
    run_dir.truncate_metrics(tmp_path, 2)
    for name in (run_dir.METRICS_JSONL, run_dir.METRICS_CSV):
        assert storage.read_bytes(storage.join(run, name)) == (tmp_path / name).read_bytes()


def test_run_lease_in_a_bucket(s3_bucket, caplog):
    run = f"{s3_bucket}/runs/r1"
    lease = run_lock.acquire_lease(run, settle_s=0.2)
    written = json.loads(storage.read_bytes(storage.join(run, ".lock")))
    assert lease.held and written["token"] == lease.info["token"]
    with pytest.raises(run_lock.RunLockError) as info:
        run_lock.acquire_lease(run, settle_s=0.2)
    msg = str(info.value)
    assert msg.startswith(f"{run}: this run is in use by pid ") and socket.gethostname() in msg
    assert "\n" not in msg
    lease.refresh()
    lease.release()
    assert not storage.exists(storage.join(run, ".lock"))
    # a holder on another host whose heartbeat stopped long ago is taken over, with a warning
    stale = {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600, "token": "old"}
    storage.write_bytes(storage.join(run, ".lock"), json.dumps(stale).encode())
    with run_lock.acquire(run) as taken:  # acquire() on a bucket URI is the lease
        assert isinstance(taken, run_lock.BucketLease)
    assert "taking over the lease of pid 1 on elsewhere" in caplog.text
    # a lease another process wrote meanwhile: this one sees it is no longer the holder
    lease = run_lock.acquire_lease(run, settle_s=0.2)
    storage.write_bytes(storage.join(run, ".lock"), json.dumps({**stale, "heartbeat": time.time()}).encode())
    lease.refresh()
    assert not lease.held
    lease.release()
    assert storage.exists(storage.join(run, ".lock"))  # not ours: left alone


def test_resume_finds_the_run_that_trained_last_not_the_folder_touched_last(tmp_path):
    """Deleting an old run's weights changes its folder's mtime, not when it trained."""
    import os

    from rtrain.training.runner import latest_run

    runs = tmp_path / "runs"
    for age, name in ((200, "old"), (100, "new")):
        for f in (run_dir.CONFIG_YAML, run_dir.METRICS_JSONL, "best.pt"):
            (runs / name / f).parent.mkdir(parents=True, exist_ok=True)
            (runs / name / f).write_text("{}")
            os.utime(runs / name / f, (time.time() - age, time.time() - age))
    assert latest_run(runs) == runs / "new"
    (runs / "old" / "best.pt").unlink()  # the folder "old" is now the newest folder
    assert latest_run(runs) == runs / "new"
    (runs / "old" / run_dir.METRICS_JSONL).write_text("{}")  # old trains again
    assert latest_run(runs) == runs / "old"


def test_resume_finds_the_latest_run_in_a_bucket(s3_bucket):
    from rtrain.training.runner import FitError, latest_run, resolve_run

    storage_uri = f"{s3_bucket}/runs"
    assert latest_run(storage_uri) is None
    for name in ("old", "new"):
        storage.write_bytes(storage.join(storage_uri, name, run_dir.CONFIG_YAML),
                            b"model: {name: compact_n}\ntrain: {epochs: 3}\n")
        time.sleep(1.1)  # S3 mtimes have one-second resolution
    storage.write_bytes(storage.join(storage_uri, "not-a-run", "notes.txt"), b"x")
    assert latest_run(storage_uri) == storage.join(storage_uri, "new")
    cfg, name = resolve_run(None, ["train.epochs=5"], None, storage_uri, resume=True)
    assert name == "new" and cfg.train.epochs == 5 and cfg.model.name == "compact_n"
    with pytest.raises(FitError, match=f"{storage_uri}/nope: no run named 'nope'"):
        resolve_run(None, None, "nope", storage_uri, resume=True)
    with pytest.raises(FitError, match="a run named 'old' exists"):
        resolve_run({"model": {"name": "compact_n"}}, None, "old", storage_uri, resume=False)


def test_predict_and_export_take_weights_from_a_bucket(s3_bucket, tmp_path, shared_data, capsys):
    from inference_fixtures import cli_error, copy_images

    from rtrain.export import main as export_main
    from rtrain.predict import main as predict_main

    weights = make_weights(tmp_path / "best.pt", img_size=128)
    uri = f"{s3_bucket}/runs/r1/best.pt"
    storage.write_bytes(uri, weights.read_bytes())
    images = copy_images(shared_data, tmp_path / "images")
    for name, w in (("local", str(weights)), ("bucket", uri)):
        assert predict_main(["--weights", w, "--source", str(images), "--out", str(tmp_path / name),
                             "--conf", "0.3", "--no-draw", "--device", "cpu"]) == 0
    a = json.loads((tmp_path / "local" / "predictions.json").read_text())
    b = json.loads((tmp_path / "bucket" / "predictions.json").read_text())
    assert len(a["results"]) > 0 and a["results"] == b["results"] and b["settings"]["weights"] == uri

    out = tmp_path / "model.torchscript"
    assert export_main(["--weights", uri, "--format", "torchscript", "--out", str(out), "--no-check"]) == 0
    assert out.stat().st_size > 100_000
    err = cli_error(capsys, export_main, ["--weights", uri, "--format", "torchscript", "--no-check"])
    assert f"--weights {uri}: pass --out" in err


def test_compare_reads_a_run_in_a_bucket_beside_a_local_one(s3_bucket, tmp_path):
    from rtrain.runs.compare import compare_runs

    bucket_run, local_run = f"{s3_bucket}/runs/lr-high", tmp_path / "lr-low"
    for where, lr in ((bucket_run, 0.01), (local_run, 0.001)):
        storage.write_bytes(storage.child(where, run_dir.CONFIG_YAML),
                            f"train: {{lr: {lr}}}\n".encode())
        for epoch in range(3):
            row = {"epoch": epoch, "step": 10 * (epoch + 1), "loss": lr * (3 - epoch)}
            run_dir.append_metrics(where, row)
    result = compare_runs([str(local_run), bucket_run], metric="loss", out=tmp_path / "compare.png")
    assert [s.run.name for s in result.series] == ["lr-low", "lr-high"]
    assert [s.run.label for s in result.series] == ["train.lr=0.001", "train.lr=0.01"]
    assert result.series[1].y == pytest.approx([0.03, 0.02, 0.01])
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
