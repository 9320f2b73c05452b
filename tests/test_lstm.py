"""The fast engine's bi-LSTM (seq2seq/kernels/lstm.py, via seq2seq.model.fast.encode_source) computes what nn.LSTM over packed sequences computes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.kernels.compat import cpu_runs_bf16_lstm
from seq2seq.model.encoder import Encoder
from seq2seq.model.fast import encode_source

LENGTHS = [7, 3, 5, 1, 7, 2]


def _encoder(layers: int, seed: int = 0) -> tuple[Encoder, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    enc = Encoder(vocab_size=40, embedding_size=8, hidden_size=6, num_layers=layers, dropout=0.0, pad_id=0)
    lengths = torch.tensor(LENGTHS)
    mask = torch.arange(max(LENGTHS))[None] < lengths[:, None]
    src = torch.randint(1, 40, mask.shape).masked_fill(~mask, 0)
    return enc, src, lengths, mask


def _reference(enc: Encoder, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTM over packed sequences: what the encoder runs on CUDA."""
    packed = pack_padded_sequence(enc.embedding(src), lengths, batch_first=True, enforce_sorted=False)
    out, (h, _) = enc.rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
    return out, torch.cat([h[-2], h[-1]], dim=-1)


@pytest.mark.parametrize("layers", [1, 2])
def test_outputs_summary_and_gradients_equal_packed_nn_lstm(layers):
    enc, src, lengths, mask = _encoder(layers)
    ours = encode_source(enc, src, lengths, mask)
    ref_out, ref_summary = _reference(enc, src, lengths)
    torch.testing.assert_close(ours.outputs, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.summary, ref_summary, rtol=1e-5, atol=1e-6)
    w_out, w_sum = torch.randn_like(ours.outputs), torch.randn_like(ours.summary)
    params = list(enc.parameters())
    grads = torch.autograd.grad((ours.outputs * w_out).sum() + (ours.summary * w_sum).sum(), params)
    ref_out, ref_summary = _reference(enc, src, lengths)
    expected = torch.autograd.grad((ref_out * w_out).sum() + (ref_summary * w_sum).sum(), params)
    for (name, _), got, want in zip(enc.named_parameters(), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_outputs_are_zero_and_a_sentence_does_not_depend_on_its_batch():
    enc, src, lengths, mask = _encoder(2)
    batch = encode_source(enc, src, lengths, mask)
    assert not batch.outputs[~mask].any()
    _assert_each_sentence_alone_gives_the_same(enc, src, lengths, mask, batch)


def _assert_each_sentence_alone_gives_the_same(enc: Encoder, src: torch.Tensor, lengths: torch.Tensor,
                                               mask: torch.Tensor, batch) -> None:
    for i, n in enumerate(LENGTHS):
        alone = encode_source(enc, src[i: i + 1, :n], lengths[i: i + 1], mask[i: i + 1, :n])
        torch.testing.assert_close(alone.outputs[0], batch.outputs[i, :n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone.summary[0], batch.summary[i], rtol=1e-5, atol=1e-6)


def test_no_grad_path_equals_the_training_path():
    enc, src, lengths, mask = _encoder(1)
    tracked = encode_source(enc, src, lengths, mask)
    with torch.no_grad():
        plain = encode_source(enc, src, lengths, mask)
    assert torch.equal(tracked.outputs.detach(), plain.outputs)
    assert torch.equal(tracked.summary.detach(), plain.summary)


def test_bf16_autocast_stays_close_to_float32_and_returns_bf16_outputs():
    enc, src, lengths, mask = _encoder(1)
    full = encode_source(enc, src, lengths, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = encode_source(enc, src, lengths, mask)
    assert half.outputs.dtype == torch.bfloat16
    assert half.summary.dtype == torch.float32  # the cell state and non-linearities stay float32
    torch.testing.assert_close(half.outputs.float(), full.outputs, rtol=0.05, atol=0.02)
    (half.outputs.float().sum() + half.summary.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.rnn.parameters())


@pytest.mark.parametrize("layers", [1, 2])
def test_inference_path_equals_packed_nn_lstm_and_ignores_the_batch(layers):
    """Evaluation without autograd runs each direction as one nn.LSTM call over the padded batch,
    the backward one over sentences reversed in place: same outputs, summary and zero padding."""
    enc, src, lengths, mask = _encoder(layers, seed=3)
    enc.eval()
    with torch.no_grad():
        ours = encode_source(enc, src, lengths, mask)
        ref_out, ref_summary = _reference(enc, src, lengths)
        torch.testing.assert_close(ours.outputs, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.summary, ref_summary, rtol=1e-5, atol=1e-6)
        assert not ours.outputs[~mask].any()
        _assert_each_sentence_alone_gives_the_same(enc, src, lengths, mask, ours)


@pytest.mark.usefixtures("cpu_bf16")
def test_inference_path_under_bf16_autocast_stays_close_and_matches_the_training_dtypes():
    enc, src, lengths, mask = _encoder(2, seed=4)
    enc.eval()
    with torch.no_grad():
        full = encode_source(enc, src, lengths, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = encode_source(enc, src, lengths, mask)
            stepped = encode_source(enc.train(), src, lengths, mask)  # the step loop, for the dtypes
    if cpu_runs_bf16_lstm():  # torch's own LSTM (cpu_bf16, no AVX512) returns float32 under autocast
        assert half.outputs.dtype == stepped.outputs.dtype == torch.bfloat16
    assert half.summary.dtype == stepped.summary.dtype == torch.float32
    torch.testing.assert_close(half.outputs.float(), full.outputs, rtol=0.05, atol=0.02)
    torch.testing.assert_close(half.summary, full.summary, rtol=0.05, atol=0.02)


def test_lstm_cell_function_matches_the_elementwise_formula_and_its_gradients():
    from seq2seq.kernels.lstm import lstm_cell

    g = torch.Generator().manual_seed(3)
    gates = (2 * torch.randn(5, 4 * 6, generator=g)).requires_grad_()
    c = torch.randn(5, 6, generator=g).requires_grad_()
    h, c_new = lstm_cell(gates, c)
    i, f, gg, o = gates.chunk(4, dim=-1)
    ref_c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    ref_h = torch.sigmoid(o) * torch.tanh(ref_c)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c_new, ref_c)
    w_h, w_c = torch.randn_like(h), torch.randn_like(c_new)
    ours = torch.autograd.grad((h * w_h).sum() + (c_new * w_c).sum(), [gates, c])
    expected = torch.autograd.grad((ref_h * w_h).sum() + (ref_c * w_c).sum(), [gates, c])
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)
    # only h used downstream: the cell state's gradient input is None
    ours_h = torch.autograd.grad((lstm_cell(gates, c)[0] * w_h).sum(), [gates, c])
    ref_h = torch.sigmoid(o) * torch.tanh(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg))
    expected_h = torch.autograd.grad((ref_h * w_h).sum(), [gates, c])
    for got, want in zip(ours_h, expected_h):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        plain_h, plain_c = lstm_cell(gates, c)
    torch.testing.assert_close(plain_h, ref_h.detach())
    torch.testing.assert_close(plain_c, ref_c.detach())
