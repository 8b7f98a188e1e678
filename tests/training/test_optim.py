"""build_optimizer: param groups without decay on norms/biases, nesterov SGD, AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtrain.training.optim import build_optimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)  # weight + bias
        self.ln = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_sgd_groups_and_nesterov():
    net = _Net()
    opt = build_optimizer(net, "sgd", lr=0.02, momentum=0.9, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.SGD)
    g = _groups(opt)
    ids = {k: {id(p) for p in v["params"]} for k, v in g.items()}
    assert ids["decay"] == {id(net.conv.weight), id(net.head.weight)}
    assert ids["no_decay"] == {id(net.bn.weight), id(net.ln.weight)}
    assert ids["bias"] == {id(net.bn.bias), id(net.head.bias), id(net.ln.bias)}
    assert g["decay"]["weight_decay"] == 1e-4
    assert g["no_decay"]["weight_decay"] == 0.0 and g["bias"]["weight_decay"] == 0.0
    assert all(v["nesterov"] and v["momentum"] == 0.9 and v["lr"] == 0.02 for v in g.values())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for v in g.values() for p in v["params"]) == trainable


def test_weight_decay_only_shrinks_decay_group():
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    opt = build_optimizer(net, "adamw", lr=0.1, momentum=0.9, weight_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.999)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay moves weights
    opt.step()
    after = dict(net.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name])


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose one of: sgd, adamw"):
        build_optimizer(_Net(), "lion")


def test_every_bias_of_the_detector_is_in_the_bias_group_the_schedule_warms():
    from rtrain.models import build_model

    model = build_model("compact_n", 3)
    g = _groups(build_optimizer(model, "sgd"))
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    assert biases and {id(p) for p in g["bias"]["params"]} == biases
    assert not biases & {id(p) for k in ("decay", "no_decay") for p in g[k]["params"]}
