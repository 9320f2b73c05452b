"""Keep freed memory in the process while a CPU search runs (glibc's malloc only).

A search step allocates and frees the same few multi-megabyte tensors every step (logits, gate
pre-activations). With glibc's defaults, blocks that size come from fresh ``mmap`` calls, or from
heap memory that ``free`` gave back to the kernel, so the kernel zero-fills and maps them again,
page by page, at every step: on the machines we measured, 130-190 thousand page faults and 10-25%
of a beam-5 decode of the Multi30k test set (docs/results.md). For the duration of a search we
raise the mmap threshold to glibc's ceiling and stop heap trimming, so freed blocks are reused
as they are; afterwards trimming resumes at the level glibc's own heuristic settles on and the
spare memory is returned at once. Elsewhere (another C library) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_CEILING = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
_NO_TRIM = 1 << 30
_TRIM_AFTER = 2 * _MMAP_CEILING  # where glibc's dynamic threshold puts trimming for that ceiling


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    return libc


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Freed blocks stay in the process inside the ``with``; spare memory is returned on exit."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)
    libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
        libc.malloc_trim(0)
