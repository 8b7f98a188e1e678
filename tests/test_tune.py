"""rtrain.tune end to end on Ray Tune (the session's Ray, no dashboard): a 4-trial ASHA sweep on tiny
synthetic shards; the table, the Pareto plot, best.yaml; stopped trials' placement groups freed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from rtrain.config import load_config
from rtrain.quickstart import prepare_synthetic
from rtrain.sweep import load_sweep
from rtrain.sweep_report import BEST_YAML, PARETO_PNG, RESULTS_CSV, RESULTS_MD


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return prepare_synthetic(root, images=24, size=96, seed=5)


def _sweep_yaml(path: Path, train: Path, val: Path) -> Path:
    doc = {
        "base": {
            "model": {"name": "compact_n"},
            "data": {"train": str(train), "val": str(val), "img_size": 96, "num_actors": 1,
                     "cpus_per_actor": 0.5, "shuffle_buffer": 16},
            "train": {"epochs": 3, "batch_size": 8, "optimizer": "adamw", "lr": 0.002,
                      "nominal_batch_size": 16, "warmup_epochs": 0.5},
            "eval": {"interval": 1, "batch_size": 8},
            "run": {"storage": str(path.parent / "unused")},
        },
        "search": {
            "model.name": {"grid": ["compact_n", "mv2_s"]},
            "model.width": {"grid": [0.25, 0.5]},
            "train.batch_size": {"choice": [4, 8]},
        },
        "tune": {"num_samples": 1, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 1,
                 "seed": 1},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_end_to_end(ray_session, tiny_shards, tmp_path):
    from ray.util.placement_group import placement_group_table

    from rtrain.sweep_run import run_sweep

    train, val = tiny_shards
    spec = load_sweep(_sweep_yaml(tmp_path / "sweep.yaml", train, val))
    result = run_sweep(spec, name="s", storage=tmp_path / "sweeps")

    out = tmp_path / "sweeps" / "s"
    assert result.sweep_dir == out and len(result.records) == 4
    combos = {(r.variant, r.width) for r in result.records}
    assert combos == {("compact_n", 0.25), ("compact_n", 0.5), ("mv2_s", 0.25), ("mv2_s", 0.5)}
    statuses = [r.status for r in result.records]
    assert "error" not in statuses, [r.reason for r in result.records]
    assert "stopped" in statuses, "ASHA stopped no trial early"
    for r in result.records:
        assert 1 <= r.epochs_run <= 3 and (r.epochs_run == 3) == (r.status == "done")
        assert 0.0 <= r.best_map <= 1.0 and r.params_m > 0 and r.gflops > 0 and r.images_per_s > 0
        assert r.lr == pytest.approx(0.002 * r.batch_size / 16)  # linear scaling from the nominal 16
        assert (Path(r.run_dir) / "metrics.jsonl").is_file() and list(Path(r.run_dir).glob("checkpoint_*"))

    with open(out / RESULTS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {row["status"] for row in rows} == set(statuses)
    assert (out / RESULTS_MD).read_text().count("\n") == 6  # header, rule, 4 rows
    assert (out / PARETO_PNG).stat().st_size > 5000

    best = load_config(out / BEST_YAML)
    top = max(result.records, key=lambda r: r.best_map)
    assert (best.model.name, best.model.width, best.train.epochs) == (top.variant, top.width, 3)
    assert best.run.name == "" and best.data.train == str(train)

    # Stopped trials' Train worker groups were removed (Ray's own cleaner needs the dashboard).
    live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == []
