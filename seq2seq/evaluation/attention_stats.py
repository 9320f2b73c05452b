"""Attention diagnostics: what a model's attention looks like over a whole test set.

From each sentence's attention matrix (output steps x source pieces, the step that writes EOS and
the source's EOS included), measured on the hypotheses the evaluation's own search produced:

- **entropy**: of each step's weights, in nats, averaged over all output steps. 0 is a hard
  alignment to one piece; log(S) is uniform over S pieces.
- **pad mass**: the largest total weight any step put on padded source positions, measured on
  the padded batch itself. It must be exactly 0; anything else is a masking bug.
- **monotonicity**: the share of steps (after the first) whose most-attended source piece is not
  to the left of the previous step's. 1 is a strictly left-to-right reading.
- **coverage deviation**: for each source piece, how far its total attention over the whole
  output is from 1, averaged over the pieces (Tu et al. 2016's coverage). Pieces never attended
  (under-translation) and pieces attended again and again (over-translation) both raise it.

Each is given over the whole set and per source-length bucket (the buckets of BLEU by length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from seq2seq.evaluation.metrics import assign_buckets, bucket_labels, source_length

ATTENTION_KEYS = ("entropy", "pad_mass", "monotonicity", "coverage_deviation")


@dataclass
class AttentionSummary:
    sentences: int
    entropy: float | None  # nats per output step
    pad_mass: float | None  # the largest weight on padding of any step: 0
    monotonicity: float | None  # share of steps whose argmax does not move left
    coverage_deviation: float | None  # mean over source pieces of |total attention - 1|


@dataclass
class AttentionDiagnostics:
    overall: AttentionSummary
    buckets: dict[str, AttentionSummary]  # by source length in words, in order

    def to_dict(self) -> dict:
        return {**asdict(self.overall), "buckets": [{"label": k, **asdict(v)} for k, v in self.buckets.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> AttentionDiagnostics:
        fields = [f for f in AttentionSummary.__dataclass_fields__]
        return cls(AttentionSummary(**{f: d[f] for f in fields}),
                   {b["label"]: AttentionSummary(**{f: b[f] for f in fields}) for b in d["buckets"]})


class _Sums:
    """Running sums over sentences, for one summary."""

    def __init__(self) -> None:
        self.sentences = 0
        self.entropy = 0.0
        self.steps = 0
        self.monotone = 0
        self.moves = 0
        self.coverage = 0.0
        self.pieces = 0
        self.pad_mass = 0.0

    def add(self, weights: torch.Tensor, pad_mass: float) -> None:
        w = weights.double()
        self.sentences += 1
        self.entropy += float(-(w * torch.log(w.clamp_min(1e-30))).sum())
        self.steps += w.size(0)
        best = w.argmax(dim=1)
        self.monotone += int((best[1:] >= best[:-1]).sum())
        self.moves += max(0, w.size(0) - 1)
        self.coverage += float((w.sum(dim=0) - 1.0).abs().sum())
        self.pieces += w.size(1)
        self.pad_mass = max(self.pad_mass, pad_mass)

    def summary(self) -> AttentionSummary:
        if not self.sentences:
            return AttentionSummary(0, None, None, None, None)
        return AttentionSummary(
            sentences=self.sentences,
            entropy=self.entropy / self.steps,
            pad_mass=self.pad_mass,
            monotonicity=self.monotone / self.moves if self.moves else 1.0,
            coverage_deviation=self.coverage / self.pieces,
        )


def diagnose(weights: Sequence[torch.Tensor], pad_mass: Sequence[float], raw_src: Sequence[str],
             edges: list[int]) -> AttentionDiagnostics:
    """Diagnostics of sentences' attention matrices ``weights`` (steps x source pieces, real
    positions only), their measured ``pad_mass`` and their raw source lines (for the buckets)."""
    labels = bucket_labels(edges)
    sums = [_Sums() for _ in labels]
    total = _Sums()
    for w, pad, b in zip(weights, pad_mass, assign_buckets([source_length(s) for s in raw_src], edges), strict=True):
        total.add(w, pad)
        sums[b].add(w, pad)
    return AttentionDiagnostics(total.summary(), {label: s.summary() for label, s in zip(labels, sums)})
