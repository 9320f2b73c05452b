"""Keep freed memory in the process instead of handing it back to the kernel (glibc, Linux).

A training step allocates and frees the same large buffers every time: bf16 copies of the
weights, logits chunks, gradients. glibc serves every block over its mmap threshold with a fresh
mmap and unmaps it on free, and trims the top of the heap once enough of it is free, so the next
step's buffers are new pages again, each costing a page fault on first touch. On this project's
CPU machines (virtual machines, where a fault costs several microseconds) that was ~160k faults
per 10 s of training. Raising the mmap threshold to its maximum (32 MB) and never trimming makes
the heap keep and reuse those blocks; peak memory stays the same, since the blocks were all live
at the peak anyway.

This changes process-wide malloc settings, so the package's entry points call it (training, and
loading a model for evaluation or translation), never an import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX_THRESHOLD = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit
_NEVER_TRIM = 2**31 - 1

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; False where there is no glibc (macOS, musl)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping the defaults")
    _done = ok
    return ok
