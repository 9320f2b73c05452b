"""Length-bucketed token batches: the sampler, the padded ``Batch``, and the collate function.

Sentences of similar length share a batch, so little compute goes to padding, and each batch is
capped by ``max_tokens`` counted *with* padding (sentences x longest side, +1 for BOS/EOS).
The sampler is a pure function of (seed, epoch): resuming at (epoch, position) reproduces the
exact batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


class Batch(NamedTuple):
    """A padded batch; B batch, S source length (+EOS), T target length (+BOS/EOS)."""

    src: torch.Tensor  # (B, S) source ids followed by EOS, then PAD
    src_lengths: torch.Tensor  # (B,) int64 on the CPU, as pack_padded_sequence wants
    src_mask: torch.Tensor  # (B, S) True at real tokens
    tgt_in: torch.Tensor  # (B, T) BOS + target ids, then PAD
    tgt_out: torch.Tensor  # (B, T) target ids + EOS, then PAD
    tgt_mask: torch.Tensor  # (B, T) True at real tokens
    indices: torch.Tensor  # (B,) row numbers in the dataset, to restore order

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device, non_blocking=True) for k, v in self._asdict().items() if k != "src_lengths"}
        return Batch(src_lengths=self.src_lengths, **moved)

    @property
    def num_tgt_tokens(self) -> int:
        return int(self.tgt_mask.sum())


class TokenIds(Sequence[np.ndarray]):
    """Token id sequences stored flat: one integer array and the offsets where each sequence
    starts. A list of lists of Python ints costs about 36 bytes per token (an object and a pointer
    each); this costs 4 to 8, which for a training set is tens of MB less resident memory."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(values):
            raise ValueError("offsets must run from 0 to len(values)")
        self.values = values
        self.offsets = offsets.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]  # one sequence; slices are not needed
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _pad(seqs: Sequence[Sequence[int]], prefix: list[int], suffix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) rows of prefix + sequence + suffix, then PAD; and the lengths. One scatter for the
    whole batch (the sequences may be lists or integer arrays)."""
    rows = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    body = np.array([len(r) for r in rows], dtype=np.int64)
    lengths = body + len(prefix) + len(suffix)
    out = np.full((len(rows), int(lengths.max(initial=0))), PAD_ID, dtype=np.int64)
    out[:, : len(prefix)] = prefix
    if rows and body.sum():
        starts = np.cumsum(body) - body
        row_of = np.repeat(np.arange(len(rows)), body)
        col_of = np.arange(int(body.sum())) - np.repeat(starts, body) + len(prefix)
        out[row_of, col_of] = np.concatenate(rows)
    for k, token in enumerate(suffix):
        out[np.arange(len(rows)), body + len(prefix) + k] = token
    return torch.from_numpy(out), torch.from_numpy(lengths)


def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]] | None,
            indices: Sequence[int], src_multiple: int = 1) -> Batch:
    """Pad a list of examples into a ``Batch``. ``tgt_ids`` may be None when only translating.
    ``src_multiple``: pad the source width up to a multiple of it (search uses this so that the
    attention matmuls meet a few widths, not one per batch: seq2seq/kernels/shapes.py)."""
    src, src_len = _pad(src_ids, [], [EOS_ID])
    extra = -src.size(1) % src_multiple
    if extra:
        src = torch.nn.functional.pad(src, (0, extra), value=PAD_ID)
    if tgt_ids is None:
        tgt_ids = [[] for _ in src_ids]
    tgt_in, _ = _pad(tgt_ids, [BOS_ID], [])
    tgt_out, _ = _pad(tgt_ids, [], [EOS_ID])
    return Batch(
        src=src,
        src_lengths=src_len,
        src_mask=src != PAD_ID,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        tgt_mask=tgt_out != PAD_ID,
        indices=torch.tensor(list(indices), dtype=torch.long),
    )


class TokenBatchSampler:
    """Batches of dataset indices grouped by length and capped by ``max_tokens`` with padding.

    Each epoch: order the examples by (source length, target length) with ties broken by a
    seeded random key, cut that order into batches greedily under the token cap, then shuffle
    the batch order. Both steps depend only on ``seed`` and the epoch number.
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int,
                 max_sentences: int, seed: int, shuffle: bool = True) -> None:
        if len(src_lengths) != len(tgt_lengths):
            raise ValueError("source and target length lists differ in size")
        # +1: EOS on the source, BOS or EOS on the target
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64) + 1
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64) + 1
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.batches(0))

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.src_lengths)
        rng = np.random.default_rng([self.seed, epoch])
        tiebreak = rng.permutation(n) if self.shuffle else np.arange(n)
        order = np.lexsort((tiebreak, self.tgt_lengths, self.src_lengths))
        width = np.maximum(self.src_lengths, self.tgt_lengths)[order]
        batches: list[list[int]] = []
        start, longest = 0, 0
        for i in range(n):
            longest_with_i = max(longest, int(width[i]))
            size = i - start + 1
            if i > start and (size * longest_with_i > self.max_tokens or size > self.max_sentences):
                batches.append(order[start:i].tolist())
                start, longest_with_i = i, int(width[i])
            longest = longest_with_i
        if n:
            batches.append(order[start:n].tolist())
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[j] for j in perm]
        return batches

    def over_cap(self) -> tuple[int, int]:
        """How many examples are longer alone than ``max_tokens`` allows (each gets a batch of its
        own, over the cap), and the longest one's width in tokens."""
        width = np.maximum(self.src_lengths, self.tgt_lengths)
        return int((width > self.max_tokens).sum()), int(width.max(initial=0))

    def iterate(self, epoch: int, start: int = 0, world_size: int = 1, rank: int = 0) -> Iterator[list[int]]:
        """The batches of ``epoch`` from position ``start`` on (for exact resume). With several
        ranks the epoch's batches are dealt out in turn, the same number to each: update ``i``
        takes batches ``i * world_size ... i * world_size + world_size - 1``, one per rank, and
        ``start`` counts updates. The ``len % world_size`` batches left at the end of the
        shuffled order wait for another epoch (a different few each epoch)."""
        batches = self.batches(epoch)
        per_rank = len(batches) // world_size
        yield from batches[rank : per_rank * world_size : world_size][start:]

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of source+target positions that are padding in this epoch's batches."""
        real = padded = 0
        for b in self.batches(epoch):
            s, t = self.src_lengths[b], self.tgt_lengths[b]
            real += int(s.sum() + t.sum())
            padded += len(b) * int(s.max() + t.max())
        return 1.0 - real / padded if padded else 0.0
