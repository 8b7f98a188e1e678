"""rtrain.search.spec / sweep_report without Ray: search-space parsing and its errors, the results table
(text, CSV, Markdown) from made-up trials, the Pareto front on known points, best.yaml."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import yaml

from rtrain.config import load_config
from rtrain.search.report import (
    TrialRecord,
    best_record,
    format_csv,
    format_markdown,
    format_table,
    pareto_front,
    plot_pareto,
    write_best_config,
    write_tables,
)
from rtrain.search.spec import SweepError, apply_params, effective_lr, load_sweep, trial_config

REPO = Path(__file__).resolve().parents[2]
BASE = {"model": {"name": "compact_n"}, "data": {"train": "d/train", "val": "d/val", "img_size": 128},
        "train": {"epochs": 6, "batch_size": 8, "lr": 0.004, "nominal_batch_size": 16}}


def _write(tmp_path: Path, search: dict, **top) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "search": search, **top}))
    return path


def test_space_kinds_map_to_tune_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = load_sweep(_write(tmp_path, {
        "model.name": {"grid": ["compact_n", "mv2_s"]},
        "model.width": {"uniform": [0.25, 0.75]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "model.neck_channels": {"randint": [16, 64]},
        "train.batch_size": {"choice": [4, 8, 16]},
    }, tune={"num_samples": 3}))
    space = spec.param_space()
    assert space["model.name"] == {"grid_search": ["compact_n", "mv2_s"]}
    width = space["model.width"]
    assert isinstance(width, Float) and (width.lower, width.upper) == (0.25, 0.75)
    assert isinstance(space["train.lr"].sampler, Float._LogUniform)
    neck = space["model.neck_channels"]
    assert isinstance(neck, Integer) and (neck.lower, neck.upper) == (16, 65)  # both ends included
    batch = space["train.batch_size"]
    assert isinstance(batch, Categorical) and batch.categories == [4, 8, 16]
    assert spec.num_trials() == 6 and spec.epochs == 6 and spec.tune.num_samples == 3


@pytest.mark.parametrize("search, message", [
    ({"model.widht": {"choice": [0.5]}}, "search.model.widht: unknown config key 'model.widht'"),
    ({"width": {"choice": [0.5]}}, "unknown config key 'width'"),
    ({"model.width": {"choice": [0.5, 9.0]}}, "model.width: 9.0 is out of range"),
    ({"model.name": {"choice": ["compact_n", "resnet"]}}, "unknown model variant 'resnet'"),
    ({"model.width": {"gaussian": [0.5, 1]}}, "unknown space kind 'gaussian'"),
    ({"model.width": {"uniform": [0.75, 0.5]}}, "needs low < high"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
    ({"train.batch_size": {"uniform": [4, 16]}}, "train.batch_size is an integer: use randint"),
    ({"train.batch_size": {"choice": [8, "big"]}}, "train.batch_size: expected int"),
    ({"run.workers": {"choice": [1, 2]}}, "run.workers cannot be searched"),
    ({"train.nominal_batch_size": {"choice": [16, 32]}}, "cannot be searched"),
    ({"model.width": {"choice": []}}, "needs a non-empty list"),
    ({"model.width": [0.5, 0.75]}, "expected one of"),
])
def test_bad_search_spaces_name_the_file_and_key(tmp_path, search, message):
    path = _write(tmp_path, search)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_other_spec_errors(tmp_path):
    with pytest.raises(SweepError, match="unknown top-level key 'serch'"):
        load_sweep(_write(tmp_path, {"model.width": {"choice": [0.5]}}, serch={}))
    with pytest.raises(SweepError, match="nothing to search"):
        load_sweep(_write(tmp_path, {}))
    with pytest.raises(SweepError, match="unknown key tune.grace"):
        load_sweep(_write(tmp_path, {"model.width": {"choice": [0.5]}}, tune={"grace": 1}))
    with pytest.raises(SweepError, match="tune.reduction_factor must be >= 2"):
        load_sweep(_write(tmp_path, {"model.width": {"choice": [0.5]}}, tune={"reduction_factor": 1}))
    with pytest.raises(SweepError, match=r"base: unknown key train\.epoch "):
        load_sweep(_write(tmp_path, {"model.width": {"choice": [0.5]}}), ["train.epoch=3"])
    with pytest.raises(SweepError, match="missing.yaml: cannot read config"):
        load_sweep(_write(tmp_path, {"model.width": {"choice": [0.5]}},
                          base_config=str(tmp_path / "missing.yaml")))


def test_base_config_file_overrides_and_cli_flags(tmp_path):
    base_file = tmp_path / "recipe.yaml"
    base_file.write_text(yaml.safe_dump({**BASE, "eval": {"interval": 5}}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base_config": str(base_file), "base": {"eval": {"interval": 1}},
                                    "search": {"model.depth": {"grid": [0.5, 1.0]}},
                                    "tune": {"num_samples": 2, "grace_period": 2}}))
    flags = {"num_samples": 5, "max_concurrent": None}
    spec = load_sweep(path, ["train.epochs=9", "tune.grace_period=3"], flags)
    assert spec.base["eval"]["interval"] == 1 and spec.base["train"]["epochs"] == 9
    assert spec.base["train"]["lr"] == 0.004 and spec.base["model"]["name"] == "compact_n"
    assert (spec.tune.num_samples, spec.tune.grace_period, spec.tune.max_concurrent) == (5, 3, 0)
    assert spec.num_trials() == 10


def test_trial_config_and_batch_scaled_lr():
    params = {"model.name": "mv2_s", "train.batch_size": 32, "data.img_size": 160}
    cfg = trial_config(BASE, params)
    assert (cfg.model.name, cfg.train.batch_size, cfg.data.img_size) == ("mv2_s", 32, 160)
    assert BASE["train"]["batch_size"] == 8  # the base is not changed
    assert effective_lr(cfg) == pytest.approx(0.004 * 32 / 16)
    assert effective_lr(cfg, workers=2) == pytest.approx(0.004 * 64 / 16)
    assert apply_params(BASE, {})["train"] == BASE["train"]


def test_effective_lr_follows_the_optimiser_and_an_auto_batch():
    adamw = trial_config(BASE, {"train.optimizer": "adamw", "train.batch_size": 64})
    assert effective_lr(adamw) == pytest.approx(0.004 * 2.0)  # sqrt(64 / 16)
    auto = trial_config(BASE, {"train.batch_size": "auto"})
    assert math.isnan(effective_lr(auto))  # unknown until the trial resolves it on its device
    assert effective_lr(auto, workers=2, batch_size=32) == pytest.approx(0.004 * 64 / 16)


def test_trial_table_batch_of_an_auto_trial_comes_from_its_metrics():
    from rtrain.search.driver import _trial_batch

    cfg = {"train": {"batch_size": "auto"}}
    rows = [{"epoch": e, "global_batch": 96, "world_size": 2} for e in range(2)]
    assert _trial_batch(cfg, rows) == 48
    assert _trial_batch(cfg, []) is None
    assert _trial_batch({"train": {"batch_size": 8}}, rows) == 8


def test_a_recipe_trial_shows_its_searched_values_and_a_budget_end_is_done(tmp_path):
    import json

    from rtrain.search.driver import trial_record

    spec = load_sweep(_write(tmp_path, {"train.ema_decay": {"choice": [0.999, 0.9998]},
                                        "data.mosaic": {"choice": [0.0, 1.0]},
                                        "train.lr": {"choice": [0.01]}}))
    params = {"train.ema_decay": 0.9998, "data.mosaic": 1.0, "train.lr": 0.01}

    def record(name, rows):
        out = tmp_path / name
        out.mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return trial_record(name, params, spec, out, num_classes=3, error=False, reason="")

    evaluated = {"evaluated": True, "mAP": 0.3, "mAP50": 0.6}
    # Three of six epochs, the last one marked finished: the time budget ended it, not ASHA.
    budget = record("budget", [{"epoch": e, "finished": int(e == 2), **evaluated} for e in range(3)])
    cut = record("cut", [{"epoch": e, "finished": 0, **evaluated} for e in range(3)])
    assert (budget.status, cut.status) == ("done", "stopped")
    assert budget.searched == params
    assert budget.lr == pytest.approx(0.01 * 8 / 16)  # the default optimiser, SGD, scales linearly
    header = format_table([budget, cut]).splitlines()[0].split()
    assert header[-2:] == ["train.ema_decay", "data.mosaic"]  # train.lr has its fixed column
    md = format_markdown([budget, cut]).splitlines()
    assert md[2].endswith("| 0.9998 | 1 |")
    rows = list(csv.DictReader(io.StringIO(format_csv([budget, cut]))))
    assert rows[0]["train.ema_decay"] == "0.9998" and rows[0]["data.mosaic"] == "1.0"


@pytest.mark.parametrize("name", ["sweep_quickstart.yaml", "sweep_bccd.yaml", "sweep_recipe.yaml"])
def test_shipped_sweeps_load(name):
    spec = load_sweep(REPO / "configs" / name)
    assert spec.num_trials() >= 4 and spec.base["eval"]["interval"] == 1
    assert "python -m rtrain.tune" in (REPO / "configs" / name).read_text()


# --------------------------------------------------------------------------- table, Pareto, best.yaml


def _record(tid, variant, gflops, speed, best, status="done", reason="", epochs=6, config=None):
    return TrialRecord(trial_id=tid, variant=variant, width=0.5, depth=1.0, img_size=128, batch_size=8,
                       lr=0.002, params_m=1.25, gflops=gflops, images_per_s=speed, best_map=best,
                       map50=None if best is None else min(1.0, best * 2), epochs_run=epochs, status=status,
                       reason=reason, config=config or {})


RECORDS = [
    _record("t0", "compact_n", 0.4, 90.0, 0.30),
    _record("t1", "mv2_s", 0.8, 60.0, 0.42),
    _record("t2", "compact_s", 1.0, 50.0, 0.35, status="stopped", epochs=2),  # dominated on both axes
    _record("t3", "seed", 2.0, 20.0, None, status="error",
            reason="NonFiniteLossError: loss was non-finite for 20 consecutive steps", epochs=1),
]


def test_table_text_csv_markdown():
    text = format_table(RECORDS)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["trial", "variant", "width"] and len(lines) == 5
    assert lines[1].startswith("t1") and lines[-1].startswith("t3")  # best mAP first, unevaluated last
    assert "error: NonFiniteLossError" in lines[-1] and "stopped" in text
    rows = list(csv.DictReader(io.StringIO(format_csv(RECORDS))))
    assert [r["trial"] for r in rows] == ["t1", "t2", "t0", "t3"]
    assert rows[0]["best mAP"] == "0.42" and rows[0]["GFLOPs"] == "0.8" and rows[3]["best mAP"] == ""
    assert rows[3]["status"] == "error" and rows[3]["reason"].startswith("NonFiniteLossError")
    md = format_markdown(RECORDS).splitlines()
    assert md[0].startswith("| trial | variant |") and md[1].startswith("|---|") and len(md) == 6
    assert "| 0.4200 |" in md[2]


def test_write_tables(tmp_path):
    csv_path, md_path = write_tables(RECORDS, tmp_path)
    assert csv_path.read_text().count("\n") == 5 and md_path.read_text().count("\n") == 6
    assert not list(tmp_path.glob(".*tmp"))


def test_pareto_front_known_points():
    pts = [(1.0, 0.5), (2.0, 0.6), (1.5, 0.4), (3.0, 0.6), (0.5, 0.1), (2.0, 0.6)]
    # (1.5, 0.4) is beaten by (1.0, 0.5); (3.0, 0.6) by (2.0, 0.6); the two (2.0, 0.6) are both kept.
    assert pareto_front(pts) == [4, 0, 1, 5]
    # Maximising x (images/s): sorted by speed, fastest last.
    assert pareto_front([(10.0, 0.3), (20.0, 0.2), (5.0, 0.4), (15.0, 0.3)], minimize_x=False) == [2, 3, 1]
    assert pareto_front([]) == [] and pareto_front([(1.0, 0.2)]) == [0]


def test_pareto_plot(tmp_path):
    path = plot_pareto(RECORDS, tmp_path / "p.png")
    assert path.stat().st_size > 5000
    assert plot_pareto([RECORDS[3]], tmp_path / "none.png") is None


def test_best_yaml_is_a_valid_training_config(tmp_path):
    from rtrain.config import config_from_dict, config_to_dict

    base = config_to_dict(config_from_dict(BASE))
    trial = config_to_dict(trial_config(BASE, {"model.name": "mv2_s", "train.batch_size": 4}))
    trial["train"]["epochs"] = 2  # what the trial ran with does not matter: best.yaml trains full length
    records = [_record("a", "compact_n", 0.4, 90.0, 0.30, config=base),
               _record("b", "mv2_s", 0.8, 60.0, 0.42, config=trial),
               _record("c", "seed", 2.0, 20.0, None, status="error", config=base)]
    best = best_record(records)
    assert best.trial_id == "b"
    path = write_best_config(best, base, tmp_path / "best.yaml", "demo")
    cfg = load_config(path)
    assert (cfg.model.name, cfg.train.batch_size, cfg.train.epochs, cfg.run.name) == ("mv2_s", 4, 6, "")
    assert "python -m rtrain.fit --config" in path.read_text()
    assert best_record([records[2]]) is None
