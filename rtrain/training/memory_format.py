"""The memory format training runs in: the layout of the model's 4-D weights and of each input batch.

`train.memory_format` is "contiguous" (NCHW), "channels_last" (NHWC) or "auto": channels_last on
CPU, where oneDNN runs the detector's depthwise and pointwise convolutions without reordering
each activation (benchmarks/memory_format.py measures the step both ways), contiguous on CUDA
until a GPU run measures it there.

Contracts:
- `to_memory_format(model, fmt)` re-lays every 4-D parameter and buffer in place (the same
  Parameter objects, so an optimizer built before or after sees them) and returns the model.
  Shapes, values and `state_dict()` keys are unchanged: a checkpoint written in either format
  loads into a model in the other (`load_state_dict` copies values, not strides).
- `match_optimizer_state(optimizer)`: after `optimizer.load_state_dict`, every state tensor with
  its parameter's shape takes the parameter's strides (fused/foreach kernels want them equal).
- The engine converts the batch on the device, in the same copy that makes it float
  (`rtrain.precision.images_to_float`), so the input costs no extra pass.
- Weights files (`best.pt`/`last.pt`) are written contiguous (`contiguous_state`), the layout
  every exporter and reader expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

MemoryFormat = Literal["auto", "contiguous", "channels_last"]
_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def resolve(setting: MemoryFormat, device: torch.device | str) -> torch.memory_format:
    """The torch memory format for a `train.memory_format` setting on `device`."""
    if setting == "auto":
        return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format
    try:
        return _FORMATS[setting]
    except KeyError:
        raise ValueError(f"memory format: expected auto, contiguous or channels_last, "
                         f"got {setting!r}") from None


def name(fmt: torch.memory_format) -> str:
    return "channels_last" if fmt == torch.channels_last else "contiguous"


def to_memory_format(model: torch.nn.Module, fmt: torch.memory_format) -> torch.nn.Module:
    """Re-lay the 4-D parameters and buffers of `model` in `fmt`, in place; returns `model`."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=fmt)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None and buf.dim() == 4:
                    module._buffers[key] = buf.contiguous(memory_format=fmt)
    return model


def match_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (momentum, Adam moments) its parameter's strides."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if (torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def contiguous_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with every tensor in the standard (contiguous) layout; already-contiguous
    tensors are not copied."""
    return {k: v.contiguous() if torch.is_tensor(v) else v for k, v in state_dict.items()}
