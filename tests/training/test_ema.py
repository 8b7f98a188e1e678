"""ModelEMA: ramped decay, convergence, buffers, DDP unwrapping, state round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rtrain.training.ema import ModelEMA, unwrap_model


def _net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
        net[1].running_mean.fill_(value)
    return net


def test_one_update_lands_between_with_ramped_decay():
    model = _net(0.0)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1.0))
    w = ema.module[0].weight
    assert torch.allclose(w, torch.full_like(w, 1 - d))  # d * 0 + (1 - d) * 1
    assert 0.0 < float(w[0, 0]) < 1.0
    assert not w.requires_grad and not ema.module.training


def test_converges_to_a_constant_model_and_copies_buffers():
    ema = ModelEMA(_net(0.0), decay=0.9, tau=5.0)
    target = _net(2.0)
    target[1].num_batches_tracked.fill_(7)
    for _ in range(200):
        ema.update(target)
    for name, t in ema.module.state_dict().items():
        assert torch.allclose(t.float(), target.state_dict()[name].float(), atol=1e-6), name
    assert int(ema.module[1].num_batches_tracked) == 7
    assert ema.module[1].running_mean[0] == pytest.approx(2.0, abs=1e-6)


def test_unwraps_wrappers_and_state_round_trip():
    inner = _net(1.0)
    dp = nn.DataParallel(inner)
    assert unwrap_model(dp) is inner
    ema = ModelEMA(dp, decay=0.5, tau=1.0)
    assert set(ema.module.state_dict()) == set(inner.state_dict())  # no "module." prefix
    ema.update(dp)
    ema.update(dp)
    other = ModelEMA(_net(5.0))
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2 and other.decay == 0.5
    assert other.current_decay() == pytest.approx(ema.current_decay())
    assert torch.equal(other.module[0].weight, ema.module[0].weight)


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = _net(3.0)
        ddp = nn.parallel.DistributedDataParallel(inner)
        ema = ModelEMA(ddp, decay=0.5, tau=1.0)
        assert "0.weight" in ema.module.state_dict()
        ema.update(ddp)
        assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 3.0))
    finally:
        dist.destroy_process_group()


def _old_update(ema_module: nn.Module, model: nn.Module, d: float) -> None:
    """The pre-foreach implementation, kept here as the reference formula."""
    src = model.state_dict()
    for name, ema_t in ema_module.state_dict().items():
        new = src[name].detach()
        if ema_t.dtype.is_floating_point:
            ema_t.mul_(d).add_(new.to(ema_t.dtype), alpha=1.0 - d)
        else:
            ema_t.copy_(new)


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
    )


def test_foreach_update_equals_the_old_formula():
    torch.manual_seed(0)
    model = _conv_net()
    ema = ModelEMA(model, decay=0.99, tau=3.0)
    reference = copy.deepcopy(model).eval()
    for step in range(1, 31):
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.dtype.is_floating_point:
                    t.add_(torch.randn_like(t))
            model[1].num_batches_tracked.fill_(step)
        ema.update(model)
        _old_update(reference, model, 0.99 * (1 - math.exp(-step / 3.0)))
    assert ema.updates == 30
    for name, t in ema.module.state_dict().items():
        ref = reference.state_dict()[name]
        assert t.dtype == ref.dtype
        assert torch.allclose(t, ref, rtol=1e-6, atol=1e-6), name
    assert int(ema.module[1].num_batches_tracked) == 30


def test_skipped_update_leaves_the_average_and_count_unchanged():
    model = _conv_net()
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    ema.update(model)
    before = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].num_batches_tracked.fill_(99)
    ema.update(model, skip=torch.tensor(True))
    assert ema.updates == 1
    for name, t in ema.module.state_dict().items():
        assert torch.equal(t, before[name]), name
    ema.update(model, skip=torch.tensor(False))
    assert ema.updates == 2 and int(ema.module[1].num_batches_tracked) == 99
    assert not torch.equal(ema.module[0].weight, before["0.weight"])


def test_tau_for_run_fits_short_and_long_runs():
    assert ModelEMA.tau_for_run(1_000_000) == 2000.0  # long runs: the configured ceiling
    short = ModelEMA.tau_for_run(200)
    assert 20 < short < 100
    # The window at the end of the run is ~20% of it: decay there ~ 1 - 1 / 40.
    ema = ModelEMA(nn.Linear(1, 1), decay=0.9998, tau=short, updates=200)
    assert 0.97 < ema.current_decay() < 0.98
    assert ModelEMA.tau_for_run(3) >= 1.0
    with pytest.raises(ValueError):
        ModelEMA.tau_for_run(0)
    assert ModelEMA.for_run(nn.Linear(1, 1), 200).tau == short
    assert ModelEMA.for_run(nn.Linear(1, 1), 200, tau=7.0).tau == 7.0


def test_a_200_step_run_averages_and_lands_closer_to_the_optimum():
    """Noisy SGD on a quadratic: the fitted EMA averages the noise away; tau=2000 barely averages."""
    g = torch.Generator().manual_seed(0)
    optimum = torch.ones(64)
    model = nn.Linear(64, 1, bias=False).requires_grad_(False)
    nn.init.zeros_(model.weight)
    fitted = ModelEMA(model, decay=0.9998, tau=ModelEMA.tau_for_run(200))
    fixed = ModelEMA(model, decay=0.9998, tau=2000.0)
    for _ in range(200):
        with torch.no_grad():
            grad = model.weight[0] - optimum + torch.randn(64, generator=g)
            model.weight[0] -= 0.1 * grad
        fitted.update(model)
        fixed.update(model)
    assert fitted.current_decay() >= 0.9
    assert fixed.current_decay() < 0.1  # the old fixed ramp: the "average" is the raw weights
    raw_err = float((model.weight[0] - optimum).norm())
    fitted_err = float((fitted.module.weight[0] - optimum).norm())
    fixed_err = float((fixed.module.weight[0] - optimum).norm())
    assert float((fitted.module.weight - model.weight).norm()) > 0.5 * raw_err  # measurably different
    assert fitted_err < 0.5 * raw_err, (fitted_err, raw_err)
    assert fixed_err > 0.8 * raw_err, (fixed_err, raw_err)


def test_copies_and_new_models_do_not_reuse_a_stale_cache():
    import pickle

    model = _net(0.0)
    ema = ModelEMA(model, decay=0.5, tau=1e-9)  # decay 0.5 from the first update
    ema.update(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.fill_(4.0)
    ema.update(twin)  # a different module: its own tensors, not the cached ones of `model`
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 2.0))
    clone = pickle.loads(pickle.dumps(ema))
    clone.update(twin)
    assert torch.allclose(clone.module[0].weight, torch.full((2, 2), 3.0))
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 2.0))  # the copy is independent
