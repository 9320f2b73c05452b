"""Tiny models and batches shared by the model, search and checkpoint tests (not a test module)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from seq2seq.core.config import (
    AttentionConfig,
    AttentionType,
    Kernels,
    LocalMode,
    LuongScore,
    ModelConfig,
    Normalizer,
    PositionBias,
)
from seq2seq.data.batching import Batch, collate
from seq2seq.data.tokenizer import EOS_ID, PAD_ID
from seq2seq.model.engine import Engine, build_engine
from seq2seq.model.network import Seq2Seq, build_model

SRC_VOCAB = 23
TGT_VOCAB = 19
FIRST_WORD = 4  # ids below are PAD, UNK, BOS, EOS

class Spec(NamedTuple):
    kind: AttentionType
    score: LuongScore
    feed: bool  # input feeding
    heads: int = 1
    normalizer: Normalizer = Normalizer.softmax
    mode: LocalMode = LocalMode.monotonic
    window: int = 3
    coverage: bool = False
    position_bias: PositionBias = PositionBias.none
    self_attention: bool = False  # model.decoder_self_attention


# name -> the attention; names follow ``model.describe``. The families the CPU kernels run, then
# the attention lab's variants (reference model only: the fast engine hands them to it).
VARIANTS: dict[str, Spec] = {
    "none": Spec(AttentionType.none, LuongScore.general, False),
    "bahdanau": Spec(AttentionType.bahdanau, LuongScore.general, False),
    "luong-dot": Spec(AttentionType.luong, LuongScore.dot, False),
    "luong-dot-feed": Spec(AttentionType.luong, LuongScore.dot, True),
    "luong-general": Spec(AttentionType.luong, LuongScore.general, False),
    "luong-general-feed": Spec(AttentionType.luong, LuongScore.general, True),
    "luong-concat": Spec(AttentionType.luong, LuongScore.concat, False),
    "luong-concat-feed": Spec(AttentionType.luong, LuongScore.concat, True),
    "luong-scaled_dot-feed": Spec(AttentionType.luong, LuongScore.scaled_dot, True),
    "bahdanau-h4": Spec(AttentionType.bahdanau, LuongScore.general, False, heads=4),
    "luong-general-h4-sparsemax": Spec(AttentionType.luong, LuongScore.general, False, 4, Normalizer.sparsemax),
    "bahdanau-entmax15": Spec(AttentionType.bahdanau, LuongScore.general, False, normalizer=Normalizer.entmax15),
    "local-m3-general-feed": Spec(AttentionType.local, LuongScore.general, True),
    "local-p2-dot": Spec(AttentionType.local, LuongScore.dot, False, mode=LocalMode.predictive, window=2),
    "local-m2-concat": Spec(AttentionType.local, LuongScore.concat, False, window=2),
    "bahdanau-cov": Spec(AttentionType.bahdanau, LuongScore.general, False, coverage=True),
    "luong-concat-cov": Spec(AttentionType.luong, LuongScore.concat, False, coverage=True),
    "bahdanau-rel": Spec(AttentionType.bahdanau, LuongScore.general, False, position_bias=PositionBias.relative),
    "luong-general-h2-rel": Spec(AttentionType.luong, LuongScore.general, False, heads=2,
                                 position_bias=PositionBias.relative),
    "local-p2-dot-rel": Spec(AttentionType.local, LuongScore.dot, False, mode=LocalMode.predictive, window=2,
                             position_bias=PositionBias.relative),
    "bahdanau-sa": Spec(AttentionType.bahdanau, LuongScore.general, False, self_attention=True),
    "luong-general-sa": Spec(AttentionType.luong, LuongScore.general, False, self_attention=True),
}
LAB = ["luong-scaled_dot-feed", "bahdanau-h4", "luong-general-h4-sparsemax", "bahdanau-entmax15",
       "local-m3-general-feed", "local-p2-dot", "local-m2-concat", "bahdanau-cov", "luong-concat-cov",
       "bahdanau-rel", "luong-general-h2-rel", "local-p2-dot-rel", "bahdanau-sa", "luong-general-sa"]
# local-p weighs its window by a Gaussian after normalising (Luong et al. 2015, eq. 10): its
# weights sum to at most 1
UNNORMALISED = ["local-p2-dot", "local-p2-dot-rel"]
ATTENTIVE = [v for v in VARIANTS if v != "none"]
KERNELS = ["fast", "reference"]  # the engines every model, gradient and search test runs on


def engine_of(model: Seq2Seq, kernels: str = "fast") -> Engine:
    """The CPU engine ``kernels`` over ``model``."""
    return build_engine(model, Kernels(kernels), torch.device("cpu"))


def model_config(variant: str, **overrides) -> ModelConfig:
    """A tiny config; decoder size is 2 x encoder size so that ``dot`` composes."""
    v = VARIANTS[variant]
    fields = dict(embedding_size=16, encoder_hidden_size=12, decoder_hidden_size=24, dropout=0.0,
                  attention=AttentionConfig(type=v.kind, score=v.score, input_feeding=v.feed, hidden_size=16,
                                            heads=v.heads, normalizer=v.normalizer, mode=v.mode,
                                            window=v.window, coverage=v.coverage,
                                            position_bias=v.position_bias, max_distance=4),
                  decoder_self_attention=v.self_attention)
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(variant: str, seed: int = 0, src_vocab: int = SRC_VOCAB, tgt_vocab: int = TGT_VOCAB,
               eos_bias: float = 0.0, scale: float = 1.0, **overrides) -> Seq2Seq:
    """A randomly initialised tiny model in eval mode. Every weight is multiplied by ``scale``
    (above 1, an untrained model's output depends more on its input); ``eos_bias`` is added to the
    EOS logit (positive: sentences end sooner; very negative: they never end on their own)."""
    torch.manual_seed(seed)
    model = build_model(model_config(variant, **overrides), src_vocab, tgt_vocab, PAD_ID)
    with torch.no_grad():
        relative = getattr(model.decoder.attention, "relative", None)
        if relative is not None:  # a trained-looking bias (it starts at zero) and a ratio that rounds
            relative.bias.weight.normal_(0.0, 1.0)
            relative.length_ratio.fill_(1.3)
        if scale != 1.0:
            for p in model.parameters():
                p.mul_(scale)
        if eos_bias:
            model.output_layer.bias[EOS_ID] += eos_bias
    return model.eval()


def random_sentences(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(FIRST_WORD, vocab, (k,), generator=g).tolist() for k in lengths]


def make_batch(src: list[list[int]], tgt: list[list[int]] | None = None) -> Batch:
    return collate(src, tgt, range(len(src)))


def logits_of(model: Seq2Seq, batch: Batch, kernels: str = "reference", **kwargs) -> torch.Tensor:
    """(B, T, V) teacher-forced logits through an engine's ``forward`` (parallel path where it exists)."""
    out = engine_of(model, kernels).forward(batch, **kwargs)
    return out.logits if out.logits is not None else model.project(out.hidden)


def stepwise_logits(model: Seq2Seq, batch: Batch, kernels: str = "reference"
                    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Teacher-forced logits by calling an engine's ``decode_step`` by hand, one target position at a time."""
    engine = engine_of(model, kernels)
    encoded = engine.encode(batch.src, batch.src_lengths, batch.src_mask)
    state, logits, attention = encoded.state, [], []
    weights = engine.search_weights()
    for t in range(batch.tgt_in.size(1)):
        out = engine.decode_step(batch.tgt_in[:, t], state, encoded.memory, weights)
        logits.append(out.logits)
        attention.append(out.attention)
        state = out.state
    return torch.stack(logits, dim=1), attention


def sequence_logprob(model: Seq2Seq, src: list[int], tokens: list[int]) -> float:
    """Log-probability of ``tokens`` + EOS given ``src``, re-scored with teacher forcing."""
    batch = make_batch([src], [tokens])
    with torch.no_grad():
        logp = torch.log_softmax(logits_of(model, batch).double(), dim=-1)[0]  # (T, V)
    target = batch.tgt_out[0]
    return float(logp.gather(1, target.unsqueeze(1)).sum())


def reference_logits(model: Seq2Seq, batch: Batch) -> torch.Tensor:
    """Teacher-forced logits the textbook way: ``nn.LSTM`` called once per step, h~ formed every
    step. The fused decoder must give the same numbers (it reuses the same parameters)."""
    dec = model.decoder
    encoded = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    memory, state = encoded.memory, encoded.state
    hidden, cell, feed, coverage = state.hidden, state.cell, state.feed, state.coverage
    logits, outputs = [], []
    for t in range(batch.tgt_in.size(1)):
        emb = dec.embedding(batch.tgt_in[:, t]).unsqueeze(1)  # (B, 1, E)
        positions = torch.full((batch.src.size(0), 1), t)  # the step, for local-m
        if dec.context_before_rnn:
            context, weights = dec.attention(hidden[-1].unsqueeze(1), memory, positions,
                                             None if coverage is None else coverage.unsqueeze(1))
            rnn_in = torch.cat([emb, context], dim=-1)
        elif dec.input_feeding:
            rnn_in = torch.cat([emb, feed.unsqueeze(1)], dim=-1)
        else:
            rnn_in = emb
        out, (hidden, cell) = dec.rnn(rnn_in, (hidden, cell))
        if dec.self_attention is not None:  # over every output so far, this one included
            sa = dec.self_attention
            outputs.append(out)
            keys, values = sa.key_value(torch.cat(outputs, dim=1)).chunk(2, dim=-1)
            own = torch.softmax(sa.query(out) @ keys.transpose(1, 2) / math.sqrt(sa.size), dim=-1) @ values
            out = out + own
        if not dec.context_before_rnn:
            context, weights = dec.attention(out, memory, positions,
                                             None if coverage is None else coverage.unsqueeze(1))
        if coverage is not None:  # the attention so far, for the next step's scores (a constant to backprop)
            coverage = coverage + weights.squeeze(1).detach()
        h_tilde = torch.tanh(dec.combine(torch.cat([out, context], dim=-1))).squeeze(1)
        feed = h_tilde
        logits.append(model.output_layer(h_tilde))
    return torch.stack(logits, dim=1)


def next_logprobs(model, src: list[int], prefix: list[int]) -> torch.Tensor:
    """(V,) log-probabilities of the token after ``prefix``, by teacher forcing."""
    batch = make_batch([src], [prefix])
    with torch.no_grad():
        return torch.log_softmax(logits_of(model, batch)[0, len(prefix)].double(), dim=-1)


def assert_same_or_tie(model, src: list[int], a: list[int], b: list[int], tol: float = 1e-4) -> None:
    """``a`` and ``b`` are the same tokens, or they part where two tokens are (numerically)
    equally probable, a tie that float rounding may break either way."""
    if a == b:
        return
    ext_a, ext_b = [*a, EOS_ID], [*b, EOS_ID]
    i = next(i for i, (x, y) in enumerate(zip(ext_a, ext_b)) if x != y)
    logp = next_logprobs(model, src, a[:i])
    gap = abs(float(logp[ext_a[i]] - logp[ext_b[i]]))
    assert gap < tol, f"outputs part at position {i} ({ext_a[i]} vs {ext_b[i]}, log-prob gap {gap:.2e}): {a} vs {b}"
