"""Precision: the dtype a `precision` setting means on this machine, and the autocast and loss scaling that go
with it. Shared by training, inference and the tools; knows no model."""

from __future__ import annotations

import torch


def choose_dtype(precision: str, without_bf16: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of `precision`; `auto` is bf16 on GPUs that have it, else `without_bf16`."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else without_bf16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def autocast_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to, or None for none: always None on CPU, where autocast only slows training down."""
    return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def grad_scaler(amp: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, which fp16 needs and bf16 does not."""
    return torch.amp.GradScaler(enabled=amp == torch.float16)
