"""The training engine without Ray: steps reduce the loss, non-finite steps are skipped, LR follows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtrain.precision import amp_dtype, make_grad_scaler
from rtrain.training.ema import ModelEMA
from rtrain.training.engine import train_one_epoch
from rtrain.training.guard import NonFiniteGuard, NonFiniteLossError
from rtrain.training.optim import build_optimizer
from rtrain.training.schedule import LRSchedule

pytestmark = pytest.mark.usefixtures("one_thread_module")  # small steps: one thread, given back after


class TinyBoxRegressor(nn.Module):
    """A small real model with the training contract: `model(images, targets)` -> dict of losses.

    It regresses the first target box (normalised) and classifies its label from the image.
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.box = nn.Linear(16, 4)
        self.cls = nn.Linear(16, num_classes)

    def forward(self, images, targets):
        feats = self.features(images)
        size = images.shape[-1]
        boxes = torch.stack([t["boxes"][0] for t in targets]) / size
        labels = torch.stack([t["labels"][0] for t in targets])
        loss_box = nn.functional.smooth_l1_loss(self.box(feats).sigmoid(), boxes)
        loss_cls = nn.functional.cross_entropy(self.cls(feats), labels)
        return {"loss": loss_box + loss_cls, "loss_box": loss_box, "loss_cls": loss_cls}


class NaNAt(nn.Module):
    """Wraps a model; its loss is NaN on the calls listed in `bad_calls` (0-based)."""

    def __init__(self, model: nn.Module, bad_calls: set[int]) -> None:
        super().__init__()
        self.model = model
        self.bad_calls = bad_calls
        self.calls = 0

    def forward(self, images, targets):
        losses = self.model(images, targets)
        if self.calls in self.bad_calls:
            losses = {k: v * float("nan") for k, v in losses.items()}
        self.calls += 1
        return losses


def to_targets(batch, device):
    out = []
    for boxes, labels in zip(batch["boxes"], batch["labels"], strict=True):
        keep = labels >= 0
        out.append({"boxes": boxes[keep].to(device), "labels": labels[keep].long().to(device)})
    return out


def make_batches(n_batches: int, batch_size: int = 4, size: int = 32, seed: int = 0) -> list[dict]:
    """One bright rectangle per image, its colour channel = its label; boxes padded to 2 (label -1)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        images = torch.zeros(batch_size, 3, size, size, dtype=torch.uint8)
        boxes = torch.zeros(batch_size, 2, 4)
        labels = torch.full((batch_size, 2), -1, dtype=torch.int64)
        for i in range(batch_size):
            x1, y1 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(6, size // 2, (2,), generator=g).tolist()
            c = int(torch.randint(0, 3, (1,), generator=g))
            images[i, c, y1 : y1 + h, x1 : x1 + w] = 255
            boxes[i, 0] = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
            labels[i, 0] = c
        batches.append({"images": images, "boxes": boxes, "labels": labels})
    return batches


def _mean_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model(b["images"].float() / 255, to_targets(b, "cpu"))["loss"]) for b in batches]
    return sum(losses) / len(losses)


def test_steps_reduce_loss_and_report_metrics():
    torch.manual_seed(0)
    model = TinyBoxRegressor()
    batches = make_batches(6)
    before = _mean_loss(model, batches)
    opt = build_optimizer(model, "adamw", lr=0.01, momentum=0.9, weight_decay=0.0)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    for epoch in range(8):
        metrics = train_one_epoch(
            model, opt, batches, device="cpu", ema=ema, grad_clip=10.0, to_targets=to_targets,
            step_offset=epoch * len(batches), epoch=epoch,
        )
    after = _mean_loss(model, batches)
    assert after < 0.7 * before, (before, after)
    assert metrics["steps"] == 6 and metrics["skipped"] == 0 and metrics["images"] == 24
    for key in ("loss", "loss_box", "loss_cls", "lr", "images_per_s", "data_wait_s", "data_wait_frac",
                "epoch_time_s", "grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["data_wait_frac"] <= 1.0
    assert metrics["images_per_s"] > 0
    assert ema.updates == 8 * 6
    # The EMA followed the model: its loss dropped too.
    assert _mean_loss(ema.module, batches) < before


def test_nonfinite_step_is_skipped_and_counted():
    torch.manual_seed(0)
    model = NaNAt(TinyBoxRegressor(), bad_calls={2})
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9)
    guard = NonFiniteGuard(max_consecutive=3)
    metrics = train_one_epoch(model, opt, make_batches(5), device="cpu", guard=guard, to_targets=to_targets)
    assert metrics["steps"] == 4 and metrics["skipped"] == 1
    assert guard.total == 1 and guard.consecutive == 0
    assert math.isfinite(metrics["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nonfinite_steps_stop_with_a_reason():
    model = NaNAt(TinyBoxRegressor(), bad_calls=set(range(100)))
    opt = build_optimizer(model, "sgd", lr=0.01)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train_one_epoch(model, opt, make_batches(5), device="cpu", guard=NonFiniteGuard(max_consecutive=3),
                        to_targets=to_targets)


class LrRecorder(nn.Module):
    def __init__(self, model, optimizer_ref):
        super().__init__()
        self.model = model
        self.optimizer_ref = optimizer_ref
        self.seen: list[float] = []

    def forward(self, images, targets):
        groups = {g["name"]: g["lr"] for g in self.optimizer_ref[0].param_groups}
        self.seen.append(groups["decay"])
        return self.model(images, targets)


def test_lr_follows_the_schedule_across_epochs():
    ref: list = []
    model = LrRecorder(TinyBoxRegressor(), ref)
    opt = build_optimizer(model, "sgd", lr=0.1)
    ref.append(opt)
    sched = LRSchedule(base_lr=0.1, total_steps=8, warmup_steps=2, final_lr_ratio=0.1)
    batches = make_batches(4)
    m0 = train_one_epoch(model, opt, batches, device="cpu", schedule=sched, to_targets=to_targets)
    m1 = train_one_epoch(model, opt, batches, device="cpu", schedule=sched, to_targets=to_targets,
                         step_offset=4)
    expected = [sched.lr_at(s) for s in range(8)]
    assert model.seen == pytest.approx(expected)
    assert model.seen[0] == pytest.approx(0.0) and max(model.seen) == pytest.approx(0.1)
    assert m0["lr"] == pytest.approx(expected[3]) and m1["lr"] == pytest.approx(expected[7])


def test_time_budget_ends_the_epoch_early():
    model = TinyBoxRegressor()
    opt = build_optimizer(model, "sgd", lr=0.01)
    sched = LRSchedule(base_lr=0.01, total_steps=1000, time_limit=1e-6)
    metrics = train_one_epoch(model, opt, make_batches(3), device="cpu", schedule=sched,
                              stop_when_finished=True, to_targets=to_targets)
    assert metrics["steps"] == 0 and metrics["stopped_early"] == 1.0


def test_amp_is_off_on_cpu():
    assert amp_dtype("cpu", True) is None
    assert make_grad_scaler("cpu", True) is None



class Oracle(nn.Module):
    """A 'detector' whose postprocess returns given boxes (input px): checks evaluate's pixel mapping."""

    def __init__(self, detections: list[dict]) -> None:
        super().__init__()
        self.detections = detections

    def forward_raw(self, images):
        return images.new_zeros(images.shape[0], 1, 3), images.new_zeros(images.shape[0], 1, 4)

    def postprocess(self, cls_logits, box_dist, image_size, score_thresh, iou_thresh, max_det):
        return self.detections


def test_evaluate_maps_predictions_to_original_pixels_and_source_ids():
    from rtrain.evaluation.coco import coco_from_dict
    from rtrain.evaluation.predict_loop import evaluate

    batch = make_batches(1, batch_size=2, size=64)[0]
    # Stored images 128 px (orig 256 x 256): letterbox scale 0.5 to the 64 px input, no padding.
    batch.update(
        image_id=torch.tensor([7, 9]), scale=torch.tensor([0.5, 0.5]), pad=torch.zeros(2, 2),
        stored_size=torch.tensor([[128, 128]] * 2), orig_size=torch.tensor([[256, 256]] * 2),
    )
    annotations, detections = [], []
    for i, image_id in enumerate((7, 9)):
        box, label = batch["boxes"][i, :1], batch["labels"][i, :1]
        x1, y1, x2, y2 = (box[0] * 4).tolist()  # input px -> original px
        annotations.append({"id": i + 1, "image_id": image_id, "category_id": 10 + int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        detections.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": label})
    cats = [{"id": 10 + k, "name": n} for k, n in enumerate("abc")]
    images = [{"id": 7, "width": 256, "height": 256}, {"id": 9, "width": 256, "height": 256}]
    gt = coco_from_dict({"images": images, "annotations": annotations, "categories": cats})

    metrics = evaluate(Oracle(detections), [batch], gt, [10, 11, 12], ["a", "b", "c"], device="cpu")
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["eval_images"] == 2 and metrics["eval_detections"] == 2
    assert set(metrics["per_class"]) == {"a", "b", "c"}
    # Boxes left in input pixels (no mapping back) would miss: scale the predictions wrongly.
    wrong = [{**d, "boxes": d["boxes"] / 4} for d in detections]
    assert evaluate(Oracle(wrong), [batch], gt, [10, 11, 12], ["a", "b", "c"], device="cpu")["mAP"] < 0.2


# --------------------------------------------------------------------------- the sync-free step loop


class NaNIn(nn.Module):
    """Wraps a model; on the calls in `bad_calls` one term goes non-finite.

    term="loss_box": loss_box (and so the total) is NaN, the other parts stay finite.
    term="grad": the losses stay finite but the gradients are NaN (0 * d sqrt(x)/dx at x = 0).
    """

    def __init__(self, model: nn.Module, bad_calls: set[int], term: str = "loss_box") -> None:
        super().__init__()
        self.model, self.bad_calls, self.term = model, bad_calls, term
        self.calls = 0

    def forward(self, images, targets):
        losses = dict(self.model(images, targets))
        if self.calls in self.bad_calls:
            if self.term == "grad":
                w = self.model.box.weight
                losses["loss"] = losses["loss"] + 0.0 * torch.sqrt(w - w.detach()).sum()
            else:
                losses[self.term] = losses[self.term] * float("nan")
                losses["loss"] = sum(v for k, v in losses.items() if k != "loss")
        self.calls += 1
        return losses


def _old_style_epoch(model, opt, batches, ema=None, grad_clip=10.0):
    """The engine's previous step loop (host reads every step), as the reference for the metrics."""
    sums, steps, norm_sum, images = {}, 0, 0.0, 0
    model.train()
    for batch in batches:
        losses = model(batch["images"].float() / 255, to_targets(batch, "cpu"))
        if not bool(torch.isfinite(losses["loss"])):
            continue
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        if not math.isfinite(norm):
            continue
        opt.step()
        if ema is not None:
            ema.update(model)
        steps += 1
        images += batch["images"].shape[0]
        norm_sum += norm
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {**{k: v / steps for k, v in sums.items()}, "steps": steps, "images": images,
            "grad_norm": norm_sum / steps}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("term", ["loss_box", "grad"])
def test_skipped_steps_change_no_weights_optimizer_state_or_ema(optimizer, term):
    """[bad, b1, bad, b3] must end exactly where [b1, b3] does: params, optimizer state, EMA."""
    batches = make_batches(4)
    results = []
    for bad_calls, run_batches in (({0, 2}, batches), (set(), [batches[1], batches[3]])):
        torch.manual_seed(0)
        model = NaNIn(TinyBoxRegressor(), bad_calls, term)
        opt = build_optimizer(model, optimizer, lr=0.05, momentum=0.9, weight_decay=1e-3)
        ema = ModelEMA(model, decay=0.9, tau=1.0)
        guard = NonFiniteGuard(max_consecutive=5)
        metrics = train_one_epoch(model, opt, run_batches, device="cpu", ema=ema, guard=guard,
                                  grad_clip=10.0, to_targets=to_targets)
        results.append((model, opt, ema, metrics, guard))
    (m_a, opt_a, ema_a, met_a, guard_a), (m_b, opt_b, ema_b, met_b, _) = results
    assert (met_a["steps"], met_a["skipped"], guard_a.total) == (2, 2, 2)
    for (name, p), q in zip(m_a.named_parameters(), m_b.parameters(), strict=True):
        assert torch.equal(p, q), name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for idx, entry in state_a.items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[idx][key])), (idx, key)
    assert ema_a.updates == ema_b.updates == 2
    for (name, p), q in zip(ema_a.module.named_parameters(), ema_b.module.parameters(), strict=True):
        assert torch.equal(p, q), name
    for key in ("loss", "loss_box", "loss_cls", "grad_norm", "images"):
        assert met_a[key] == pytest.approx(met_b[key], rel=1e-6), key


def test_metrics_and_weights_match_the_old_step_loop():
    batches = make_batches(6)
    runs = []
    for engine in (True, False):
        torch.manual_seed(0)
        model = NaNIn(TinyBoxRegressor(), {3})
        opt = build_optimizer(model, "sgd", lr=0.05, momentum=0.9)
        ema = ModelEMA(model, decay=0.9, tau=2.0)
        if engine:
            m = train_one_epoch(model, opt, batches, device="cpu", ema=ema, grad_clip=10.0,
                                to_targets=to_targets, log_every=2)
        else:
            m = _old_style_epoch(model, opt, batches, ema=ema)
        runs.append((model, ema, m))
    (model, ema, new), (old_model, old_ema, old) = runs
    assert new["steps"] == old["steps"] == 5 and new["skipped"] == 1 and new["images"] == old["images"] == 20
    for key in ("loss", "loss_box", "loss_cls", "grad_norm"):
        assert new[key] == pytest.approx(old[key], rel=1e-5), key
    for p, q in zip(model.parameters(), old_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    for p, q in zip(ema.module.parameters(), old_ema.module.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_guard_stops_a_run_of_bad_steps_within_one_interval_naming_the_term():
    model = NaNIn(TinyBoxRegressor(), set(range(100)), "loss_box")
    opt = build_optimizer(model, "sgd", lr=0.01)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps") as e:
        train_one_epoch(model, opt, make_batches(10), device="cpu", guard=NonFiniteGuard(max_consecutive=3),
                        to_targets=to_targets, guard_every=2)
    msg = str(e.value)
    assert "loss_box=nan" in msg and "loss_cls" not in msg and "lower train.lr" in msg
    assert model.calls == 4  # the limit (3) was reached in the interval ending at step 4
    grad = NaNIn(TinyBoxRegressor(), set(range(100)), "grad")
    opt = build_optimizer(grad, "adamw", lr=0.01)
    with pytest.raises(NonFiniteLossError, match="grad_norm=nan"):
        train_one_epoch(grad, opt, make_batches(4), device="cpu", guard=NonFiniteGuard(max_consecutive=2),
                        to_targets=to_targets)


def test_grad_scaler_path_skips_bad_steps_and_backs_off():
    torch.manual_seed(0)
    model = NaNIn(TinyBoxRegressor(), {1})
    opt = build_optimizer(model, "sgd", lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    batches = make_batches(3)
    kw = dict(device="cpu", scaler=scaler, ema=ema, to_targets=to_targets)
    first = train_one_epoch(model, opt, batches[:1], **kw)
    before = [p.detach().clone() for p in model.parameters()]
    ema_before = [p.detach().clone() for p in ema.module.parameters()]
    m = train_one_epoch(model, opt, batches[1:2], **kw)
    assert first["steps"] == 1 and m["skipped"] == 1 and m["steps"] == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(ema.module.parameters(), ema_before, strict=True))
    assert scaler.get_scale() == 2.0**9 and ema.updates == 1
    m = train_one_epoch(model, opt, batches[2:], **kw)
    assert m["steps"] == 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_detector_trains_the_same_from_padded_targets_as_from_dicts():
    from rtrain.models import build_model
    from rtrain.training.engine import targets_from_batch

    batches = make_batches(2, batch_size=2, size=64)
    for b in batches:
        b["iscrowd"] = torch.zeros(b["labels"].shape, dtype=torch.bool)
    weights = []
    for padded in (True, False):
        torch.manual_seed(0)
        model = build_model("compact_n", num_classes=3)
        opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9)
        m = train_one_epoch(model, opt, batches, device="cpu", grad_clip=10.0,
                            to_targets=lambda b, d, p=padded: targets_from_batch(b, d, padded=p))
        assert m["steps"] == 2 and math.isfinite(m["loss"])
        weights.append((m, [p.detach().clone() for p in model.parameters()]))
    (m_pad, w_pad), (m_list, w_list) = weights
    assert m_pad["loss"] == pytest.approx(m_list["loss"], rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(w_pad, w_list, strict=True))
    padded = targets_from_batch(batches[0], torch.device("cpu"))
    assert padded["boxes"].shape == (2, 2, 4) and padded["labels"].dtype == torch.int64


class HostReads:
    """Counts the ways a tensor's value reaches Python (each one waits for the device on a GPU):
    item/tolist/bool/float/int, and boolean-mask indexing (its size needs the mask's count)."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))
        getitem = torch.Tensor.__getitem__

        def counting_getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                self.count += 1
            return getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", counting_getitem)

    def _counting(self, original):
        def wrapper(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_host_reads_do_not_grow_with_the_steps(monkeypatch, optimizer):
    """A Detector epoch (padded targets, EMA, guard, grad clipping) reads the device a fixed number
    of times at its end, whatever the number of steps: the steps themselves never read."""
    from rtrain.models import build_model

    batches = make_batches(4, batch_size=2, size=64)
    for b in batches:
        b["iscrowd"] = torch.zeros(b["labels"].shape, dtype=torch.bool)
    torch.manual_seed(0)
    model = build_model("compact_n", num_classes=3)
    opt = build_optimizer(model, optimizer, lr=0.01, momentum=0.9)
    ema = ModelEMA(model, decay=0.99, tau=ModelEMA.tau_for_run(8))
    guard = NonFiniteGuard()
    sched = LRSchedule(base_lr=0.01, total_steps=8, warmup_steps=2)
    kw = dict(device="cpu", ema=ema, guard=guard, grad_clip=10.0, schedule=sched)
    train_one_epoch(model, opt, batches[:1], **kw)  # first step: optimizer state, caches
    reads = HostReads(monkeypatch)
    counts = []
    for n in (1, 3):
        before = reads.count
        m = train_one_epoch(model, opt, batches[:n], **kw)
        counts.append(reads.count - before)
        assert m["steps"] == n
    assert counts[0] == counts[1], counts
    assert counts[0] <= 3, counts  # guard counters, the sums, the invalid-label count


def test_optimizer_resumed_from_a_non_fused_state_still_skips_on_the_device():
    torch.manual_seed(0)
    model = NaNAt(TinyBoxRegressor(), bad_calls={1})
    from rtrain.training.optim import param_groups

    plain = torch.optim.SGD(param_groups(model, 5e-4), lr=0.05, momentum=0.9)  # a pre-fused checkpoint
    train_one_epoch(model, plain, make_batches(1), device="cpu", to_targets=to_targets)
    opt = build_optimizer(model, "sgd", lr=0.05, momentum=0.9)
    opt.load_state_dict(plain.state_dict())  # takes the saved groups' fused=None
    assert not opt.param_groups[0]["fused"]
    before = [p.detach().clone() for p in model.parameters()]
    m = train_one_epoch(model, opt, make_batches(1, seed=1), device="cpu", to_targets=to_targets)
    assert m["skipped"] == 1 and opt.param_groups[0]["fused"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_progress_hook_gets_the_sums_read_every_log_every_steps(caplog):
    """on_progress is called where the sums are read (every log_every steps), instead of the log line."""
    from rtrain.training.progress import ProgressReporter, parse_line

    torch.manual_seed(0)
    model = TinyBoxRegressor()
    opt = build_optimizer(model, "adamw", lr=0.01, momentum=0.9, weight_decay=0.0)
    calls = []
    lines = []
    reporter = ProgressReporter(interval_s=1e-9, emit=lines.append)

    def hook(step, total, stats):
        calls.append((step, total, dict(stats)))
        reporter(step, total, stats)

    with caplog.at_level("INFO", logger="rtrain.training.engine"):
        metrics = train_one_epoch(model, opt, make_batches(6), device="cpu", to_targets=to_targets,
                                  log_every=2, on_progress=hook, steps_total=6, epoch=2)
    assert [c[0] for c in calls] == [2, 4, 6] and all(c[1] == 6 for c in calls)
    assert [c[2]["images"] for c in calls] == [8, 16, 24]
    assert all(c[2]["epoch"] == 2 and c[2]["skipped"] == 0 for c in calls)
    assert calls[-1][2]["loss"] == pytest.approx(metrics["loss"])  # the last read covers the whole epoch
    assert all(c[2]["images_per_s"] > 0 and 0 <= c[2]["data_wait_frac"] <= 1 for c in calls)
    assert all(b[2]["elapsed_s"] >= a[2]["elapsed_s"] for a, b in zip(calls, calls[1:], strict=False))
    assert not [r for r in caplog.records if "step" in r.getMessage()], "the hook replaces the log line"
    # The reporter's lines (none for the last step: the epoch line follows it) parse back.
    assert [parse_line(x)["step"] for x in lines] == [2, 4]
    assert all(parse_line(x)["epoch"] == 3 and parse_line(x)["total"] == 6 for x in lines)

    # No hook calls without log_every; max_steps stands in for an unknown steps_total.
    calls.clear()
    train_one_epoch(model, opt, make_batches(3), device="cpu", to_targets=to_targets, on_progress=hook)
    assert calls == []
    train_one_epoch(model, opt, make_batches(3), device="cpu", to_targets=to_targets, log_every=1,
                    on_progress=hook, max_steps=3)
    assert [(c[0], c[1]) for c in calls] == [(1, 3), (2, 3), (3, 3)]
