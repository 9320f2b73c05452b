"""The encoder-decoder in every attention variant: shapes, gradients, masking, padding invariance,
parallel vs step-by-step decoding, overfitting a tiny batch, scheduled sampling, config checks and
a checkpoint round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers_model import (
    ATTENTIVE,
    FIRST_WORD,
    SRC_VOCAB,
    TGT_VOCAB,
    UNNORMALISED,
    VARIANTS,
    engine_of,
    logits_of,
    make_batch,
    make_model,
    model_config,
    random_sentences,
    reference_logits,
    stepwise_logits,
)
from reference_search import greedy_search

from seq2seq.core.config import (
    AttentionConfig,
    AttentionType,
    CorpusSource,
    DataConfig,
    Device,
    LuongScore,
    Normalizer,
    SearchConfig,
    SyntheticConfig,
    TokenizerConfig,
    TrainConfig,
    TrainerConfig,
)
from seq2seq.core.errors import ConfigError
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.model import fast
from seq2seq.model.attention import (
    AdditiveAttention,
    LocalAttention,
    MultiplicativeAttention,
    NoAttention,
)
from seq2seq.model.encoder import EncoderOutput
from seq2seq.model.network import build_model, describe

ALL = list(VARIANTS)

# Three sentences of different lengths on both sides, so every batch has source and target padding.
SRC = [[4, 5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]
TGT = [[4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16]]



@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def batch3():
    return make_batch(SRC, TGT)


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize("variant", ALL)
def test_builds_the_named_variant(variant):
    model = make_model(variant)
    kind, score, feed = VARIANTS[variant][:3]
    assert model.description == variant == describe(model_config(variant))
    attention = model.decoder.attention
    if kind == AttentionType.local:  # a window around any global score
        assert isinstance(attention, LocalAttention) and attention.window == VARIANTS[variant].window
        attention = attention.scorer
    if kind == AttentionType.none:
        assert isinstance(attention, NoAttention)
    elif kind == AttentionType.bahdanau or score == LuongScore.concat:
        assert isinstance(attention, AdditiveAttention)
    else:
        assert isinstance(attention, MultiplicativeAttention)
    assert model.decoder.input_feeding == feed
    # Bahdanau and no attention feed the context before the LSTM; Luong (and local) after.
    after = kind in (AttentionType.luong, AttentionType.local)
    assert model.decoder.context_before_rnn == (not after)
    # The parallel teacher-forced path exists exactly when no step waits for an earlier one.
    # (A coverage model's step reads the attention of the steps before it.)
    assert model.decoder.parallel == (kind == AttentionType.none or (after and not feed
                                                                     and not VARIANTS[variant].coverage))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", ALL)
def test_fused_decoder_matches_a_per_step_nn_lstm(variant, layers, kernels):
    """The training step path, the search step and a plain nn.LSTM-per-step decoder agree."""
    model = make_model(variant, decoder_layers=layers, scale=1.5)
    batch = batch3()
    with torch.no_grad():
        expected = reference_logits(model, batch)
        torch.testing.assert_close(logits_of(model, batch, kernels=kernels, force_steps=True), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stepwise_logits(model, batch, kernels)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("variant", ALL)
def test_fused_decoder_gradients_match_a_per_step_nn_lstm(variant, layers, kernels):
    """The one-matmul weight gradients of the step loop equal plain autograd's, for every parameter."""
    batch = batch3()
    grads = []
    for reference in (False, True):
        model = make_model(variant, decoder_layers=layers, scale=1.5).train()  # dropout is 0
        logits = reference_logits(model, batch) if reference else logits_of(model, batch, kernels=kernels, force_steps=True)
        mask = batch.tgt_mask
        torch.nn.functional.cross_entropy(logits[mask], batch.tgt_out[mask]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    fused, expected = grads
    assert fused.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(fused[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("force_steps", [False, True], ids=["default-path", "step-path"])
@pytest.mark.parametrize("variant", ALL)
def test_forward_shapes_and_finite_gradients_for_every_parameter(variant, force_steps, kernels):
    model = make_model(variant).train()
    batch = batch3()
    b, s = batch.src.shape
    t = batch.tgt_in.size(1)
    out = engine_of(model, kernels).forward(batch, force_steps=force_steps)
    assert out.hidden.shape == (b, t, model.decoder.output_size)
    assert out.logits is None  # only scheduled sampling returns logits
    logits = model.project(out.hidden)
    assert logits.shape == (b, t, TGT_VOCAB)
    assert torch.isfinite(logits).all()
    if variant == "none":
        assert out.attention is None
    else:
        assert out.attention.shape == (b, t, s)
    mask = batch.tgt_mask
    loss = torch.nn.functional.cross_entropy(logits[mask], batch.tgt_out[mask])
    loss.backward()
    params = dict(model.named_parameters())
    if variant == "none":
        assert not any(name.startswith("decoder.attention.") for name in params)
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient (unused by the loss?)"
    # The padding rows of the embeddings never learn.
    assert model.encoder.embedding.weight.grad[PAD_ID].abs().sum() == 0
    assert model.decoder.embedding.weight.grad[PAD_ID].abs().sum() == 0


# ----------------------------------------------------------------------------- attention weights


def _check_weights(weights: torch.Tensor, src_mask: torch.Tensor, positive: bool = True,
                   normalised: bool = True) -> None:
    """(B, T, S) weights: rows sum to 1 (at most 1 unless ``normalised``) and are exactly 0.0 at
    padded source positions."""
    if normalised:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5, rtol=0)
    else:
        assert (weights.sum(-1) <= 1 + 1e-5).all() and (weights.sum(-1) > 0).all()
    pad = (~src_mask).unsqueeze(1).expand_as(weights)
    assert pad.any()
    assert (weights[pad] == 0.0).all()
    if positive:  # moderate scores: every real position gets some weight
        assert (weights[~pad] > 0.0).all()


@pytest.mark.parametrize("variant", ATTENTIVE)
def test_attention_sums_to_one_and_is_zero_at_padding(variant, kernels):
    model = make_model(variant)
    batch = batch3()
    # softmax over every position gives each some weight; sparse normalizers and windows do not
    spec = VARIANTS[variant]
    check = dict(positive=spec.normalizer == Normalizer.softmax and spec.kind != AttentionType.local,
                 normalised=variant not in UNNORMALISED)
    with torch.no_grad():
        _check_weights(engine_of(model, kernels).forward(batch).attention, batch.src_mask, **check)
        _check_weights(engine_of(model, kernels).forward(batch, force_steps=True).attention, batch.src_mask, **check)
        _, step_attention = stepwise_logits(model, batch, kernels)
    _check_weights(torch.stack(step_attention, dim=1), batch.src_mask, **check)


def test_attention_stays_zero_at_padding_with_huge_scores():
    """Masking happens before the softmax: even scores of 1e4 leave padding at exactly 0."""
    model = make_model("luong-dot")
    batch = batch3()
    with torch.no_grad():
        encoded = model.encode(batch.src, batch.src_lengths, batch.src_mask)
        memory = encoded.memory._replace(keys=encoded.memory.keys * 1e4)
        query = torch.randn(batch.src.size(0), 5, model.decoder.hidden_size)
        result = model.decoder.attention(query, memory)
    _check_weights(result.weights, batch.src_mask, positive=False)


def test_no_attention_returns_no_weights(kernels):
    model = make_model("none")
    batch = batch3()
    with torch.no_grad():
        assert engine_of(model, kernels).forward(batch).attention is None
        assert engine_of(model, kernels).forward(batch, force_steps=True).attention is None
        _, step_attention = stepwise_logits(model, batch, kernels)
    assert all(a is None for a in step_attention)


# ----------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("variant", ALL)
def test_outputs_do_not_depend_on_padding(variant, kernels):
    model = make_model(variant)
    short_src, short_tgt = [4, 5, 6, 7], [8, 9, 10]
    long_src, long_tgt = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [4, 5, 6, 7, 8, 9, 10, 11]
    alone = make_batch([short_src], [short_tgt])
    padded = make_batch([long_src, short_src, long_src], [long_tgt, short_tgt, long_tgt])
    t = alone.tgt_in.size(1)
    with torch.no_grad():
        for force_steps in (False, True):
            a = logits_of(model, alone, kernels=kernels, force_steps=force_steps)[0]
            b = logits_of(model, padded, kernels=kernels, force_steps=force_steps)[1, :t]
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        step_a, _ = stepwise_logits(model, alone, kernels)
        step_b, _ = stepwise_logits(model, padded, kernels)
    torch.testing.assert_close(step_b[1, :t], step_a[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- parallel vs steps


@pytest.mark.parametrize("variant", ALL)
def test_parallel_path_step_path_and_decode_step_agree(variant, kernels):
    model = make_model(variant)
    batch = batch3()
    mask = batch.tgt_mask
    with torch.no_grad():
        default = engine_of(model, kernels).forward(batch)
        steps = engine_of(model, kernels).forward(batch, force_steps=True)
        by_hand, hand_attention = stepwise_logits(model, batch, kernels)
    torch.testing.assert_close(model.project(steps.hidden)[mask], model.project(default.hidden)[mask],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(by_hand[mask], model.project(default.hidden)[mask], atol=1e-5, rtol=0)
    if variant != "none":
        att_mask = mask.unsqueeze(-1).expand_as(default.attention)
        torch.testing.assert_close(steps.attention[att_mask], default.attention[att_mask], atol=1e-6, rtol=0)
        hand = torch.stack(hand_attention, dim=1)
        torch.testing.assert_close(hand[att_mask], default.attention[att_mask], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ALL)
def test_input_feeding_carries_the_attentional_state(variant):
    """The state after a step holds that step's h~ (what the output layer projects), and only
    input-feeding decoders read it at the next step."""
    model = make_model(variant)
    batch = batch3()
    with torch.no_grad():
        encoded = model.encode(batch.src, batch.src_lengths, batch.src_mask)
        assert (encoded.state.feed == 0).all()  # zeros before the first step
        first = model.decode_step(batch.tgt_in[:, 0], encoded.state, encoded.memory)
        torch.testing.assert_close(model.project(first.state.feed), first.logits)
        second = model.decode_step(batch.tgt_in[:, 1], first.state, encoded.memory)
        shaken = first.state._replace(feed=first.state.feed + torch.randn_like(first.state.feed))
        second_shaken = model.decode_step(batch.tgt_in[:, 1], shaken, encoded.memory)
    if VARIANTS[variant][2]:
        assert (second_shaken.logits - second.logits).abs().max() > 1e-3
    else:
        assert torch.equal(second_shaken.logits, second.logits)


# ----------------------------------------------------------------------------- learning


OVERFIT_SRC = [[4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21]]
# Each target is the source backwards (mapped into the target vocabulary), so the decoder must
# look at the source, not only at the previous word.
OVERFIT_TGT = [[(w % (TGT_VOCAB - FIRST_WORD)) + FIRST_WORD for w in reversed(s)] for s in OVERFIT_SRC]


@pytest.mark.parametrize("variant", ALL)
def test_tiny_model_overfits_a_tiny_batch(variant, kernels):
    model = make_model(variant, seed=1, encoder_hidden_size=16, decoder_hidden_size=32).train()
    batch = make_batch(OVERFIT_SRC, OVERFIT_TGT)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = batch.tgt_mask
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_of(model, batch, kernels=kernels)[mask], batch.tgt_out[mask])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if losses[-1] < 0.02:
            break
    assert losses[-1] < 0.1, f"loss only fell from {losses[0]:.3f} to {losses[-1]:.3f} in 300 steps"
    model.eval()
    hyps = greedy_search(engine_of(model, kernels), batch, SearchConfig())
    assert [h.tokens for h in hyps] == OVERFIT_TGT


# ----------------------------------------------------------------------------- the bottleneck


def _noisy_encoder(original, scale: float = 3.0):
    """Wrap an encoder function (src, lengths, mask) -> EncoderOutput so its per-position outputs
    get noise at every position but the last real one; the summary (what the plain
    encoder-decoder sees) is left untouched."""
    gen = torch.Generator().manual_seed(7)

    def forward(src, src_lengths, src_mask):
        enc = original(src, src_lengths, src_mask)
        keep = torch.zeros_like(src_mask)
        keep[torch.arange(src.size(0)), src_lengths - 1] = True  # the final (EOS) position
        noise = torch.randn(enc.outputs.shape, generator=gen) * scale
        noise = noise * (src_mask & ~keep).unsqueeze(-1)
        return EncoderOutput(outputs=enc.outputs + noise, mask=enc.mask, summary=enc.summary)

    return forward


@pytest.mark.parametrize("variant", ALL)
def test_only_attention_models_see_more_than_the_summary(variant, monkeypatch, kernels):
    model = make_model(variant)
    batch = batch3()
    mask = batch.tgt_mask
    with torch.no_grad():
        clean = logits_of(model, batch, kernels=kernels)[mask]
        clean_steps, _ = stepwise_logits(model, batch, kernels)
        if engine_of(model, kernels).name == "reference":  # the lab's variants run it under "fast" too
            monkeypatch.setattr(model.encoder, "forward", _noisy_encoder(model.encoder.forward))
        else:
            plain = fast.encode_source
            noisy_fast = _noisy_encoder(lambda *args: plain(model.encoder, *args))
            monkeypatch.setattr(fast, "encode_source", lambda _encoder, *args: noisy_fast(*args))
        noisy = logits_of(model, batch, kernels=kernels)[mask]
        noisy_steps, _ = stepwise_logits(model, batch, kernels)
    if variant == "none":  # a fixed-vector model never reads the per-position states
        assert torch.equal(noisy, clean)
        assert torch.equal(noisy_steps[mask], clean_steps[mask])
    else:
        assert (noisy - clean).abs().max() > 1e-2
        assert (noisy_steps[mask] - clean_steps[mask]).abs().max() > 1e-2


def test_no_attention_memory_is_the_summary_alone():
    model = make_model("none")
    batch = batch3()
    with torch.no_grad():
        enc = model.encoder(batch.src, batch.src_lengths, batch.src_mask)
        memory = model.decoder.attention.prepare(enc)
    assert memory.values.shape == (3, 1, model.encoder.output_size)
    torch.testing.assert_close(memory.values[:, 0], enc.summary)
    assert memory.mask.all()


# ----------------------------------------------------------------------------- scheduled sampling


@pytest.mark.parametrize("variant", ALL)
def test_scheduled_sampling_runs_and_returns_logits(variant, kernels):
    model = make_model(variant).train()
    batch = batch3()
    out = engine_of(model, kernels).forward(batch, teacher_forcing=0.5)
    assert out.logits is not None
    assert out.logits.shape == (3, batch.tgt_in.size(1), TGT_VOCAB)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, model.project(out.hidden))
    loss = torch.nn.functional.cross_entropy(out.logits[batch.tgt_mask], batch.tgt_out[batch.tgt_mask])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ALL)
def test_teacher_forcing_zero_feeds_the_models_own_predictions(variant, kernels):
    """Ratio 0: every step after the first gets the argmax of the previous step's logits."""
    model = make_model(variant)
    batch = batch3()
    with torch.no_grad():
        out = engine_of(model, kernels).forward(batch, teacher_forcing=0.0)
        encoded = model.encode(batch.src, batch.src_lengths, batch.src_mask)
        state, prev, expected = encoded.state, batch.tgt_in[:, 0], []
        for _ in range(batch.tgt_in.size(1)):
            step = model.decode_step(prev, state, encoded.memory)
            expected.append(step.logits)
            state, prev = step.state, step.logits.argmax(-1)
    torch.testing.assert_close(out.logits, torch.stack(expected, dim=1), atol=1e-5, rtol=0)
    # ... which differs from teacher forcing (so the test above can fail).
    forced = logits_of(model, batch, kernels=kernels)
    assert (forced - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ALL)
def test_teacher_forcing_one_equals_the_parallel_path(variant, kernels):
    model = make_model(variant)
    batch = batch3()
    with torch.no_grad():
        stepped = engine_of(model, kernels).forward(batch, teacher_forcing=1.0, force_steps=True)
        default = engine_of(model, kernels).forward(batch, teacher_forcing=1.0)
    assert stepped.logits is None
    mask = batch.tgt_mask
    torch.testing.assert_close(model.project(stepped.hidden)[mask], model.project(default.hidden)[mask],
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("variant", ["none", "bahdanau", "luong-general-feed"])
def test_tied_embeddings_share_the_weight(variant, kernels):
    model = make_model(variant, tie_embeddings=True, embedding_size=20)
    assert model.output_layer.weight is model.decoder.embedding.weight
    assert model.decoder.output_size == 20
    # One matrix, counted once by parameters() but stored under both names.
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(t.numel() for t in model.state_dict().values())
    assert n_state - n_params == TGT_VOCAB * 20
    model.train()
    batch = batch3()
    logits = logits_of(model, batch, kernels=kernels)
    assert logits.shape == (3, batch.tgt_in.size(1), TGT_VOCAB)
    logits[batch.tgt_mask].logsumexp(-1).sum().backward()
    assert model.decoder.embedding.weight.grad is not None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"encoder_hidden_size": -4}, "model.encoder_hidden_size"),
        ({"decoder_hidden_size": 0}, "model.decoder_hidden_size"),
        ({"embedding_size": -1}, "model.embedding_size"),
        ({"encoder_layers": 0}, "model.encoder_layers"),
        ({"dropout": 1.5}, "model.dropout"),
        ({"dropout": -0.1}, "model.dropout"),
        ({"attention": AttentionConfig(type=AttentionType.bahdanau, hidden_size=0)},
         "model.attention.hidden_size"),
        ({"decoder_hidden_size": 25}, "score=dot"),
    ],
)
def test_bad_sizes_raise_config_error_naming_the_key(overrides, key):
    cfg = model_config("luong-dot", **overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(cfg, SRC_VOCAB, TGT_VOCAB, PAD_ID)


def test_dot_with_equal_sizes_builds_and_general_accepts_any_sizes():
    build_model(model_config("luong-dot"), SRC_VOCAB, TGT_VOCAB, PAD_ID)
    build_model(model_config("luong-general", decoder_hidden_size=25), SRC_VOCAB, TGT_VOCAB, PAD_ID)
    with pytest.raises(ConfigError):
        build_model(model_config("luong-dot", decoder_hidden_size=25), SRC_VOCAB, TGT_VOCAB, PAD_ID)


# ----------------------------------------------------------------------------- checkpoint round trip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Synthetic data, a SentencePiece model and a tiny Trainer (a few real updates)."""
    from seq2seq.data.prepare import prepare_data
    from seq2seq.training.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny_run")
    data = DataConfig(corpus="synthetic", source=CorpusSource.synthetic, languages=["src", "tgt"],
                      src_lang="src", tgt_lang="tgt", cache_dir=str(root / "cache"),
                      synthetic=SyntheticConfig(train_size=200, valid_size=10, test_size=10, max_len=10))
    cfg = TrainConfig(
        name="tiny", data=data, tokenizer=TokenizerConfig(vocab_size=60, character_coverage=1.0, byte_fallback=False),
        model=dataclasses.replace(model_config("luong-general-feed"), tie_embeddings=True,
                                  embedding_size=24),
        trainer=TrainerConfig(max_steps=3, max_epochs=None, device=Device.cpu, progress=False),
    )
    prepared = prepare_data(cfg.data, cfg.tokenizer)
    trainer = Trainer(cfg, prepared, root / "run")
    for indices in list(trainer.sampler.batches(0))[:3]:
        assert not trainer.train_step(trainer._batch(indices)).skipped
        trainer.progress.step += 1
        trainer.progress.batch_in_epoch += 1
    trainer.save()
    return trainer, root / "run" / "checkpoints" / "last.pt"


def test_checkpoint_round_trip_gives_identical_logits(tiny_run):
    from seq2seq.evaluation.evaluate import load_model

    trainer, path = tiny_run
    loaded = load_model(Path(path), Device.cpu)
    assert loaded.model.description == trainer.model.description == "luong-general-feed"
    assert loaded.model.output_layer.weight is loaded.model.decoder.embedding.weight
    trainer.model.eval()
    src = random_sentences(5, 1, 12, trainer.data.tokenizer.src_vocab_size, seed=3)
    tgt = random_sentences(5, 1, 12, trainer.data.tokenizer.tgt_vocab_size, seed=4)
    batch = make_batch(src, tgt)
    with torch.no_grad():
        expected = logits_of(trainer.model, batch)
        got = logits_of(loaded.model, batch)
    assert torch.equal(got, expected)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # The tokenizer travels in the checkpoint too.
    assert loaded.tokenizer.digest() == trainer.data.tokenizer.digest()


def test_restore_continues_from_the_saved_position(tiny_run, tmp_path):
    from seq2seq.training.trainer import Trainer

    trainer, path = tiny_run
    fresh = Trainer(trainer.cfg, trainer.data, path.parent.parent)
    assert fresh.restore() == path
    assert fresh.progress == trainer.progress
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor), name
    saved = trainer.optimizer.state_dict()["state"]
    restored = fresh.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and saved
    for k in saved:
        assert torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"])


def test_additive_scores_match_autograd_and_pass_gradcheck():
    from seq2seq.kernels.scores import AdditiveScores

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 6, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(3, 1, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(AdditiveScores.apply, (q, keys, v))
    weights = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    plain = torch.autograd.grad((torch.tanh(q + keys) @ v * weights).sum(), (q, keys, v))
    fused = torch.autograd.grad((AdditiveScores.apply(q, keys, v) * weights).sum(), (q, keys, v))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ALL)
def test_beams_sharing_one_memory_row_step_as_with_a_memory_row_each(variant, kernels):
    """Beam search keeps one memory row per sentence for its K beams; a step must give what it
    gives with the memory copied to every beam."""
    model = make_model(variant)
    batch = batch3()
    k = 3
    with torch.no_grad():
        engine = engine_of(model, kernels)
        weights = engine.search_weights()
        encoded = engine.encode(batch.src, batch.src_lengths, batch.src_mask)
        rows = torch.arange(batch.src.size(0)).repeat_interleave(k)
        state = encoded.state.select(rows)
        prev = torch.randint(4, 19, (rows.numel(),), generator=torch.Generator().manual_seed(0))
        for _ in range(3):  # a few steps, so the fed state differs between beams
            shared = engine.decode_step(prev, state, encoded.memory, weights)
            copied = engine.decode_step(prev, state, encoded.memory.select(rows), weights)
            torch.testing.assert_close(shared.logits, copied.logits, atol=1e-5, rtol=0)
            if copied.attention is not None:
                torch.testing.assert_close(shared.attention, copied.attention, atol=1e-6, rtol=0)
            state, prev = shared.state, shared.logits.argmax(dim=-1)
