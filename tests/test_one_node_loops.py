"""The one-node training loops (``seq2seq/kernels/feedloop.py`` for Luong attention with input feeding,
``seq2seq/kernels/bahdanauloop.py`` for Bahdanau attention): their outputs and every parameter's gradient
against the textbook decoder (``nn.LSTM`` per step, autograd), in float32 and under bf16 autocast,
and which models take them."""

from __future__ import annotations

import pytest
import torch
from helpers_model import (
    LAB,
    SRC_VOCAB,
    TGT_VOCAB,
    VARIANTS,
    engine_of,
    logits_of,
    make_batch,
    make_model,
    random_sentences,
    reference_logits,
)

from seq2seq.model.fast import FastDecoder

LOOPED = ["luong-general-feed", "luong-dot-feed", "bahdanau"]  # the models that take a one-node loop
# the CPU kernels' families only: the attention lab's variants run the reference model
STANDARD = [v for v in VARIANTS if v not in LAB]
FEED = [v for v in STANDARD if VARIANTS[v].feed]


def _batch(n: int = 6, max_tgt: int = 9, seed: int = 1):
    """Sources and targets of different lengths, so both sides carry padding."""
    src = random_sentences(n, 1, 11, SRC_VOCAB, seed)
    tgt = random_sentences(n, 1, max_tgt, TGT_VOCAB, seed + 1)
    return make_batch(src, tgt)


def _gradients(model, logits_fn, batch, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every parameter's gradient of a random linear function of the real positions' logits."""
    model.zero_grad()
    logits = logits_fn(model, batch)
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(logits.shape, generator=g) * batch.tgt_mask.unsqueeze(-1)
    (logits.float() * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fast_logits(model, batch) -> torch.Tensor:
    return logits_of(model, batch, kernels="fast")


def _autograd_loop(monkeypatch) -> None:
    """Send every model through the autograd step loop instead (the path the loops replaced)."""
    monkeypatch.setattr(FastDecoder, "loop", property(lambda self: "steps"))


@pytest.mark.parametrize("variant", LOOPED)
def test_multiplicative_feed_and_bahdanau_models_take_a_one_node_loop(variant):
    assert FastDecoder(make_model(variant).decoder).loop in ("feed", "bahdanau")


@pytest.mark.parametrize("variant", sorted(set(STANDARD) - set(LOOPED)))
def test_other_models_do_not(variant):
    assert FastDecoder(make_model(variant).decoder).loop in ("parallel", "steps")


@pytest.mark.parametrize("variant", LOOPED)
def test_two_layer_models_keep_the_autograd_loop(variant):
    assert FastDecoder(make_model(variant, decoder_layers=2).decoder).loop == "steps"


@pytest.mark.parametrize("variant", [*FEED, "bahdanau"])
@pytest.mark.parametrize("max_tgt", [1, 9], ids=["one-step", "steps"])
def test_logits_and_every_gradient_match_the_textbook_decoder(variant, max_tgt):
    model = make_model(variant, scale=1.5).train()  # dropout is 0: training mode, same numbers
    batch = _batch(max_tgt=max_tgt)
    expected, expected_grads = _gradients(model, reference_logits, batch)
    logits, grads = _gradients(model, _fast_logits, batch)
    mask = batch.tgt_mask
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", LOOPED)
@pytest.mark.usefixtures("cpu_bf16")
def test_bf16_autocast_matches_the_autograd_loop_to_bf16_rounding(variant, monkeypatch):
    """Same arithmetic in the same dtypes (the loop's attention is float32, more exact): the two
    differ by bf16 rounding, not by a mistake, which would show as an O(1) relative error."""
    model = make_model(variant, decoder_hidden_size=64, encoder_hidden_size=32, embedding_size=32).train()
    batch = _batch(n=8, max_tgt=12)

    def autocast_logits(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _fast_logits(m, b)

    logits, grads = _gradients(model, autocast_logits, batch)
    with monkeypatch.context() as patch:
        _autograd_loop(patch)
        expected, expected_grads = _gradients(model, autocast_logits, batch)
    mask = batch.tgt_mask
    scale = expected[mask].abs().max()
    assert (logits[mask] - expected[mask]).abs().max() < 0.05 * scale
    for name, grad in expected_grads.items():
        err = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert err < 0.05, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("variant", LOOPED)
def test_without_gradients_gives_the_same_states_and_weights(variant):
    model = make_model(variant).train()
    batch = _batch()
    with_grad = engine_of(model, "fast").forward(batch)
    with torch.no_grad():
        without = engine_of(model, "fast").forward(batch)
    torch.testing.assert_close(without.hidden, with_grad.hidden.detach(), atol=0, rtol=0)
    torch.testing.assert_close(without.attention, with_grad.attention, atol=0, rtol=0)
    assert not with_grad.attention.requires_grad  # the weights are reported, not differentiated


@pytest.mark.parametrize("variant", ["luong-general-feed", "bahdanau"])
def test_scheduled_sampling_still_trains(variant):
    """Sampling runs the autograd loop (the words depend on the model's own predictions)."""
    model = make_model(variant).train()
    batch = _batch()
    out = engine_of(model, "fast").forward(batch, teacher_forcing=0.5)
    assert out.logits is not None
    out.logits.sum().backward()
    assert model.decoder.rnn.weight_hh_l0.grad.abs().sum() > 0
