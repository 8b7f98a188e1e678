"""LRSchedule: warm-up then cosine, the time-budget variant, resume of elapsed time."""

from __future__ import annotations

import math

import pytest
import torch

from rtrain.optim import build_optimizer
from rtrain.schedule import LRSchedule, lr_factor, scale_lr


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
