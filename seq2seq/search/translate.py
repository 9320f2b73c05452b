"""Translate many sentences: sort them by length, batch them, decode, return them in input order.

Greedy decoding and beam search stream the batches through ``seq2seq.search.continuous`` (an
ended sentence's place goes to the next one at once). Attention weights, when asked for, come from
a teacher-forced pass over each source and its own output: the same states the search went through.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from seq2seq.core.config import SearchConfig
from seq2seq.data.batching import Batch, collate
from seq2seq.model.engine import Engine
from seq2seq.search.common import SOURCE_MULTIPLE, Hypothesis
from seq2seq.search.continuous import output_width, stream_beam, stream_greedy


def _batches(src_ids: Sequence[Sequence[int]], order: list[int], size: int, device: torch.device
             ) -> Iterator[Batch]:
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        yield collate([src_ids[i] for i in chunk], None, chunk, src_multiple=SOURCE_MULTIPLE).to(device)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


@torch.no_grad()
def translate_ids(engine: Engine, src_ids: Sequence[Sequence[int]], cfg: SearchConfig,
                  device: torch.device, amp_dtype: torch.dtype | None = None, cap: int = 512,
                  keep_attention: bool = False, scored: bool = False) -> list[Hypothesis]:
    """Decode many sentences: sorted by length into batches of ``cfg.batch_size`` (little
    padding), at most ``cfg.batch_size`` decoded at once; results in input order.

    Greedy hypotheses carry their log-probability only with ``scored``: the translation needs
    only the ranking of each step's logits, and their normaliser costs about a tenth of a greedy
    step. Beam search always scores (it ranks by the scores). With ``keep_attention`` each
    hypothesis of an attention model carries its attention weights (``attention_weights``)."""
    engine.model.eval()
    if not src_ids:
        return []
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    results: list[Hypothesis | None] = [None] * len(src_ids)
    batches = _batches(src_ids, order, cfg.batch_size, device)
    # One autocast region and one set of step weights for all batches: every weight is cast to
    # the autocast dtype (and packed, by the fast engine) once per call, not once per batch
    # (autocast caches its casts until the region ends).
    with engine.search_scope(), _autocast(device, amp_dtype):
        weights = engine.search_weights()
        width = output_width(max(len(s) for s in src_ids) + 1, cfg, cap)  # +1: the source's EOS
        stream = (stream_greedy(engine, batches, cfg, weights, cap, width, scored) if cfg.beam_size <= 1
                  else stream_beam(engine, batches, cfg, weights, cap, width))
        for i, hyp in stream:
            results[i] = hyp
    hyps: list[Hypothesis] = results  # type: ignore[assignment]
    if keep_attention:
        attention = attention_weights(engine, src_ids, [h.tokens for h in hyps], device, amp_dtype)
        hyps = [h._replace(attention=a) for h, a in zip(hyps, attention)]
    return hyps


@torch.no_grad()
def attention_weights(engine: Engine, src_ids: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                      device: torch.device, amp_dtype: torch.dtype | None = None, batch_size: int = 64
                      ) -> list[torch.Tensor | None]:
    """The attention of each output step over the source, (len(output) + 1, source length + 1)
    float32 (the rows include the step that writes EOS, the columns the source's EOS), from a
    teacher-forced pass over ``src_ids[i]`` and ``outputs[i]``; None for a model without
    attention. The outputs of a search give the weights that search saw, up to float rounding."""
    return attention_pass(engine, src_ids, outputs, device, amp_dtype, batch_size)[0]


@torch.no_grad()
def attention_pass(engine: Engine, src_ids: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                   device: torch.device, amp_dtype: torch.dtype | None = None, batch_size: int = 64
                   ) -> tuple[list[torch.Tensor | None], list[float]]:
    """``attention_weights``, and for each sentence the largest total weight any of its steps put
    on the padded positions of its batch (which must be 0), measured before cutting them off."""
    engine.model.eval()
    found: list[torch.Tensor | None] = []
    pad_mass: list[float] = []
    with _autocast(device, amp_dtype):
        for start in range(0, len(src_ids), batch_size):
            rows = range(start, min(start + batch_size, len(src_ids)))
            batch = collate([src_ids[i] for i in rows], [outputs[i] for i in rows], rows).to(device)
            weights = engine.forward(batch).attention
            for b in range(len(rows)):
                if weights is None:
                    found.append(None)
                    pad_mass.append(0.0)
                    continue
                steps, width = int(batch.tgt_mask[b].sum()), int(batch.src_lengths[b])
                found.append(weights[b, :steps, :width].float().cpu())
                pad_mass.append(float(weights[b, :steps, width:].float().sum(-1).max()) if steps else 0.0)
    return found, pad_mass
