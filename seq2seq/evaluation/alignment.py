"""Word alignments from attention, and their quality against gold alignments.

Attention is over SentencePiece pieces; alignments are between words. Each target piece is linked
to the source word holding the piece it attends to most (a step that attends most to the
source's EOS links nothing), and a target word is linked to every source word its pieces link to.
Links are written in the Pharaoh format: ``i-j`` joins source word ``i`` and target word ``j``
(0-based), ``i?j`` a possible (not sure) link in a gold file.

Quality (Och & Ney 2003) with sure links S and possible links P (S within P):
precision = |A & P| / |A|, recall = |A & S| / |S|, AER = 1 - (|A & S| + |A & P|) / (|A| + |S|),
summed over a whole test set. With only sure gold links (the synthetic corpus), AER is 1 - F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WORD_START = "\u2581"  # SentencePiece's word-boundary mark

Links = set[tuple[int, int]]


def word_index(pieces: Sequence[str]) -> list[int]:
    """The word each piece belongs to: a piece starting with the boundary mark opens a word."""
    out, word = [], -1
    for k, piece in enumerate(pieces):
        if k == 0 or piece.startswith(WORD_START):
            word += 1
        out.append(word)
    return out


def attention_links(weights: torch.Tensor, src_pieces: Sequence[str], tgt_pieces: Sequence[str]) -> Links:
    """Word links from a sentence's attention (rows: target pieces then EOS; columns: source
    pieces then EOS)."""
    src_word, tgt_word = word_index(src_pieces), word_index(tgt_pieces)
    links: Links = set()
    if not len(src_pieces):
        return links
    best = weights[: len(tgt_pieces), : len(src_pieces) + 1].argmax(dim=1).tolist()
    for t, s in enumerate(best):
        if s < len(src_pieces):
            links.add((src_word[s], tgt_word[t]))
    return links


def format_links(links: Links) -> str:
    return " ".join(f"{i}-{j}" for i, j in sorted(links))


def parse_links(line: str, where: str) -> tuple[Links, Links]:
    """Sure and possible links of one Pharaoh line (``i-j`` sure, ``i?j`` possible; possible
    includes sure). ValueError naming ``where`` for anything else."""
    sure: Links = set()
    possible: Links = set()
    for token in line.split():
        sep = "-" if "-" in token else "?" if "?" in token else None
        left, _, right = token.partition(sep) if sep else ("", "", "")
        if sep is None or not left.isdigit() or not right.isdigit():
            raise ValueError(f"{where}: {token!r} is not an alignment link; write i-j (sure) or i?j (possible) "
                             "with 0-based word positions")
        link = (int(left), int(right))
        possible.add(link)
        if sep == "-":
            sure.add(link)
    return sure, possible


@dataclass
class AlignmentScore:
    sentences: int
    links: int  # predicted
    gold_sure: int
    precision: float
    recall: float
    aer: float


def alignment_score(predicted: Sequence[Links], gold: Sequence[tuple[Links, Links]]) -> AlignmentScore:
    """Corpus-level precision, recall and AER of ``predicted`` against (sure, possible) gold."""
    a = s = a_s = a_p = 0
    for links, (sure, possible) in zip(predicted, gold, strict=True):
        a += len(links)
        s += len(sure)
        a_s += len(links & sure)
        a_p += len(links & possible)
    return AlignmentScore(
        sentences=len(predicted), links=a, gold_sure=s,
        precision=a_p / a if a else 0.0,
        recall=a_s / s if s else 0.0,
        aer=1.0 - (a_s + a_p) / (a + s) if a + s else 0.0,
    )
