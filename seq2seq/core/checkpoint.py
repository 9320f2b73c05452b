"""Self-describing checkpoints: written atomically, loaded safely.

A checkpoint is a dict of tensors and plain Python values: the model, optimizer and scheduler
``state_dict``s, the training position and RNG states, the resolved config and the SentencePiece
model(s), so a model can be rebuilt and used from the file alone. Files are written to a temporary
name, fsynced and renamed, so a crash leaves either the old file or the new one, never half of one.
Loading always uses ``weights_only=True``: a file that carries arbitrary pickled objects is refused.

A training run keeps its checkpoints in one folder: ``step-<N>.pt`` for the newest
``keep`` saves, ``last.pt`` and ``best.pt`` as hard links to one of them (no extra disk), so a
corrupt ``last.pt`` can fall back to the previous good step file.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from seq2seq.core.errors import CheckpointError
from seq2seq.core.files import temp_beside

log = logging.getLogger(__name__)

FORMAT = "seq2seq-checkpoint"
VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, rename, fsync the folder)."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def link_checkpoint(source: Path, path: Path) -> None:
    """Point ``path`` at ``source``'s bytes atomically: a hard link, or a copy where links fail."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links: an atomic copy instead
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    tmp.unlink(missing_ok=True)  # rename is a no-op when both names already share the file
    _fsync_dir(path.parent)


STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def step_checkpoints(directory: Path) -> list[Path]:
    """The ``step-<N>.pt`` files in ``directory``, newest (highest N) first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def step_of(path: Path) -> int:
    """N of a ``step-<N>.pt`` file."""
    m = STEP_FILE.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not a step-<N>.pt file")
    return int(m.group(1))


def save_step_checkpoint(payload: dict[str, Any], directory: Path, step: int, keep: int,
                         also: tuple[str, ...] = ("last",), protect: Collection[int] = ()) -> Path:
    """Write ``step-<step>.pt``, point ``last.pt`` (and ``also``) at it, keep the newest ``keep``
    step files and those of the steps in ``protect``."""
    path = directory / f"step-{step}.pt"
    save_checkpoint(payload, path)
    for name in also:
        link_checkpoint(path, directory / f"{name}.pt")
    for old in step_checkpoints(directory)[keep:]:
        if step_of(old) not in protect:
            old.unlink(missing_ok=True)  # best.pt/last.pt keep their own link to the bytes
    return path


def remove_partial_writes(directory: Path) -> None:
    """Delete temp files a killed process left half-written (their final names were never replaced)."""
    if directory.is_dir():
        for path in directory.glob(".*.pt.*"):
            if path.suffix in (".tmp", ".link"):
                path.unlink(missing_ok=True)


def load_latest(directory: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]]:
    """``last.pt``, or when it is unreadable the newest good ``step-<N>.pt``, with a warning for each bad one."""
    candidates = [directory / "last.pt", *step_checkpoints(directory)]
    errors = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            payload = load_checkpoint(path, map_location)
        except CheckpointError as err:
            log.warning("%s; trying an older checkpoint", err)
            errors.append(str(err))
            continue
        if errors:
            log.warning("resuming from %s, the newest readable checkpoint", path)
        return path, payload
    if errors:
        raise CheckpointError(f"no readable checkpoint in {directory}: {errors[0]}")
    raise CheckpointError(f"{directory / 'last.pt'}: no such checkpoint file")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe unpickler stopped: at an importable object (code could run) or at bytes that are
        # no pickle it accepts (corruption, or an old/foreign format). Neither is loaded.
        if "global" in str(err).lower():
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects other than tensors and "
                "plain values, which could run code; only load checkpoints written by seq2seq"
            ) from None
        detail = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in detail if "unsupported" in ln.lower()), detail[0] if detail else "unreadable")
        raise CheckpointError(f"{path}: refused to load: corrupt, or not a checkpoint written by seq2seq "
                              f"({reason[:80]}); use another checkpoint") from None
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
