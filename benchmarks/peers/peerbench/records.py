"""The benchmark's settings and the records of its training and decoding runs (JSON-ready)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Settings:
    data_root: Path
    work: Path
    results: Path
    steps: int = 300
    repeats: int = 3
    decode_repeats: int = 3
    threads: int = 2
    toolkits: list[str] = field(default_factory=lambda: ["ours", "joey", "onmt"])
    attentions: list[str] = field(default_factory=lambda: ["bahdanau", "luong"])
    batching: str = "sentences"
    batch_sentences: int = 64
    max_tokens: int = 1024
    warmup: float = 0.1
    beam: int = 5
    limit: int | None = None
    seed: int = 1234
    ours_overrides: list[str] = field(default_factory=list)
    decode: bool = True
    keep_checkpoints: bool = False

    @property
    def warmup_steps(self) -> int:
        return max(1, math.ceil(self.warmup * self.steps))


@dataclass
class TrainRecord:
    toolkit: str
    attention: str
    repeat: int
    error: str | None = None
    tokens_per_s: float | None = None
    window: dict | None = None
    params: int | None = None
    peak_rss_mb: float | None = None
    wall_s: float | None = None
    first_update_s: float | None = None  # launch to the end of update 1 (start-up + one update)
    log: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class DecodeRecord:
    toolkit: str
    attention: str
    search: str
    error: str | None = None
    repeat: int = 1
    sentences: int | None = None
    seconds: float | None = None
    sent_per_s: float | None = None
    tokens: int | None = None
    tok_per_s: float | None = None
    bleu: float | None = None
    chrf: float | None = None
    bleu_signature: str | None = None
    timing: str | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    hyps: str = ""
    log: str = ""
