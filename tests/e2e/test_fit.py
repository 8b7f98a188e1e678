"""rtrain.fit end to end on Ray Train (tiny synthetic shards): report, log, fine-tune, decode in the worker,
close mosaic, resume; the shipped configs; the checks before Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from fit_configs import tiny_fit_config

from rtrain.config import config_from_dict, config_to_dict, load_config
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import load_weights
from rtrain.training.quickstart import QUICKSTART, prepare_synthetic
from rtrain.training.runner import FitError, fit
from rtrain.training.train_loop import build_detector

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds_its_model(path):
    data = yaml.safe_load(path.read_text())
    if "base" in data:  # a sweep (rtrain.tune): its `base` is a training config
        cfg = config_from_dict(data["base"])
    else:
        cfg = load_config(path)
    model = build_detector(cfg, num_classes=3)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "python -m rtrain." in path.read_text(), "each config names the command that trains it"


def test_quickstart_yaml_equals_the_built_in_default():
    from_yaml = load_config(REPO / "configs" / "quickstart.yaml")
    assert config_to_dict(from_yaml) == config_to_dict(config_from_dict(QUICKSTART))


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return prepare_synthetic(root, images=24, size=128, seed=3)



def test_checks_before_ray(tiny_shards, tmp_path):
    train, val = tiny_shards
    cfg = tiny_fit_config(train, val, 1, tmp_path / "runs")
    bad = {**cfg, "data": {**cfg["data"], "val": str(tmp_path / "missing")}}
    with pytest.raises(FitError, match="missing: shard directory not found"):
        fit(bad, name="x", plots=False)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "config.yaml").write_text("{}")
    with pytest.raises(FitError, match="exists; pass resume=True"):
        fit(cfg, name="taken", plots=False)
    with pytest.raises(FitError, match="no run named 'nope'"):
        fit(cfg, name="nope", resume=True, plots=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FitError, match="storage is not writable"):
        fit(cfg, storage=blocker / "runs", name="y", plots=False)


def test_storage_uris_are_checked_in_one_line_never_made_local(tiny_shards, tmp_path, monkeypatch, s3_server):
    """An unsupported scheme, a bucket that cannot be written and bucket shards that are not there
    are each one line before Ray, and no `./s3:/...` folder appears (it did before)."""
    monkeypatch.chdir(tmp_path)
    train, val = tiny_shards
    cfg = tiny_fit_config(train, val, 1, tmp_path / "runs")
    cases = [({}, {"storage": "az://bucket/runs"}, "run.storage az://bucket/runs: the az:// scheme is not"),
             ({}, {"storage": "s3://no-such-bucket/r"}, "s3://no-such-bucket/r: storage is not writable ("),
             ({"run": {**cfg["run"], "storage": "hdfs://nn/r"}}, {}, "run.storage hdfs://nn/r: the hdfs:// "),
             ({"data": {**cfg["data"], "train": "s3://no-such-bucket/train"}}, {},
              "s3://no-such-bucket/train: shard directory not found"),
             ({"data": {**cfg["data"], "val": "hdfs://nn/val"}}, {}, "data.val hdfs://nn/val: the hdfs:// "),
             ({"model": {"name": "compact_n", "init": "az://b/best.pt"}}, {}, "model.init az://b/best.pt: ")]
    for change, kwargs, start in cases:
        with pytest.raises(FitError) as info:
            fit({**cfg, **change}, name="x", plots=False, **kwargs)
        assert str(info.value).startswith(start) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["runs"] if (tmp_path / "runs").exists() else [])


def test_resume_with_another_model_or_classes_is_refused_before_ray(tiny_shards, tmp_path):
    from rtrain.config import dump_config
    from rtrain.runs.checkpoint import capture_rng_state, save_checkpoint

    train, val = tiny_shards
    cfg = config_from_dict(tiny_fit_config(train, val, 1, tmp_path / "runs"))
    out = tmp_path / "runs" / "old"
    dump_config(cfg, out / "config.yaml")
    names = ["circle", "square", "triangle", "star", "cross", "ring"]

    def checkpoint(model_cfg: dict, class_names: list[str]) -> None:
        c = config_from_dict({**config_to_dict(cfg), "model": model_cfg})
        model = build_detector(c, len(class_names))
        save_checkpoint(out / "checkpoint_2026-01-01_00-00-00.000000", {
            "model": model.state_dict(), "optimizer": {}, "epoch": 0, "step": 1, "rng": capture_rng_state(),
            "config": config_to_dict(c), "class_names": class_names,
        })

    checkpoint({"name": "compact_s"}, names)
    with pytest.raises(FitError, match="cannot resume: .*model.name differs"):
        fit(None, storage=tmp_path / "runs", resume=True, plots=False)
    checkpoint({"name": "compact_n"}, names[:5] + ["blob"])
    with pytest.raises(FitError, match="other classes .*'ring', the data has|class 5 is 'blob'"):
        fit(None, storage=tmp_path / "runs", resume=True, plots=False)


def _poisoned_copy(train: Path, out: Path) -> Path:
    """`train` with a NaN box, a box outside its image and a label outside 0..C-1 added by hand to
    the first row of its first shard."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(train, out)
    first = sorted(out.glob("*.parquet"))[0]
    table = pq.read_table(first)
    boxes = table["boxes"].to_pylist()
    labels = table["labels"].to_pylist()
    boxes[0] = boxes[0] + [float("nan"), 1.0, 5.0, 5.0, 5000.0, 5000.0, 6000.0, 6000.0, 1.0, 1.0, 9.0, 9.0]
    labels[0] = labels[0] + [0, 0, 99]
    crowd = table["iscrowd"].to_pylist()
    crowd[0] = crowd[0] + [False, False, False]
    for name, values, kind in (("boxes", boxes, pa.float32()), ("labels", labels, pa.int32()),
                               ("iscrowd", crowd, pa.bool_())):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.list_(kind)))
    pq.write_table(table, first)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_fit_reports_and_logs_then_a_finetune_from_it_decodes_in_the_worker_closes_mosaic_and_resumes(
        ray_session, tiny_shards, tmp_path):
    """Three Ray Train runs in sequence, each start about a minute on 2 cores, so one test:

    1. 2 workers, 2 epochs, TensorBoard + MLflow: metrics rows, config.yaml, best/last weights,
       checkpoints, plots, both trackers (tests/e2e/test_trackers.py's check).
    2. A fine-tune from run 1's last.pt (`model.init`), 1 worker, decoding in the worker
       (data.decode=gpu on CPU: raw rows -> torchvision.io + tensor augmentation), mosaic closed
       for the last 99 % of a 2-minute budget, on a copy of the shards with 3 poisoned boxes that
       are dropped and counted.
    3. `resume=True` without a name (the latest run: run 2) and more epochs, after run 1's weights
       are gone: every weight comes from the checkpoint, and the close-mosaic decision is kept.
    """
    from test_trackers import assert_fit_logged_to_tensorboard_and_mlflow

    from rtrain.data.close_mosaic import EXTRA_KEY
    from rtrain.runs.checkpoint import checkpoint_dirs, find_latest_complete, load_checkpoint

    train, val = tiny_shards
    storage = tmp_path / "runs"
    cfg = tiny_fit_config(train, val, 2, storage, loggers=["tensorboard", "mlflow"])
    result = fit(cfg, name="e2e")

    out = storage / "e2e"
    assert result.run_dir == out and result.epochs_done == 2
    rows = run_dir.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["evaluated"] and 0.0 <= r["mAP"] <= 1.0 for r in rows)
    assert rows[1]["step"] > rows[0]["step"] > 0 and rows[0]["world_size"] == 2
    assert {"loss", "loss_cls", "loss_box", "loss_dfl", "lr", "images_per_s", "data_wait_frac",
            "mAP50"} <= rows[0].keys()
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header + 2 rows
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["run"]["name"] == "e2e" and saved_cfg["train"]["epochs"] == 2
    for weights in (result.best_weights, result.last_weights):
        obj = torch.load(weights, weights_only=True)
        assert obj["class_names"] == ["circle", "square", "triangle", "star", "cross", "ring"]
        model = build_detector(config_from_dict(obj["config"]), len(obj["class_names"]))
        model.load_state_dict(obj["model"])
    assert load_weights(result.last_weights)["extra"]["epoch"] == 1
    assert len(list(out.glob("checkpoint_*"))) >= 1
    assert {p.name for p in result.plots} == {"curves.png", "val_predictions.png"}
    assert all(p.stat().st_size > 1000 for p in result.plots)
    assert_fit_logged_to_tensorboard_and_mlflow(result, storage, epochs=2)

    # 2. fine-tune; close_mosaic_frac 0.99: the budget left after the first epoch is under 99 % of
    # it, and the run ends at its epoch cap long before its budget
    tuned_cfg = tiny_fit_config(_poisoned_copy(train, tmp_path / "poisoned"), val, 3, storage, workers=1)
    tuned_cfg["model"]["init"] = str(result.last_weights)
    tuned_cfg["data"].update(decode="gpu", shuffle_buffer=0, mosaic=1.0, close_mosaic_frac=0.99)
    tuned_cfg["train"]["time_limit_min"] = 2.0
    tuned = fit(tuned_cfg, name="tuned", plots=False)
    rows = run_dir.read_metrics(tuned.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(r["evaluated"] for r in rows)
    assert all(r["skipped"] == 0 and r["steps"] == 2 for r in rows)  # 19 train images, batch 8
    # the poisoned image's 3 bad boxes, in each epoch whose 16 rows include it
    assert all(r["dropped_targets"] in (0, 3) for r in rows) and sum(r["dropped_targets"] for r in rows) > 0
    assert all(r["first_batch_s"] >= 0 for r in rows)
    first_free = load_checkpoint(find_latest_complete(checkpoint_dirs(tuned.run_dir))[0])["extra"][EXTRA_KEY]
    # decided after epoch 0: epoch 1, or later when decoded rows were read ahead
    assert isinstance(first_free, int) and 1 <= first_free <= 3

    # 3. resume the latest run with more epochs; the init file is gone
    result.last_weights.unlink()
    result.best_weights.unlink(missing_ok=True)
    resumed = fit(None, overrides=["train.epochs=4"], storage=storage, resume=True, plots=False)
    assert resumed.name == "tuned"
    rows = run_dir.read_metrics(tuned.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3], "an epoch is missing or doubled"
    assert rows[3]["step"] > rows[2]["step"] and rows[3]["run_starts"] == 2
    assert load_weights(tuned.run_dir / "last.pt")["extra"]["epoch"] == 3
    assert load_checkpoint(find_latest_complete(checkpoint_dirs(tuned.run_dir))[0])["extra"][EXTRA_KEY] \
        == first_free


def test_full_disk_at_start_is_one_line_before_ray(tmp_path, monkeypatch):
    """A full disk cannot be made here without root mounts: the OS error it raises is injected."""
    import errno
    import tempfile

    from rtrain.training.runner import check_storage

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_space)
    with pytest.raises(FitError) as info:
        check_storage(tmp_path / "runs")
    assert str(info.value) == f"{tmp_path / 'runs'}: storage is not writable (No space left on device)"
