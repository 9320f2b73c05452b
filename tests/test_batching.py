"""Token batching: sampler invariants (coverage, caps, determinism, exact resume), the padded
``Batch`` from ``collate``, and the padding share on real Multi30k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from seq2seq.core.config import TokenizerConfig, TrainerConfig
from seq2seq.data.batching import Batch, TokenBatchSampler, TokenIds, collate
from seq2seq.data.prepare import prepare_data, token_ids
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def random_lengths(n: int, seed: int, low: int = 1, high: int = 60) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    src = rng.integers(low, high, size=n)
    tgt = np.maximum(1, src + rng.integers(-5, 6, size=n))
    return src.tolist(), tgt.tolist()


SETTINGS = [
    # (examples, max_tokens, max_sentences, seed)
    (1000, 512, 64, 1),
    (1000, 4096, 256, 2),
    (777, 300, 8, 3),
    (50, 100, 1000, 4),  # the token cap binds
    (300, 100000, 16, 5),  # the sentence cap binds
    (1, 64, 4, 6),
]


def width(batch: list[int], src: list[int], tgt: list[int]) -> int:
    """Padded width of a batch: longest side plus BOS/EOS."""
    return max(max(src[i], tgt[i]) for i in batch) + 1


@pytest.mark.parametrize("n, max_tokens, max_sentences, seed", SETTINGS)
def test_sampler_invariants(n: int, max_tokens: int, max_sentences: int, seed: int):
    src, tgt = random_lengths(n, seed)
    sampler = TokenBatchSampler(src, tgt, max_tokens=max_tokens, max_sentences=max_sentences, seed=seed)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n)), "every example exactly once per epoch"
        assert all(batches) and all(isinstance(i, int) for i in flat)
        for b in batches:
            assert len(b) <= max_sentences
            if len(b) >= 2:
                assert len(b) * width(b, src, tgt) <= max_tokens
        assert len(batches) == len(sampler)
        assert sampler.batches(epoch) == batches  # same seed and epoch, same batches


def test_single_long_sentence_gets_its_own_batch():
    src, tgt = [5, 5, 500, 5], [5, 5, 5, 600]
    sampler = TokenBatchSampler(src, tgt, max_tokens=100, max_sentences=10, seed=0)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert [2] in batches and [3] in batches


def test_batches_group_similar_lengths():
    src, tgt = random_lengths(2000, 7)
    sampler = TokenBatchSampler(src, tgt, max_tokens=2048, max_sentences=256, seed=7)
    batches = sampler.batches(0)
    # bucketed: ordered by source length, the batches' length ranges touch but never interleave
    ranges = sorted((min(src[i] for i in b), max(src[i] for i in b)) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))
    assert sampler.padding_fraction(0) < 0.1
    # the same batch sizes filled at random pad far more
    rng = np.random.default_rng(0)
    perm, real, padded, pos = rng.permutation(len(src)), 0, 0, 0
    for b in batches:
        idx = perm[pos:pos + len(b)]
        pos += len(b)
        s, t = np.asarray(src)[idx] + 1, np.asarray(tgt)[idx] + 1
        real += int(s.sum() + t.sum())
        padded += len(idx) * int(s.max() + t.max())
    assert 1 - real / padded > 3 * sampler.padding_fraction(0)


def test_batches_are_close_to_the_cap():
    """Greedy filling: a batch ends only when the next sentence would break a cap."""
    src, tgt = random_lengths(500, 8)
    max_tokens, max_sentences = 1000, 32
    sampler = TokenBatchSampler(src, tgt, max_tokens=max_tokens, max_sentences=max_sentences, seed=8,
                                shuffle=False)
    batches = sampler.batches(0)
    for b, nxt in zip(batches, batches[1:]):
        grown = [*b, nxt[0]]
        assert len(grown) > max_sentences or len(grown) * width(grown, src, tgt) > max_tokens


def test_seed_and_epoch_change_the_order():
    src, tgt = random_lengths(1000, 9)
    make = lambda seed: TokenBatchSampler(src, tgt, max_tokens=1024, max_sentences=128, seed=seed)  # noqa: E731
    a, b = make(1), make(1)
    assert a.batches(0) == b.batches(0) and a.batches(5) == b.batches(5)
    assert a.batches(0) != a.batches(1)
    assert [i for x in a.batches(0) for i in x] != [i for x in a.batches(1) for i in x]
    assert a.batches(0) != make(2).batches(0)


def test_no_shuffle_is_sorted_and_epoch_independent():
    src, tgt = random_lengths(300, 10)
    sampler = TokenBatchSampler(src, tgt, max_tokens=1024, max_sentences=64, seed=10, shuffle=False)
    assert sampler.batches(0) == sampler.batches(3)
    flat = [i for b in sampler.batches(0) for i in b]
    assert [src[i] for i in flat] == sorted(src)


@pytest.mark.parametrize("epoch", [0, 1, 4])
def test_iterate_resumes_exactly(epoch: int):
    src, tgt = random_lengths(600, 11)
    sampler = TokenBatchSampler(src, tgt, max_tokens=800, max_sentences=64, seed=11)
    full = sampler.batches(epoch)
    assert list(sampler.iterate(epoch)) == full
    for start in (0, 1, len(full) // 2, len(full) - 1, len(full), len(full) + 3):
        # a fresh sampler stands for a resumed process
        resumed = TokenBatchSampler(src, tgt, max_tokens=800, max_sentences=64, seed=11)
        assert list(resumed.iterate(epoch, start)) == full[start:]


def test_sampler_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        TokenBatchSampler([1, 2], [1], max_tokens=10, max_sentences=2, seed=0)


def test_empty_dataset():
    sampler = TokenBatchSampler([], [], max_tokens=10, max_sentences=2, seed=0)
    assert sampler.batches(0) == [] and len(sampler) == 0 and sampler.padding_fraction() == 0.0


# ----------------------------------------------------------------------------- collate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate(seed: int):
    rng = np.random.default_rng(seed)
    n = 7
    src_ids = [rng.integers(4, 100, size=rng.integers(1, 12)).tolist() for _ in range(n)]
    tgt_ids = [rng.integers(4, 100, size=rng.integers(0, 12)).tolist() for _ in range(n)]
    indices = rng.permutation(50)[:n].tolist()
    batch = collate(src_ids, tgt_ids, indices)
    assert isinstance(batch, Batch)
    S, T = max(map(len, src_ids)) + 1, max(map(len, tgt_ids)) + 1
    assert batch.src.shape == batch.src_mask.shape == (n, S)
    assert batch.tgt_in.shape == batch.tgt_out.shape == batch.tgt_mask.shape == (n, T)
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert batch.src_mask.dtype == batch.tgt_mask.dtype == torch.bool
    assert batch.src_lengths.dtype == torch.long and batch.src_lengths.device.type == "cpu"
    assert batch.src_lengths.tolist() == [len(s) + 1 for s in src_ids]
    assert batch.indices.tolist() == indices
    assert batch.num_tgt_tokens == sum(len(t) + 1 for t in tgt_ids)
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        ls, lt = len(s) + 1, len(t) + 1
        assert batch.src[i, :ls].tolist() == [*s, EOS_ID]
        assert batch.src_mask[i].tolist() == [True] * ls + [False] * (S - ls)
        assert (batch.src[i, ls:] == PAD_ID).all()
        assert batch.tgt_in[i, :lt].tolist() == [BOS_ID, *t]
        assert batch.tgt_out[i, :lt].tolist() == [*t, EOS_ID]
        assert batch.tgt_in[i, 1:lt].tolist() == batch.tgt_out[i, : lt - 1].tolist()  # shifted by one
        assert batch.tgt_mask[i].tolist() == [True] * lt + [False] * (T - lt)
        assert (batch.tgt_in[i, lt:] == PAD_ID).all() and (batch.tgt_out[i, lt:] == PAD_ID).all()
    # no real token is the padding id, so the masks are exactly "not padding"
    assert torch.equal(batch.src_mask, batch.src != PAD_ID)
    assert torch.equal(batch.tgt_mask, batch.tgt_out != PAD_ID)


@pytest.mark.parametrize("seed", [0, 1])
def test_token_ids_hold_the_same_sequences_and_collate_alike(seed: int):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(4, 100, size=rng.integers(0, 9)).tolist() for _ in range(30)]
    pairs = Dataset.from_dict({"ids": seqs}).select(rng.permutation(30))  # an indices mapping, as after a shuffle
    seqs = [pairs[i]["ids"] for i in range(30)]
    ids = token_ids(pairs, "ids")
    assert len(ids) == 30 and ids.lengths().tolist() == [len(s) for s in seqs]
    assert [ids[i].tolist() for i in range(30)] == seqs
    pick = rng.permutation(30)[:8].tolist()
    from_arrays = collate([ids[i] for i in pick], [ids[i] for i in reversed(pick)], pick)
    from_lists = collate([seqs[i] for i in pick], [seqs[i] for i in reversed(pick)], pick)
    assert all(torch.equal(a, b) for a, b in zip(from_arrays, from_lists))


def test_token_ids_reject_offsets_that_do_not_cover_the_values():
    with pytest.raises(ValueError, match="offsets"):
        TokenIds(np.arange(5), np.array([0, 2, 4]))


def test_collate_of_empty_sequences_is_all_eos():
    batch = collate([[], []], [[], [9]], [0, 1])
    assert batch.src.tolist() == [[EOS_ID], [EOS_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, PAD_ID], [BOS_ID, 9]]
    assert batch.tgt_out.tolist() == [[EOS_ID, PAD_ID], [9, EOS_ID]]


def test_collate_without_targets():
    batch = collate([[5, 6], [7]], None, [0, 1])
    assert batch.tgt_in.tolist() == [[BOS_ID], [BOS_ID]]
    assert batch.tgt_out.tolist() == [[EOS_ID], [EOS_ID]]
    assert batch.src.tolist() == [[5, 6, EOS_ID], [7, EOS_ID, PAD_ID]]


def test_batch_to_keeps_lengths_on_cpu():
    batch = collate([[5, 6], [7]], [[8], [9, 10]], [0, 1])
    moved = batch.to(torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(batch, moved))
    assert moved.src_lengths.device.type == "cpu"


def test_sampler_batches_collate_within_the_cap():
    src_ids = [[4] * n for n in random_lengths(400, 12)[0]]
    tgt_ids = [[5] * n for n in random_lengths(400, 13)[0]]
    sampler = TokenBatchSampler([len(s) for s in src_ids], [len(t) for t in tgt_ids], max_tokens=600,
                                max_sentences=50, seed=12)
    for b in sampler.batches(0):
        batch = collate([src_ids[i] for i in b], [tgt_ids[i] for i in b], b)
        if len(b) >= 2:
            assert batch.src.numel() <= 600 and batch.tgt_in.numel() <= 600
        assert batch.indices.tolist() == b


# ----------------------------------------------------------------------------- real data


def test_padding_on_multi30k(multi30k: Path, make_data_cfg, tmp_path: Path):
    cfg = make_data_cfg("multi30k", root=str(multi30k.parent))
    prepared = prepare_data(cfg, TokenizerConfig())  # the default 8k joint unigram model
    train = prepared.train
    src = [len(x) for x in train["src_ids"]]
    tgt = [len(x) for x in train["tgt_ids"]]
    flat = token_ids(train, "src_ids")  # the trainer's view of the same column
    assert flat.lengths().tolist() == src
    assert [flat[i].tolist() for i in (0, len(src) // 2, len(src) - 1)] == [
        train[i]["src_ids"] for i in (0, len(src) // 2, len(src) - 1)]
    trainer = TrainerConfig()
    assert trainer.max_tokens == 4096
    sampler = TokenBatchSampler(src, tgt, max_tokens=trainer.max_tokens, max_sentences=trainer.max_sentences,
                                seed=1234)
    assert sampler.padding_fraction(0) < 0.10
    assert sampler.padding_fraction(1) < 0.10
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(train)))
    # the batches are full: on average close to the token cap
    used = [len(b) * (max(max(src[i], tgt[i]) for i in b) + 1) for b in batches]
    assert np.mean(used) > 0.8 * trainer.max_tokens
