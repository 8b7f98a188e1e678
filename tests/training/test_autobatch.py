"""AutoBatch: the fit from a memory profile, the profile itself (measured on CPU), resolution."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from rtrain.config import config_from_dict
from rtrain.models import build_model
from rtrain.training.autobatch import (
    DEFAULT_BATCH,
    MAX_BATCH,
    auto_batch_size,
    choose_batch,
    fit_batch_from_profile,
    fit_line,
    max_train_size,
    profile_memory,
    resolve_batch_size,
    saved_tensor_bytes,
)

MiB, GiB = 2**20, 2**30
SIZES = [1, 2, 4, 8, 16]


def _linear(a: float, c: float, sizes=SIZES) -> list[float]:
    return [a * s + c for s in sizes]


# --------------------------------------------------------------------------- the fit


def test_linear_profile_gives_the_batch_for_the_fraction():
    mem = _linear(100 * MiB, 1 * GiB)
    assert fit_line(SIZES, mem) == pytest.approx((100 * MiB, 1 * GiB))
    # (0.6 * 80 GiB - 1 GiB) / 100 MiB = 481.3 -> 480 (multiple of 8)
    assert fit_batch_from_profile(SIZES, mem, 80 * GiB, 0.6) == 480
    assert fit_batch_from_profile(SIZES, mem, 80 * GiB, 0.3) == 232  # (24576 - 1024) / 100 = 235.5
    # below 8 no rounding to a multiple of 8: a small card still gets every image it can hold
    assert fit_batch_from_profile(SIZES, mem, 2 * GiB, 0.9) == 8  # (1843 - 1024) / 100 = 8.2
    assert fit_batch_from_profile(SIZES, mem, 2 * GiB, 0.8) == 6  # 6.1


def test_the_same_model_uses_a_laptop_card_and_an_h200():
    # per image 180 MiB, 0.5 GiB fixed: a research laptop's 6 GB card and an H200's 139 GB
    mem = _linear(180 * MiB, 0.5 * GiB)
    laptop = fit_batch_from_profile(SIZES, mem, 6 * 10**9, 0.6)
    h200 = fit_batch_from_profile(SIZES, mem, 139 * GiB, 0.6)
    assert laptop == 16  # (3433 MiB - 512) / 180 = 16.2
    assert h200 == 464  # (85402 MiB - 512) / 180 = 471.6 -> 464
    assert h200 % 8 == 0 and 180 * MiB * h200 + 0.5 * GiB <= 0.6 * 139 * GiB


def test_clamped_to_1_and_max_batch():
    mem = _linear(100 * MiB, 1 * GiB)
    assert fit_batch_from_profile(SIZES, mem, 1 * GiB, 0.6) == 1  # fixed part alone is over budget
    assert fit_batch_from_profile(SIZES, _linear(1 * MiB, 0), 1000 * GiB, 0.9) == MAX_BATCH


def test_oom_in_profile_caps_the_pick_below_the_failing_size():
    mem = _linear(10 * MiB, 1 * GiB)
    assert fit_batch_from_profile(SIZES, mem, 80 * GiB, 0.6) == MAX_BATCH
    # 16 ran out of memory although the line says thousands fit: the card disagrees, stay below 16
    assert fit_batch_from_profile(SIZES, mem[:4] + [None], 80 * GiB, 0.6) == 8  # 15 -> 8
    assert fit_batch_from_profile(SIZES, mem[:3] + [None, None], 80 * GiB, 0.6) == 7
    assert fit_batch_from_profile(SIZES, [mem[0], None, None, None, None], 80 * GiB, 0.6) == 1
    assert fit_batch_from_profile(SIZES, [None] * 5, 80 * GiB, 0.6) == 1  # nothing ran: 1
    # a later verification run at 480 that ran out of memory caps a refit at 479 -> 472
    sizes, mem = SIZES + [480], _linear(100 * MiB, 1 * GiB) + [None]
    assert fit_batch_from_profile(sizes, mem, 80 * GiB, 0.6) == 472


def test_a_line_that_does_not_grow_is_fitted_through_the_origin():
    flat = [2 * GiB, 2 * GiB, 2 * GiB, 1.95 * GiB, 1.95 * GiB]  # noise dominates at tiny sizes
    a, c = fit_line(SIZES, flat)
    assert (a, c) == (1.95 * GiB / 16, 0.0)  # cost per image over-stated: the safe side
    assert fit_batch_from_profile(SIZES, flat, 80 * GiB, 0.6) == 392  # 48 / 1.95 * 16 = 393.8
    assert fit_line([4], [400 * MiB]) == (100 * MiB, 0.0)


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="one reading per size"):
        fit_batch_from_profile([1, 2], [1.0], 10.0, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        fit_batch_from_profile([1, 2], [1.0, 2.0], 10.0, 1.5)
    with pytest.raises(ValueError, match=">= 1"):
        fit_batch_from_profile([0, 2], [1.0, 2.0], 10.0, 0.5)


# --------------------------------------------------------------------------- the profile, on CPU


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_profile_of_the_real_model_is_linear_and_leaves_no_trace():
    torch.manual_seed(0)
    model = build_model("compact_n", 3).eval()
    before, rng = _state(model), torch.get_rng_state()
    mem = profile_memory(model, [1, 2, 4, 8], 64, "cpu", saved_tensor_bytes, num_classes=3, amp=False)
    assert all(isinstance(m, int) and m > 0 for m in mem)
    assert mem == sorted(mem) and mem[3] > 3 * mem[0]  # activations grow with the batch
    a, c = fit_line([1, 2, 4], mem[:3])
    assert a * 8 + c == pytest.approx(mem[3], rel=0.05)  # the line predicts a size it did not see
    # BatchNorm statistics, weights, grads, mode and the RNG stream are as before
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())


class _Card:
    """A card of `capacity` bytes over a real meter: a step that needs more raises the CUDA
    allocator's OutOfMemoryError, as the card would."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    @contextlib.contextmanager
    def __call__(self):
        with saved_tensor_bytes() as reading:
            yield reading
        if reading.bytes > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: tried to hold {reading.bytes} bytes")


def test_profile_stops_at_the_first_size_that_runs_out_of_memory():
    model = build_model("compact_n", 3)
    before = _state(model)
    full = profile_memory(model, [1, 2, 4], 64, "cpu", saved_tensor_bytes, num_classes=3, amp=False)
    card = _Card(capacity=(full[1] + full[2]) // 2)  # holds batch 2, not 4
    mem = profile_memory(model, [1, 2, 4, 8], 64, "cpu", card, num_classes=3, amp=False)
    assert mem[:2] == full[:2] and mem[2:] == [None, None]
    assert fit_batch_from_profile([1, 2, 4, 8], mem, 100 * full[2], 0.9) == 3  # below the failure
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="multiple of"):  # other errors are not swallowed
        profile_memory(model, [1], 65, "cpu", saved_tensor_bytes, num_classes=3, amp=False)


# --------------------------------------------------------------------------- resolution


def _cfg(**train):
    return config_from_dict({"data": {"img_size": 64}, "train": train})


def test_cpu_resolves_auto_to_the_default_and_says_so(caplog):
    model = build_model("compact_n", 3)
    batch, line = auto_batch_size(model, 64, "cpu", num_classes=3)
    assert (batch, DEFAULT_BATCH) == (16, 16)
    assert line == "batch_size auto: no GPU memory to fit on cpu; using batch 16"
    with caplog.at_level(logging.INFO, logger="rtrain.training.autobatch"):
        assert resolve_batch_size(_cfg(batch_size="auto"), model, torch.device("cpu")) == 16
    assert [r.getMessage() for r in caplog.records] == [line]


def test_a_given_batch_is_used_as_is_without_profiling(caplog):
    with caplog.at_level(logging.INFO, logger="rtrain.training.autobatch"):
        assert resolve_batch_size(_cfg(batch_size=24), build_model("compact_n", 3), "cpu") == 24
    assert not caplog.records


def test_all_ranks_take_the_smallest_pick(tmp_path, caplog):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        with caplog.at_level(logging.INFO, logger="rtrain.training.autobatch"):
            assert resolve_batch_size(_cfg(batch_size="auto"), build_model("compact_n", 3), "cpu") == 16
    finally:
        dist.destroy_process_group()
    assert len(caplog.records) == 1


def test_profile_size_covers_multi_scale():
    assert max_train_size(320, 0.0) == 320
    assert max_train_size(320, 0.5) == 480
    assert max_train_size(256, 0.1) == 256  # 281 -> 256: the loop's top multiple of 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pick_fits_its_fraction_and_trains():
    device = torch.device("cuda")
    model = build_model("compact_n", 3).to(device)
    batch, line = auto_batch_size(model, 256, device, fraction=0.3, num_classes=3)
    assert 1 <= batch <= MAX_BATCH and line.startswith(f"batch_size auto: {batch} per worker")
    _, total = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    images = torch.rand(batch, 3, 256, 256, device=device)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0]], device=device)
    targets = [{"boxes": box, "labels": torch.zeros(1, dtype=torch.long, device=device),
                "iscrowd": torch.zeros(1, dtype=torch.bool, device=device)}] * batch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(images, targets)["loss"]
    loss.backward()
    assert torch.cuda.max_memory_allocated(device) <= 0.3 * total * 1.1


# --------------------------------------------------------------------------- choosing and verifying


def test_choose_batch_on_a_real_cpu_profile_runs_its_pick():
    model = build_model("compact_n", 3)

    def profile(sizes):
        return profile_memory(model, sizes, 64, "cpu", saved_tensor_bytes, num_classes=3, amp=False)

    base = profile([1, 2, 4])
    capacity = 20 * (base[2] - base[0]) // 3 + base[0]  # room for about 20 images over batch 1's cost
    batch, tried, mem, verified = choose_batch(profile, [1, 2, 4], capacity, 0.8)
    assert tried[:3] == [1, 2, 4] and mem[:3] == base  # the profile is repeatable
    assert batch == 16 and tried[3:] == [16] and verified  # (0.8 x capacity) holds 16.x -> 16
    assert mem[3] <= 0.8 * capacity * 1.05


def _superlinear(a, c, q, capacity, calls):
    def profile(sizes):
        calls.append(list(sizes))
        used = [a * s + c + q * s * s for s in sizes]
        return [None if u > capacity else u for u in used]

    return profile


def test_choose_batch_shrinks_while_the_pick_runs_out_of_memory_or_over_the_target():
    calls: list = []
    # memory grows faster than the line fitted on 1..16: the first picks run out of memory
    profile = _superlinear(100 * MiB, 1 * GiB, 0.5 * MiB, 80 * GiB, calls)
    batch, tried, mem, verified = choose_batch(profile, SIZES, 80 * GiB, 0.6)
    assert verified and mem[tried.index(batch)] <= 0.6 * 80 * GiB * 1.05
    assert calls[0] == SIZES and all(len(c) == 1 for c in calls[1:])
    picks = tried[len(SIZES):]
    assert picks == sorted(picks, reverse=True) and picks[-1] == batch
    assert None in mem  # at least one pick ran out of memory on the way down
    assert all(b <= 0.8 * a for a, b in zip(picks, picks[1:], strict=False))


def test_choose_batch_falls_back_to_the_largest_size_that_fitted():
    calls: list = []
    # memory explodes past 16: every pick misses; 16 is known to fit
    def profile(sizes):
        calls.append(list(sizes))
        return [100 * MiB * s + GiB if s <= 16 else None for s in sizes]

    batch, tried, _, verified = choose_batch(profile, SIZES, 80 * GiB, 0.6)
    assert (batch, verified) == (16, True) and len(calls) == 6  # the profile + 5 tries
    assert choose_batch(lambda sizes: [None] * len(sizes), SIZES, 80 * GiB, 0.6)[::3] == (1, False)


def test_a_resumed_auto_run_keeps_the_batch_it_resolved_and_does_not_profile(caplog, monkeypatch):
    import rtrain.training.autobatch as autobatch

    def no_profiling(*args, **kwargs):
        raise AssertionError("a resumed run profiled again")

    monkeypatch.setattr(autobatch, "auto_batch_size", no_profiling)
    model = build_model("compact_n", 3)
    with caplog.at_level(logging.INFO, logger="rtrain.training.autobatch"):
        assert resolve_batch_size(_cfg(batch_size="auto"), model, "cpu", max_batch=12, resumed=24) == 24
    assert "batch_size auto: 24 per worker, as resolved before the checkpoint" in caplog.text
    # a batch the config names is used as named, whatever the checkpoint ran with
    assert resolve_batch_size(_cfg(batch_size=8), model, "cpu", resumed=24) == 8


def test_auto_is_capped_by_the_images_a_worker_sees(caplog):
    model = build_model("compact_n", 3)
    with caplog.at_level(logging.INFO, logger="rtrain.training.autobatch"):
        assert resolve_batch_size(_cfg(batch_size="auto"), model, "cpu", max_batch=12) == 8
        assert resolve_batch_size(_cfg(batch_size="auto"), model, "cpu", max_batch=5) == 5
        assert resolve_batch_size(_cfg(batch_size="auto"), model, "cpu", max_batch=100) == 16
        assert resolve_batch_size(_cfg(batch_size=32), model, "cpu", max_batch=5) == 32  # as given
    assert caplog.records[0].getMessage().endswith("; 8: capped by the 12 images a worker sees per epoch")


def test_outside_ray_a_worker_has_the_whole_card():
    from rtrain.training.autobatch import _is_oom, gpu_share

    assert gpu_share() == 1.0
    assert _is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not _is_oom(RuntimeError("size mismatch"))
