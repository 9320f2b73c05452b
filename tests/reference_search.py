"""Greedy and beam search one batch at a time, the plain way: the reference the package's
continuous-batching searches (``seq2seq.search.continuous``) are tested against. Not a test module.

Beam search keeps a (B, K) beam per sentence in one tensor and handles finished hypotheses with
masks. A sentence stops when its best-scoring candidate ends the sentence (so beam size 1 is
exactly greedy decoding) or when it reaches its length cap.
"""

from __future__ import annotations

from typing import Any

import torch

from seq2seq.core.config import SearchConfig
from seq2seq.data.batching import Batch
from seq2seq.data.tokenizer import BOS_ID, EOS_ID
from seq2seq.model.engine import Engine
from seq2seq.search.common import Hypothesis, compact_to, kept_rows, length_penalty, max_lengths
from seq2seq.search.stepscores import beam_candidates, greedy_choice


@torch.no_grad()
def greedy_search(engine: Engine, batch: Batch, cfg: SearchConfig, cap: int = 512,
                  keep_attention: bool = False, weights: Any = None) -> list[Hypothesis]:
    device = batch.src.device
    encoded = engine.encode(batch.src, batch.src_lengths, batch.src_mask)
    state, memory = encoded.state, encoded.memory
    step_weights = weights if weights is not None else engine.search_weights()
    b = batch.src.size(0)
    limits = max_lengths(batch.src_lengths, cfg, cap).to(device)
    steps = int(limits.max())
    rows = torch.arange(b, device=device)  # the batch rows still being decoded
    limit = limits  # their length caps
    prev = torch.full((b,), BOS_ID, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # among ``rows``
    lengths = limits.clone()  # output length incl. EOS; replaced when EOS is produced
    score = torch.zeros(b, device=device)
    tokens = torch.full((b, steps), EOS_ID, dtype=torch.long, device=device)
    attn = batch.src.new_zeros((b, steps, batch.src.size(1)), dtype=torch.float) if keep_attention else None
    first_cap = int(limit.min())  # known on the host: no per-step check until a row reaches it
    for t in range(steps):
        out = engine.decode_step(prev, state, memory, step_weights)
        step_score, prev = greedy_choice(out.logits, (t + 1) >= limit if t + 1 >= first_cap else None)
        score.index_add_(0, rows, torch.where(finished, 0.0, step_score))
        newly = (prev == EOS_ID) & ~finished
        lengths[rows] = torch.where(newly, t + 1, lengths[rows])
        finished |= newly
        tokens[rows, t] = prev
        if attn is not None and out.attention is not None:
            attn[rows, t] = out.attention.float()
        state = out.state
        # One host sync per step: stop when every sentence has ended, compact when many have.
        done = int(finished.sum())
        if done == rows.numel():
            break
        count = compact_to(done, rows.numel())
        if count < rows.numel():
            keep = kept_rows(finished, count)
            rows, limit, prev, finished = rows[keep], limit[keep], prev[keep], finished[keep]
            first_cap = int(limit.min())
            state, memory = state.select(keep), memory.select(keep)
    all_tokens = tokens.tolist()
    src_len = batch.src_lengths.tolist()
    hyps = []
    for i, n in enumerate(lengths.tolist()):
        seq = all_tokens[i][: n - 1]  # the first EOS is at position n - 1
        a = attn[i, :n, : src_len[i]].cpu() if attn is not None and out.attention is not None else None
        hyps.append(Hypothesis(tokens=seq, score=float(score[i]), attention=a))
    return hyps


@torch.no_grad()
def beam_search(engine: Engine, batch: Batch, cfg: SearchConfig, cap: int = 512,
                weights: Any = None) -> list[Hypothesis]:
    k = cfg.beam_size
    device = batch.src.device
    b = batch.src.size(0)
    encoded = engine.encode(batch.src, batch.src_lengths, batch.src_mask)
    step_weights = weights if weights is not None else engine.search_weights()
    # The state has a row per beam (B*K); the memory stays one row per sentence, which its K beams
    # share (the decoder attends with K queries per memory row).
    state = encoded.state.select(torch.arange(b, device=device).repeat_interleave(k))
    memory = encoded.memory
    limits = max_lengths(batch.src_lengths, cfg, cap).to(device)  # (B,)
    steps = int(limits.max())

    # Finished sentences leave the decoded batch; their results wait here, by batch row.
    out_scores = torch.full((b, k), float("-inf"), device=device)
    out_tokens = torch.full((b, k, steps), EOS_ID, dtype=torch.long, device=device)
    out_len = torch.zeros((b, k), dtype=torch.long, device=device)
    sent = torch.arange(b, device=device)  # batch rows of the sentences still decoded

    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the top-k are distinct
    history = torch.zeros((b, k, 0), dtype=torch.long, device=device)
    fin_scores = torch.full((b, k), float("-inf"), device=device)
    fin_tokens = torch.full((b, k, steps), EOS_ID, dtype=torch.long, device=device)
    fin_len = torch.zeros((b, k), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    prev = torch.full((b * k,), BOS_ID, dtype=torch.long, device=device)
    first_cap = int(limits.min())  # known on the host: no per-step check until a sentence reaches it
    n_cand = min(2 * k, k * engine.model.output_layer.out_features)
    in_beam = torch.arange(n_cand, device=device) < k

    for t in range(steps):
        n = sent.numel()
        out = engine.decode_step(prev, state, memory, step_weights)
        at_cap = ((t + 1) >= limits).repeat_interleave(k) if t + 1 >= first_cap else None
        v = out.logits.size(-1)
        top_scores, top_idx = beam_candidates(out.logits, scores, at_cap, n_cand)  # (N, 2K) of the K*V
        top_beam = torch.div(top_idx, v, rounding_mode="floor")
        top_tok = top_idx % v
        is_eos = top_tok == EOS_ID

        # Finished candidates compete with earlier finished ones on the normalised score. Only an
        # EOS among the K best candidates may finish a hypothesis (as in fairseq): the extra K
        # candidates exist to refill the beam, and letting a runner-up EOS finish would make beam
        # size 1 differ from greedy decoding.
        new_fin = torch.where(is_eos & in_beam & ~done.unsqueeze(1),
                              top_scores / length_penalty(t + 1, cfg.length_penalty), float("-inf"))
        pool_scores = torch.cat([fin_scores, new_fin], dim=1)  # (N, K + 2K)
        fin_scores, pick = pool_scores.topk(k, dim=-1)
        cand_hist = torch.gather(history, 1, top_beam.unsqueeze(-1).expand(-1, -1, t))  # (N, 2K, t)
        cand_tokens = torch.full((n, n_cand, steps), EOS_ID, dtype=torch.long, device=device)
        cand_tokens[:, :, :t] = cand_hist
        pool_tokens = torch.cat([fin_tokens, cand_tokens], dim=1)
        fin_tokens = torch.gather(pool_tokens, 1, pick.unsqueeze(-1).expand(-1, -1, steps))
        pool_len = torch.cat([fin_len, torch.full_like(top_beam, t + 1)], dim=1)
        fin_len = torch.gather(pool_len, 1, pick)

        # Without a length penalty a sentence ends when its best candidate ends it (beam 1 ==
        # greedy); with one, once K hypotheses have finished; and when no live hypothesis is left.
        live = torch.isfinite(torch.where(is_eos, float("-inf"), top_scores)).any(-1)
        done = done | ~live | (is_eos[:, 0] if cfg.length_penalty == 0 else torch.isfinite(fin_scores).sum(-1) >= k)
        n_done = int(done.sum())  # the step's one host sync
        if n_done == n:
            break

        # The K best unfinished candidates continue.
        alive_scores, alive = torch.where(is_eos, float("-inf"), top_scores).topk(k, dim=-1)
        beam = torch.gather(top_beam, 1, alive)  # (N, K)
        tok = torch.gather(top_tok, 1, alive)
        history = torch.cat([torch.gather(history, 1, beam.unsqueeze(-1).expand(-1, -1, t)),
                             tok.unsqueeze(-1)], dim=2)
        scores = alive_scores
        reorder = (torch.arange(n, device=device).unsqueeze(1) * k + beam).view(-1)
        prev = tok.view(-1)
        count = compact_to(n_done, n)
        if count < n:  # store the finished sentences' results, decode only the rest
            gone = done.nonzero().squeeze(1)
            out_scores[sent[gone]], out_tokens[sent[gone]], out_len[sent[gone]] = (
                fin_scores[gone], fin_tokens[gone], fin_len[gone])
            keep = kept_rows(done, count)
            sent, limits, done = sent[keep], limits[keep], done[keep]
            first_cap = int(limits.min())
            scores, history, fin_scores, fin_tokens, fin_len = (
                scores[keep], history[keep], fin_scores[keep], fin_tokens[keep], fin_len[keep])
            reorder = reorder.view(n, k)[keep].view(-1)
            prev = prev.view(n, k)[keep].view(-1)
            memory = memory.select(keep)
        state = out.state.select(reorder)

    out_scores[sent], out_tokens[sent], out_len[sent] = fin_scores, fin_tokens, fin_len
    best = out_scores.argmax(dim=-1).tolist()
    all_tokens, all_len, all_scores = out_tokens.tolist(), out_len.tolist(), out_scores.tolist()
    hyps = []
    for i, j in enumerate(best):
        length = all_len[i][j]
        hyps.append(Hypothesis(tokens=all_tokens[i][j][: max(length - 1, 0)], score=all_scores[i][j], attention=None))
    return hyps


def decode(engine: Engine, batch: Batch, cfg: SearchConfig, cap: int = 512,
           keep_attention: bool = False, weights: Any = None) -> list[Hypothesis]:
    """Greedy when ``beam_size`` is 1, beam search otherwise. ``weights``: the model's
    ``step_weights()``, made in the same autocast setting (made here when not given)."""
    if cfg.beam_size <= 1:
        return greedy_search(engine, batch, cfg, cap, keep_attention, weights)
    return beam_search(engine, batch, cfg, cap, weights)


