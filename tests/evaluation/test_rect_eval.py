"""Rectangular evaluation (eval.rect): canvases, exact box round trips, padding, world invariance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rtrain.data.augment import PAD_VALUE, Sample, letterbox, rect_canvas
from rtrain.data.batches import DecodeAugment, boxes_to_original, iter_batches_local
from rtrain.evaluation.sharded import _rect_rows_of_rank, val_batches

# (h, w) of the stored images: six 16:9 landscape, two each 4:3 landscape, portrait and square
SHAPES = [(108, 192), (192, 108), (144, 192), (108, 192), (128, 128), (108, 192)] * 2
SIZE = 192


def _make_images(root, shapes, seed=0):
    """JPEGs with 1-3 flat-coloured rectangles on a dark background; COCO boxes are the rectangles."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(shapes, 1):
        pixels = np.full((h, w, 3), 30, np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = rng.integers(120, 255, 3)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 3)),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.jpg", quality=95)
        images.append({"id": i, "file_name": f"{i:03d}.jpg", "width": w, "height": h})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    coco = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    from data_prep.shard import build_parser, shard

    root = _make_images(tmp_path_factory.mktemp("mixed"), SHAPES)
    out = root / "shards"
    # 5 rows per shard: batches of the aspect-sorted rows cross shard boundaries
    shard(build_parser().parse_args(["--format", "coco", "--annotations", str(root / "annotations.json"),
                                     "--images", str(root / "images"), "--out", str(out), "--size", str(SIZE),
                                     "--rows-per-shard", "5", "--workers", "1"]))
    return out


def test_rect_canvas_rounds_the_batch_up_to_the_stride():
    assert rect_canvas([(1080, 1920)], 416) == (256, 416)  # 1920x1080 -> 416x234 -> 256
    assert rect_canvas([(1920, 1080)], 416) == (416, 256)
    assert rect_canvas([(1080, 1920), (480, 640)], 416) == (320, 416)  # 4:3 -> 312 -> 320
    assert rect_canvas([(1080, 1920), (1920, 1080)], 416) == (416, 416)  # mixed orientation: square
    assert rect_canvas([], 416) == (416, 416)
    # the figure: a 16:9 photo in a 416 square is 44 % grey, in its rect canvas 9 %
    assert 1 - 234 * 416 / 416**2 == pytest.approx(0.4375)
    assert 1 - 234 * 416 / (256 * 416) == pytest.approx(0.0859, abs=1e-4)


def test_rect_letterbox_is_the_square_one_cropped_and_boxes_round_trip_exactly():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (270, 480, 3), dtype=np.uint8)
    box = np.array([[33.5, 20.25, 300.0, 269.0]], np.float32)
    s = Sample(image, box, [0], [False])
    canvas = rect_canvas([image.shape[:2]], 416)
    rect, square = letterbox(s, 416, canvas), letterbox(s, 416)
    assert rect.image.shape == (*canvas, 3) == (256, 416, 3)
    assert rect.scale == square.scale  # the same resize: only the grey border differs
    dy = square.pad[1] - rect.pad[1]
    assert rect.pad[0] == square.pad[0] and dy == int(dy) > 0
    np.testing.assert_array_equal(rect.image, square.image[int(dy) : int(dy) + 256])
    np.testing.assert_allclose(rect.boxes + [0, dy, 0, dy], square.boxes, atol=1e-4)
    # input px -> stored px (-> original px, here 2x the stored image) exactly as before
    back = boxes_to_original(torch.from_numpy(rect.boxes), rect.scale, rect.pad, (480, 270), (960, 540))
    np.testing.assert_allclose(back.numpy(), box * 2, atol=1e-3)
    with pytest.raises(ValueError, match="does not fit a 224x416 canvas"):
        letterbox(s, 416, (224, 416))


def _grey_fraction(batches) -> tuple[float, int]:
    pixels = grey = 0
    for b in batches:
        pixels += b["images"][:, 0].numel()
        grey += int((b["images"] == PAD_VALUE).all(1).sum())
    return grey / pixels, pixels


def test_rect_val_batches_have_less_padding_and_the_same_boxes(mixed_shards):
    square = list(val_batches(mixed_shards, batch_size=4, img_size=SIZE, rect=False, threads=1))
    rect = list(val_batches(mixed_shards, batch_size=4, img_size=SIZE, rect=True, threads=1))
    ids = [i for b in rect for i in b["image_id"].tolist()]
    assert sorted(ids) == sorted(i for b in square for i in b["image_id"].tolist()) == list(range(1, 13))
    shapes = [tuple(b["images"].shape[-2:]) for b in rect]
    # sorted by height / width: four 16:9 (108 -> 128), two 16:9 + two 4:3 (144 -> 160), then
    # the squares and portraits (a portrait is 192 high: the square canvas)
    assert shapes == [(128, 192), (160, 192), (192, 192)]
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in shapes)
    (rect_grey, rect_px), (square_grey, square_px) = _grey_fraction(rect), _grey_fraction(square)
    assert rect_px < square_px and rect_grey < square_grey - 0.05
    by_id = {int(i): (b, k) for b in square for k, i in enumerate(b["image_id"])}
    for b in rect:
        for k, i in enumerate(b["image_id"].tolist()):
            sb, sk = by_id[i]
            assert float(b["scale"][k]) == float(sb["scale"][k])
            shift = (sb["pad"][sk] - b["pad"][k]).repeat(2)
            n = int((b["labels"][k] >= 0).sum())
            torch.testing.assert_close(b["boxes"][k, :n] + shift, sb["boxes"][sk, :n], atol=1e-4, rtol=0)


def test_rect_boxes_map_back_to_the_annotations(mixed_shards):
    from rtrain.evaluation.coco import coco_gt_from_shards

    gt = coco_gt_from_shards(mixed_shards)
    for b in val_batches(mixed_shards, batch_size=4, img_size=SIZE, rect=True, threads=1):
        for k, i in enumerate(b["image_id"].tolist()):
            n = int((b["labels"][k] >= 0).sum())
            back = boxes_to_original(b["boxes"][k, :n], b["scale"][k], b["pad"][k], b["stored_size"][k],
                                     b["orig_size"][k])
            want = np.array([a["bbox"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[i]))], np.float32)
            want[:, 2:] += want[:, :2]
            np.testing.assert_allclose(np.sort(back.numpy(), 0), np.sort(want, 0), atol=1e-3)


def test_rect_batches_do_not_depend_on_the_world_size(mixed_shards):
    def groups(world):
        return sorted(tuple(c["image_id"].to_pylist()) for r in range(world)
                      for c in _rect_rows_of_rank(mixed_shards, r, world, 4))

    one = groups(1)
    assert [len(g) for g in one] == [4, 4, 4]
    assert groups(2) == groups(3) == one
    assert [c.num_rows for c in _rect_rows_of_rank(mixed_shards, 1, 2, 4)] == [4]  # batch 1 of 0, 1, 2


def test_square_val_batches_are_todays_batches(mixed_shards):
    serial = list(iter_batches_local(mixed_shards, batch_size=4, train=False, img_size=SIZE))
    square = list(val_batches(mixed_shards, batch_size=4, img_size=SIZE, rect=False, threads=1))
    assert len(serial) == len(square)
    for a, b in zip(square, serial, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_path_rect_matches_the_pil_path(mixed_shards):
    from rtrain.data.batches import READ_COLUMNS, collate
    from rtrain.data.device_decode import DeviceDecodeAugment, numpy_batch_from_table, raw_collate

    device_path = DeviceDecodeAugment(SIZE, train=False, rect=True)
    pil_path = DecodeAugment(train=False, img_size=SIZE, rect=True, reduced_decode=False)  # its pixel twin
    shapes = []
    for chunk in _rect_rows_of_rank(mixed_shards, 0, 1, 4):
        numpy_rows = numpy_batch_from_table(chunk.select(READ_COLUMNS))
        ours = device_path(raw_collate(numpy_rows), 0, "cpu")
        theirs = collate(pil_path(numpy_rows))
        assert ours["images"].shape == theirs["images"].shape
        shapes.append(tuple(ours["images"].shape[-2:]))
        for key in ("boxes", "labels", "scale", "pad", "image_id"):
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0)
        assert (ours["images"].float() - theirs["images"].float()).abs().mean() < 0.5
    assert shapes == [(128, 192), (160, 192), (192, 192)]


def test_rect_is_for_evaluation_only():
    from rtrain.data.augment_tensor import TensorAugmenter

    with pytest.raises(ValueError, match="evaluation only"):
        DecodeAugment(train=True, img_size=64, rect=True)
    with pytest.raises(ValueError, match="evaluation only"):
        TensorAugmenter(64, train=True, rect=True)


def test_eval_rect_false_scores_as_before_and_rect_scores_the_same_images(mixed_shards):
    from rtrain.config import config_from_dict
    from rtrain.evaluation import predict_loop
    from rtrain.evaluation.coco import coco_gt_from_shards
    from rtrain.evaluation.sharded import validate_sharded
    from rtrain.models import build_model

    torch.manual_seed(0)
    model = build_model("compact_n", 2)
    gt = coco_gt_from_shards(mixed_shards)
    args = (gt, [1, 2], ["a", "b"])
    ev = {"batch_size": 4, "score_thresh": 0.05}
    today = iter_batches_local(mixed_shards, batch_size=4, train=False, img_size=SIZE)
    before = predict_loop.evaluate(model, today, *args, device="cpu", score_thresh=0.05)
    square = validate_sharded(model, config_from_dict({"data": {"val": str(mixed_shards), "img_size": SIZE},
                                                       "eval": {**ev, "rect": False}}), *args, device="cpu")
    rect = validate_sharded(model, config_from_dict({"data": {"val": str(mixed_shards), "img_size": SIZE},
                                                     "eval": ev}), *args, device="cpu")
    for key in ("mAP", "mAP50", "AR100", "eval_images", "eval_detections"):
        assert square[key] == before[key], key
    assert rect["eval_images"] == before["eval_images"] == 12


def test_predict_rect_gives_each_image_its_own_canvas(tmp_path):
    """A wide and a tall image in one batch: each is predicted as when it is alone (its own
    canvas, not the batch's), and its boxes land in its own pixels."""
    from inference_fixtures import spread_head

    from rtrain.deploy.predictor import PredictSettings, process_rows
    from rtrain.models import build_model

    root = _make_images(tmp_path / "imgs", [(108, 192), (192, 108), (144, 192)], seed=3)
    torch.manual_seed(0)
    model = spread_head(build_model("compact_n", 2)).eval()
    paths = [str(root / "images" / f"{i:03d}.jpg") for i in (1, 2, 3)]

    def run(idx):
        rows = {"id": np.asarray([i + 1 for i in idx]), "name": np.asarray([f"{i}" for i in idx], object),
                "path": np.asarray([paths[i] for i in idx], object)}
        settings = PredictSettings(img_size=SIZE, conf=0.05, iou=0.6, rect=True)
        return process_rows(model, ["a", "b"], settings, rows, None, torch.device("cpu"))

    together = run([0, 1, 2])
    assert sum(len(s) for s in together["scores"]) > 0
    for k, i in enumerate([0, 1, 2]):
        alone = run([i])
        np.testing.assert_allclose(together["boxes"][k], alone["boxes"][0], atol=1e-3)
        np.testing.assert_allclose(together["scores"][k], alone["scores"][0], atol=1e-5)
        b = together["boxes"][k].reshape(-1, 4)
        w, h = int(together["width"][k]), int(together["height"][k])
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()
