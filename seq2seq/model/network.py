"""The encoder-decoder and its builder.

Shape legend used across the package: B batch, S source length, T target length, E embedding
size, H hidden size, D encoder output size (2 x encoder hidden), P attentional-state size,
V vocabulary size, L layers, K beam size.

These modules are the reference model: plain torch on any device, the path a GPU runs. Search
and training reach the model through an engine (``seq2seq.model.engine``), which runs either
these methods or the CPU kernels on the same parameters.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
from torch import nn

from seq2seq.core.config import (
    AttentionType,
    LocalMode,
    LuongScore,
    ModelConfig,
    Normalizer,
    PositionBias,
)
from seq2seq.core.errors import ConfigError
from seq2seq.data.batching import Batch
from seq2seq.model.attention import (
    AdditiveAttention,
    Attention,
    AttentionMemory,
    LocalAttention,
    MultiplicativeAttention,
    NoAttention,
)
from seq2seq.model.decoder import Decoder, DecoderOutput, DecoderState
from seq2seq.model.encoder import Encoder
from seq2seq.model.losses import cross_entropy


class EncodedSource(NamedTuple):
    memory: AttentionMemory
    state: DecoderState


class StepOutput(NamedTuple):
    logits: torch.Tensor  # (B, V) float32
    state: DecoderState
    attention: torch.Tensor | None  # (B, S)


class Seq2Seq(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, output_layer: nn.Linear, description: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.output_layer = output_layer
        self.description = description  # e.g. "luong-general-feed", used in reports and plots

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncodedSource:
        enc = self.encoder(src, src_lengths, src_mask)
        memory = self.decoder.attention.prepare(enc)  # key projections: once per batch
        return EncodedSource(memory=memory, state=self.decoder.init_state(enc.summary, enc.mask))

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState, memory: AttentionMemory) -> StepOutput:
        """One decoder step from the previous tokens (N,); search's only entry. ``memory`` has N
        rows, or N / G rows each shared by G consecutive rows of the state (the beams of one
        sentence)."""
        h_tilde, state, attention = self.decoder.step(self.decoder.embedding(prev_tokens), state, memory)
        return StepOutput(logits=self.output_layer(h_tilde).float(), state=state, attention=attention)

    def forward(self, batch: Batch, teacher_forcing: float = 1.0, force_steps: bool = False) -> DecoderOutput:
        """Teacher-forced pass. Returns attentional states; ``project`` turns them into logits.

        ``force_steps`` runs the step-by-step path even where the parallel one exists (tests use
        it to check that both give the same logits).
        """
        encoded = self.encode(batch.src, batch.src_lengths, batch.src_mask)
        if self.decoder.parallel and teacher_forcing >= 1.0 and not force_steps:
            return self.decoder.forward_parallel(batch.tgt_in, encoded.state, encoded.memory)
        return self.decoder.forward_steps(batch.tgt_in, encoded.state, encoded.memory,
                                          project=self.output_layer, teacher_forcing=teacher_forcing)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layer(hidden)

    def loss(self, out: DecoderOutput, batch: Batch, label_smoothing: float) -> torch.Tensor:
        """Mean token cross-entropy of a teacher-forced pass over the real target positions."""
        mask = batch.tgt_mask
        logits = out.logits[mask] if out.logits is not None else self.output_layer(out.hidden[mask])
        return cross_entropy(logits, batch.tgt_out[mask], label_smoothing)


def describe(cfg: ModelConfig) -> str:
    """The model's name in reports and plots: ``bahdanau``, ``luong-general-feed``, and for the
    attention variants ``-h<heads>`` and the normalizer (``luong-scaled_dot-h4-sparsemax``)."""
    att = cfg.attention
    if att.type == AttentionType.luong:
        name = f"luong-{att.score.value}" + ("-feed" if att.input_feeding else "")
    elif att.type == AttentionType.local:  # local-m / local-p, Luong et al.'s names
        name = (f"local-{'m' if att.mode == LocalMode.monotonic else 'p'}{att.window}-{att.score.value}"
                + ("-feed" if att.input_feeding else ""))
    else:
        name = att.type.value
    if att.type != AttentionType.none:
        name += f"-h{att.heads}" if att.heads > 1 else ""
        name += f"-{att.normalizer.value}" if att.normalizer != Normalizer.softmax else ""
        name += "-cov" if att.coverage else ""
        name += "-rel" if att.position_bias == PositionBias.relative else ""
    return name + ("-sa" if cfg.decoder_self_attention else "")


def check_model_config(cfg: ModelConfig) -> None:
    """Reject sizes that compose but cannot build a model, naming the key."""
    positive = {
        "model.embedding_size": cfg.embedding_size,
        "model.encoder_hidden_size": cfg.encoder_hidden_size,
        "model.encoder_layers": cfg.encoder_layers,
        "model.decoder_hidden_size": cfg.decoder_hidden_size,
        "model.decoder_layers": cfg.decoder_layers,
        "model.attention.hidden_size": cfg.attention.hidden_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1) (got {cfg.dropout})")
    att = cfg.attention
    dot = att.score in (LuongScore.dot, LuongScore.scaled_dot)
    scored_after = att.type in (AttentionType.luong, AttentionType.local)
    if scored_after and dot and cfg.decoder_hidden_size != 2 * cfg.encoder_hidden_size:
        raise ConfigError(
            f"model.attention.score={att.score.value} needs model.decoder_hidden_size == 2 x "
            f"model.encoder_hidden_size ({cfg.decoder_hidden_size} != {2 * cfg.encoder_hidden_size}); "
            "use score=general or change the sizes"
        )
    if att.heads < 1:
        raise ConfigError(f"model.attention.heads must be a positive integer (got {att.heads})")
    if att.type == AttentionType.local:
        if att.window < 1:
            raise ConfigError(f"model.attention.window must be a positive integer (got {att.window})")
        if att.heads > 1:
            raise ConfigError(f"model.attention.heads={att.heads} does not combine with local attention (one "
                              "window per step); use heads=1, or global attention (model/attention=luong)")
    if att.type == AttentionType.none:
        for key, value, default in (("heads", att.heads, 1), ("normalizer", att.normalizer, Normalizer.softmax),
                                    ("coverage", att.coverage, False),
                                    ("position_bias", att.position_bias, PositionBias.none)):
            if value != default:
                shown = value.value if isinstance(value, Enum) else str(value).lower()
                raise ConfigError(f"model.attention.{key}={shown} needs an attention to apply to; "
                                  "choose model/attention=bahdanau or luong")
        return
    additive = att.type == AttentionType.bahdanau or att.score == LuongScore.concat
    if att.position_bias == PositionBias.relative:
        if att.max_distance < 1:
            raise ConfigError(f"model.attention.max_distance must be a positive integer (got {att.max_distance})")
    if att.coverage:
        if not additive or att.type == AttentionType.local or att.heads > 1:
            raise ConfigError("model.attention.coverage=true feeds the coverage vector into an additive score of "
                              "one head over the whole source (v^T tanh(W q + U h + w_c c)): use "
                              "model/attention=bahdanau, or luong with model.attention.score=concat, and heads=1")
    # what each head takes a 1/heads share of
    split = {"the encoder states (2 x model.encoder_hidden_size)": 2 * cfg.encoder_hidden_size}
    if additive:
        split["model.attention.hidden_size"] = att.hidden_size
    else:
        split["model.decoder_hidden_size"] = cfg.decoder_hidden_size
    for what, size in split.items():
        if size % att.heads:
            raise ConfigError(f"model.attention.heads={att.heads} must divide {what} ({size}); choose a "
                              "number of heads that divides it")


def build_attention(cfg: ModelConfig, query_size: int, value_size: int) -> Attention:
    att = cfg.attention
    if att.type == AttentionType.none:
        return NoAttention(query_size, value_size)
    scorer: AdditiveAttention | MultiplicativeAttention
    distance = att.max_distance if att.position_bias == PositionBias.relative else 0
    local = att.type == AttentionType.local
    # a local attention's bias is its own (distances to its window's centre), not its scorer's
    scorer_distance = 0 if local else distance
    if att.type == AttentionType.bahdanau or att.score == LuongScore.concat:
        scorer = AdditiveAttention(query_size, value_size, att.hidden_size, att.heads, att.normalizer, att.coverage,
                                   scorer_distance)
    else:
        scorer = MultiplicativeAttention(query_size, value_size, general=att.score == LuongScore.general,
                                         scaled=att.score == LuongScore.scaled_dot, heads=att.heads,
                                         normalizer=att.normalizer, relative_distance=scorer_distance)
    if local:
        return LocalAttention(scorer, att.window, predictive=att.mode == LocalMode.predictive,
                              relative_distance=distance)
    return scorer


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int) -> Seq2Seq:
    check_model_config(cfg)
    encoder = Encoder(src_vocab_size, cfg.embedding_size, cfg.encoder_hidden_size, cfg.encoder_layers,
                      cfg.dropout, pad_id)
    context_size = encoder.output_size
    # With tied embeddings the output layer reuses the target embedding matrix, so h~ must have
    # the embedding's size.
    output_size = cfg.embedding_size if cfg.tie_embeddings else cfg.decoder_hidden_size
    is_luong = cfg.attention.type in (AttentionType.luong, AttentionType.local)  # scored after the LSTM step
    decoder = Decoder(
        vocab_size=tgt_vocab_size,
        embedding_size=cfg.embedding_size,
        hidden_size=cfg.decoder_hidden_size,
        num_layers=cfg.decoder_layers,
        context_size=context_size,
        output_size=output_size,
        attention=build_attention(cfg, cfg.decoder_hidden_size, context_size),
        context_before_rnn=not is_luong,
        input_feeding=is_luong and cfg.attention.input_feeding,
        dropout=cfg.dropout,
        pad_id=pad_id,
        self_attention=cfg.decoder_self_attention,
    )
    output_layer = nn.Linear(output_size, tgt_vocab_size)
    if cfg.tie_embeddings:
        output_layer.weight = decoder.embedding.weight
    return Seq2Seq(encoder, decoder, output_layer, describe(cfg))


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], most: int = 4) -> str:
    """Which tensors of ``state`` do not fit ``model``: missing, unexpected, or of another shape,
    the first ``most`` of each named (for a one-line error)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]

    def names(label: str, items: list[str]) -> str:
        more = f" and {len(items) - most} more" if len(items) > most else ""
        return f"{label}: {', '.join(items[:most])}{more}"

    parts = [names(label, items) for label, items in
             (("other shapes (checkpoint vs model)", shapes), ("missing", missing), ("unexpected", unexpected))
             if items]
    return "; ".join(parts) or "no tensor differs by name or shape"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
