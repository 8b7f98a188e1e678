"""rtrain.compare / rtrain.runs.compare on hand-written run dirs in the format run_dir/train_loop write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rtrain import compare as cli
from rtrain.config import config_from_dict, dump_config
from rtrain.runs.compare import (
    CompareError,
    compare_runs,
    ema_smooth,
    legend_labels,
    read_run,
    skipped_lines,
    summarize,
)
from rtrain.runs.run_dir import append_metrics


def _row(epoch: int, loss: float, *, batch: int, evaluated: bool, m: float, per_epoch_images: int = 32,
         ) -> dict:
    """One metrics row with the keys train_loop writes (a subset of the COCO ones)."""
    steps = per_epoch_images // batch
    row = {
        "loss": loss, "loss_cls": loss / 2, "loss_box": loss / 4, "loss_dfl": loss / 4, "lr": 0.01,
        "steps": steps, "skipped": 0, "images": steps * batch, "images_per_s": 10.0,
        "data_wait_s": 0.1, "data_wait_frac": 0.01, "epoch_time_s": 3.0 + batch / 16, "grad_norm": 1.0,
        "stopped_early": 0.0, "epoch": epoch, "step": (epoch + 1) * steps, "world_size": 1,
        "global_batch": batch, "nonfinite_total": 0, "evaluated": evaluated, "mAP": m,
    }
    if evaluated:
        row.update(mAP50=2 * m, mAP_large=-1.0)
    row.update(best_mAP=m, elapsed_s=(epoch + 1) * 4.0, epoch_wall_s=4.0)
    return row


def _run(root: Path, name: str, batch: int, losses: list[float], maps: list[float]) -> Path:
    run = root / name
    cfg = config_from_dict({"train": {"batch_size": batch}, "run": {"name": name}})
    dump_config(cfg, run / "config.yaml")
    for epoch, (loss, m) in enumerate(zip(losses, maps, strict=True)):
        append_metrics(run, _row(epoch, loss, batch=batch, evaluated=epoch % 2 == 1, m=m))
    return run


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    a = _run(tmp_path, "bs1", 1, [4.0, 3.0, 3.5, 2.5], [0.0, 0.10, 0.10, 0.30])
    b = _run(tmp_path, "bs16", 16, [4.0, 3.8, 3.6, 3.7], [0.0, 0.05, 0.05, 0.20])
    return a, b


def _table_row(table: str, name: str) -> list[str]:
    return next(line for line in table.splitlines() if line.startswith(name + " ")).split()


def test_two_runs_plot_table_and_legend(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "cmp.png"
    res = compare_runs([a, b], metric="loss", x="epoch", smooth=0.6, out=out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert [s.run.label for s in res.series] == ["train.batch_size=1", "train.batch_size=16"]
    # final = last epoch, best = min for a loss, with the x where it happened
    assert _table_row(res.table, "bs1")[1:6] == ["4", "2.5000", "4", "2.5000", "4"]
    assert _table_row(res.table, "bs16")[1:6] == ["4", "3.7000", "4", "3.6000", "3"]

    # mAP: only evaluated rows count (train_loop repeats the last mAP on the others); best = max
    res = compare_runs([a, b], metric="mAP", x="step", out=None)
    s_a = res.series[0]
    assert s_a.x == [64.0, 128.0] and s_a.y == [0.10, 0.30]  # bs1: 32 steps per epoch
    assert summarize(res.series[1], "mAP") == {"final": 0.20, "final_x": 8.0, "best": 0.20, "best_x": 8.0,
                                               "points": 2}
    assert s_a.run.skipped["not evaluated (no fresh mAP)"] == 2
    # time and images axes come from elapsed_s and images x world_size
    res = compare_runs([a], metric="loss", x="time", out=None)
    assert res.series[0].x == [4.0, 8.0, 12.0, 16.0] and res.series[0].x_source == "elapsed_s"
    res = compare_runs([a], metric="loss", x="images", out=None)
    assert res.series[0].x == [32.0, 64.0, 96.0, 128.0]
    # a -1 from pycocotools (no large objects in val) is not a point
    with pytest.raises(CompareError, match="mAP_large = -1"):
        compare_runs([a], metric="mAP_large", x="epoch", out=None)


def test_missing_keys_are_derived(tmp_path):
    run = tmp_path / "old"
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"counts": {"images": 50}}))
    dump_config(config_from_dict({"data": {"train": str(shards)}}), run / "config.yaml")
    rows = [{"epoch": e, "loss": 3.0 - e, "steps": 5, "skipped": 1, "epoch_wall_s": 2.5} for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_run(run)
    xs = {x: compare_runs([run], x=x, out=None).series[0] for x in ("step", "time", "images")}
    assert xs["step"].x == [6.0, 12.0, 18.0] and xs["step"].x_source == "sum of steps"
    assert xs["time"].x == [2.5, 5.0, 7.5] and xs["time"].x_source == "sum of epoch_wall_s"
    assert xs["images"].x == [50.0, 100.0, 150.0] and xs["images"].x_source == "epoch x train images"
    assert len(data.rows) == 3


def test_truncated_and_junk_lines_still_plot_and_are_reported(two_runs, tmp_path, capsys):
    a, b = two_runs
    text = (b / "metrics.jsonl").read_text()
    killed = text + '{"loss": 1.0, "epoch": 5, "ste'  # killed mid-write
    lines = killed.splitlines()
    lines.insert(1, "not json at all")
    lines.insert(2, json.dumps([1, 2]))
    lines.insert(3, json.dumps({"epoch": 9, "lr": 0.1}))  # no loss
    lines.insert(4, json.dumps({"epoch": 10, "loss": None}))  # NaN written as null
    (b / "metrics.jsonl").write_text("\n".join(lines))
    empty = tmp_path / "empty_run"
    empty.mkdir()

    out = tmp_path / "cmp.png"
    rc = cli.main([str(a), str(b), str(empty), "--metric", "loss", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert f"left out {empty}: no metrics.jsonl" in printed
    skipped = next(line for line in printed.splitlines() if line.startswith(f"{b}: skipped"))
    assert "2 line not JSON (truncated or garbled)" in skipped
    assert "1 row not a JSON object" in skipped and "1 loss missing" in skipped
    assert "1 loss null/non-finite" in skipped
    # the 4 good rows of bs16 are still all there: final 3.7, best 3.6
    assert _table_row(printed, "bs16")[1:6] == ["4", "3.7000", "4", "3.6000", "3"]
    res = compare_runs([b], out=None)
    assert skipped_lines(res.series) and res.series[0].y == [4.0, 3.8, 3.6, 3.7]


def test_nothing_to_plot_is_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    rc = cli.main([str(empty), str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "nothing to plot" in err and "no metrics.jsonl" in err
    assert not (tmp_path / "x.png").exists()


def test_ema_smoothing_and_legend_fallback(tmp_path):
    assert ema_smooth([2.0, 2.0, 2.0], 0.6) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no warm-up dip
    assert ema_smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])
    assert ema_smooth([3.0, 1.0], 0.0) == [3.0, 1.0]
    with pytest.raises(CompareError, match="smooth"):
        ema_smooth([1.0], 1.0)
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    for d in (a, b):
        dump_config(config_from_dict({"run": {"name": d.name}}), d / "config.yaml")
    nocfg = tmp_path / "loose"
    nocfg.mkdir()
    assert legend_labels([read_run(a), read_run(b), read_run(nocfg)]) == ["run_a", "run_b", "loose"]
