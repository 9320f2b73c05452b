"""Self-describing checkpoints: written atomically, loaded safely.

A checkpoint is a dict of tensors and plain Python values: the model, optimizer and scheduler
``state_dict``s, the training position and RNG states, the resolved config and the SentencePiece
model(s), so a model can be rebuilt and used from the file alone. Files are written to a temporary
name, fsynced and renamed, so a crash leaves either the old file or the new one, never half of one.
Loading always uses ``weights_only=True``: a file that carries arbitrary pickled objects is refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from seq2seq.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "seq2seq-checkpoint"
VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, rename, fsync the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects other than tensors and "
                "plain values, which could run code; only load checkpoints written by seq2seq"
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({err}); use another checkpoint") from None
    except Exception as err:  # a corrupt file can make the unpickler raise anything (KeyError...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not isinstance(err, (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError)):
            reason = f"{type(err).__name__}: {reason}"
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({reason[:120]}); use another checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a seq2seq checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                              f"(this seq2seq reads version {VERSION})")
    return payload


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()
