"""Numeric precision on a device: the autocast dtype, the grad scaler, uint8 images to float.

bf16 autocast on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU. Images
arrive as the batch layout's uint8 [B, 3, S, S] and become float 0..1 on the device here.
"""

from __future__ import annotations

import contextlib

import torch


def amp_dtype(device: torch.device | str, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 on GPUs that support it, else fp16; None on CPU/off."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_grad_scaler(device: torch.device | str, enabled: bool = True) -> torch.amp.GradScaler | None:
    """A GradScaler only when autocast runs in fp16 (bf16 and fp32 need none)."""
    if amp_dtype(device, enabled) is torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def images_to_float(images: torch.Tensor, device: torch.device,
                    memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 0..1 on `device` (the conversion happens on the device), laid
    out in `memory_format` by the same copy (the input's layout by default)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.to(torch.float32, memory_format=memory_format).div_(255.0)
    return images.to(torch.float32, memory_format=memory_format)
