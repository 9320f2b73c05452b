"""Atomic file writes: a crash or a concurrent reader sees the old file or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: Path) -> tuple[int, str]:
    """A unique temporary file next to ``path`` with the permissions a plain ``open`` would give
    (``mkstemp`` makes it owner-only, which would leave reports and checkpoints unreadable to others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def make_writable_dir(folder: Path) -> None:
    """Create ``folder`` (and its parents) if need be and prove it takes a new file; raises the
    ``OSError`` that says why not (callers turn it into their own one-line error)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a unique temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text with ``\\n`` line endings on every platform."""
    write_bytes_atomic(path, text.encode("utf-8"))
