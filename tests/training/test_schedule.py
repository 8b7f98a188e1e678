"""LRSchedule: warm-up then cosine, the time-budget variant, resume of elapsed time."""

from __future__ import annotations

import math

import pytest
import torch

from rtrain.training.optim import build_optimizer
from rtrain.training.schedule import LRSchedule, lr_factor, scale_lr


def test_lr_factor_numbers():
    # warm-up 10% from 0.1 to 1, then cosine to 0.01
    assert lr_factor(0.0, 0.1, 0.01, 0.1) == pytest.approx(0.1)
    assert lr_factor(0.05, 0.1, 0.01, 0.1) == pytest.approx(0.55)
    assert lr_factor(0.1, 0.1, 0.01, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1, 0.01, 0.1) == pytest.approx(0.01 + 0.99 * 0.5)  # cosine midpoint
    assert lr_factor(1.0, 0.1, 0.01, 0.1) == pytest.approx(0.01)
    assert lr_factor(1.7, 0.1, 0.01, 0.1) == pytest.approx(0.01)  # clamped
    assert lr_factor(0.3, 0.0, 0.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_step_schedule():
    s = LRSchedule(
        base_lr=0.1, total_steps=1000, warmup_steps=100, final_lr_ratio=0.05, warmup_start_ratio=0.0
    )
    assert s.lr_at(0) == pytest.approx(0.0)
    assert s.lr_at(50) == pytest.approx(0.05)
    assert s.lr_at(100) == pytest.approx(0.1)
    assert s.lr_at(550) == pytest.approx(0.1 * (0.05 + 0.95 * 0.5))
    assert s.lr_at(1000) == pytest.approx(0.005)
    lrs = [s.lr_at(i) for i in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone after warm-up
    assert not s.finished(999) and s.finished(1000)


def test_time_budget_takes_over_when_it_runs_out_first():
    s = LRSchedule(base_lr=1.0, total_steps=1000, warmup_steps=0, final_lr_ratio=0.0, time_limit=60.0)
    # 10% of steps but half the time spent: progress 0.5 -> half LR
    assert s.progress(100, elapsed=30.0) == pytest.approx(0.5)
    assert s.lr_at(100, elapsed=30.0) == pytest.approx(0.5)
    # steps ahead of the clock: the step count rules
    assert s.progress(900, elapsed=6.0) == pytest.approx(0.9)
    assert s.finished(10, elapsed=60.0)
    assert s.lr_at(10, elapsed=60.0) == pytest.approx(0.0)


def test_elapsed_time_carries_over_a_resume():
    s = LRSchedule(base_lr=1.0, total_steps=10_000, warmup_steps=0, final_lr_ratio=0.0, time_limit=100.0)
    state = s.state_dict()
    state["elapsed"] = 40.0  # as if 40 s had been spent before the crash
    resumed = LRSchedule(base_lr=1.0, total_steps=10_000, time_limit=100.0)
    resumed.load_state_dict(state)
    assert 40.0 <= resumed.elapsed() < 41.0
    assert resumed.progress(0) == pytest.approx(0.4, abs=0.01)
    again = resumed.state_dict()
    assert again["elapsed"] >= 40.0 and again["time_limit"] == 100.0


def test_apply_sets_groups_and_bias_warmup():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, "sgd", lr=0.01)
    s = LRSchedule(base_lr=0.01, total_steps=100, warmup_steps=10, final_lr_ratio=0.01, warmup_bias_lr=0.1)
    lr = s.apply(opt, 0, elapsed=0.0)
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lr == pytest.approx(0.0) and by_name["decay"] == pytest.approx(0.0)
    assert by_name["bias"] == pytest.approx(0.1)  # biases start high
    s.apply(opt, 5, elapsed=0.0)
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    assert by_name["decay"] == pytest.approx(0.005)
    assert by_name["bias"] == pytest.approx(0.1 + (0.01 - 0.1) * 0.5)
    s.apply(opt, 10, elapsed=0.0)
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)


def test_scale_lr_and_bad_args():
    assert scale_lr(0.01, 256) == pytest.approx(0.04)
    assert scale_lr(0.01, 16, nominal_batch=64) == pytest.approx(0.0025)
    with pytest.raises(ValueError):
        scale_lr(0.01, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(0.1, total_steps=10, warmup_steps=11)


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def _warm_schedule(optimizer: str, **over):
    from rtrain.config import config_from_dict

    train = config_from_dict({"train": {"optimizer": optimizer, "momentum": 0.9, **over}}).train
    return train, LRSchedule.from_config(train, base_lr=0.01, total_steps=100, warmup_steps=10)


def test_sgd_warmup_lr_bias_lr_and_momentum_per_group():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9)
    _, s = _warm_schedule("sgd")  # defaults: start ratio 0.1, bias LR 0.1, momentum 0.8 -> 0.9
    # step 0: weights at 0.1 x peak, biases at the absolute 0.1, momentum 0.8
    assert s.apply(opt, 0, elapsed=0.0) == pytest.approx(0.001)
    g = _groups(opt)
    assert g["decay"]["lr"] == pytest.approx(0.001) and g["no_decay"]["lr"] == pytest.approx(0.001)
    assert g["bias"]["lr"] == pytest.approx(0.1)
    assert all(v["momentum"] == pytest.approx(0.8) for v in g.values())
    # mid warm-up (step 5 of 10): halfway on every line
    s.apply(opt, 5, elapsed=0.0)
    assert g["decay"]["lr"] == pytest.approx(0.001 + (0.01 - 0.001) * 0.5)
    assert g["bias"]["lr"] == pytest.approx(0.1 + (0.01 - 0.1) * 0.5)
    assert all(v["momentum"] == pytest.approx(0.85) for v in g.values())
    # end of warm-up and after: every group on the cosine, momentum at its target
    s.apply(opt, 10, elapsed=0.0)
    assert all(v["lr"] == pytest.approx(0.01) and v["momentum"] == pytest.approx(0.9) for v in g.values())
    s.apply(opt, 55, elapsed=0.0)
    cos_mid = 0.01 * (0.05 + 0.95 * 0.5)
    assert all(v["lr"] == pytest.approx(cos_mid) and v["momentum"] == pytest.approx(0.9) for v in g.values())
    assert all(v["nesterov"] for v in g.values())  # still a valid Nesterov SGD


def test_adamw_warms_beta1_and_caps_the_bias_start_at_the_peak():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, "adamw", lr=0.01, momentum=0.9)
    _, s = _warm_schedule("adamw")
    s.apply(opt, 0, elapsed=0.0)
    g = _groups(opt)
    assert all(v["betas"] == pytest.approx((0.8, 0.999)) for v in g.values())
    assert g["decay"]["lr"] == pytest.approx(0.001)
    assert g["bias"]["lr"] == pytest.approx(0.01)  # min(0.1, peak): no 0.1-sized Adam steps
    s.apply(opt, 5, elapsed=0.0)
    assert g["bias"]["lr"] == pytest.approx(0.01) and g["decay"]["lr"] == pytest.approx(0.0055)
    assert all(v["betas"] == pytest.approx((0.85, 0.999)) for v in g.values())
    s.apply(opt, 10, elapsed=0.0)
    assert all(v["betas"] == pytest.approx((0.9, 0.999)) for v in g.values())
    assert all(v["lr"] == pytest.approx(0.01) for v in g.values())
    # a real step runs with the warmed-up betas (AdamW accepts the tuple the schedule wrote)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()


def test_warmup_switches_off():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.0)
    _, s = _warm_schedule("sgd", momentum=0.0, warmup_bias_lr=0.0, warmup_start_ratio=0.0)
    assert s.warmup_bias_lr is None and s.momentum_at(0) is None
    s.apply(opt, 0, elapsed=0.0)
    g = _groups(opt)
    assert all(v["lr"] == 0.0 and v["momentum"] == 0.0 and not v["nesterov"] for v in g.values())
    s.apply(opt, 5, elapsed=0.0)
    assert g["bias"]["lr"] == pytest.approx(g["decay"]["lr"]) == pytest.approx(0.005)


def test_lr_scaling_linear_for_sgd_sqrt_for_adamw():
    assert scale_lr(0.01, 256, 64, "sgd") == pytest.approx(0.04)
    assert scale_lr(0.01, 256, 64, "adamw") == pytest.approx(0.02)
    assert scale_lr(0.01, 16, 64, "adamw") == pytest.approx(0.005)
    assert scale_lr(0.01, 64, 64, "adamw") == scale_lr(0.01, 64, 64, "sgd") == pytest.approx(0.01)
    assert scale_lr(0.01, 256, 64, "AdamW") == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown optimizer 'lion' for LR scaling"):
        scale_lr(0.01, 64, 64, "lion")


def test_resume_sets_the_same_lr_and_momentum_at_every_step():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    _, s = _warm_schedule("sgd")
    state = s.state_dict()
    # a fresh schedule built with other settings takes the saved ones
    resumed = LRSchedule(base_lr=1.0, total_steps=7)
    resumed.load_state_dict(state)
    a, b = build_optimizer(model, "sgd", lr=0.01), build_optimizer(model, "sgd", lr=0.01)
    for step in range(0, 100, 3):
        s.apply(a, step, elapsed=0.0)
        resumed.apply(b, step, elapsed=0.0)
        for ga, gb in zip(a.param_groups, b.param_groups, strict=True):
            assert (ga["lr"], ga["momentum"]) == (gb["lr"], gb["momentum"])
    assert {k: v for k, v in resumed.state_dict().items() if k != "elapsed"} == {
        k: v for k, v in state.items() if k != "elapsed"
    }


def test_state_saved_before_momentum_warmup_still_loads():
    old = {"base_lr": 0.1, "total_steps": 20, "warmup_steps": 3, "final_lr_ratio": 0.01,
           "warmup_start_ratio": 0.0, "warmup_bias_lr": None, "time_limit": None, "elapsed": 5.0}
    s = LRSchedule(base_lr=0.5, total_steps=10, momentum=0.9, warmup_momentum=0.8)
    s.load_state_dict(old)
    assert s.momentum is None and s.warmup_momentum is None  # that run had no momentum warm-up
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.937)
    s.apply(opt, 0, elapsed=0.0)
    assert all(g["momentum"] == 0.937 and g["lr"] == 0.0 for g in opt.param_groups)
