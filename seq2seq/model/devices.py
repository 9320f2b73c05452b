"""Where a model runs and in which precision, from the ``device`` and ``precision`` keys."""

from __future__ import annotations

import logging

import torch

from seq2seq.core.config import Device, Precision
from seq2seq.core.errors import ConfigError
from seq2seq.kernels.compat import cpu_has_native_bf16, cpu_runs_bf16_lstm

log = logging.getLogger(__name__)


def resolve_device(requested: Device, key: str = "trainer.device") -> torch.device:
    if requested == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available; use {key}=auto or cpu")
    if requested == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def check_num_threads(num_threads: int, key: str) -> None:
    """A thread count key (``trainer.num_threads``, ``num_threads``): 0 for every core, or positive."""
    if num_threads < 0:
        raise ConfigError(f"{key} must be 0 (all cores) or positive (got {num_threads})")


def set_cpu_threads(num_threads: int, key: str) -> None:
    """Use ``num_threads`` CPU threads for torch (0: leave torch's default, every core).
    Checked before any work, so a bad value fails with the key's name."""
    check_num_threads(num_threads, key)
    if num_threads:
        torch.set_num_threads(num_threads)


def autocast_dtype(precision: Precision, device: torch.device, saved: bool = False) -> torch.dtype | None:
    """``auto``: bf16 autocast on CUDA and on CPUs with native bf16 (float32 master weights,
    float32 non-linearities and cell state); float32 elsewhere. ``fp32``/``bf16`` force one.

    ``bf16`` on a CPU whose oneDNN has no bf16 LSTM is refused (``ConfigError``);
    for a ``saved`` config (a run trained elsewhere, evaluated here) it is float32 instead, with
    a warning: float32 is the more precise of the two."""
    if precision == Precision.bf16:
        if device.type == "cpu" and not cpu_runs_bf16_lstm():
            if saved:
                log.warning("trainer.precision=bf16 (the run's config): this CPU has no bf16 LSTM in "
                            "oneDNN; evaluating in float32")
                return None
            raise ConfigError("trainer.precision=bf16: this CPU cannot run the LSTM in bf16 (oneDNN needs "
                              "AVX512, AVX-NE-CONVERT or AMX); use trainer.precision=auto (float32 here) or fp32")
        return torch.bfloat16
    if precision == Precision.auto and (device.type == "cuda" or cpu_has_native_bf16()):
        return torch.bfloat16
    return None
