"""ModelEMA: ramped decay, convergence, buffers, DDP unwrapping, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtrain.ema import ModelEMA, unwrap_model


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
