"""Optimizer builder: three param groups so weight decay only touches conv/linear weights.

Decaying BatchNorm scales or biases pulls them towards zero for no benefit and
hurts small models, so:
  "decay"    weights of every non-norm layer       (weight_decay)
  "no_decay" weights of normalisation layers       (0)
  "bias"     every bias                            (0; LRSchedule may warm it up separately)
Each group carries its "name", which `LRSchedule.apply` reads.

The optimizers use torch's fused kernels where every parameter is a float tensor on CPU or CUDA
(`fused=True`): one kernel per step instead of a loop over tensors, and they honour
`optimizer.found_inf` (a device flag, as GradScaler sets it), which lets `rtrain.training.engine` skip a
step on a device-side decision without reading it on the host.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters of `model` split into named groups (see module doc); empty groups dropped."""
    decay, no_decay, bias = [], [], []
    seen: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if pname == "bias":
                bias.append(param)
            elif isinstance(module, _NORM_TYPES) or param.ndim <= 1:
                # 1-d parameters (norm scales, layer-scale gammas) are not weights to shrink.
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "bias", "params": bias, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.937,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """SGD (Nesterov, `momentum`) or AdamW (betas=(momentum, 0.999)) over `param_groups(model)`.

    Pass the unwrapped model or the DDP wrapper: both give the same parameters.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    kernel = {"fused": True} if fusable(params) else {}
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **kernel)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **kernel)


FUSED_DEVICES = ("cpu", "cuda")


def fusable(params: list[torch.Tensor]) -> bool:
    """True when torch's fused SGD/AdamW kernels take all of `params` (float, on CPU or CUDA)."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES and type(p) in (torch.Tensor, nn.Parameter)
        for p in params
    )


def ensure_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Turn the fused kernels back on in an SGD/Adam/AdamW built fused; True when it is fused now.

    `Optimizer.load_state_dict` takes the saved param groups' flags, so a checkpoint written by a
    non-fused optimizer silently turns `fused` off while the optimizer still advertises
    `found_inf` support (and torch's non-fused step then refuses a `found_inf`).
    """
    if not isinstance(optimizer, torch.optim.SGD | torch.optim.Adam | torch.optim.AdamW):
        return False
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    for group in optimizer.param_groups:
        if not group.get("fused"):
            if not fusable(list(group["params"])):
                return False
            group["fused"], group["foreach"] = True, None
    return True
