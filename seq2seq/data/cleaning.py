"""Cleaning a loaded corpus: normalise every split, filter the training split only.

An evaluation line is never dropped: test sets are scored on every line. ``fingerprint`` hashes
split contents, so caches are keyed by text rather than by file names.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from seq2seq.core.config import DataConfig
from seq2seq.core.errors import DataError

log = logging.getLogger(__name__)

# Bytes 0x80-0x9F decoded as Latin-1 instead of Windows-1252 turn quotes, dashes and ellipses into
# C1 control characters (SOURCES.md: news-test2008). Map them back to what the writer meant.
_C1_REPAIR = {
    chr(b): bytes([b]).decode("cp1252") for b in range(0x80, 0xA0) if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
}
_C1_RE = re.compile("[\x80-\x9f]")
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")
_SPACE_RE = re.compile(r"\s+")


def normalize(text: str) -> tuple[str, bool]:
    """NFC, C1 repair, control-character removal and whitespace collapsing.

    Returns the text and whether a C1 character was repaired.
    """
    repaired = False
    if _C1_RE.search(text):
        text = _C1_RE.sub(lambda m: _C1_REPAIR.get(m.group(), ""), text)
        repaired = True
    text = _CONTROL_RE.sub("", text)
    text = _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return text, repaired


@dataclass
class CleaningStats:
    pairs: int = 0
    changed: int = 0  # lines altered by normalisation
    c1_repaired: int = 0
    dropped_empty: int = 0
    dropped_long: int = 0
    dropped_ratio: int = 0

    @property
    def kept(self) -> int:
        return self.pairs - self.dropped_empty - self.dropped_long - self.dropped_ratio


def clean_split(ds: Dataset, filter_pairs: bool, max_len: int, max_ratio: float) -> tuple[Dataset, CleaningStats]:
    stats = CleaningStats(pairs=len(ds))
    out_src, out_tgt, out_line, out_raw_src, out_ref = [], [], [], [], []
    table = ds.select_columns(["src", "tgt", "line"])[:]  # one read: iterating a Column is slow
    for src, tgt, line in zip(table["src"], table["tgt"], table["line"]):
        clean_src, rep_s = normalize(src)
        clean_tgt, rep_t = normalize(tgt)
        stats.changed += (clean_src != src) + (clean_tgt != tgt)
        stats.c1_repaired += rep_s + rep_t
        if filter_pairs:
            n_src, n_tgt = len(clean_src.split()), len(clean_tgt.split())
            if n_src == 0 or n_tgt == 0:
                stats.dropped_empty += 1
                continue
            if max(n_src, n_tgt) > max_len:
                stats.dropped_long += 1
                continue
            if max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio:
                stats.dropped_ratio += 1
                continue
        out_src.append(clean_src)
        out_tgt.append(clean_tgt)
        out_line.append(line)
        out_raw_src.append(src)
        out_ref.append(tgt)
    # raw_src / ref keep the text as it was: evaluation scores against raw references.
    columns = {"src": out_src, "tgt": out_tgt, "line": out_line, "raw_src": out_raw_src, "ref": out_ref}
    if not filter_pairs:  # every row kept: a corpus's other columns (gold alignments) stay aligned
        columns.update({c: ds[c] for c in ds.column_names if c not in ("src", "tgt", "line")})
    return Dataset.from_dict(columns), stats


def clean_corpus(raw: DatasetDict, cfg: DataConfig) -> DatasetDict:
    """Normalise every split; filter the training split only, logging what was dropped."""
    cleaned = {}
    for split, ds in raw.items():
        is_train = split == cfg.train_split
        cleaned[split], st = clean_split(ds, is_train, cfg.max_len, cfg.max_len_ratio)
        log.info(
            "%s/%s: %d pairs, %d lines normalised, %d C1 characters repaired%s",
            cfg.corpus, split, st.pairs, st.changed, st.c1_repaired,
            f"; dropped {st.dropped_empty} empty, {st.dropped_long} longer than "
            f"{cfg.max_len} words, {st.dropped_ratio} with length ratio > {cfg.max_len_ratio:g}; "
            f"kept {st.kept}" if is_train else "; nothing dropped (evaluation split)",
        )
        if is_train and st.kept == 0:
            raise DataError(
                f"corpus '{cfg.corpus}' split '{split}': every pair was dropped by cleaning "
                "(empty, too long or extreme length ratio); check data.max_len and "
                "data.max_len_ratio"
            )
    return DatasetDict(cleaned)


def fingerprint(ds: Dataset, columns: tuple[str, ...] = ("src", "tgt")) -> str:
    """A hash of a split's text, so caches are keyed by contents rather than by file names.

    The default (cleaned ``src`` and ``tgt``) keys what a tokenizer is trained on; a cache that
    also stores ``raw_src``, ``ref`` and ``line`` must hash those too, or an edit that cleaning
    undoes (spacing, a C1 quote) would be served stale.
    """
    h = hashlib.sha256()
    table = ds.select_columns(list(columns))[:]  # one read: iterating a datasets Column is slow
    for row in zip(*(table[c] for c in columns)):
        h.update("\t".join(map(str, row)).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
