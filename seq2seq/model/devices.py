"""Where a model runs and in which precision, from the ``device`` and ``precision`` keys."""

from __future__ import annotations

import torch

from seq2seq.core.config import Device, Precision
from seq2seq.core.errors import ConfigError
from seq2seq.kernels.compat import cpu_has_native_bf16


def resolve_device(requested: Device, key: str = "trainer.device") -> torch.device:
    if requested == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available; use {key}=auto or cpu")
    if requested == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 autocast on CUDA and on CPUs with native bf16 (float32 master weights,
    float32 non-linearities and cell state); float32 elsewhere. ``fp32``/``bf16`` force one."""
    if precision == Precision.bf16:
        return torch.bfloat16
    if precision == Precision.auto and (device.type == "cuda" or cpu_has_native_bf16()):
        return torch.bfloat16
    return None
