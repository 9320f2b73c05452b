"""Translate many sentences: sort them by length, batch them, decode, return them in input order.

Greedy decoding and beam search stream the batches through ``seq2seq.continuous`` (an ended
sentence's place goes to the next one at once); greedy decoding that keeps attention weights
decodes batch by batch (``search.decode``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from seq2seq.batching import Batch, collate
from seq2seq.config import SearchConfig
from seq2seq.continuous import output_width, stream_beam, stream_greedy
from seq2seq.heap import retained_heap
from seq2seq.model import Seq2Seq
from seq2seq.search import SOURCE_MULTIPLE, Hypothesis, decode


def _batches(src_ids: Sequence[Sequence[int]], order: list[int], size: int, device: torch.device
             ) -> Iterator[Batch]:
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        yield collate([src_ids[i] for i in chunk], None, chunk, src_multiple=SOURCE_MULTIPLE).to(device)


@torch.no_grad()
def translate_ids(model: Seq2Seq, src_ids: Sequence[Sequence[int]], cfg: SearchConfig,
                  device: torch.device, amp_dtype: torch.dtype | None = None, cap: int = 512,
                  keep_attention: bool = False, scored: bool = False) -> list[Hypothesis]:
    """Decode many sentences: sorted by length into batches of ``cfg.batch_size`` (little
    padding), at most ``cfg.batch_size`` decoded at once; results in input order.

    Greedy hypotheses carry their log-probability only with ``scored`` (or ``keep_attention``):
    the translation needs only the ranking of each step's logits, and their normaliser costs about
    a tenth of a greedy step. Beam search always scores (it ranks by the scores)."""
    model.eval()
    if not src_ids:
        return []
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    results: list[Hypothesis | None] = [None] * len(src_ids)
    batches = _batches(src_ids, order, cfg.batch_size, device)
    # One autocast region and one set of step weights for all batches: every weight is cast to
    # the autocast dtype (and packed, on the CPU) once per call, not once per batch (autocast
    # caches its casts until the region ends).
    with (retained_heap() if device.type == "cpu" else contextlib.nullcontext(),
          torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)):
        weights = model.step_weights()
        if not keep_attention:
            width = output_width(max(len(s) for s in src_ids) + 1, cfg, cap)  # +1: the source's EOS
            stream = (stream_greedy(model, batches, cfg, weights, cap, width, scored) if cfg.beam_size <= 1
                      else stream_beam(model, batches, cfg, weights, cap, width))
            for i, hyp in stream:
                results[i] = hyp
        else:
            for batch in batches:
                hyps = decode(model, batch, cfg, cap, keep_attention, weights)
                for i, hyp in zip(batch.indices.tolist(), hyps):
                    results[i] = hyp
    return results  # type: ignore[return-value]
