"""Engines: what runs the model. One switch (``trainer.kernels``, ``kernels=`` for evaluate and
translate) picks one per process:

- ``reference``: the model modules themselves (``encoder.py``, ``attention.py``, ``decoder.py``,
  ``network.py``): nn.LSTM over packed sequences (cuDNN on CUDA), the parallel decoder or the
  autograd step loop, plain matmuls, and torch's optimizer step. This is what a GPU runs.
- ``fast``: the same parameters through the CPU kernels (``seq2seq.model.fast``).
- ``auto``: ``fast`` on the CPU, ``reference`` elsewhere (the kernels are CPU kernels; no GPU
  measurement has yet shown they pay there).

Search, training and evaluation use an engine's methods only, never the model's directly, so
either engine serves every command.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from seq2seq.core.config import Kernels
from seq2seq.data.batching import Batch
from seq2seq.model.attention import AttentionMemory
from seq2seq.model.decoder import DecoderOutput, DecoderState
from seq2seq.model.fast import FastEngine
from seq2seq.model.network import EncodedSource, Seq2Seq, StepOutput

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str  # "reference" or "fast"
    model: Seq2Seq

    def paths(self) -> dict[str, str]:
        """What runs the encoder, the teacher-forced decoder and search: for the log and summary.json."""
        ...

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncodedSource: ...

    def forward(self, batch: Batch, teacher_forcing: float = 1.0, force_steps: bool = False) -> DecoderOutput: ...

    def loss(self, out: DecoderOutput, batch: Batch, label_smoothing: float) -> torch.Tensor: ...

    def search_weights(self) -> Any:
        """What ``decode_step`` applies at every step, prepared once per search (inside its
        autocast region)."""
        ...

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                    weights: Any) -> StepOutput: ...

    def search_scope(self) -> contextlib.AbstractContextManager[None]: ...


class ReferenceEngine:
    """The model modules as they are."""

    name = "reference"

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model

    def paths(self) -> dict[str, str]:
        decoder = self.model.decoder
        return {"encoder": "nn.LSTM over packed sequences",
                "decoder": "parallel nn.LSTM over the whole target" if decoder.parallel
                else "autograd step loop (Decoder.step)",
                "search": "Decoder.step, plain matmuls"}

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncodedSource:
        return self.model.encode(src, src_lengths, src_mask)

    def forward(self, batch: Batch, teacher_forcing: float = 1.0, force_steps: bool = False) -> DecoderOutput:
        return self.model(batch, teacher_forcing=teacher_forcing, force_steps=force_steps)

    def loss(self, out: DecoderOutput, batch: Batch, label_smoothing: float) -> torch.Tensor:
        return self.model.loss(out, batch, label_smoothing)

    def search_weights(self) -> None:
        return None

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                    weights: None = None) -> StepOutput:
        return self.model.decode_step(prev_tokens, state, memory)

    @contextlib.contextmanager
    def search_scope(self) -> Iterator[None]:
        yield


def build_engine(model: Seq2Seq, kernels: Kernels, device: torch.device, key: str = "trainer.kernels") -> Engine:
    """The engine ``kernels`` asks for on ``device``. The kernels are CPU kernels: ``fast``
    elsewhere runs the reference, with one info line, never an error."""
    if kernels == Kernels.reference:
        return ReferenceEngine(model)
    if device.type != "cpu":
        if kernels == Kernels.fast:
            log.info("%s=fast: the kernels are CPU kernels; on %s the reference model runs", key, device.type)
        return ReferenceEngine(model)
    if not model.decoder.attention.standard or model.decoder.self_attention is not None:
        # a variant is written once, in the reference model
        log.info("%s: no CPU kernel for %s attention; the reference model runs", key, model.description)
        return ReferenceEngine(model)
    return FastEngine(model)


def describe_engine(engine: Engine) -> str:
    """One line for the log: the engine and the path each part takes."""
    return f"engine {engine.name}: " + "; ".join(f"{part}: {path}" for part, path in engine.paths().items())
