"""Losses: DFL and GIoU basics, DetectionLoss on empty/real targets, gradients, autocast, and a tiny fit."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from rtrain.models.box_ops import dist_to_ltrb, level_sizes, ltrb_to_boxes, make_points
from rtrain.models.losses import DetectionLoss, distribution_focal_loss, varifocal_loss

REG_MAX = 7
STRIDES = (8, 16)
NUM_CLASSES = 3


def setup(batch=2, size=64, seed=0):
    torch.manual_seed(seed)
    points, strides = make_points(level_sizes(size, size, STRIDES), STRIDES)
    n = points.shape[0]
    cls_logits = torch.randn(batch, n, NUM_CLASSES, requires_grad=True)
    box_dist = torch.randn(batch, n, 4 * (REG_MAX + 1), requires_grad=True)
    return cls_logits, box_dist, points, strides


def some_targets():
    return [
        {"boxes": torch.tensor([[5.0, 6.0, 30.0, 40.0], [33.0, 20.0, 60.0, 50.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([1]),
         "iscrowd": torch.tensor([False])},
    ]


def empty_targets(batch=2):
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(batch)]


def test_dfl_of_perfect_distribution_is_lower_than_wrong_one():
    target = torch.tensor([2.3])
    perfect = torch.full((1, REG_MAX + 1), -30.0)
    perfect[0, 2], perfect[0, 3] = math.log(0.7), math.log(0.3)
    wrong = torch.full((1, REG_MAX + 1), -30.0)
    wrong[0, 6] = 0.0
    loss_perfect = distribution_focal_loss(perfect, target)
    loss_wrong = distribution_focal_loss(wrong, target)
    # The perfect distribution's loss is the entropy of (0.7, 0.3), its minimum.
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert loss_perfect.item() == pytest.approx(entropy, abs=1e-4)
    assert loss_wrong.item() > loss_perfect.item() + 10
    # And its expectation decodes back to the target distance.
    assert dist_to_ltrb(perfect.repeat(1, 4), REG_MAX)[0, 0].item() == pytest.approx(2.3, abs=1e-4)


def test_giou_loss_of_identical_boxes_is_zero_and_grows_apart():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    assert generalized_box_iou_loss(boxes, boxes, reduction="sum").item() == pytest.approx(0.0, abs=1e-6)
    apart = boxes + torch.tensor([30.0, 0.0, 30.0, 0.0])
    assert (generalized_box_iou_loss(boxes, apart) > 1.0).all()


def test_varifocal_loss_weights_negatives_by_confidence():
    target = torch.zeros(2, 1)
    loss = varifocal_loss(torch.tensor([[-4.0], [4.0]]), target)
    assert loss[0] < 1e-3 < loss[1]  # a confident false positive costs far more
    soft = varifocal_loss(torch.tensor([[0.0]]), torch.tensor([[0.6]]))
    assert soft.item() == pytest.approx(0.6 * math.log(2), abs=1e-5)  # BCE(0.5 vs 0.6) * 0.6


def test_total_loss_finite_with_empty_targets_and_gradients_flow():
    cls_logits, box_dist, points, strides = setup()
    out = DetectionLoss(NUM_CLASSES, REG_MAX)(cls_logits, box_dist, points, strides, empty_targets())
    assert set(out) == {"loss", "loss_cls", "loss_box", "loss_dfl"}
    assert torch.isfinite(out["loss"])
    assert out["loss_box"].item() == 0.0 and out["loss_dfl"].item() == 0.0
    assert out["loss_cls"].item() > 0
    out["loss"].backward()
    assert cls_logits.grad is not None and cls_logits.grad.abs().sum() > 0
    assert box_dist.grad is not None  # in the graph (zero), so DDP sees no unused parameter


def test_losses_with_targets_are_positive_and_reach_both_outputs():
    cls_logits, box_dist, points, strides = setup()
    out = DetectionLoss(NUM_CLASSES, REG_MAX)(cls_logits, box_dist, points, strides, some_targets())
    for key in ("loss_cls", "loss_box", "loss_dfl"):
        assert torch.isfinite(out[key]) and out[key].item() > 0, key
    assert out["loss"].item() == pytest.approx(
        (out["loss_cls"] + out["loss_box"] + out["loss_dfl"]).item(), rel=1e-6
    )
    out["loss"].backward()
    assert cls_logits.grad.abs().sum() > 0 and box_dist.grad.abs().sum() > 0


def test_all_crowd_batch_has_no_box_loss():
    cls_logits, box_dist, points, strides = setup()
    targets = some_targets()
    for t in targets:
        t["iscrowd"] = torch.ones(t["boxes"].shape[0], dtype=torch.bool)
    out = DetectionLoss(NUM_CLASSES, REG_MAX)(cls_logits, box_dist, points, strides, targets)
    assert out["loss_box"].item() == 0.0 and torch.isfinite(out["loss"])


def test_loss_runs_under_autocast_in_float32():
    cls_logits, box_dist, points, strides = setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DetectionLoss(NUM_CLASSES, REG_MAX)(
            cls_logits.bfloat16(), box_dist.bfloat16(), points, strides, some_targets()
        )
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert cls_logits.grad is not None and cls_logits.grad.abs().sum() > 0


def test_shape_mismatch_is_a_clear_error():
    cls_logits, box_dist, points, strides = setup()
    with pytest.raises(ValueError, match="box_dist"):
        DetectionLoss(NUM_CLASSES, REG_MAX + 1)(cls_logits, box_dist, points, strides, some_targets())
    with pytest.raises(ValueError, match="target dicts"):
        DetectionLoss(NUM_CLASSES, REG_MAX)(cls_logits, box_dist, points, strides, some_targets()[:1])




def test_optimising_raw_outputs_fits_the_boxes_and_classes(one_thread):
    """Treat the head outputs as free parameters: minimising the loss must fit the targets."""
    cls_logits, box_dist, points, strides = setup(batch=2, seed=1)
    with torch.no_grad():
        cls_logits.fill_(-4.6)  # prior probability 0.01, as a detection head is initialised
        box_dist.mul_(0.1)
    targets = some_targets()
    loss_fn = DetectionLoss(NUM_CLASSES, REG_MAX)
    opt = torch.optim.Adam([cls_logits, box_dist], lr=0.1)
    first = None
    for _ in range(100):
        out = loss_fn(cls_logits, box_dist, points, strides, targets)
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.3 * first
    with torch.no_grad():
        scores, labels = cls_logits.sigmoid().max(dim=-1)
        boxes = ltrb_to_boxes(points, dist_to_ltrb(box_dist, REG_MAX) * strides[:, None])
    for i, t in enumerate(targets):
        for box, label in zip(t["boxes"], t["labels"], strict=True):
            # The best-scoring point of that class decodes to the gt box.
            best = (scores[i] * (labels[i] == label)).argmax()
            iou = 1 - generalized_box_iou_loss(boxes[i, best], box).item()
            assert scores[i, best] > 0.5 and iou > 0.85, (i, label, scores[i, best].item(), iou)


def padded(targets, m=4):
    """The collate layout: boxes [B, M, 4], labels [B, M] with -1 padding, iscrowd [B, M]."""
    b = len(targets)
    boxes = torch.zeros(b, m, 4)
    labels = torch.full((b, m), -1, dtype=torch.long)
    crowd = torch.zeros(b, m, dtype=torch.bool)
    for i, t in enumerate(targets):
        k = t["boxes"].shape[0]
        boxes[i, :k], labels[i, :k] = t["boxes"], t["labels"]
        if "iscrowd" in t:
            crowd[i, :k] = t["iscrowd"]
    return {"boxes": boxes, "labels": labels, "iscrowd": crowd}


def test_padded_targets_give_the_same_losses_and_gradients_as_dicts():
    targets = some_targets()
    targets[1]["iscrowd"] = torch.tensor([True])
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
    cls_logits, box_dist, points, strides = setup(batch=3)
    loss_fn = DetectionLoss(NUM_CLASSES, REG_MAX)
    ref = loss_fn(cls_logits, box_dist, points, strides, targets)
    ref["loss"].backward()
    ref_grads = cls_logits.grad.clone(), box_dist.grad.clone()
    cls_logits.grad = box_dist.grad = None
    out = loss_fn(cls_logits, box_dist, points, strides, padded(targets))
    out["loss"].backward()
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-6, atol=1e-7), k
    assert torch.allclose(cls_logits.grad, ref_grads[0], atol=1e-7)
    assert torch.allclose(box_dist.grad, ref_grads[1], atol=1e-7)
    assert ref["loss_box"] > 0


def test_invalid_labels_are_ignored_and_counted_without_raising():
    cls_logits, box_dist, points, strides = setup()
    good = some_targets()
    bad = padded(good)
    bad["boxes"][0, 2] = torch.tensor([1.0, 1.0, 20.0, 20.0])
    bad["labels"][0, 2] = NUM_CLASSES  # out of range
    bad["boxes"][1, 1] = torch.tensor([30.0, 30.0, 60.0, 60.0])
    bad["labels"][1, 1] = -5  # negative but not the -1 padding
    loss_fn = DetectionLoss(NUM_CLASSES, REG_MAX)
    out = loss_fn(cls_logits, box_dist, points, strides, bad)
    ref = DetectionLoss(NUM_CLASSES, REG_MAX)(cls_logits, box_dist, points, strides, good)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-6), k  # the bad boxes were ignored
    assert int(loss_fn.invalid_targets) == 2
    loss_fn(cls_logits, box_dist, points, strides, bad)
    assert int(loss_fn.invalid_targets) == 4  # cumulative
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        DetectionLoss(NUM_CLASSES, REG_MAX, strict_labels=True)(cls_logits, box_dist, points, strides, bad)


def test_detector_loss_points_are_float32_under_autocast(monkeypatch):
    from rtrain.models import build_model

    torch.manual_seed(0)
    model = build_model("compact_n", num_classes=NUM_CLASSES).train()
    seen = {}
    forward = model.loss_fn.forward

    def spy(cls_logits, box_dist, points, point_strides, targets):
        seen["dtypes"] = (points.dtype, point_strides.dtype, box_dist.dtype)
        return forward(cls_logits, box_dist, points, point_strides, targets)

    monkeypatch.setattr(model.loss_fn, "forward", spy)
    images = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, padded(some_targets()))
    assert seen["dtypes"] == (torch.float32, torch.float32, torch.bfloat16)
    assert torch.isfinite(out["loss"])
    model.zero_grad()
    ref = model(images, some_targets())
    same = model(images, padded(some_targets()))
    assert torch.allclose(ref["loss"], same["loss"], rtol=1e-6)


def test_dense_box_terms_equal_the_terms_over_the_positives_only():
    """The box terms run over all points with weight 0 off the positives (no boolean indexing, so
    no host sync); they must equal the same terms gathered over the positives."""
    from rtrain.models.assigner import pad_targets
    from rtrain.models.box_ops import boxes_to_ltrb

    cls_logits, box_dist, points, strides = setup(seed=3)
    loss_fn = DetectionLoss(NUM_CLASSES, REG_MAX)
    out = loss_fn(cls_logits, box_dist, points, strides, some_targets())
    with torch.no_grad():
        pred = ltrb_to_boxes(points, dist_to_ltrb(box_dist, REG_MAX) * strides[:, None])
        gts = pad_targets(some_targets(), torch.device("cpu"), NUM_CLASSES)
        a = loss_fn.assigner(cls_logits.sigmoid(), pred, points, strides, *gts)
        fg = a.fg_mask
        assert fg.sum() > 3
        w = a.target_scores[fg].sum(-1)
        norm = a.target_scores.sum().clamp(min=1)
        box = (generalized_box_iou_loss(pred[fg], a.target_boxes[fg]) * w).sum() / norm
        s = strides[:, None].expand(2, -1, -1)[fg]
        t = boxes_to_ltrb(points.expand(2, -1, -1)[fg] / s, a.target_boxes[fg] / s).clamp(0, REG_MAX - 0.01)
        dfl = (distribution_focal_loss(box_dist[fg].reshape(-1, 4, REG_MAX + 1), t).mean(-1) * w).sum() / norm
    assert out["loss_box"].item() == pytest.approx(2.0 * box.item(), rel=1e-5)
    assert out["loss_dfl"].item() == pytest.approx(0.5 * dfl.item(), rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(box_dist.grad).all() and torch.isfinite(cls_logits.grad).all()
    # Off the positives the box terms give no gradient (only the classification term touches cls).
    off = ~fg
    assert box_dist.grad[off].abs().max() == 0


def test_sync_free_giou_matches_torchvision():
    from rtrain.models.box_ops import giou_loss

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(500, 2, generator=g) * 30], -1).requires_grad_(True)
    xy = torch.rand(500, 2, generator=g) * 50
    b = torch.cat([xy, xy + 1 + torch.rand(500, 2, generator=g) * 30], -1)
    ours = giou_loss(a, b)
    ours.sum().backward()
    grad = a.grad.clone()
    a.grad = None
    ref = generalized_box_iou_loss(a, b)
    ref.sum().backward()
    disjoint = ref > 1
    assert disjoint.any() and (~disjoint).any()  # both overlapping and disjoint pairs
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(grad, a.grad, atol=1e-6)
