"""The training engine: one epoch of optimisation. Pure PyTorch, no Ray.

The Ray Train loop (`rtrain.training.train_loop`) calls these functions on every worker;
tests call them directly on tiny models and batches.

Batches are the dicts `rtrain.data.batches`'s collate gives: `images` uint8 [B, 3, S, S]
(converted here to float 0..1 on the device), `boxes` float [B, M, 4] xyxy
input pixels padded, `labels` int [B, M] (-1 = padding), `iscrowd` bool [B, M],
plus `image_id`, `scale`, `pad`, `orig_size` that evaluation uses to map
predictions back to original pixels.

Under DDP every rank must take the same number of optimizer steps and the same
skip decisions, or the gradient all-reduce hangs: ranks agree each step on "a rank
ran out of data / the time budget is spent" (one tiny host-visible all-reduce, only
when distributed) and on "a rank's loss or gradient is non-finite" (a device flag,
all-reduced on the device and applied without a host read; see `train_one_epoch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from rtrain.precision import amp_dtype, autocast, images_to_float
from rtrain.training.guard import NonFiniteGuard
from rtrain.training.optim import ensure_fused

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- batches


def targets_from_batch(batch: Mapping[str, Any], device: torch.device, padded: bool = True):
    """The batch's targets on `device`.

    padded=True (training default): the collate tensors as they are, {"boxes" float32 [B, M, 4],
    "labels" int64 [B, M] (-1 = padding), "iscrowd" bool [B, M]}, copied without a host sync;
    `Detector`/`DetectionLoss` take them directly.
    padded=False: per-image dicts (`boxes` [M, 4], `labels` [M] int64, `iscrowd` [M] bool),
    padding removed (one host read per image: for evaluation, tests and models that need lists).
    """
    if not padded:
        from rtrain.data.batches import batch_to_targets  # the data module owns the batch layout

        return batch_to_targets(batch, device)
    labels = batch["labels"]
    crowd = batch.get("iscrowd")
    if crowd is None:
        crowd = torch.zeros(labels.shape, dtype=torch.bool)
    return {
        "boxes": batch["boxes"].to(device, torch.float32, non_blocking=True),
        "labels": labels.to(device, torch.long, non_blocking=True),
        "iscrowd": crowd.to(device, torch.bool, non_blocking=True),
    }


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _reduce_device(device: torch.device) -> torch.device:
    """Where a collective's tensor lives: the device for NCCL, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def agree_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise max of `values` across DDP ranks (identity when not distributed).

    Used for flags (OR) and for the elapsed time, so that every rank stops at the same step
    and applies the same time-based LR (different LRs would let the DDP replicas drift apart).
    This is a host-visible agreement (the result is read): at most one per step.
    """
    if _world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def agree_max_device(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max of a device tensor across DDP ranks, left on the device (no host read
    with NCCL; with gloo the tensor goes through the CPU). Identity when not distributed."""
    if _world() == 1:
        return flags
    dev = _reduce_device(flags.device)
    t = flags.to(dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(flags.device, non_blocking=True)


# --------------------------------------------------------------------------- training


def _prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for fused SGD before its first step.

    torch's fused SGD allocates its buffers uninitialised on the first step and then relies on the
    kernel to fill them; a first step skipped through `found_inf` would leave garbage there. With
    dampening 0 a zero buffer gives the same first update (buf = grad).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("fused") or group["momentum"] == 0 or group["dampening"] != 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Fused torch optimizers read `optimizer.found_inf` on the device (the GradScaler protocol)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def _optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (0-dim bool on the device)."""
    if _honours_found_inf(optimizer):
        optimizer.grad_scale = None
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):  # other optimizers: one host read (build_optimizer gives fused ones)
        optimizer.step()


def _scaler_found_inf(scaler: torch.amp.GradScaler, optimizer, skip: torch.Tensor) -> torch.Tensor:
    """OR `skip` into the GradScaler's inf flags for `optimizer` (after `unscale_`), so its step
    skips and its scale backs off without a host read; returns the combined 0-dim bool flag."""
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    combined = skip
    for flag in found.values():
        flag.copy_(torch.maximum(flag, skip.to(flag.device, flag.dtype)))
        combined = combined | (flag.to(skip.device) > 0)
    return combined


def _step_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


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
    to_targets: Callable[[Mapping[str, Any], torch.device], Any] | None = None,
    step_offset: int = 0,
    max_steps: int | None = None,
    stop_when_finished: bool = False,
    log_every: int = 0,
    epoch: int = 0,
    guard_every: int | None = None,
    on_progress: Callable[[int, int | None, dict[str, float]], None] | None = None,
    steps_total: int | None = None,
    pause: Callable[[], int] | None = None,
    on_pause: Callable[[int, int], None] | None = None,
    pause_every: int = 1,
    pause_phase: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Run one pass over `batches`, one optimizer step per batch.

    model: in train mode, `model(images, targets)` returns `{"loss": total, "loss_*": parts}`
        (scalar tensors, the same keys every step).
    schedule: an `rtrain.training.schedule.LRSchedule` (or anything with `apply(optimizer, step, elapsed)`,
        `elapsed()`, `finished(step, elapsed)`): sets the LR before every step
        (step = step_offset + steps taken or skipped so far).
    stop_when_finished: end the epoch early, on all ranks together, once `schedule.finished`
        (its step or wall-clock budget is used up) — for time-limited runs.
    ema: object with `update(model, skip=flag)` (`rtrain.training.ema.ModelEMA`), called after every step;
        `skip` is the step's device flag, so a skipped step leaves the average unchanged.
    scaler: GradScaler for fp16 autocast (see `rtrain.precision.make_grad_scaler`); None otherwise.
    guard: skips steps whose loss parts (or, without a scaler, gradient norm) are non-finite;
        raises after too many (see below).
    grad_clip: max global grad norm (0 = no clipping; the norm is still measured).
    batch_transform: (batch, step) -> batch before the batch moves to the device (multi-scale).
    to_targets: (batch, device) -> targets for the model; default `targets_from_batch` (padded).
    max_steps: at most this many steps (taken + skipped) in this call.
    log_every: log the running mean loss every this many steps (0 = never).
    on_progress: called instead of that log line, every `log_every` steps, as
        `on_progress(step_in_epoch, steps_total, stats)`: steps taken + skipped in this call, the
        caller's `steps_total` (else `max_steps`; None when unknown), and `stats` made from the sums
        read there (no further host sync): epoch, loss (running mean), lr, steps, skipped, images,
        elapsed_s, images_per_s, data_wait_s, data_wait_frac (`rtrain.training.progress` renders them).
    memory_format: the layout the float images are made in (the model's, see
        `rtrain.training.memory_format`), by the copy that converts them on the device.
    guard_every: read the guard's device counters every this many steps (default: `log_every`,
        or 50 when that is 0); always at the epoch end.
    pause: () -> this rank's pause request (`rtrain.training.preempt`: 0 none, 1 checkpoint, 2 stop), asked
        before every step and agreed (MAX) across ranks in the top-of-step all-reduce (no extra
        sync). It is acted on only when `pause_phase` + the steps of this call is a positive
        multiple of `pause_every` (and at least one step ran in this call): `on_pause(code, steps
        taken + skipped in this call)` runs there on every rank (the guard's counters are synced
        first); after a stop (2) the epoch ends at once, with `preempted` 1.0 in the result.

    Host synchronisation: the step itself never waits on the device. Loss parts, the grad norm and
    counts are summed on the device and read once per `log_every` interval and at the epoch end.
    The skip decision (non-finite loss part OR non-finite grad norm) is a device flag, agreed
    across DDP ranks by one device all-reduce (MAX) and applied without a host read: fused
    optimizers (`rtrain.training.optim.build_optimizer`) get it as `optimizer.found_inf`, the GradScaler
    gets it folded into its inf flags (so a skipped step also backs its scale off, as an fp16
    overflow does), the EMA gets it as `skip`. Other optimizers cost one host
    read per step. Under DDP the only host-visible agreement is the top-of-step one ("a rank ran
    out of data / steps, the elapsed time"), none when not distributed. The NonFiniteGuard counts
    on the device and is checked every `guard_every` steps, so a run of non-finite steps is
    stopped within one such interval of reaching its limit (skipped steps change no weights).

    Returns mean loss parts over the steps taken, `lr` (last), `steps`, `skipped`, `images`,
    `images_per_s`, `data_wait_s`, `data_wait_frac`, `epoch_time_s`, `grad_norm` (mean over the
    steps taken; non-finite norms of fp16-overflow steps count as 0), `stopped_early` (1.0 when
    the schedule's budget or max_steps ended the epoch), `preempted` (1.0 when a stop pause ended it).
    """
    device = torch.device(device)
    to_targets = to_targets or targets_from_batch
    guard = guard or NonFiniteGuard()
    dtype = amp_dtype(device, amp)
    world = _world()
    if guard_every is None:
        guard_every = log_every if log_every > 0 else 50
    model.train()
    ensure_fused(optimizer)  # a resumed optimizer state may have switched the fused kernels off
    _prime_momentum(optimizer)
    names: list[str] | None = None
    sums: torch.Tensor | None = None  # [loss parts..., grad_norm, images, steps taken] on the device
    iters = 0
    data_wait = 0.0
    lr = optimizer.param_groups[0]["lr"]
    stopped_early = preempted = False
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        data_wait += time.perf_counter() - t0
        step = step_offset + iters
        elapsed = schedule.elapsed() if schedule is not None else 0.0
        out_of_steps = max_steps is not None and iters >= max_steps
        want = float(pause()) if pause is not None else 0.0
        if world > 1:
            exhausted, stop, elapsed, want = agree_max(
                [float(batch is None), float(out_of_steps), elapsed, want], device)
        else:
            exhausted, stop = batch is None, out_of_steps
        if stop_when_finished and schedule is not None and schedule.finished(step, elapsed):
            stop = True
        if exhausted or stop:
            stopped_early = bool(stop) and not exhausted
            break
        if want and iters > 0 and (pause_phase + iters) % max(1, pause_every) == 0 and on_pause is not None:
            guard.sync()
            on_pause(int(want), iters)
            if want >= 2:  # preempt.STOP: the batch in hand is the first one a resume trains on
                preempted = True
                break
        if batch_transform is not None:
            batch = batch_transform(batch, step)
        if schedule is not None:
            lr = float(schedule.apply(optimizer, step, elapsed))
        images = images_to_float(batch["images"], device, memory_format)
        targets = to_targets(batch, device)

        with autocast(device, dtype):
            losses = model(images, targets)
        if names is None:
            names = list(losses)
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        params = _step_params(optimizer)
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach().float()
        else:
            norm = torch.zeros((), device=device)
        parts = torch.stack([losses[k].detach().float().reshape(()) for k in names])
        values = torch.cat([parts, norm.reshape(1).to(parts.device)])
        # fp16 overflow (inf grads) is routine with a scaler: it skips those steps by itself.
        checked = parts if scaler is not None else values
        bad = (~torch.isfinite(checked).all()).float().reshape(1)
        skip = agree_max_device(bad)[0] > 0
        guard.record(skip, values, names + ["grad_norm"])

        if scaler is not None:
            ema_skip = _scaler_found_inf(scaler, optimizer, skip)
            scaler.step(optimizer)
            scaler.update()
        else:
            ema_skip = skip
            _optimizer_step(optimizer, skip)
        if ema is not None:
            ema.update(model, skip=ema_skip)

        finite_norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm)).reshape(1)
        counts = parts.new_ones(2)  # [images, 1 step]; filled in place, not copied from the host
        counts[0] = float(images.shape[0])
        row = torch.cat([parts, finite_norm, counts])
        row = torch.where(skip, torch.zeros_like(row), row)
        sums = row if sums is None else sums + row
        iters += 1
        if log_every and iters % log_every == 0:
            host = sums.tolist()
            mean_loss = host[names.index("loss")] / max(host[-1], 1.0)
            if on_progress is None:
                logger.info("epoch %d step %d: loss %.4f lr %.5f", epoch, step + 1, mean_loss, lr)
            else:
                spent = time.perf_counter() - start
                on_progress(iters, steps_total if steps_total is not None else max_steps, {
                    "epoch": epoch, "loss": mean_loss, "lr": lr, "steps": host[-1],
                    "skipped": iters - host[-1], "images": host[-2], "elapsed_s": spent,
                    "images_per_s": host[-2] / spent if spent > 0 else 0.0, "data_wait_s": data_wait,
                    "data_wait_frac": data_wait / spent if spent > 0 else 0.0,
                })
        if guard_every and iters % guard_every == 0:
            guard.sync()

    guard.sync()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    host = sums.tolist() if sums is not None else []
    steps = int(host[-1]) if host else 0
    images_seen = int(host[-2]) if host else 0
    metrics = {name: host[i] / max(steps, 1) for i, name in enumerate(names or [])}
    _warn_invalid_targets(model)
    metrics.update(
        lr=lr,
        steps=steps,
        skipped=iters - steps,
        images=images_seen,
        images_per_s=images_seen / elapsed if elapsed > 0 else 0.0,
        data_wait_s=data_wait,
        data_wait_frac=data_wait / elapsed if elapsed > 0 else 0.0,
        epoch_time_s=elapsed,
        grad_norm=host[-3] / max(steps, 1) if host else 0.0,
        stopped_early=float(stopped_early),
        preempted=float(preempted),
    )
    return metrics


def _warn_invalid_targets(model: torch.nn.Module) -> None:
    """Log the labels the loss ignored as invalid (its device counter, read once per epoch)."""
    from rtrain.training.ema import unwrap_model

    loss_fn = getattr(unwrap_model(model), "loss_fn", None)
    count = getattr(loss_fn, "invalid_targets", None)
    if isinstance(count, torch.Tensor):
        n = int(count)
        if n:
            logger.warning("%d target boxes with a label outside the classes were ignored so far", n)
