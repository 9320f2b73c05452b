"""The synthetic language pair: determinism, split hygiene, length spread and translation rules."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import replace

import pytest

from seq2seq.core.config import SyntheticConfig
from seq2seq.core.errors import ConfigError
from seq2seq.data.synthetic import SPLITS, build_lexicon, generate_synthetic, translate

SMALL = SyntheticConfig(train_size=2000, valid_size=100, test_size=200)
LINE = re.compile(r"^[a-z]+( [a-z]+)* \.$")


@pytest.fixture(scope="module")
def small() -> dict[str, tuple[list[str], list[str]]]:
    return generate_synthetic(SMALL)


def test_same_seed_gives_identical_corpus(small):
    assert generate_synthetic(SMALL) == small


def test_different_seed_gives_different_corpus(small):
    other = generate_synthetic(replace(SMALL, seed=SMALL.seed + 1))
    for split in SPLITS:
        assert other[split][0] != small[split][0]
    assert build_lexicon(replace(SMALL, seed=SMALL.seed + 1)).nouns != build_lexicon(SMALL).nouns


def test_global_random_state_is_untouched():
    state = random.getstate()
    generate_synthetic(replace(SMALL, train_size=50))
    assert random.getstate() == state


def test_splits_are_aligned_and_sized(small):
    assert tuple(small) == SPLITS
    sizes = {"train": SMALL.train_size, "valid": SMALL.valid_size, "test": SMALL.test_size}
    for split, (src, tgt) in small.items():
        assert len(src) == len(tgt) == sizes[split]
        for s, t in zip(src, tgt, strict=True):
            assert LINE.match(s), s
            assert LINE.match(t), t
            assert len(s.split()) == len(t.split())


def test_source_lengths_cover_the_range_uniformly():
    cfg = SyntheticConfig(train_size=5000, valid_size=1, test_size=1, min_len=3, max_len=80)
    lengths = [len(line.split()) for line in generate_synthetic(cfg)["train"][0]]
    assert min(lengths) >= 3 and max(lengths) <= 80
    assert set(lengths) == set(range(3, 81))
    # Six bins of 13 lengths each: a uniform draw puts 1/6 of the sentences in each.
    bins = Counter((n - 3) // 13 for n in lengths)
    for b in range(6):
        assert 0.8 / 6 < bins[b] / len(lengths) < 1.2 / 6, bins


def test_degenerate_short_lengths_stay_in_range():
    cfg = SyntheticConfig(train_size=300, valid_size=5, test_size=5, min_len=1, max_len=4)
    lines = [line for src, tgt in generate_synthetic(cfg).values() for line in src + tgt]
    # Length 1 is "." alone and length 2 a bare noun; both are too few to reach every split.
    assert {len(line.split()) for line in lines} == {1, 2, 3, 4}
    assert all(line.endswith(".") for line in lines)


def test_vocabularies_are_disjoint(small):
    src_vocab = {w for src, _ in small.values() for line in src for w in line.split()}
    tgt_vocab = {w for _, tgt in small.values() for line in tgt for w in line.split()}
    assert src_vocab & tgt_vocab == {"."}
    lex = build_lexicon(SMALL)
    assert len(set(lex.to_target.values())) == len(lex.to_target)  # a bijection


def test_target_is_a_function_of_the_source(small):
    lex = build_lexicon(SMALL)
    seen: dict[str, str] = {}
    for src, tgt in small.values():
        for s, t in zip(src, tgt, strict=True):
            assert seen.setdefault(s, t) == t
            assert translate(s.split(), lex) == t.split()
            # Word for word: the target is a permutation of the translated source words.
            assert sorted(lex.to_target[w] for w in s.split()) == sorted(t.split())


def test_a_word_in_the_same_role_always_translates_the_same(small):
    lex = build_lexicon(SMALL)
    src, tgt = small["train"]
    # A noun right after a determiner heads a noun phrase in every sentence it appears in.
    by_noun: dict[str, list[str]] = {}
    for s, t in zip(src, tgt, strict=True):
        words = s.split()
        for prev, word in zip(words, words[1:], strict=False):
            if prev in lex.determiners and word in lex.nouns:
                by_noun.setdefault(word, []).append(t)
    noun, targets = max(by_noun.items(), key=lambda item: len(item[1]))
    assert len(targets) > 10
    assert all(lex.to_target[noun] in t.split() for t in targets)


def test_reordering_rules_on_a_hand_built_sentence():
    lex = build_lexicon(SMALL)
    t = lex.to_target
    det, conj, sub, prep = (
        lex.determiners[0],
        lex.conjunctions[0],
        lex.subordinators[0],
        lex.prepositions[0],
    )
    n1, n2, n3, n4, n5 = lex.nouns[:5]
    a1, a2 = lex.adjectives[:2]
    v1, v2, v3 = lex.verbs[:3]
    source = [
        det, n1, a1, a2, v1, n2,  # main clause, adjectives after the noun
        conj, n3, v2, prep, n4,  # main clause with a prepositional phrase
        sub, n5, v3, det, n1, a1, prep, n2,  # subordinate clause, SVO
        ".",
    ]  # fmt: skip
    expected = [
        t[det], t[a1], t[a2], t[n1], t[v1], t[n2],  # adjectives before the noun
        t[conj], t[n3], t[v2], t[n4], t[prep],  # postposition
        t[sub], t[n5], t[det], t[a1], t[n1], t[n2], t[prep], t[v3],  # verb-final
        ".",
    ]  # fmt: skip
    assert translate(source, lex) == expected
    # A conjunction closes the subordinate clause: the verb after it stays in place.
    assert translate([n1, v1, n2, sub, n3, v2, n4, conj, n5, v3, n1, "."], lex) == [
        t[n1], t[v1], t[n2], t[sub], t[n3], t[n4], t[v2], t[conj], t[n5], t[v3], t[n1], ".",
    ]  # fmt: skip


def test_translate_rejects_unknown_words_and_broken_phrases():
    lex = build_lexicon(SMALL)
    with pytest.raises(ValueError, match="unknown"):
        translate(["zzz", "."], lex)
    with pytest.raises(ValueError, match="no noun"):
        translate([lex.determiners[0], lex.verbs[0], "."], lex)


def test_held_out_sources_never_appear_in_train():
    # A tiny lexicon and short sentences make collisions frequent, so the filter is exercised.
    cfg = SyntheticConfig(
        train_size=500, valid_size=50, test_size=50, min_len=2, max_len=6,
        num_nouns=2, num_adjectives=2, num_verbs=2,
    )  # fmt: skip
    corpus = generate_synthetic(cfg)
    train = set(corpus["train"][0])
    assert len(corpus["train"][0]) == cfg.train_size
    assert not train & set(corpus["test"][0])
    assert not train & set(corpus["valid"][0])
    assert not set(corpus["valid"][0]) & set(corpus["test"][0])


def test_train_size_does_not_change_held_out_splits(small):
    other = generate_synthetic(replace(SMALL, train_size=300))
    assert other["test"] == small["test"]
    assert other["valid"] == small["valid"]
    # Train is drawn from its own stream too, so a smaller train split is a prefix of a larger one.
    assert other["train"][0] == small["train"][0][:300]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train_size", 0),
        ("valid_size", 0),
        ("test_size", -1),
        ("min_len", 0),
        ("min_len", 81),
        ("max_len", 2),
        ("num_nouns", 1),
        ("num_adjectives", 0),
        ("num_verbs", 1),
        ("seed", "13"),
        ("train_size", 2.5),
    ],
)
def test_bad_config_raises_config_error(key, value):
    with pytest.raises(ConfigError) as err:
        generate_synthetic(replace(SyntheticConfig(), **{key: value}))
    message = str(err.value)
    assert f"data.synthetic.{key}" in message or "data.synthetic.min_len" in message
    assert "\n" not in message


def test_impossible_held_out_filter_raises_config_error():
    # Length 2 means "noun ."; with two nouns, the test split already holds every sentence.
    cfg = SyntheticConfig(
        train_size=1, valid_size=1, test_size=50, min_len=2, max_len=2, num_nouns=2
    )
    with pytest.raises(ConfigError, match=r"data\.synthetic\.valid_size: cannot draw"):
        generate_synthetic(cfg)


def test_default_corpus_sizes():
    corpus = generate_synthetic(SyntheticConfig())
    assert len(corpus["train"][0]) == 20000
