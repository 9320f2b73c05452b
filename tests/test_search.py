"""Greedy decoding and beam search: beam 1 is greedy, batching changes nothing, length caps hold,
beam finds at least as probable a hypothesis (and the exact optimum when the beam can hold every
prefix), and ``translate_ids`` keeps the input order."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers_model import (
    ATTENTIVE,
    SRC_VOCAB,
    UNNORMALISED,
    VARIANTS,
    assert_same_or_tie,
    engine_of,
    make_batch,
    make_model,
    random_sentences,
    sequence_logprob,
)
from reference_search import beam_search, decode, greedy_search

from seq2seq.core.config import SearchConfig
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.search.common import max_lengths, search_label
from seq2seq.search.translate import translate_ids

CPU = torch.device("cpu")
# (variant, seed, EOS bias, weight scale): untrained models with flat (scale 1) and peakier output
# distributions; with these, a beam of 1 that let a runner-up EOS finish a hypothesis differed from
# greedy decoding.
MODELS = [("bahdanau", 2, 0.0, 1.0), ("bahdanau", 2, 0.0, 1.5), ("bahdanau", 0, 0.0, 2.5),
          ("none", 2, 0.0, 1.0), ("none", 2, 0.0, 1.5), ("luong-general-feed", 0, 0.0, 1.0),
          ("luong-general-feed", 0, 0.0, 1.5), ("luong-general-feed", 4, 1.0, 2.5),
          ("luong-concat", 1, 1.0, 1.5), ("luong-dot", 2, 0.0, 1.0)]
MODEL_IDS = [f"{v}-seed{s}-eos{b:g}-x{k:g}" for v, s, b, k in MODELS]



# ----------------------------------------------------------------------------- beam 1 == greedy


@pytest.mark.parametrize(("variant", "seed", "eos_bias", "scale"), MODELS, ids=MODEL_IDS)
def test_beam_size_one_is_greedy(variant, seed, eos_bias, scale, kernels):
    model = make_model(variant, seed, eos_bias=eos_bias, scale=scale)
    src = random_sentences(8, 1, 9, SRC_VOCAB, seed)
    batch = make_batch(src)
    greedy = greedy_search(engine_of(model, kernels), batch, SearchConfig())
    for alpha in (0.0, 0.6, 1.0, 2.0):
        beam = beam_search(engine_of(model, kernels), batch, SearchConfig(beam_size=1, length_penalty=alpha))
        for s, g, b in zip(src, greedy, beam):
            assert_same_or_tie(model, s, g.tokens, b.tokens)
            if g.tokens == b.tokens:
                n = len(g.tokens) + 1  # EOS counts
                assert b.score == pytest.approx(g.score / ((5 + n) / 6) ** alpha, abs=1e-4)
    # decode() picks greedy for beam size 1
    assert [h.tokens for h in decode(engine_of(model, kernels), batch, SearchConfig(beam_size=1))] == [h.tokens for h in greedy]


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize(("variant", "seed", "eos_bias", "scale"), MODELS[1::2], ids=MODEL_IDS[1::2])
def test_batched_and_one_at_a_time_decoding_agree(variant, seed, eos_bias, scale, kernels):
    model = make_model(variant, seed, eos_bias=eos_bias, scale=scale)
    src = random_sentences(7, 1, 12, SRC_VOCAB, seed + 100)
    batch = make_batch(src)
    for cfg in (SearchConfig(), SearchConfig(beam_size=5)):
        together = decode(engine_of(model, kernels), batch, cfg)
        for s, hyp in zip(src, together):
            alone = decode(engine_of(model, kernels), make_batch([s]), cfg)[0]
            if cfg.beam_size == 1:
                assert_same_or_tie(model, s, hyp.tokens, alone.tokens)
            else:
                assert hyp.tokens == alone.tokens
                assert hyp.score == pytest.approx(alone.score, abs=1e-4)


# ----------------------------------------------------------------------------- length caps


def _expected_tokens(src_len: int, ratio: float, offset: int, cap: int) -> int:
    """Tokens before the forced EOS: the cap counts EOS, and source length counts its EOS."""
    return min(max(math.ceil((src_len + 1) * ratio) + offset, 1), cap) - 1


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize(("ratio", "offset", "cap"), [(2.0, 10, 512), (1.5, 2, 512), (1.0, 0, 512),
                                                      (2.0, 10, 7), (0.0, 0, 512)])
def test_length_cap_is_respected(beam_size, ratio, offset, cap, kernels):
    model = make_model("bahdanau", 0, eos_bias=-1e4)  # never ends on its own
    src = [[5] * n for n in (1, 2, 4, 9, 13)]
    cfg = SearchConfig(beam_size=beam_size, max_len_ratio=ratio, max_len_offset=offset)
    hyps = decode(engine_of(model, kernels), make_batch(src), cfg, cap=cap)
    got = [len(h.tokens) for h in hyps]
    assert got == [_expected_tokens(len(s), ratio, offset, cap) for s in src]
    assert all(EOS_ID not in h.tokens for h in hyps)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_model_that_ends_at_once_gives_empty_hypotheses(beam_size, kernels):
    model = make_model("luong-general", 0, eos_bias=1e4)
    hyps = decode(engine_of(model, kernels), make_batch([[4, 5, 6], [7]]), SearchConfig(beam_size=beam_size))
    assert [h.tokens for h in hyps] == [[], []]


def test_max_lengths():
    lengths = torch.tensor([1, 5, 100])
    cfg = SearchConfig(max_len_ratio=1.5, max_len_offset=3)
    assert max_lengths(lengths, cfg, cap=512).tolist() == [5, 11, 153]
    assert max_lengths(lengths, cfg, cap=20).tolist() == [5, 11, 20]
    assert max_lengths(lengths, SearchConfig(max_len_ratio=0.0, max_len_offset=0), cap=9).tolist() == [1, 1, 1]


def test_a_ten_thousand_token_source_is_translated_with_a_capped_output(kernels):
    src = [random_sentences(1, 10_000, 10_000, SRC_VOCAB, seed=9)[0], [4, 5, 6]]
    for bias, beam_size in ((-1e4, 1), (-1e4, 3), (0.0, 1)):
        model = make_model("bahdanau", 1, eos_bias=bias)
        hyps = translate_ids(engine_of(model, kernels), src, SearchConfig(beam_size=beam_size), CPU, cap=20)
        assert len(hyps[0].tokens) <= 19
        if bias < 0:  # cannot end early: exactly the cap (EOS counted) for the long one
            assert len(hyps[0].tokens) == 19
            assert len(hyps[1].tokens) == _expected_tokens(3, 2.0, 10, 20)


# ----------------------------------------------------------------------------- search quality


@pytest.mark.parametrize(("variant", "seed", "eos_bias", "scale"), MODELS, ids=MODEL_IDS)
def test_beam_finds_at_least_as_probable_a_hypothesis_as_greedy(variant, seed, eos_bias, scale, kernels):
    model = make_model(variant, seed, eos_bias=eos_bias, scale=scale)
    src = random_sentences(6, 1, 8, SRC_VOCAB, seed + 200)
    batch = make_batch(src)
    greedy = greedy_search(engine_of(model, kernels), batch, SearchConfig())
    beam = beam_search(engine_of(model, kernels), batch, SearchConfig(beam_size=5, length_penalty=0.0))
    normalised = beam_search(engine_of(model, kernels), batch, SearchConfig(beam_size=5, length_penalty=1.0))
    for s, g, b, nb in zip(src, greedy, beam, normalised):
        g_logp = sequence_logprob(model, s, g.tokens)
        b_logp = sequence_logprob(model, s, b.tokens)
        # The reported scores are the sequences' log-probabilities (EOS included) ...
        assert g.score == pytest.approx(g_logp, abs=1e-3)
        assert b.score == pytest.approx(b_logp, abs=1e-3)
        # ... and with alpha = 1 the log-probability over ((5 + n) / 6).
        n = len(nb.tokens) + 1
        assert nb.score == pytest.approx(sequence_logprob(model, s, nb.tokens) / ((5 + n) / 6), abs=1e-3)
        assert b_logp >= g_logp - 1e-4


def test_a_beam_that_holds_every_prefix_finds_the_exact_optimum(kernels):
    """Vocabulary 6 (5 tokens besides EOS), at most 2 tokens: 31 hypotheses in all. A beam of 30
    keeps every prefix, so with no length penalty it must return the most probable one."""
    cfg = SearchConfig(beam_size=30, length_penalty=0.0, max_len_ratio=0.0, max_len_offset=3)
    words = [t for t in range(6) if t != EOS_ID]
    candidates = [list(c) for n in range(3) for c in itertools.product(words, repeat=n)]
    assert len(candidates) == 31
    for seed in range(6):
        model = make_model("luong-general-feed", seed, tgt_vocab=6, eos_bias=-1.0 + seed * 0.5)
        src = random_sentences(1, 2, 6, SRC_VOCAB, seed)[0]
        best = max(sequence_logprob(model, src, c) for c in candidates)
        hyp = beam_search(engine_of(model, kernels), make_batch([src]), cfg)[0]
        assert len(hyp.tokens) <= 2
        assert sequence_logprob(model, src, hyp.tokens) == pytest.approx(best, abs=1e-5)
        assert hyp.score == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_with_a_length_penalty_the_search_returns_the_best_normalised_hypothesis(alpha, kernels):
    """As above (31 hypotheses, a beam holding every prefix), ranked by log-probability over
    ((5 + n) / 6) ** alpha. The search must go on after the first EOS: with these peaky models the
    most probable hypothesis is often short and a longer one wins once normalised."""
    cfg = SearchConfig(beam_size=30, length_penalty=alpha, max_len_ratio=0.0, max_len_offset=3)
    words = [t for t in range(8) if t not in (PAD_ID, BOS_ID, EOS_ID)]  # search never writes PAD or BOS
    candidates = [list(c) for n in range(3) for c in itertools.product(words, repeat=n)]
    assert len(candidates) == 31
    overtaken = 0
    for seed, eos_bias in itertools.product(range(6), (-1.0, 2.0)):
        model = make_model("luong-general-feed", seed, tgt_vocab=8, eos_bias=eos_bias, scale=4.0)
        src = random_sentences(1, 2, 6, SRC_VOCAB, seed)[0]
        logprob = [sequence_logprob(model, src, c) for c in candidates]
        most_probable = candidates[max(range(31), key=lambda i: logprob[i])]
        best_score, best = max(((lp / ((5 + len(c) + 1) / 6) ** alpha, c) for lp, c in zip(logprob, candidates)),
                               key=lambda x: x[0])
        overtaken += len(best) > len(most_probable)
        for hyp in (beam_search(engine_of(model, kernels), make_batch([src]), cfg)[0],
                    translate_ids(engine_of(model, kernels), [src], cfg, CPU)[0]):
            assert hyp.score == pytest.approx(best_score, abs=1e-4)
            assert hyp.tokens == best
    assert overtaken >= 3  # the case that matters occurs: a longer hypothesis wins once normalised


class _Scripted:
    """A real engine whose next-token distribution is looked up from the previous token, so a test
    can say which hypotheses exist and how probable each is."""

    def __init__(self, inner, table: torch.Tensor) -> None:
        self.inner, self.table, self.name, self.model = inner, table, inner.name, inner.model

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode_step(self, prev, state, memory, weights):
        return self.inner.decode_step(prev, state, memory, weights)._replace(logits=self.table[prev])


def _table(rows: dict[int, dict[int, float]], vocab: int = 8) -> torch.Tensor:
    """Log-probabilities per previous token: the given ones, the rest of the mass spread evenly
    over the other tokens search may write (never PAD or BOS)."""
    writable = [t for t in range(vocab) if t not in (PAD_ID, BOS_ID)]
    table = torch.full((vocab, vocab), -30.0)
    for prev in range(vocab):
        given = rows.get(prev, {})
        rest = [t for t in writable if t not in given]
        left = 1.0 - sum(math.exp(v) for v in given.values())
        for t in rest:
            table[prev, t] = math.log(left / len(rest))
        for t, v in given.items():
            table[prev, t] = v
    return table


@pytest.mark.parametrize("beam_size", [2, 5])
def test_a_length_penalty_lets_a_longer_hypothesis_overtake_an_early_end(beam_size, kernels):
    """The sentence may end at once (log p -1.0), or go on with 'a b' (log p -1.3 in all): the
    first is more probable, the second better once normalised by ((5 + 3) / 6) ** 1. With the
    penalty the search must not end at the first EOS, as it did when the best candidate being EOS
    ended a sentence whatever the penalty."""
    a, b = [t for t in range(8) if t not in (PAD_ID, BOS_ID, EOS_ID)][:2]
    table = _table({BOS_ID: {EOS_ID: -1.0, a: -1.2}, a: {b: -0.05}, b: {EOS_ID: -0.05}})
    engine = _Scripted(engine_of(make_model("bahdanau", 0, tgt_vocab=8), kernels), table)
    src = random_sentences(1, 3, 5, SRC_VOCAB, 0)
    ends_at_once = translate_ids(engine, src, SearchConfig(beam_size=beam_size, length_penalty=0.0), CPU)[0]
    assert ends_at_once.tokens == [] and ends_at_once.score == pytest.approx(-1.0, abs=1e-4)
    goes_on = translate_ids(engine, src, SearchConfig(beam_size=beam_size, length_penalty=1.0), CPU)[0]
    assert goes_on.tokens == [a, b] and goes_on.score == pytest.approx(-1.3 / (8 / 6), abs=1e-4)
    assert beam_search(engine, make_batch(src), SearchConfig(beam_size=beam_size, length_penalty=1.0))[0].tokens == [a, b]
    greedy = translate_ids(engine, src, SearchConfig(), CPU)[0]
    assert greedy.tokens == []  # beam 1 is still greedy


# ----------------------------------------------------------------------------- translate_ids


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translate_ids_keeps_the_input_order(beam_size, kernels):
    src = [random_sentences(1, n, n, SRC_VOCAB, seed=n)[0] for n in (5, 1, 9, 3, 7, 2, 8, 4)]
    cfg = SearchConfig(beam_size=beam_size, batch_size=3)
    # A model that decides itself when to stop, with input-dependent output ...
    model = make_model("luong-general-feed", 0, scale=2.5)
    hyps = translate_ids(engine_of(model, kernels), src, cfg, CPU)
    assert len(hyps) == len(src)
    alone = [decode(engine_of(model, kernels), make_batch([s]), cfg)[0] for s in src]
    for s, h, a in zip(src, hyps, alone):
        assert_same_or_tie(model, s, h.tokens, a.tokens)
    assert len({tuple(h.tokens) for h in hyps}) >= 4  # distinct outputs: a reordering would show
    # ... and one that runs to each sentence's own length cap.
    model = make_model("bahdanau", 0, eos_bias=-1e4)
    lengths = [len(h.tokens) for h in translate_ids(engine_of(model, kernels), src, cfg, CPU)]
    assert lengths == [_expected_tokens(len(s), cfg.max_len_ratio, cfg.max_len_offset, 512) for s in src]


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.usefixtures("cpu_bf16")
def test_translate_ids_scores_greedy_output_only_when_asked(amp_dtype, kernels):
    """Unscored greedy decoding skips the normaliser, nothing else: the same tokens; scored, each
    score is the hypothesis' log-probability; beam search always scores."""
    src = random_sentences(12, 1, 9, SRC_VOCAB, seed=3)
    model = make_model("luong-general-feed", 0, scale=2.5)
    greedy, beam = SearchConfig(batch_size=4), SearchConfig(beam_size=3, batch_size=4)
    plain = translate_ids(engine_of(model, kernels), src, greedy, CPU, amp_dtype)
    scored = translate_ids(engine_of(model, kernels), src, greedy, CPU, amp_dtype, scored=True)
    assert [h.tokens for h in plain] == [h.tokens for h in scored]
    assert all(h.score is None for h in plain)
    if amp_dtype is None:
        for s, h in zip(src, scored):
            assert h.score == pytest.approx(sequence_logprob(model, s, h.tokens), abs=1e-4)
    assert all(isinstance(h.score, float) for h in translate_ids(engine_of(model, kernels), src, beam, CPU, amp_dtype))


def test_translate_ids_with_no_sentences(kernels):
    assert translate_ids(engine_of(make_model("none"), kernels), [], SearchConfig(), CPU) == []


@pytest.mark.parametrize("variant", ATTENTIVE)
@pytest.mark.parametrize("beam_size", [1, 3])
def test_kept_attention_is_the_attention_the_search_saw(variant, beam_size, kernels):
    """translate_ids' attention rows (from a teacher-forced pass over each output) cover each
    source, sum to one, and equal what the step-by-step search computed along the way."""
    model = make_model(variant, 1, eos_bias=2.0)
    engine = engine_of(model, kernels)
    src = [[4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    hyps = translate_ids(engine, src, SearchConfig(beam_size=beam_size), CPU, keep_attention=True)
    stepwise = greedy_search(engine, make_batch(src), SearchConfig(), keep_attention=True)
    for s, h, g in zip(src, hyps, stepwise):
        assert h.attention.shape == (len(h.tokens) + 1, len(s) + 1)  # EOS on both sides
        if variant in UNNORMALISED:  # local-p's Gaussian: at most 1
            assert (h.attention.sum(-1) <= 1 + 1e-5).all()
        else:
            torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens) + 1), atol=1e-5, rtol=0)
        if beam_size == 1 and h.tokens == g.tokens:
            torch.testing.assert_close(h.attention, g.attention, atol=1e-5, rtol=0)
    # A model without attention has none to keep.
    none = translate_ids(engine_of(make_model("none"), kernels), src, SearchConfig(), CPU, keep_attention=True)
    assert all(h.attention is None for h in none)


def test_search_label():
    assert search_label(SearchConfig()) == "greedy"
    assert search_label(SearchConfig(beam_size=5)) == "beam5"
    assert search_label(SearchConfig(beam_size=5, length_penalty=0.6)) == "beam5-lp0.6"


def test_compaction_keeps_a_multiple_of_eight_rows_with_every_unfinished_one():
    import torch

    from seq2seq.search.common import compact_to, kept_rows

    assert compact_to(0, 64) == 64  # nothing finished
    assert compact_to(10, 64) == 64  # under a quarter finished
    assert compact_to(16, 64) == 48
    assert compact_to(21, 64) == 48  # 43 unfinished, rounded up to 48
    assert compact_to(39, 40) == 8
    finished = torch.tensor([True, False, True, True, False, False, True, True, True, True])
    kept = kept_rows(finished, 5)
    assert kept.tolist() == sorted(kept.tolist()) and len(kept) == 5
    assert set((~finished).nonzero().squeeze(1).tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("beam_size", [1, 4])
def test_both_engines_give_the_same_translations(variant, beam_size):
    """The fast engine's search (packed weights, fused step) and the reference model's agree on
    a fixed model: the same outputs, or a tie float rounding broke either way."""
    model = make_model(variant, 3, eos_bias=-1.0, scale=1.5)
    src = random_sentences(24, 1, 14, SRC_VOCAB, seed=21)
    cfg = SearchConfig(beam_size=beam_size, batch_size=8)
    fast = translate_ids(engine_of(model, "fast"), src, cfg, CPU, scored=True)
    reference = translate_ids(engine_of(model, "reference"), src, cfg, CPU, scored=True)
    for s, a, b in zip(src, fast, reference):
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-4)
        if beam_size == 1:
            assert_same_or_tie(model, s, a.tokens, b.tokens)
    assert sum(a.tokens == b.tokens for a, b in zip(fast, reference)) >= 23
    assert len({tuple(h.tokens) for h in fast}) >= 5  # input-dependent outputs
