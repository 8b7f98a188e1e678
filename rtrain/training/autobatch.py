"""`train.batch_size: auto`: the largest per-worker batch whose training step fits the GPU.

As Ultralytics' AutoBatch: run forward + backward (the real model, its real loss, synthetic
images at the training size and synthetic boxes) at a few batch sizes, record the peak
memory of each, fit `memory = a * batch + c` by least squares, and take the batch whose
predicted memory is `fraction` of the memory this process may use (the card's total less
what other processes hold; with a fractional Ray GPU, at most that share of it). Then:
  - the batch is rounded down to a multiple of 8 (when it is at least 8) and clamped to
    [1, MAX_BATCH];
  - a size that ran out of memory while profiling caps the pick below it, and profiling
    stops there (larger sizes would not fit either);
  - the pick is run once for real; if it runs out of memory, or its peak is above the target,
    the measurement joins the fit and a smaller batch is picked (a few tries at most).
The constant term includes room for an EMA copy of the weights and two optimizer states per
weight (AdamW's moments; SGD needs one), which exist in training but not while profiling.

The profile leaves no trace: weights and BatchNorm statistics are restored, gradients are
cleared and the RNG streams are forked, so a run with `auto` trains like one given the
resolved number. Off CUDA there is no device memory to fit: `DEFAULT_BATCH` (16), said in
the explanation line.

    batch = resolve_batch_size(cfg, model, device)   # int; logs one line when it resolved "auto"
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 16  # off CUDA, and the row size data pipelines use before the batch is known
MAX_BATCH = 1024
PROFILE_SIZES = (1, 2, 4, 8, 16)
STATE_COPIES = 3  # EMA weights + AdamW exp_avg + exp_avg_sq, per parameter byte
_VERIFY_TRIES = 5
_TOLERANCE = 1.05  # a verified peak up to 5% over the target is accepted (allocator granularity)


# --------------------------------------------------------------------------- fitting (pure)


def _round_batch(b: float) -> int:
    b = int(math.floor(b))
    if b >= 8:
        b -= b % 8
    return min(max(b, 1), MAX_BATCH)


def fit_line(sizes: Sequence[int], mem_bytes: Sequence[float | None]) -> tuple[float, float]:
    """(a, c) of `memory = a * batch + c` over the sizes that ran (None = ran out of memory).

    One point (or a line that does not grow) is fitted through the origin from the largest
    point that ran, which over-states the cost per image: the safe side.
    """
    points = [(float(s), float(m)) for s, m in zip(sizes, mem_bytes, strict=True) if m is not None]
    if not points:
        raise ValueError("no profiled batch size ran: nothing to fit")
    if len({s for s, _ in points}) >= 2:
        n = len(points)
        mean_s = sum(s for s, _ in points) / n
        mean_m = sum(m for _, m in points) / n
        var = sum((s - mean_s) ** 2 for s, _ in points)
        a = sum((s - mean_s) * (m - mean_m) for s, m in points) / var
        if a > 0:
            return a, mean_m - a * mean_s
    s, m = max(points)
    return m / s, 0.0


def fit_batch_from_profile(
    sizes: Sequence[int], mem_bytes: Sequence[float | None], total_bytes: float, fraction: float
) -> int:
    """The batch whose predicted memory is `fraction * total_bytes`, from a profile.

    sizes: batch sizes profiled; mem_bytes: the peak bytes each used, None where it ran out
    of memory. The fit is `rtrain.training.autobatch.fit_line`; the pick is capped below the smallest
    size that ran out of memory, rounded down to a multiple of 8 (if >= 8) and clamped to
    [1, MAX_BATCH]. Nothing ran (even the smallest size ran out of memory): 1.
    """
    if len(sizes) != len(mem_bytes) or not sizes:
        raise ValueError(f"need one reading per size, got {len(sizes)} sizes, {len(mem_bytes)} readings")
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(sizes)}")
    if total_bytes <= 0 or not 0 < fraction <= 1:
        raise ValueError(f"need total_bytes > 0 and 0 < fraction <= 1, got {total_bytes}, {fraction}")
    failed = [int(s) for s, m in zip(sizes, mem_bytes, strict=True) if m is None]
    if len(failed) == len(sizes):
        return 1
    a, c = fit_line(sizes, mem_bytes)
    b = (fraction * total_bytes - c) / a
    if failed:
        b = min(b, min(failed) - 1)
    return _round_batch(b)


# --------------------------------------------------------------------------- measuring


class Reading:
    """Bytes one measured step used (set when its `measure` block ends)."""

    bytes: int = 0


Meter = Callable[[], contextlib.AbstractContextManager[Reading]]


def cuda_peak_meter(device: torch.device) -> Meter:
    """Peak bytes allocated on `device` during the block (the caching allocator's counter)."""

    @contextlib.contextmanager
    def measure() -> Iterator[Reading]:
        reading = Reading()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield reading
        torch.cuda.synchronize(device)
        reading.bytes = int(torch.cuda.max_memory_allocated(device))

    return measure


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[Reading]:
    """Bytes of the distinct storages autograd saves for backward during the block.

    Any device, CPU included: the activations a training step keeps, the part of its memory
    that grows with the batch (no allocator counters needed). A meter for `profile_memory`.
    """
    reading = Reading()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # e.g. tensors without storage
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield reading
    reading.bytes = sum(storages.values())


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def _synthetic_batch(batch: int, img_size: int, num_classes: int, boxes_per_image: int, device):
    images = torch.rand(batch, 3, img_size, img_size, device=device)
    targets = []
    for _ in range(batch):
        centre = torch.rand(boxes_per_image, 2, device=device) * img_size
        half = (0.05 + 0.45 * torch.rand(boxes_per_image, 2, device=device)) * img_size / 2
        boxes = torch.cat([centre - half, centre + half], dim=1).clamp_(0, img_size)
        targets.append({
            "boxes": boxes,
            "labels": torch.randint(0, max(1, num_classes), (boxes_per_image,), device=device),
            "iscrowd": torch.zeros(boxes_per_image, dtype=torch.bool, device=device),
        })
    return images, targets


def _train_step(model, batch, img_size, num_classes, boxes_per_image, device, amp_dtype) -> None:
    images, targets = _synthetic_batch(batch, img_size, num_classes, boxes_per_image, device)
    ctx = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        losses = model(images, targets)
    losses["loss"].backward()


@contextlib.contextmanager
def _untouched(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block, then put back the weights, buffers, grads, train/eval mode and RNG state."""
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    was_training = model.training
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            yield
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        model.train(was_training)


def profile_memory(
    model: torch.nn.Module,
    sizes: Sequence[int],
    img_size: int,
    device: torch.device | str,
    meter: Meter,
    *,
    num_classes: int,
    amp: bool = True,
    boxes_per_image: int = 32,
) -> list[int | None]:
    """Bytes `meter` reads for one forward+backward at each size; None from the first that runs
    out of memory on (larger sizes are not tried). The model is left as it was."""
    from rtrain.precision import amp_dtype

    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    out: list[int | None] = []
    with _untouched(model, device):
        for size in sizes:
            if out and out[-1] is None:
                out.append(None)
                continue
            try:
                with meter() as reading:
                    _train_step(model, int(size), img_size, num_classes, boxes_per_image, device, dtype)
                out.append(reading.bytes)
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                out.append(None)
            finally:
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- choosing


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def choose_batch(
    profile: Callable[[Sequence[int]], list[int | None]],
    sizes: Sequence[int],
    total_bytes: float,
    fraction: float,
) -> tuple[int, list[int], list[int | None], bool]:
    """Profile `sizes`, fit, then run the pick; shrink while it runs out of memory or over the target.

    profile: batch sizes -> bytes each used (None: out of memory). After a miss the next pick
    is the refit's, and at most 0.8x the missed one; after `_VERIFY_TRIES` misses, the largest
    size that ran within the target. Returns (batch, every size profiled, their readings,
    whether the batch ran within the target).
    """
    target = fraction * total_bytes
    tried = list(sizes)
    mem = profile(tried)
    batch = fit_batch_from_profile(tried, mem, total_bytes, fraction)
    for _ in range(_VERIFY_TRIES):
        if batch in tried or mem[0] is None:  # measured already, or nothing fits at all
            break
        (reading,) = profile([batch])
        tried.append(batch)
        mem.append(reading)
        if reading is not None and reading <= target * _TOLERANCE:
            break
        # a miss: refit with it, and shrink by at least a fifth (memory can grow faster than a line)
        batch = min(fit_batch_from_profile(tried, mem, total_bytes, fraction), _round_batch(batch * 0.8))
    fits = [s for s, m in zip(tried, mem, strict=True) if m is not None and m <= target * _TOLERANCE]
    if batch not in fits and fits:  # out of tries: the largest size that ran within the target
        batch = max(fits)
    return batch, tried, mem, batch in fits


def auto_batch_size(
    model: torch.nn.Module,
    img_size: int,
    device: torch.device | str,
    *,
    fraction: float = 0.6,
    num_classes: int,
    amp: bool = True,
    boxes_per_image: int = 32,
    sizes: Sequence[int] = PROFILE_SIZES,
    default: int = DEFAULT_BATCH,
    share: float = 1.0,
) -> tuple[int, str]:
    """(batch, one-line explanation): the per-worker batch for `fraction` of the GPU's memory.

    model: the detector on `device` (train-mode forward `model(images, targets)` -> loss dict);
    it is left exactly as it was. img_size: the largest training input side (multi-scale
    included). share: the part of the card this worker was given (Ray's fractional GPUs, e.g.
    0.25 for four trials on one card): memory usable = min(share x total, total less what
    other processes hold now). Off CUDA: (`default`, a line saying why).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default, f"batch_size auto: no GPU memory to fit on {device.type}; using batch {default}"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    others = max(0, total - free - torch.cuda.memory_reserved(device))  # other processes on the card
    usable = min(share * total, total - others)
    state_bytes = STATE_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())
    meter = cuda_peak_meter(device)

    def profile(batch_sizes: Sequence[int]) -> list[int | None]:
        mem = profile_memory(model, batch_sizes, img_size, device, meter, num_classes=num_classes,
                             amp=amp, boxes_per_image=boxes_per_image)
        return [None if m is None else m + state_bytes for m in mem]

    batch, tried, mem, verified = choose_batch(profile, sizes, usable, fraction)
    name = torch.cuda.get_device_name(device)
    if mem[0] is None:
        return 1, (f"batch_size auto: even batch {tried[0]} ran out of memory at {img_size}px on {name} "
                   f"({_gib(usable)} usable); using 1")
    a, c = fit_line(tried, mem)
    note = "" if verified else " (not verified by a run)"
    return batch, (
        f"batch_size auto: {batch} per worker for {fraction:.0%} of {_gib(usable)} usable on {name}"
        f"{'' if share >= 1 else f' (a {share:g} share)'} "
        f"at {img_size}px: {a / 2**20:.1f} MiB/image + {_gib(c)}, profiled at {sorted(set(tried))}{note}"
    )


def max_train_size(img_size: int, multi_scale: float) -> int:
    """The largest input side training uses (`train_loop.multi_scale_fn`'s top size)."""
    if multi_scale <= 0:
        return img_size
    lo = max(32, int(img_size * (1 - multi_scale)) // 32 * 32)
    return max(lo, int(img_size * (1 + multi_scale)) // 32 * 32)


def gpu_share() -> float:
    """The fraction of a GPU Ray gave this process (1.0 outside Ray or for whole GPUs)."""
    try:
        import ray

        if not ray.is_initialized():
            return 1.0
        gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    except Exception:  # no Ray, or not in a Ray worker: a whole card
        return 1.0
    return gpus if 0 < gpus < 1 else 1.0


def resolve_batch_size(
    cfg, model: torch.nn.Module, device: torch.device | str, max_batch: int | None = None,
    resumed: int | None = None,
) -> int:
    """`cfg.train.batch_size` as an int: as given, or for "auto" `auto_batch_size` on this worker.

    resumed: the batch an "auto" run resolved before, from its checkpoint: a resumed run keeps it
    (its schedule, LR scaling and mid-epoch position were made with it), without profiling again.

    max_batch: an upper bound for "auto" (e.g. the images one worker sees per epoch: a batch
    cannot hold more). With torch.distributed initialised every rank profiles its own device
    and all take the smallest pick (a collective: every rank must call this). Rank 0 logs the
    one line.
    """
    batch = cfg.train.batch_size
    if isinstance(batch, int):
        return batch
    if batch != "auto":
        raise ValueError(f"train.batch_size: expected an int or 'auto', got {batch!r}")
    if resumed is not None:
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            logger.info("batch_size auto: %d per worker, as resolved before the checkpoint", resumed)
        return int(resumed)
    device = torch.device(device)
    size = max_train_size(cfg.data.img_size, cfg.data.multi_scale)
    batch, line = auto_batch_size(model, size, device, fraction=cfg.train.autobatch_fraction,
                                  num_classes=int(model.num_classes), amp=cfg.train.amp,
                                  share=gpu_share() if device.type == "cuda" else 1.0)
    if max_batch is not None and batch > max(1, max_batch):
        batch = _round_batch(max(1, max_batch))
        line += f"; {batch}: capped by the {max_batch} images a worker sees per epoch"
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        backend = torch.distributed.get_backend()
        t = torch.tensor([batch], device=device if backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        if int(t.item()) != batch:
            line += f"; {int(t.item())}: the smallest over {torch.distributed.get_world_size()} workers"
            batch = int(t.item())
    if rank == 0:
        logger.info("%s", line)
    return batch
