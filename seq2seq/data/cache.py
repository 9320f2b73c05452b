"""Cache entries that verify themselves.

Every cached artifact (a tokenized split's Arrow file, a SentencePiece model) gets a manifest
beside it, ``<file>.manifest.json``, written after the file itself: its size, its SHA-256 and
what it holds (rows, for a table). A reader trusts the file only when the manifest is there and
matches; anything else (a file cut short, even at a record-batch boundary where Arrow still reads
it as a valid, shorter table; a file swapped for another split's; a manifest from an older
version) is rebuilt, with a warning. Hashing streams the file: a few milliseconds per megabyte.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from seq2seq.core.files import write_text_atomic

log = logging.getLogger(__name__)


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path, **facts: Any) -> None:
    """Record ``path``'s size and hash, and ``facts`` about its content, beside it."""
    record = {"bytes": path.stat().st_size, "sha256": file_digest(path), **facts}
    write_text_atomic(manifest_path(path), json.dumps(record, sort_keys=True) + "\n")


def verified(path: Path, **facts: Any) -> bool:
    """Whether ``path`` is the file its manifest describes, holding ``facts``. A file that
    exists but does not match is reported (the caller rebuilds it)."""
    if not path.is_file():
        return False
    problem = _mismatch(path, facts)
    if problem is not None:
        log.warning("cache entry %s %s; rebuilding it", path, problem)
        return False
    return True


def _mismatch(path: Path, facts: dict[str, Any]) -> str | None:
    try:
        record = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "has no manifest (written by an older version, or interrupted)"
    except (OSError, ValueError) as err:
        return f"has an unreadable manifest ({err})"
    if not isinstance(record, dict):
        return "has an unreadable manifest"
    if record.get("bytes") != path.stat().st_size:
        return f"is {path.stat().st_size} bytes, its manifest says {record.get('bytes')}"
    for key, value in facts.items():
        if record.get(key) != value:
            return f"holds {key}={record.get(key)!r}, expected {value!r}"
    if record.get("sha256") != file_digest(path):
        return "does not match its recorded hash"
    return None


def remove(path: Path) -> None:
    """Drop a cache entry and its manifest."""
    path.unlink(missing_ok=True)
    manifest_path(path).unlink(missing_ok=True)
