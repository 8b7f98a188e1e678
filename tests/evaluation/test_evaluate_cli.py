"""python -m rtrain.evaluate: the training evaluation's numbers, equal to pycocotools run directly."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from inference_fixtures import BCCD_CLASSES, cli_error, make_bccd_shards, make_weights, one_thread
from pycocotools.cocoeval import COCOeval

from rtrain.data.batches import iter_batches_local
from rtrain.deploy.predictor import predict
from rtrain.evaluate import main
from rtrain.evaluation import predict_loop
from rtrain.evaluation.coco import STAT_NAMES, coco_gt_from_shards
from rtrain.evaluation.sharded import val_batches
from rtrain.evaluation.weights import evaluate_weights
from rtrain.runs.checkpoint import save_weights
from rtrain.runs.loading import load_detector


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory):
    return make_bccd_shards(shared_data, tmp_path_factory.mktemp("eval") / "val")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # eval section: score 0.05, batch 4 (inference_fixtures); 128 px keeps it fast
    return make_weights(tmp_path_factory.mktemp("w") / "best.pt", img_size=128)


def test_cli_writes_metrics_table_and_pr_curves(shards, weights, tmp_path, capsys):
    out, pr = tmp_path / "metrics.json", tmp_path / "pr"
    assert main(["--weights", str(weights), "--shards", str(shards), "--out", str(out),
                 "--pr-curves", str(pr)]) == 0
    metrics = json.loads(out.read_text())
    assert {"mAP", "mAP50", "mAP75", "per_class", *STAT_NAMES} <= set(metrics)
    assert list(metrics["per_class"]) == BCCD_CLASSES
    assert metrics["eval_images"] == 6 and metrics["eval_detections"] > 0
    assert metrics["settings"]["img_size"] == 128 and metrics["settings"]["score_thresh"] == 0.05
    pngs = sorted(pr.glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    text = capsys.readouterr().out
    assert "AP  @[IoU=0.50:0.95 | area=   all | maxDets=100]" in text
    assert all(name in text for name in BCCD_CLASSES)


def test_equals_in_training_evaluation_and_pycocotools_on_the_same_predictions(shards, weights, tmp_path):
    metrics = evaluate_weights(weights, shards)
    # 1) the in-training path (rect val batches by default), called directly
    loaded = load_detector(weights)
    gt = coco_gt_from_shards(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    cat_ids = [c["category_id"] for c in manifest["classes"]]
    batches = val_batches(shards, batch_size=4, img_size=128, rect=True)
    direct = predict_loop.evaluate(loaded.model, batches, gt, cat_ids, BCCD_CLASSES, device="cpu",
                             score_thresh=0.05, iou_thresh=0.6)
    for key in STAT_NAMES:
        assert metrics[key] == direct[key], key
    assert metrics["per_class"] == direct["per_class"]
    assert metrics["settings"]["rect"] is True
    # eval.rect=false: the square 128 x 128 batches of before
    square = evaluate_weights(weights, shards, overrides=["eval.rect=false"])
    batches = iter_batches_local(shards, batch_size=4, train=False, img_size=128)
    before = predict_loop.evaluate(loaded.model, batches, gt, cat_ids, BCCD_CLASSES, device="cpu",
                             score_thresh=0.05, iou_thresh=0.6)
    assert [square[k] for k in STAT_NAMES] == [before[k] for k in STAT_NAMES]
    # 2) predictions made by the predict path (same thresholds and batches), scored by pycocotools itself
    report = predict(weights, shards, out_dir=tmp_path / "p", conf=0.05, iou=0.6, batch_size=4, draw=False)
    results = json.loads(report.json_path.read_text())["results"]
    assert results and {r["category_id"] for r in results} <= set(cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert [metrics[k] for k in STAT_NAMES] == pytest.approx(list(ev.stats), abs=1e-6)
    assert metrics["mAP50"] > 0  # not a vacuous comparison of zeros


def test_overrides_change_the_settings(shards, weights, tmp_path):
    out = tmp_path / "m.json"
    assert main(["--weights", str(weights), "--shards", str(shards), "--out", str(out), "--batch-size", "3",
                 "--set", "data.img_size=160", "eval.score_thresh=0.5"]) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["img_size"], s["score_thresh"], s["batch_size"]) == (160, 0.5, 3)


def _error(capsys, argv) -> str:
    return cli_error(capsys, main, argv)


def test_bad_inputs_are_one_line_errors(shards, weights, tmp_path, capsys):
    assert "file not found" in _error(capsys, ["--weights", str(tmp_path / "no.pt"), "--shards", str(shards)])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(weights.read_bytes()[:2000])
    assert "corrupt" in _error(capsys, ["--weights", str(corrupt), "--shards", str(shards)])
    # weights of compact_n saved under a config that says compact_s
    foreign = tmp_path / "foreign.pt"
    other = make_weights(tmp_path / "n.pt", variant="compact_n")
    obj = torch.load(other, weights_only=True)
    config = {**obj["config"], "model": {**obj["config"]["model"], "name": "compact_s"}}
    save_weights(foreign, obj["model"], config, obj["class_names"])
    err = _error(capsys, ["--weights", str(foreign), "--shards", str(shards)])
    assert "do not fit the model" in err and "compact_s" in err and "missing" in err
    renamed = tmp_path / "renamed.pt"
    save_weights(renamed, obj["model"], obj["config"], ["a", "b", "c"])
    assert "differ from the weights'" in _error(capsys, ["--weights", str(renamed), "--shards", str(shards)])
    assert "shard directory not found" in _error(capsys, ["--weights", str(weights), "--shards",
                                                          str(tmp_path / "nowhere")])
    assert "unknown key" in _error(capsys, ["--weights", str(weights), "--shards", str(shards),
                                            "--set", "eval.nope=1"])
