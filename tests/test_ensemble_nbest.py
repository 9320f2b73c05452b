"""Ensemble decoding, n-best lists and checkpoint averaging, in-process: the ensemble's step is the
renormalised mean of its members' log-probabilities and goes through continuous search like one
model; an n-best list holds the K most probable hypotheses, best first, with their scores; an
averaged state is the element-wise mean."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers_model import (
    SRC_VOCAB,
    engine_of,
    make_batch,
    make_model,
    random_sentences,
    sequence_logprob,
)

from seq2seq.core.config import SearchConfig
from seq2seq.core.errors import ConfigError
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.search.common import check_search_config
from seq2seq.search.ensemble import EnsembleEngine
from seq2seq.search.translate import translate_ids
from seq2seq.training.average import average_weights

CPU = torch.device("cpu")
# members of different families: the ensemble's state and memory hold each one's own
# (variant, seed, EOS bias, weight scale): outputs of many lengths that depend on the input
MEMBERS = [("bahdanau", 2, 0.0, 2.5), ("luong-general-feed", 4, 1.0, 2.5), ("local-m3-general-feed", 3, 0.0, 2.5),
           ("bahdanau-cov", 5, 0.0, 2.5)]


def members(names: list[str], kernels: str = "reference"):
    found = {m[0]: m for m in MEMBERS}
    return [engine_of(make_model(v, seed, eos_bias=bias, scale=scale), kernels)
            for v, seed, bias, scale in (found[n] for n in names)]


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_an_ensemble_step_is_the_renormalised_mean_of_its_members_log_probabilities(kernels):
    engines = members(["bahdanau", "luong-general-feed"], kernels)
    ensemble = EnsembleEngine(engines)
    batch = make_batch(random_sentences(4, 2, 9, SRC_VOCAB, 1))
    prev = torch.full((4,), BOS_ID)
    with torch.no_grad():
        encoded = ensemble.encode(batch.src, batch.src_lengths, batch.src_mask)
        got = ensemble.decode_step(prev, encoded.state, encoded.memory, ensemble.search_weights())
        each = []
        for e in engines:
            enc = e.encode(batch.src, batch.src_lengths, batch.src_mask)
            each.append(torch.log_softmax(e.decode_step(prev, enc.state, enc.memory, e.search_weights()).logits, -1))
    expected = torch.log_softmax(torch.stack(each).mean(0), -1)
    torch.testing.assert_close(got.logits, expected)
    assert torch.allclose(got.logits.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("beam", [1, 4])
def test_an_ensemble_of_a_model_with_itself_translates_as_the_model(beam):
    model = make_model("luong-general-feed", 4, eos_bias=1.0, scale=2.5)
    src = random_sentences(20, 1, 14, SRC_VOCAB, 5)
    cfg = SearchConfig(beam_size=beam, batch_size=6)
    alone = translate_ids(engine_of(model), src, cfg, CPU, scored=True)
    twice = translate_ids(EnsembleEngine([engine_of(model), engine_of(model, "reference")]), src, cfg, CPU,
                          scored=True)
    assert [h.tokens for h in twice] == [h.tokens for h in alone]
    assert [h.score for h in twice] == pytest.approx([h.score for h in alone], abs=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_an_ensemble_decodes_each_sentence_in_continuous_search_as_it_decodes_it_alone(beam):
    """Sentences of many lengths through a pool of 5: the members' states (local-m's step,
    coverage) are sliced, concatenated, overwritten and widened together."""
    ensemble = EnsembleEngine(members(["bahdanau", "local-m3-general-feed", "bahdanau-cov"]))
    src = random_sentences(23, 1, 19, SRC_VOCAB, 8)
    cfg = SearchConfig(beam_size=beam, batch_size=5)
    pooled = translate_ids(ensemble, src, cfg, CPU, scored=True)
    single = SearchConfig(beam_size=beam, batch_size=1)
    same = 0
    for s, hyp in zip(src, pooled):
        alone = translate_ids(ensemble, [s], single, CPU, scored=True)[0]
        if hyp.tokens == alone.tokens:
            same += 1
            assert hyp.score == pytest.approx(alone.score, abs=1e-4)
    assert same >= len(src) - 1  # at most one near-tie broken the other way by float rounding
    assert len({tuple(h.tokens) for h in pooled}) >= 5  # outputs depend on the input


def test_an_ensemble_needs_two_members_of_one_vocabulary():
    with pytest.raises(ValueError, match="at least two"):
        EnsembleEngine(members(["bahdanau"]))
    other = engine_of(make_model("bahdanau", 1, tgt_vocab=50))
    with pytest.raises(ValueError, match="vocabularies"):
        EnsembleEngine([*members(["bahdanau"]), other])


# ----------------------------------------------------------------------------- n-best


def test_nbest_is_the_k_most_probable_hypotheses_when_the_beam_holds_every_prefix(kernels):
    """Vocabulary 8, of which search may write 5 words (never PAD or BOS) and EOS, at most 2
    words: 31 hypotheses. A beam of 30 keeps every prefix, so the 5-best list must be the 5 most
    probable, in order."""
    cfg = SearchConfig(beam_size=30, nbest=5, length_penalty=0.0, max_len_ratio=0.0, max_len_offset=3)
    words = [t for t in range(8) if t not in (PAD_ID, BOS_ID, EOS_ID)]
    candidates = [list(c) for n in range(3) for c in itertools.product(words, repeat=n)]
    assert len(candidates) == 31
    for seed in range(4):
        model = make_model("luong-general-feed", seed, tgt_vocab=8, eos_bias=-1.0 + seed * 0.5)
        src = random_sentences(1, 2, 6, SRC_VOCAB, seed)[0]
        ranked = sorted(((sequence_logprob(model, src, c), c) for c in candidates), key=lambda x: -x[0])[:5]
        hyp = translate_ids(engine_of(model, kernels), [src], cfg, CPU)[0]
        assert [tokens for tokens, _ in hyp.nbest] == [c for _, c in ranked]
        assert [score for _, score in hyp.nbest] == pytest.approx([lp for lp, _ in ranked], abs=1e-4)
        assert (hyp.tokens, hyp.score) == hyp.nbest[0]


def test_nbest_lists_are_k_distinct_hypotheses_best_first_scored_as_the_search_scores(kernels):
    model = make_model("bahdanau", 2, eos_bias=0.0, scale=1.5)
    src = random_sentences(12, 1, 10, SRC_VOCAB, 3)
    cfg = SearchConfig(beam_size=5, nbest=4, batch_size=4)
    for s, hyp in zip(src, translate_ids(engine_of(model, kernels), src, cfg, CPU)):
        assert len(hyp.nbest) == 4
        assert len({tuple(t) for t, _ in hyp.nbest}) == 4
        scores = [score for _, score in hyp.nbest]
        assert scores == sorted(scores, reverse=True)
        assert (hyp.tokens, hyp.score) == hyp.nbest[0]
        for tokens, score in hyp.nbest:  # log-probability over lp(n) = (5 + n) / 6, EOS counted
            assert score == pytest.approx(sequence_logprob(model, s, tokens) / ((5 + len(tokens) + 1) / 6), abs=1e-3)


def test_nbest_settings_are_checked():
    check_search_config(SearchConfig(beam_size=5, nbest=5))
    with pytest.raises(ConfigError, match="search.nbest=3 needs a beam"):
        check_search_config(SearchConfig(nbest=3))
    with pytest.raises(ConfigError, match="search.nbest must be a positive"):
        check_search_config(SearchConfig(beam_size=5, nbest=0))


def test_one_best_search_carries_no_list():
    model = make_model("bahdanau", 2)
    hyps = translate_ids(engine_of(model), random_sentences(3, 1, 6, SRC_VOCAB, 1), SearchConfig(beam_size=3), CPU)
    assert all(h.nbest is None for h in hyps)


# ----------------------------------------------------------------------------- averaging


def test_averaged_weights_are_the_element_wise_mean_in_each_tensors_dtype():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).to(torch.bfloat16),
               "count": torch.tensor(7 + i)} for i in range(3)]
    out = average_weights(states)
    torch.testing.assert_close(out["w"], sum(s["w"].double() for s in states).float() / 3)
    assert out["h"].dtype == torch.bfloat16
    torch.testing.assert_close(out["h"].float(), (sum(s["h"].double() for s in states) / 3).to(torch.bfloat16).float())
    assert int(out["count"]) == 7  # not a weight: the newest (first) state's
    one = average_weights(states[:1])
    assert torch.equal(one["w"], states[0]["w"])
