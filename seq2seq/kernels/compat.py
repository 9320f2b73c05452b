"""The private torch APIs the kernels use, each looked up once, with a warning when missing.

The fast engine reaches past torch's public API in four places: ``torch._VF.lstm`` (one direction
of a bidirectional LSTM at inference), oneDNN's weight packing (``torch.ops.mkldnn``), the fused
Adam kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``) and the CPU's bf16 probes
(``torch.cpu._is_amx_tile_supported``). A torch without one of them runs the public-API code for
that piece (the reference path, or a plain loop) and says so once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()


def private(owner: Any, name: str, feature: str, fallback: str) -> Callable[..., Any] | None:
    """``owner.name`` when this torch has it; otherwise None, with one warning naming what runs
    instead."""
    found = getattr(owner, name, None)
    if found is None and feature not in _warned:
        _warned.add(feature)
        log.warning("this torch (%s) has no %s: %s runs %s instead", torch.__version__, name, feature, fallback)
    return found


def vf_lstm() -> Callable[..., Any] | None:
    return private(torch._VF, "lstm", "the encoder's one-call inference", "the step loop")


def mkldnn_packing() -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
    ops = torch.ops.mkldnn
    reorder = private(ops, "_reorder_linear_weight", "search weight packing", "plain matmuls")
    linear = private(ops, "_linear_pointwise", "search weight packing", "plain matmuls")
    return reorder, linear


def fused_adam(decoupled: bool) -> Callable[..., Any] | None:
    name = "_fused_adamw_" if decoupled else "_fused_adam_"
    return private(torch, name, "the fused Adam update", "a per-tensor update")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than float32 ones. Without them
    bf16 is emulated on the CPU and slower than float32. A torch without the probes: False."""
    amx = private(torch.cpu, "_is_amx_tile_supported", "the CPU bf16 probe", "float32 (precision=auto)")
    avx = private(torch.cpu, "_is_avx512_bf16_supported", "the CPU bf16 probe", "float32 (precision=auto)")
    return bool(amx is not None and avx is not None and (amx() or avx()))


@functools.cache
def cpu_runs_bf16_lstm() -> bool:
    """Whether this CPU's oneDNN has a bf16 LSTM: it needs AVX512 (BW,
    VL, DQ), AVX-NE-CONVERT or AMX and raises "could not create a primitive descriptor" otherwise
    (an AMD EPYC without AVX512 does). Found by running a tiny LSTM once, since torch has no probe
    for exactly that. A torch without oneDNN runs bf16 through its own kernels: True."""
    if not torch.backends.mkldnn.is_available():
        return True
    lstm = torch.nn.LSTM(4, 4, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 2, 4))
    except RuntimeError:
        return False
    return True
