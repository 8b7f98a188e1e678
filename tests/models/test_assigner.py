"""Task-aligned assigner on hand-made cases: a 4x4 grid of stride-8 points on a 32x32 image.

Point index = row * 4 + col; point (col, row) sits at ((col + 0.5) * 8, (row + 0.5) * 8).
"""

from __future__ import annotations

import pytest
import torch

from rtrain.models.assigner import TaskAlignedAssigner, pad_targets, pairwise_iou
from rtrain.models.box_ops import level_sizes, make_points

NUM_CLASSES = 2


def grid():
    points, strides = make_points(level_sizes(32, 32, (8,)), (8,))
    return points, strides


def far_boxes(n: int) -> torch.Tensor:
    """Predicted boxes that overlap nothing of interest (bottom-right corner, 1 px).

    Real predictions always contain their own point; these do not, which makes a point's IoU 0 and
    so keeps it out of the positives whatever its location.
    """
    return torch.tensor([[30.0, 30.0, 31.0, 31.0]]).repeat(n, 1)


def assign(pred_boxes, targets, scores=None, **kw):
    points, strides = grid()
    n = points.shape[0]
    batch = len(targets)
    if scores is None:
        scores = torch.full((batch, n, NUM_CLASSES), 0.5)
    gts = pad_targets(targets, torch.device("cpu"), NUM_CLASSES)
    return TaskAlignedAssigner(**kw)(scores, pred_boxes, points, strides, *gts)


def one_gt_case():
    """gt [0, 0, 16, 16] contains points 0, 1, 4, 5; their predictions have IoU 1, .75, .5, .25."""
    pred = far_boxes(16)
    pred[0] = torch.tensor([0.0, 0.0, 16.0, 16.0])
    pred[1] = torch.tensor([0.0, 0.0, 16.0, 12.0])
    pred[4] = torch.tensor([0.0, 0.0, 8.0, 16.0])
    pred[5] = torch.tensor([8.0, 8.0, 16.0, 16.0])
    target = {"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "labels": torch.tensor([1])}
    return pred[None], target


def test_grid_layout_is_what_the_cases_assume():
    points, _ = grid()
    assert points[0].tolist() == [4.0, 4.0]
    assert points[1].tolist() == [12.0, 4.0]
    assert points[4].tolist() == [4.0, 12.0]
    assert points[15].tolist() == [28.0, 28.0]


def test_one_gt_all_inside_points_positive_with_normalised_scores():
    pred, target = one_gt_case()
    a = assign(pred, [target], topk=13)
    assert torch.nonzero(a.fg_mask[0]).flatten().tolist() == [0, 1, 4, 5]
    assert a.target_labels[0, [0, 1, 4, 5]].tolist() == [1, 1, 1, 1]
    outside = [i for i in range(16) if i not in (0, 1, 4, 5)]
    assert (a.target_labels[0, outside] == NUM_CLASSES).all()
    assert (a.target_scores[0, outside] == 0).all()
    # TOOD normalisation: metric / max metric * max IoU; max IoU = 1, metric = 0.5 * IoU^6.
    expected = torch.tensor([1.0, 0.75**6, 0.5**6, 0.25**6])
    assert torch.allclose(a.target_scores[0, [0, 1, 4, 5], 1], expected, atol=1e-6)
    assert (a.target_scores[0, :, 0] == 0).all()
    assert torch.equal(a.target_boxes[0, 0], target["boxes"][0])
    assert not a.ignore_mask.any()


def test_topk_keeps_the_best_aligned_points():
    pred, target = one_gt_case()
    a = assign(pred, [target], topk=2)
    assert torch.nonzero(a.fg_mask[0]).flatten().tolist() == [0, 1]


def test_class_score_enters_the_metric():
    pred, target = one_gt_case()
    scores = torch.full((1, 16, NUM_CLASSES), 0.5)
    scores[0, 0, 1] = 1e-6  # point 0 is best by IoU but very unsure of the class
    a = assign(pred, [target], scores=scores, topk=2)
    assert torch.nonzero(a.fg_mask[0]).flatten().tolist() == [1, 4]


def test_point_inside_two_boxes_goes_to_higher_iou():
    # A covers columns/rows 0-2 (points at 4, 12, 20); B covers 1-3. Shared points: 5, 6, 9, 10.
    box_a = [0.0, 0.0, 24.0, 24.0]
    box_b = [8.0, 8.0, 32.0, 32.0]
    pred = far_boxes(16)
    pred[5] = torch.tensor(box_a)  # IoU 1 with A, 256/896 with B
    pred[10] = torch.tensor(box_b)  # the other way round
    pred[6] = torch.tensor([0.0, 0.0, 24.0, 20.0])  # IoU .83 with A, less with B
    pred[9] = torch.tensor([10.0, 10.0, 32.0, 32.0])  # IoU .84 with B, less with A
    target = {"boxes": torch.tensor([box_a, box_b]), "labels": torch.tensor([0, 1])}
    a = assign(pred[None], [target], topk=13)
    iou = pairwise_iou(target["boxes"][None], pred[None])[0]
    for idx in (5, 6, 9, 10):
        expected_gt = int(iou[:, idx].argmax())
        assert a.fg_mask[0, idx]
        assert int(a.gt_index[0, idx]) == expected_gt, idx
        assert int(a.target_labels[0, idx]) == expected_gt
    assert [int(a.gt_index[0, i]) for i in (5, 6, 9, 10)] == [0, 0, 1, 1]
    # Exactly one class target per positive point.
    assert ((a.target_scores[0] > 0).sum(dim=-1) <= 1).all()


def test_points_outside_every_box_are_negative():
    pred, _ = one_gt_case()
    pred[0, 10] = torch.tensor([16.0, 16.0, 24.0, 24.0])
    pred[0, 11] = torch.tensor([24.0, 16.0, 32.0, 24.0])
    target = {"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 24.0]]),
              "labels": torch.tensor([1, 0])}
    a = assign(pred, [target], topk=13)
    # Second box contains points 10 (20, 20) and 11 (28, 20) only.
    assert torch.nonzero(a.fg_mask[0]).flatten().tolist() == [0, 1, 4, 5, 10, 11]
    negatives = ~a.fg_mask[0]
    assert (a.target_scores[0][negatives] == 0).all()
    assert (a.target_labels[0][negatives] == NUM_CLASSES).all()


def test_crowd_box_gives_no_positive_and_ignores_its_points():
    pred, target = one_gt_case()
    target["iscrowd"] = torch.tensor([True])
    a = assign(pred, [target], topk=13)
    assert not a.fg_mask.any()
    assert (a.target_scores == 0).all()
    assert torch.nonzero(a.ignore_mask[0]).flatten().tolist() == [0, 1, 4, 5]


def test_zero_gts_is_all_background():
    pred, _ = one_gt_case()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    a = assign(pred, [empty])
    assert not a.fg_mask.any() and not a.ignore_mask.any()
    assert (a.target_labels == NUM_CLASSES).all()
    assert (a.target_scores == 0).all()


def test_degenerate_box_is_never_assigned():
    pred, _ = one_gt_case()
    target = {"boxes": torch.tensor([[4.0, 0.0, 4.0, 16.0]]), "labels": torch.tensor([0])}
    a = assign(pred, [target], center_radius=2.5)
    assert not a.fg_mask.any()


def test_tiny_box_falls_back_to_centre_region():
    # 2x2 px box around (13, 13): contains no point centre; nearest point is 5 at (12, 12).
    pred = far_boxes(16)
    pred[5] = torch.tensor([9.0, 9.0, 15.0, 15.0])
    target = {"boxes": torch.tensor([[12.5, 12.5, 14.5, 14.5]]), "labels": torch.tensor([0])}
    assert not assign(pred[None], [target], center_radius=0).fg_mask.any()
    a = assign(pred[None], [target], center_radius=1.0)
    assert torch.nonzero(a.fg_mask[0]).flatten().tolist() == [5]


def test_batched_with_padding_matches_one_image_at_a_time():
    torch.manual_seed(0)
    points, _ = grid()
    half = torch.rand(3, 16, 2) * 10 + 2
    pred = torch.cat([points - half, points + half], dim=-1)
    scores = torch.rand(3, 16, NUM_CLASSES)
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 20.0, 18.0], [10.0, 6.0, 31.0, 30.0]]),
         "labels": torch.tensor([0, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[3.0, 9.0, 27.0, 25.0]]), "labels": torch.tensor([1])},
    ]
    batched = assign(pred, targets, scores=scores, topk=3)
    assert batched.fg_mask[0].sum() > 0 and batched.fg_mask[2].sum() > 0
    for i in range(3):
        single = assign(pred[i : i + 1], [targets[i]], scores=scores[i : i + 1], topk=3)
        assert torch.equal(batched.fg_mask[i], single.fg_mask[0])
        assert torch.equal(batched.target_labels[i], single.target_labels[0])
        assert torch.allclose(batched.target_scores[i], single.target_scores[0])
        assert torch.equal(batched.target_boxes[i], single.target_boxes[0])


def test_bad_label_is_a_clear_error():
    pred, target = one_gt_case()
    target["labels"] = torch.tensor([5])
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        assign(pred, [target])


def test_tiny_metrics_still_give_the_best_point_the_max_iou_target():
    # Early in training: class prior 0.01 and poor boxes (best IoU 1/16) make metrics ~6e-10; the
    # normalisation must not let a fixed eps (say 1e-9) swamp them and shrink the targets.
    pred = far_boxes(16)
    pred[0] = torch.tensor([0.0, 0.0, 4.0, 4.0])  # IoU 16/256 with gt [0, 0, 16, 16]
    pred[5] = torch.tensor([10.0, 10.0, 12.0, 12.0])  # IoU 4/256
    target = {"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "labels": torch.tensor([0])}
    scores = torch.full((1, 16, NUM_CLASSES), 0.01)
    a = assign(pred[None], [target], scores=scores, topk=13)
    assert torch.nonzero(a.fg_mask[0]).flatten().tolist() == [0, 5]
    assert a.target_scores[0, 0, 0].item() == pytest.approx(1 / 16, rel=1e-4)
    assert a.target_scores[0, 5, 0].item() == pytest.approx(1 / 16 * 0.25**6, rel=1e-3)


def test_padded_targets_match_the_dict_form_and_invalid_labels_are_masked():
    from rtrain.models.assigner import prepare_targets

    pred, target = one_gt_case()
    target["iscrowd"] = torch.tensor([False])
    padded = {
        "boxes": torch.tensor([[[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 0.0, 0.0], [16.0, 16.0, 32.0, 32.0]]]),
        "labels": torch.tensor([[1, -1, 7]]),  # a real box, padding, an out-of-range label
        "iscrowd": torch.zeros(1, 3, dtype=torch.bool),
    }
    dev = torch.device("cpu")
    boxes, labels, valid, crowd, n_invalid = prepare_targets(padded, dev, NUM_CLASSES)
    assert valid.tolist() == [[True, False, False]] and not crowd.any()
    assert labels.tolist() == [[1, 0, 0]] and int(n_invalid) == 1
    points, strides = grid()
    scores = torch.full((1, 16, NUM_CLASSES), 0.5)
    a = TaskAlignedAssigner(topk=3)(scores, pred, points, strides, boxes, labels, valid, crowd)
    b = assign(pred, [target], topk=3)
    assert torch.equal(a.fg_mask, b.fg_mask) and torch.allclose(a.target_scores, b.target_scores)
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        pad_targets(padded, dev, NUM_CLASSES)  # strict by default for direct callers
