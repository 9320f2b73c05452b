"""The vocabulary side of a search step against its definition: a full log-softmax, PAD/BOS (and
at the cap everything but EOS) banned, and a plain top-k over every beam's every continuation."""

from __future__ import annotations

import pytest
import torch

from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.search.stepscores import (
    ban,
    beam_candidates,
    chunk_size,
    greedy_choice,
    log_normaliser,
)


def reference_logp(logits: torch.Tensor, at_cap: torch.Tensor | None) -> torch.Tensor:
    """The definition: log-softmax over the whole vocabulary, then the bans."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    logp[:, [PAD_ID, BOS_ID]] = float("-inf")
    if at_cap is not None:
        keep = logp[:, EOS_ID].clone()
        logp[at_cap] = float("-inf")
        logp[at_cap, EOS_ID] = keep[at_cap]
    return logp


def random_logits(rows: int, vocab: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.mark.parametrize("offset", [0.0, 500.0, -500.0])
def test_log_normaliser_is_logsumexp_even_for_huge_logits(offset):
    logits = random_logits(7, 300, seed=1) + offset
    torch.testing.assert_close(log_normaliser(logits.clone()).double(),
                               torch.logsumexp(logits.double(), dim=-1), atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("capped", [False, True])
def test_greedy_choice_is_the_best_allowed_token_and_its_log_probability(capped):
    logits = random_logits(9, 50, seed=2)
    logits[0, PAD_ID] = logits[1, BOS_ID] = 100.0  # banned tokens that would win
    at_cap = torch.tensor([i % 3 == 0 for i in range(9)]) if capped else None
    ref = reference_logp(logits, at_cap)
    score, tokens = greedy_choice(logits.clone(), at_cap)
    assert torch.equal(tokens, ref.argmax(dim=-1))
    torch.testing.assert_close(score.double(), ref.max(dim=-1).values, atol=1e-5, rtol=0)
    if capped:
        assert (tokens[at_cap] == EOS_ID).all()


@pytest.mark.parametrize("capped", [False, True])
def test_unscored_greedy_choice_picks_the_same_tokens(capped):
    logits = random_logits(9, 50, seed=4)
    logits[2, PAD_ID] = 100.0
    at_cap = torch.tensor([i % 4 == 1 for i in range(9)]) if capped else None
    score, tokens = greedy_choice(logits.clone(), at_cap, scored=False)
    assert score is None
    assert torch.equal(tokens, greedy_choice(logits.clone(), at_cap)[1])


def test_ban_leaves_only_eos_in_capped_rows():
    logits = random_logits(4, 10, seed=3)
    at_cap = torch.tensor([False, True, False, True])
    banned = ban(logits.clone(), at_cap)
    assert torch.isinf(banned[:, [PAD_ID, BOS_ID]]).all()
    assert torch.isfinite(banned[at_cap]).sum() == 2 and torch.isfinite(banned[at_cap, EOS_ID]).all()
    assert torch.isfinite(banned[~at_cap]).sum() == 2 * 8


@pytest.mark.parametrize("vocab", [8000, 37, 19, 4, 1024, 7919])  # 37, 7919 prime: one-token chunks
def test_chunk_size_divides_the_vocabulary(vocab):
    c = chunk_size(vocab, 10)
    assert vocab % c == 0 and 1 <= c <= vocab


@pytest.mark.parametrize("n, k, vocab", [(6, 5, 8000), (3, 4, 37), (5, 2, 19), (2, 8, 6), (4, 1, 100), (64, 5, 1000)])
@pytest.mark.parametrize("capped", [False, True])
def test_beam_candidates_equal_a_full_top_k(n, k, vocab, capped):
    g = torch.Generator().manual_seed(n * 100 + k * 10 + vocab)
    logits = random_logits(n * k, vocab, seed=vocab)
    scores = -torch.rand(n, k, generator=g) * 10
    scores[0, 1:] = float("-inf")  # a first step: one live beam
    at_cap = (torch.rand(n, generator=g) < 0.5).repeat_interleave(k) if capped else None
    count = min(2 * k, k * vocab)
    ref_all = (reference_logp(logits, at_cap).view(n, k, vocab) + scores.double().unsqueeze(-1)).view(n, k * vocab)
    ref_scores, _ = ref_all.topk(count, dim=-1)
    got_scores, got_index = beam_candidates(logits.clone(), scores, at_cap, count)
    assert got_scores.shape == got_index.shape == (n, count)
    torch.testing.assert_close(got_scores.double(), ref_scores, atol=1e-4, rtol=0)
    # each index names a candidate with the score reported for it (ties may order differently)
    finite = torch.isfinite(got_scores)
    torch.testing.assert_close(ref_all.gather(1, got_index)[finite], got_scores.double()[finite], atol=1e-4, rtol=0)
    assert (got_index >= 0).all() and (got_index < k * vocab).all()
    assert (got_scores[:, :-1] >= got_scores[:, 1:]).all()  # best first
    # distinct candidates among the finite ones
    for row, ok in zip(got_index, finite):
        assert len(set(row[ok].tolist())) == int(ok.sum())
