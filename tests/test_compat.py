"""A torch without one of the private APIs the kernels use: that piece runs its public-API form,
with one warning, and computes the same."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from helpers_model import SRC_VOCAB, make_batch, make_model, random_sentences

from seq2seq.kernels import adam, compat
from seq2seq.model import fast


def test_a_missing_private_api_gives_none_and_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    owner = types.SimpleNamespace(present=len)
    with caplog.at_level(logging.WARNING, logger="seq2seq.kernels.compat"):
        assert compat.private(owner, "present", "a feature", "the plain way") is len
        assert compat.private(owner, "absent", "a feature", "the plain way") is None
        assert compat.private(owner, "absent", "a feature", "the plain way") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "absent" in warnings[0] and "the plain way" in warnings[0]


def test_without_vf_lstm_the_encoder_runs_its_step_loop_at_inference(monkeypatch):
    model = make_model("bahdanau")
    batch = make_batch(random_sentences(5, 1, 9, SRC_VOCAB, seed=2))
    with torch.no_grad():
        one_call = fast.encode_source(model.encoder, batch.src, batch.src_lengths, batch.src_mask)
        monkeypatch.setattr(fast, "vf_lstm", lambda: None)
        stepped = fast.encode_source(model.encoder, batch.src, batch.src_lengths, batch.src_mask)
    torch.testing.assert_close(stepped.outputs, one_call.outputs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stepped.summary, one_call.summary, atol=1e-6, rtol=1e-5)


def test_without_the_fused_kernel_adam_updates_tensor_by_tensor(monkeypatch):
    def run(kernel_found: bool) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
        opt = adam.Adam(params, lr=0.01, weight_decay=0.01)
        if not kernel_found:
            monkeypatch.setattr(adam, "fused_adam", lambda decoupled: None)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(grad_scale=torch.tensor(2.0))
        monkeypatch.undo()
        return [p.detach() for p in params]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_the_cpu_bf16_probes_precision_auto_is_float32(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.setattr(compat.torch, "cpu", types.SimpleNamespace())
    assert compat.cpu_has_native_bf16() is False


def test_bf16_on_a_cpu_without_a_bf16_lstm_is_refused_or_evaluated_in_float32(monkeypatch, caplog):
    """oneDNN has no bf16 LSTM without AVX512 / AVX-NE-CONVERT / AMX (an AMD EPYC without AVX512):
    a forced precision=bf16 would crash inside the first LSTM call. A config asking for it is
    refused with the key named; a run trained in bf16 elsewhere evaluates in float32, warned."""
    from seq2seq.core.config import Precision
    from seq2seq.core.errors import ConfigError
    from seq2seq.model import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_runs_bf16_lstm", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer\.precision=bf16: this CPU cannot run the LSTM in bf16"):
        devices.autocast_dtype(Precision.bf16, cpu)
    with caplog.at_level(logging.WARNING, logger="seq2seq.model.devices"):
        assert devices.autocast_dtype(Precision.bf16, cpu, saved=True) is None
    assert "evaluating in float32" in caplog.text
    assert devices.autocast_dtype(Precision.fp32, cpu) is None
    monkeypatch.setattr(devices, "cpu_runs_bf16_lstm", lambda: True)
    assert devices.autocast_dtype(Precision.bf16, cpu) == torch.bfloat16


def test_the_bf16_lstm_probe_agrees_with_running_one():
    """The probe says what this machine does: where it says no, nn.LSTM under bf16 autocast
    raises; where it says yes, it runs."""
    lstm = torch.nn.LSTM(8, 8, batch_first=True, bidirectional=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.randn(3, 5, 8))
        runs = True
    except RuntimeError:
        runs = False
    assert compat.cpu_runs_bf16_lstm() is runs
