"""COCO evaluation: GT from shards in original pixels, prediction mapping, metrics with known answers."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rtrain.evaluation.coco import STAT_NAMES, coco_evaluate, coco_gt_from_shards, to_coco_results

# Source category ids are deliberately not 1..C: evaluation must report the source's ids.
CLASSES = [{"index": 0, "name": "cat", "category_id": 3}, {"index": 1, "name": "dog", "category_id": 7}]
SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("file_name", pa.string()), ("jpeg", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
    ("boxes", pa.list_(pa.float32())), ("labels", pa.list_(pa.int32())), ("iscrowd", pa.list_(pa.bool_())),
])  # fmt: skip


def _image(image_id, orig_wh, boxes_orig, labels, iscrowd=None, longer=640):
    """A shard row: boxes given in ORIGINAL pixels are stored resized like the shard writer does."""
    ow, oh = orig_wh
    s = longer / max(ow, oh)
    w, h = round(ow * s), round(oh * s)
    stored = (np.asarray(boxes_orig, np.float64).reshape(-1, 4) * [w / ow, h / oh, w / ow, h / oh]).reshape(
        -1
    )
    return {
        "image_id": image_id, "file_name": f"{image_id}.jpg", "jpeg": b"", "width": w, "height": h,
        "orig_width": ow, "orig_height": oh, "boxes": stored.astype(np.float32).tolist(), "labels": labels,
        "iscrowd": iscrowd or [False] * len(labels),
    }  # fmt: skip


IMAGES = [
    _image(11, (1000, 500), [[100, 50, 300, 250], [600, 100, 640, 130]], [0, 1]),
    _image(12, (480, 960), [[10, 20, 410, 900]], [1]),
    _image(13, (640, 640), [], []),  # no objects: detections here are false positives
    _image(14, (800, 600), [[0, 0, 50, 40], [200, 200, 700, 580], [300, 10, 400, 90]], [0, 0, 1],
           [False, True, False]),
]  # fmt: skip


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    for i, rows in enumerate((IMAGES[:2], IMAGES[2:])):
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, d / f"part-{i:05d}.parquet")
    (d / "manifest.json").write_text(json.dumps({"classes": CLASSES}))
    return d


@pytest.fixture(scope="module")
def gt(shard_dir):
    return coco_gt_from_shards(shard_dir)


def _perfect(gt):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
        for a in gt.dataset["annotations"] if not a["iscrowd"]
    ]  # fmt: skip


def test_gt_from_shards_is_in_original_pixels_and_source_ids(gt):
    imgs = {i["id"]: i for i in gt.dataset["images"]}
    assert set(imgs) == {11, 12, 13, 14}
    assert (imgs[11]["width"], imgs[11]["height"]) == (1000, 500)
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[11]))
    assert [a["category_id"] for a in anns] == [3, 7]
    assert anns[0]["bbox"] == pytest.approx([100, 50, 200, 200], abs=1e-3)
    assert anns[0]["area"] == pytest.approx(40000, rel=1e-5)
    assert gt.loadAnns(gt.getAnnIds(imgIds=[12]))[0]["bbox"] == pytest.approx([10, 20, 400, 880], abs=1e-3)
    assert [a["iscrowd"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[14]))] == [0, 1, 0]
    assert gt.loadCats([3, 7]) == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def test_perfect_predictions_score_one(gt, capsys):
    m = coco_evaluate(gt, _perfect(gt))
    assert (
        m["mAP"] == pytest.approx(1.0)
        and m["mAP50"] == pytest.approx(1.0)
        and m["AR100"] == pytest.approx(1.0)
    )
    assert m["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert set(m) == set(STAT_NAMES) | {"per_class"}
    assert capsys.readouterr().out == ""  # pycocotools' chatter is swallowed


def test_shifted_box_costs_the_thresholds_above_its_iou(gt):
    res = _perfect(gt)
    # shift image 12's dog (400 x 880) right by 80 px: IoU = 320*880 / (480*880) = 2/3; score it
    # below the other detections so the ranking (not score ties) decides precision
    dog = next(r for r in res if r["image_id"] == 12)
    dog["bbox"][0] += 80
    dog["score"] = 0.5
    m = coco_evaluate(gt, res, class_names=["Cat", "Dog"])
    # dog: 3 GT; this one matches at IoU thresholds .50 .55 .60 .65 only (4 of 10). Above, the two
    # other dogs are found first (precision 1 up to recall 2/3), then nothing: with COCO's 101 recall
    # points, AP = (67 points of 101) at those 6 thresholds.
    dog_ap = (4 * 1.0 + 6 * 67 / 101) / 10
    assert m["per_class"]["Dog"] == pytest.approx(dog_ap, abs=1e-6)
    assert m["per_class"]["Cat"] == pytest.approx(1.0)
    assert m["mAP50"] == pytest.approx(1.0) and m["mAP"] == pytest.approx((1.0 + dog_ap) / 2)


def test_wrong_class_scores_zero_for_that_class(gt):
    # every dog predicted as a cat (lower score than the real cats)
    res = [dict(r, category_id=3, score=0.5) if r["category_id"] == 7 else r for r in _perfect(gt)]
    m = coco_evaluate(gt, res)
    assert m["per_class"]["dog"] == 0.0
    assert m["per_class"]["cat"] == pytest.approx(1.0)  # the false positives rank below every true one
    assert m["mAP"] == pytest.approx(0.5)


def test_equals_pycocotools_called_directly(gt, tmp_path):
    rng = np.random.default_rng(0)
    res = []
    for r in _perfect(gt) * 3:  # jittered copies, duplicates and a false positive on the empty image
        x, y, w, h = r["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        res.append(dict(r, bbox=[x + j[0], y + j[1], w + j[2], h + j[3]], score=float(rng.uniform(0.05, 1))))
    res.append({"image_id": 13, "category_id": 3, "bbox": [10, 10, 100, 100], "score": 0.99})
    before = json.dumps(res)
    ours = coco_evaluate(gt, res)
    assert json.dumps(res) == before  # caller's dicts untouched

    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt.dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        ref_gt = COCO(str(ann))
        ev = COCOeval(ref_gt, ref_gt.loadRes(json.loads(before)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert [ours[k] for k in STAT_NAMES] == pytest.approx(list(ev.stats), abs=1e-12)
    assert 0.0 < ours["mAP"] < 1.0


def test_empty_results_and_bad_results(gt):
    m = coco_evaluate(gt, [])
    assert all(m[k] == 0.0 for k in STAT_NAMES) and m["per_class"] == {"cat": 0.0, "dog": 0.0}
    with pytest.raises(ValueError, match="image_id 99"):
        coco_evaluate(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="category_id 1,"):
        coco_evaluate(gt, [{"image_id": 11, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


def _letterbox(stored_wh, size):
    """What the data pipeline does at eval time: scale the stored image into size x size, pad centred."""
    sw, sh = stored_wh
    s = size / max(sw, sh)
    return s, ((size - sw * s) / 2, (size - sh * s) / 2)


def test_letterbox_mapping_round_trip_gives_perfect_map(gt, shard_dir):
    rows = pq.read_table(sorted(shard_dir.glob("*.parquet"))).to_pylist()
    ids, dets, scales, pads, stored, orig = [], [], [], [], [], []
    for row in rows:
        s, pad = _letterbox((row["width"], row["height"]), 416)
        b = torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4)
        b = b * s + torch.tensor([pad[0], pad[1], pad[0], pad[1]])
        keep = ~torch.tensor(row["iscrowd"], dtype=torch.bool)
        ids.append(row["image_id"])
        dets.append({"boxes": b[keep], "scores": torch.full((int(keep.sum()),), 0.8),
                     "labels": torch.tensor(row["labels"], dtype=torch.int64)[keep]})  # fmt: skip
        scales.append(s)
        pads.append(pad)
        stored.append((row["width"], row["height"]))
        orig.append((row["orig_width"], row["orig_height"]))
    res = to_coco_results(ids, dets, torch.tensor(scales), torch.tensor(pads), stored, orig, [3, 7])
    assert len(res) == 5
    first = res[0]
    assert first["image_id"] == 11 and first["category_id"] == 3
    assert first["bbox"] == pytest.approx([100, 50, 200, 200], abs=0.01)
    assert coco_evaluate(gt, res)["mAP"] == pytest.approx(1.0)


def test_mapping_clips_to_the_stored_image_and_drops_boxes_in_the_padding():
    # original 1000x500 stored as 640x320, letterboxed into 416x416: scale 0.65, pad (0, 104)
    det = {
        "boxes": torch.tensor([[-10.0, 90.0, 50.0, 130.0],    # starts in the padding: clipped
                               [100.0, 10.0, 200.0, 100.0],   # entirely in the top padding: dropped
                               [41.6, 124.8, 124.8, 208.0]]),  # exact box
        "scores": torch.tensor([0.3, 0.2, 0.9]),
        "labels": torch.tensor([1, 0, 0]),
    }  # fmt: skip
    res = to_coco_results([5], [det], [0.65], [(0.0, 104.0)], [(640, 320)], [(1000, 500)], [3, 7])
    assert [r["score"] for r in res] == pytest.approx([0.3, 0.9])
    clipped, exact = res
    assert clipped["category_id"] == 7
    k = 1000 / 640  # stored -> original
    assert clipped["bbox"] == pytest.approx([0, 0, 50 / 0.65 * k, (130 - 104) / 0.65 * k], abs=1e-6)
    assert exact["bbox"] == pytest.approx([100, 50, 200, 200], abs=1e-4)
    with pytest.raises(ValueError, match="label 2 out of range"):
        to_coco_results([5], [dict(det, labels=torch.tensor([2, 0, 0]))], [0.65], [(0, 104)], [(640, 320)],
                        [(1000, 500)], [3, 7])  # fmt: skip


def test_bad_shards_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json: manifest not found"):
        coco_gt_from_shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": CLASSES}))
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        coco_gt_from_shards(tmp_path)
    bad = dict(IMAGES[0], boxes=[1.0, 2.0, 3.0])
    pq.write_table(pa.Table.from_pylist([bad], schema=SCHEMA), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: image_id 11 has 3 box values, 2 labels"):
        coco_gt_from_shards(tmp_path)
    pq.write_table(pa.Table.from_pylist([IMAGES[0]], schema=SCHEMA), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([IMAGES[0]], schema=SCHEMA), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="b.parquet: duplicate image_id 11"):
        coco_gt_from_shards(tmp_path)


@pytest.mark.slow
def test_real_coco128_shards_match_the_source_annotations(shared_data, tmp_path, capsys):
    """The shard writer's output, read back as GT, equals coco128's own json (ids, sizes, boxes)."""
    from data_prep import shard

    src_json = shared_data / "coco128/annotations/instances_train2017.json"
    sub = json.loads(src_json.read_text())  # the fixture's coco128 images (crowd, grayscale, no-box ones)
    keep = {i["id"] for i in sub["images"]}
    assert len(keep) >= 10 and any(a["iscrowd"] for a in sub["annotations"])
    out = tmp_path / "shards"
    argv = ["--format", "coco", "--annotations", src_json, "--images",
            shared_data / "coco128/train2017", "--out", out, "--size", "160", "--workers", "1"]  # fmt: skip
    assert shard.main([str(a) for a in argv]) == 0
    capsys.readouterr()

    gt = coco_gt_from_shards(out)
    sizes = {i["id"]: (i["width"], i["height"]) for i in sub["images"]}
    assert {i["id"]: (i["width"], i["height"]) for i in gt.dataset["images"]} == sizes
    for image_id in keep:
        ours = sorted((a["category_id"], *a["bbox"]) for a in gt.imgToAnns[image_id])
        theirs = sorted(
            (a["category_id"], *a["bbox"]) for a in sub["annotations"] if a["image_id"] == image_id
        )
        assert [o[0] for o in ours] == [t[0] for t in theirs]  # COCO's own (non-contiguous) ids
        assert np.allclose([o[1:] for o in ours], [t[1:] for t in theirs], atol=0.05) if ours else not theirs
    perfect = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
               for a in sub["annotations"]]  # fmt: skip
    assert coco_evaluate(gt, perfect)["mAP"] == pytest.approx(1.0)
