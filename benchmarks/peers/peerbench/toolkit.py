"""What every toolkit adapter takes and gives: training and decoding specs and outcomes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from peerbench.procs import ProcResult, StepPoint

ATTENTIONS = ("bahdanau", "luong")


@dataclass(frozen=True)
class Workspace:
    """The benchmark's work folder (gitignored): venvs, prepared data, runs and logs."""

    root: Path

    @property
    def venvs(self) -> Path:
        return self.root / "venvs"

    @property
    def corpus(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@dataclass(frozen=True)
class CorpusFiles:
    """The segmented corpus every toolkit reads: ``<prefix>.<lang>`` files of space-separated
    SentencePiece pieces, one vocabulary of pieces, and the raw test references."""

    src_lang: str
    tgt_lang: str
    train: Path  # prefix: train.<src>, train.<tgt>
    valid: Path
    test: Path
    refs: Path  # raw references of the test prefix, one per line
    vocab: Path  # one piece per line, without the SentencePiece specials
    spm_model: Path
    stats: dict = field(default_factory=dict)

    def file(self, prefix: Path, lang: str) -> Path:
        return prefix.with_name(f"{prefix.name}.{lang}")


@dataclass(frozen=True)
class TrainSpec:
    attention: str  # "bahdanau" | "luong"
    steps: int
    threads: int
    seed: int
    batching: str  # "sentences" | "tokens"
    batch_sentences: int
    max_tokens: int
    corpus: CorpusFiles
    run_dir: Path
    log: Path


@dataclass
class TrainOutcome:
    points: list[StepPoint]
    params: int | None
    proc: ProcResult
    model: Path  # what decoding loads: a checkpoint file or a run directory
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeSpec:
    attention: str
    beam: int  # 1 = greedy
    threads: int
    corpus: CorpusFiles
    model: Path
    out: Path  # hypotheses as space-separated pieces, one per line
    log: Path


@dataclass
class DecodeOutcome:
    seconds: float  # decoding only
    timing: str  # how `seconds` was measured
    proc: ProcResult


class Toolkit(ABC):
    """One NMT toolkit: set up once, train a matched model, decode the test set."""

    name: str  # short key used on the command line: ours, joey, onmt
    label: str  # in tables

    def __init__(self, work: Workspace) -> None:
        self.work = work

    @abstractmethod
    def setup(self, log: Path) -> None:
        """Make the toolkit runnable (idempotent). Raises ``BenchError``."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Toolkit and torch versions of the environment it runs in."""

    @abstractmethod
    def train(self, spec: TrainSpec) -> TrainOutcome:
        """Train ``spec.steps`` updates without validation; raises ``BenchError``."""

    @abstractmethod
    def decode(self, spec: DecodeSpec) -> DecodeOutcome:
        """Translate ``spec.corpus.test`` into ``spec.out``; raises ``BenchError``."""
