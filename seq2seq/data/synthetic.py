"""A toy language pair ("src" -> "tgt") generated offline from a seed.

Why it exists: on real corpora, BLEU falling with sentence length mixes two causes, long sentences
being harder to translate and a fixed-size vector being too small to hold them. Here every
sentence is equally easy word by word, so a drop in quality with length isolates the information
bottleneck of a plain encoder-decoder, which attention removes (Bahdanau et al. 2015, Fig. 2).

The languages: made-up words from disjoint letter inventories (nothing can be copied across),
translated word by word through a bijection, with three local reorderings:

* noun phrases: source ``det noun adj*``, target ``det adj* noun``;
* prepositional phrases: source ``prep NP``, target ``NP postposition``;
* subordinate clauses: source ``sub S V O [PP]``, target ``sub S O [PP] V`` (verb-final).

Main clauses keep SVO order and are joined by conjunctions. A sentence's token count, including its
final ``.``, is drawn uniformly from ``[min_len, max_len]`` and met exactly, so source lengths
spread evenly. Target and source have the same number of tokens.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from seq2seq.core.config import SyntheticConfig
from seq2seq.core.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

# Disjoint letters make the two vocabularies disjoint by construction.
_SRC_SYLLABLES = tuple(c + v for c in "bdgkpt" for v in "aiu")
_TGT_SYLLABLES = tuple(c + v for c in "flmnrsvz" for v in "eo")
# Function words are one syllable, content words two or more, so the classes never collide.
_FUNCTION_COUNTS = {"det": 3, "conj": 3, "sub": 2, "prep": 4}
_CLAUSE_MAX = 20  # longer sentences are split into clauses of at most this many words
_NP_EXTRA_MAX = 3  # words a noun phrase may add to its noun (a determiner, adjectives)

# Clause skeletons: N noun phrase, V verb, P preposition, S subordinator. Subordinate clauses are
# always transitive, because verb-final order is only visible when something follows the verb.
_SKELETONS = (
    "NV", "NVN", "NVPN", "NVNPN", "NVSNVN", "NVNSNVN", "NVNSNVNPN", "NVPNSNVN",
)  # fmt: skip
_FITS = {
    size: tuple(s for s in _SKELETONS if len(s) <= size <= len(s) + _NP_EXTRA_MAX * s.count("N"))
    for size in range(2, _CLAUSE_MAX + 1)
}


@dataclass(frozen=True)
class Lexicon:
    """Source words by class, and the bijection source word -> target word."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]
    determiners: tuple[str, ...]
    conjunctions: tuple[str, ...]
    subordinators: tuple[str, ...]
    prepositions: tuple[str, ...]
    to_target: dict[str, str] = field(repr=False, hash=False)
    word_class: dict[str, str] = field(repr=False, hash=False)


def _check(cfg: SyntheticConfig) -> None:
    def integer(key: str) -> int:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"data.synthetic.{key} must be an integer (got {value!r})")
        return value

    integer("seed")
    for key in ("train_size", "valid_size", "test_size"):
        if integer(key) < 1:
            raise ConfigError(f"data.synthetic.{key} must be >= 1 (got {getattr(cfg, key)})")
    min_len, max_len = integer("min_len"), integer("max_len")
    if not 1 <= min_len <= max_len:
        raise ConfigError(
            "data.synthetic.min_len must be between 1 and data.synthetic.max_len "
            f"(got min_len={min_len}, max_len={max_len})"
        )
    for key in ("num_nouns", "num_adjectives", "num_verbs"):
        if integer(key) < 2:
            raise ConfigError(f"data.synthetic.{key} must be >= 2 (got {getattr(cfg, key)})")


def _words(
    rng: random.Random,
    syllables: tuple[str, ...],
    count: int,
    taken: set[str],
    min_syll: int,
    max_syll: int,
) -> list[str]:
    out: list[str] = []
    misses = 0
    while len(out) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(min_syll, max_syll)))
        if word in taken:
            misses += 1
            if misses > 50:  # short words are used up; allow longer ones
                max_syll, misses = max_syll + 1, 0
            continue
        taken.add(word)
        out.append(word)
    return out


def build_lexicon(cfg: SyntheticConfig) -> Lexicon:
    """The lexicon for ``cfg`` (depends only on the seed and the lexicon sizes)."""
    _check(cfg)
    rng = random.Random(f"seq2seq-synthetic/{cfg.seed}/lexicon")
    src_taken: set[str] = set()
    tgt_taken: set[str] = set()
    classes = {
        **_FUNCTION_COUNTS,
        "noun": cfg.num_nouns,
        "adj": cfg.num_adjectives,
        "verb": cfg.num_verbs,
    }
    by_class: dict[str, tuple[str, ...]] = {}
    to_target: dict[str, str] = {".": "."}
    word_class: dict[str, str] = {".": "."}
    for name, count in classes.items():
        lengths = (1, 1) if name in _FUNCTION_COUNTS else (2, 3)
        src = _words(rng, _SRC_SYLLABLES, count, src_taken, *lengths)
        tgt = _words(rng, _TGT_SYLLABLES, count, tgt_taken, *lengths)
        by_class[name] = tuple(src)
        to_target.update(zip(src, tgt, strict=True))
        word_class.update((w, name) for w in src)
    return Lexicon(
        nouns=by_class["noun"],
        adjectives=by_class["adj"],
        verbs=by_class["verb"],
        determiners=by_class["det"],
        conjunctions=by_class["conj"],
        subordinators=by_class["sub"],
        prepositions=by_class["prep"],
        to_target=to_target,
        word_class=word_class,
    )


def translate(source: list[str], lexicon: Lexicon) -> list[str]:
    """Translate source tokens; raises ``ValueError`` on an unknown word or a broken phrase."""
    return translate_aligned(source, lexicon)[0]


def translate_aligned(source: list[str], lexicon: Lexicon) -> tuple[list[str], list[int]]:
    """The translation, and for each target token the position of the source token it
    translates: the gold word alignment (one-to-one, as every word has one translation and the
    reorderings only move words)."""
    tgt, cls = lexicon.to_target, lexicon.word_class
    out: list[str] = []
    origin: list[int] = []
    deferred: list[int] | None = None  # source positions of the open subordinate clause's verbs

    def emit(position: int) -> None:
        out.append(tgt[source[position]])
        origin.append(position)

    i = 0
    while i < len(source):
        word = source[i]
        kind = cls.get(word)
        if kind is None:
            raise ValueError(f"unknown source word {word!r} at position {i}")
        if kind in ("det", "noun", "prep"):
            start = j = i + 1 if kind == "prep" else i
            if j < len(source) and cls.get(source[j]) == "det":
                j += 1
            if j >= len(source) or cls.get(source[j]) != "noun":
                raise ValueError(f"a noun phrase at position {i} has no noun")
            k = j + 1
            while k < len(source) and cls.get(source[k]) == "adj":
                k += 1
            for position in range(start, j):  # determiner stays first
                emit(position)
            for position in range(j + 1, k):  # adjectives move before the noun
                emit(position)
            emit(j)
            if kind == "prep":
                emit(i)  # preposition becomes a postposition
            i = k
            continue
        if kind == "verb" and deferred is not None:
            deferred.append(i)
        else:
            if kind in ("conj", "sub", ".") and deferred is not None:
                for position in deferred:
                    emit(position)
                deferred = None
            emit(i)
            if kind == "sub":
                deferred = []
        i += 1
    for position in deferred or []:
        emit(position)
    return out, origin


def gold_alignments(src_lines: list[str], lexicon: Lexicon, flip: bool = False) -> list[str]:
    """Pharaoh ``i-j`` lines (source word i, target word j) of synthetic source lines and their
    translations; ``flip`` gives ``j-i``, for the corpus read in the tgt -> src direction."""
    out = []
    for line in src_lines:
        origin = translate_aligned(line.split(), lexicon)[1]
        links = sorted((j, i) if flip else (i, j) for j, i in enumerate(origin))
        out.append(" ".join(f"{a}-{b}" for a, b in links))
    return out


def _pick(rand: Callable[[], float], words: tuple[str, ...]) -> str:
    # Indexing by rand() is several times faster than Random.choice, and generation is hot.
    return words[int(rand() * len(words))]


def _clause(rng: random.Random, lex: Lexicon, size: int) -> list[str]:
    rand = rng.random
    skeleton = _pick(rand, _FITS[size])
    extras = [0] * skeleton.count("N")
    for slot in rng.sample(range(_NP_EXTRA_MAX * len(extras)), size - len(skeleton)):
        extras[slot // _NP_EXTRA_MAX] += 1
    out: list[str] = []
    np_index = 0
    for slot in skeleton:
        if slot == "N":
            extra = extras[np_index]
            np_index += 1
            has_det = extra > 0 and rand() < 0.6
            if has_det:
                out.append(_pick(rand, lex.determiners))
            out.append(_pick(rand, lex.nouns))
            for _ in range(extra - has_det):
                out.append(_pick(rand, lex.adjectives))
        else:
            words = {"V": lex.verbs, "P": lex.prepositions, "S": lex.subordinators}[slot]
            out.append(_pick(rand, words))
    return out


def _sentence(rng: random.Random, lex: Lexicon, length: int) -> list[str]:
    """A source sentence of exactly ``length`` tokens, the final "." included."""
    left = length - 1
    if left == 1:  # too short for a clause: a one-word nominal sentence
        return [rng.choice(lex.nouns), "."]
    out: list[str] = []
    while left > 0:
        if out:
            out.append(rng.choice(lex.conjunctions))
            left -= 1
        if left <= _CLAUSE_MAX and (left < 5 or rng.random() < 0.5):
            size = left
        else:  # leave room for a conjunction and a clause of at least two words
            size = rng.randint(2, min(_CLAUSE_MAX, left - 3))
        out.extend(_clause(rng, lex, size))
        left -= size
    out.append(".")
    return out


def _split(
    cfg: SyntheticConfig, lex: Lexicon, name: str, size: int, exclude: set[str]
) -> tuple[list[str], list[str]]:
    # One seed per split, so that resizing train leaves valid and test as they were.
    rng = random.Random(f"seq2seq-synthetic/{cfg.seed}/{name}")
    src_lines: list[str] = []
    tgt_lines: list[str] = []
    dropped, budget = 0, 100 * size + 10_000
    while len(src_lines) < size:
        tokens = _sentence(rng, lex, rng.randint(cfg.min_len, cfg.max_len))
        line = " ".join(tokens)
        if line in exclude:  # held-out sentences must not be seen in training
            dropped += 1
            if dropped > budget:
                raise ConfigError(
                    f"data.synthetic.{name}_size: cannot draw {size} {name} sentences unlike "
                    "the held-out ones; raise data.synthetic.max_len or the lexicon sizes"
                )
            continue
        src_lines.append(line)
        tgt_lines.append(" ".join(translate(tokens, lex)))
    if dropped:
        log.debug("synthetic %s: redrew %d sentences found in held-out splits", name, dropped)
    return src_lines, tgt_lines


def generate_synthetic(cfg: SyntheticConfig) -> dict[str, tuple[list[str], list[str]]]:
    """split name -> (source lines, target lines); line i of each aligned."""
    lex = build_lexicon(cfg)
    test = _split(cfg, lex, "test", cfg.test_size, set())
    valid = _split(cfg, lex, "valid", cfg.valid_size, set(test[0]))
    train = _split(cfg, lex, "train", cfg.train_size, set(test[0]) | set(valid[0]))
    return {"train": train, "valid": valid, "test": test}
