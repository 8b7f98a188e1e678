"""The training engine: one epoch of optimisation, and COCO evaluation. Pure PyTorch, no Ray.

The Ray Train loop (`rtrain.train_loop`) calls these functions on every worker;
tests call them directly on tiny models and batches.

Batches are the dicts `rtrain.data`'s collate gives: `images` uint8 [B, 3, S, S]
(converted here to float 0..1 on the device), `boxes` float [B, M, 4] xyxy
input pixels padded, `labels` int [B, M] (-1 = padding), `iscrowd` bool [B, M],
plus `image_id`, `scale`, `pad`, `orig_size` that evaluation uses to map
predictions back to original pixels.

Under DDP every rank must take the same number of optimizer steps and the same
skip decisions, or the gradient all-reduce hangs: ranks agree each step (one
tiny all-reduce) on "a rank ran out of data / the time budget is spent" and on
"a rank's loss is non-finite".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from rtrain.guard import NonFiniteGuard

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- AMP


def amp_dtype(device: torch.device | str, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 on GPUs that support it, else fp16; None on CPU/off."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_grad_scaler(device: torch.device | str, enabled: bool = True) -> torch.amp.GradScaler | None:
    """A GradScaler only when autocast runs in fp16 (bf16 and fp32 need none)."""
    if amp_dtype(device, enabled) is torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- batches


def images_to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 0..1 on `device` (the conversion happens on the device)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def targets_from_batch(batch: Mapping[str, Any], device: torch.device) -> list[dict]:
    """Per-image target dicts (`boxes` [M, 4], `labels` [M] int64, `iscrowd` [M] bool), padding removed."""
    from rtrain.data import batch_to_targets  # the data module owns the batch layout

    return batch_to_targets(batch, device)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise max of `values` across DDP ranks (identity when not distributed).

    Used for flags (OR) and for the elapsed time, so that every rank stops at the same step
    and applies the same time-based LR (different LRs would let the DDP replicas drift apart).
    """
    if _world() == 1:
        return values
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# --------------------------------------------------------------------------- training


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str,
    schedule=None,
    ema=None,
    amp: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    guard: NonFiniteGuard | None = None,
    grad_clip: float = 0.0,
    batch_transform: Callable[[Mapping[str, Any], int], Mapping[str, Any]] | None = None,
    to_targets: Callable[[Mapping[str, Any], torch.device], list[dict]] | None = None,
    step_offset: int = 0,
    max_steps: int | None = None,
    stop_when_finished: bool = False,
    log_every: int = 0,
    epoch: int = 0,
) -> dict[str, float]:
    """Run one pass over `batches`, one optimizer step per batch.

    model: in train mode, `model(images, targets)` returns `{"loss": total, "loss_*": parts}`.
    schedule: an `rtrain.schedule.LRSchedule` (or anything with `apply(optimizer, step, elapsed)`,
        `elapsed()`, `finished(step, elapsed)`): sets the LR before every step
        (step = step_offset + steps taken so far).
    stop_when_finished: end the epoch early, on all ranks together, once `schedule.finished`
        (its step or wall-clock budget is used up) — for time-limited runs.
    ema: object with `update(model)`, called after every optimizer step.
    scaler: GradScaler for fp16 autocast (see `make_grad_scaler`); None otherwise.
    guard: skips steps whose loss (or gradient norm) is non-finite; raises after too many.
    grad_clip: max global grad norm (0 = no clipping; the norm is still measured).
    batch_transform: (batch, step) -> batch before the batch moves to the device (multi-scale).
    max_steps: at most this many steps (taken + skipped) in this call.

    Returns mean loss parts over the steps taken, `lr` (last), `steps`, `skipped`, `images`,
    `images_per_s`, `data_wait_s`, `data_wait_frac`, `epoch_time_s`, `grad_norm` (mean),
    `stopped_early` (1.0 when the schedule's budget or max_steps ended the epoch).
    """
    device = torch.device(device)
    to_targets = to_targets or targets_from_batch
    guard = guard or NonFiniteGuard()
    dtype = amp_dtype(device, amp)
    model.train()
    sums: dict[str, float] = {}
    steps = skipped = images_seen = 0
    norm_sum = 0.0
    data_wait = 0.0
    lr = optimizer.param_groups[0]["lr"]
    stopped_early = False
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        data_wait += time.perf_counter() - t0
        step = step_offset + steps + skipped
        elapsed = schedule.elapsed() if schedule is not None else 0.0
        out_of_steps = max_steps is not None and steps + skipped >= max_steps
        exhausted, stop, elapsed = agree_max([float(batch is None), float(out_of_steps), elapsed], device)
        if stop_when_finished and schedule is not None and schedule.finished(step, elapsed):
            stop = True
        if exhausted or stop:
            stopped_early = bool(stop) and not exhausted
            break
        if batch_transform is not None:
            batch = batch_transform(batch, step)
        if schedule is not None:
            lr = float(schedule.apply(optimizer, step, elapsed))
        images = images_to_float(batch["images"], device)
        targets = to_targets(batch, device)

        with _autocast(device, dtype):
            losses = model(images, targets)
        loss = losses["loss"]
        (bad_loss,) = agree_max([float(not bool(torch.isfinite(loss.detach())))], device)
        if not guard.check(losses, all_finite=not bad_loss):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if scaler is not None:
            scaler.step(optimizer)  # skips by itself on inf grads (fp16 overflow is routine)
            scaler.update()
        else:
            # DDP already averaged the gradients, so every rank sees the same norm.
            if not guard.check({"grad_norm": norm}):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
        if ema is not None:
            ema.update(model)

        steps += 1
        images_seen += images.shape[0]
        norm_sum += norm if math.isfinite(norm) else 0.0
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        if log_every and steps % log_every == 0:
            logger.info(
                "epoch %d step %d: loss %.4f lr %.5f", epoch, step + 1, sums["loss"] / steps, lr
            )

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    metrics = {name: total / max(steps, 1) for name, total in sums.items()}
    metrics.update(
        lr=lr,
        steps=steps,
        skipped=skipped,
        images=images_seen,
        images_per_s=images_seen / elapsed if elapsed > 0 else 0.0,
        data_wait_s=data_wait,
        data_wait_frac=data_wait / elapsed if elapsed > 0 else 0.0,
        epoch_time_s=elapsed,
        grad_norm=norm_sum / max(steps, 1),
        stopped_early=float(stopped_early),
    )
    return metrics


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str,
    score_thresh: float = 0.01,
    iou_thresh: float = 0.6,
    max_det: int = 100,
    amp: bool = True,
) -> Iterable[tuple[Mapping[str, Any], list[dict]]]:
    """Yield (batch, detections) per batch; detections as `Detector.postprocess` gives (input px)."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    model.eval()
    for batch in batches:
        images = images_to_float(batch["images"], device)
        with _autocast(device, dtype):
            cls_logits, box_dist = model.forward_raw(images)
        dets = model.postprocess(
            cls_logits.float(),
            box_dist.float(),
            tuple(images.shape[-2:]),
            score_thresh=score_thresh,
            iou_thresh=iou_thresh,
            max_det=max_det,
        )
        yield batch, dets


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    coco_gt,
    category_ids: list[int],
    class_names: list[str],
    *,
    device: torch.device | str,
    score_thresh: float = 0.01,
    iou_thresh: float = 0.6,
    max_det: int = 100,
    amp: bool = True,
) -> dict[str, Any]:
    """COCO metrics of `model` (a Detector, not DDP-wrapped) on `batches`.

    Predictions are mapped back to original-image pixels and source category ids by
    `rtrain.evaluation.to_coco_results`, then scored by pycocotools against `coco_gt`.
    Returns `coco_evaluate`'s dict (mAP, mAP50, mAP75, ..., per_class) plus `eval_images`,
    `eval_detections` and `eval_time_s`.
    """
    from rtrain.evaluation import coco_evaluate, to_coco_results

    start = time.perf_counter()
    results: list[dict] = []
    n_images = 0
    was_training = model.training
    for batch, dets in predict_batches(
        model, batches, device=device, score_thresh=score_thresh, iou_thresh=iou_thresh,
        max_det=max_det, amp=amp,
    ):
        n_images += len(dets)
        results.extend(to_coco_results(
            batch["image_id"], dets, batch["scale"], batch["pad"], batch["stored_size"], batch["orig_size"],
            category_ids,
        ))
    model.train(was_training)
    metrics = dict(coco_evaluate(coco_gt, results, class_names))
    metrics.update(eval_images=n_images, eval_detections=len(results),
                   eval_time_s=time.perf_counter() - start)
    return metrics
