"""The attention lab's switches: scaled dot-product scores, several heads, sparse normalizers,
local attention, coverage, relative positions, decoder self-attention.
(The model, search and checkpoint tests run every one of them too: helpers_model.LAB.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers_model import engine_of, make_model
from test_train_cli import ok, one_line_error, run_cli, run_dirs

from seq2seq.core.config import (
    AttentionConfig,
    AttentionType,
    EvalConfig,
    LuongScore,
    ModelConfig,
    Normalizer,
)
from seq2seq.core.errors import ConfigError
from seq2seq.model.attention import (
    AdditiveAttention,
    AttentionMemory,
    MultiplicativeAttention,
    normalize,
)
from seq2seq.model.network import build_model, check_model_config


def memory(b: int = 2, s: int = 5, d: int = 8, dtype=torch.float64) -> AttentionMemory:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(b, s, d, generator=g, dtype=dtype)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 3:] = False
    return AttentionMemory(keys=values, values=values, mask=mask)


MODULES = {
    "scaled_dot": lambda: MultiplicativeAttention(8, 8, general=False, scaled=True),
    "scaled_dot-h2": lambda: MultiplicativeAttention(8, 8, general=False, scaled=True, heads=2),
    "general-h4": lambda: MultiplicativeAttention(8, 8, general=True, heads=4),
    "additive-h2": lambda: AdditiveAttention(6, 8, hidden_size=6, heads=2),
    "additive-sparsemax": lambda: AdditiveAttention(6, 8, hidden_size=6, normalizer=Normalizer.sparsemax),
    "general-h2-entmax15": lambda: MultiplicativeAttention(8, 8, general=True, heads=2,
                                                           normalizer=Normalizer.entmax15),
}


@pytest.mark.parametrize("name", MODULES)
def test_every_new_score_passes_gradcheck_in_float64(name):
    torch.manual_seed(0)
    module = MODULES[name]().double()
    mem = memory()
    query = torch.randn(2, 3, module.query_size, dtype=torch.float64, requires_grad=True)
    values = mem.values.clone().requires_grad_(True)

    def run(q, v):
        m = module.prepare(type("Enc", (), {"outputs": v, "mask": mem.mask})())
        out = module(q, m)
        return out.context, out.weights

    assert torch.autograd.gradcheck(run, (query, values))


@pytest.mark.parametrize("name", MODULES)
def test_weights_sum_to_one_and_are_exactly_zero_at_padding(name):
    torch.manual_seed(1)
    module = MODULES[name]().double()
    mem = memory()
    mem = module.prepare(type("Enc", (), {"outputs": mem.values, "mask": mem.mask})())
    weights = module(torch.randn(2, 4, module.query_size, dtype=torch.float64) * 3, mem).weights
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    assert torch.equal(weights[0, :, 3:], torch.zeros_like(weights[0, :, 3:]))
    assert (weights >= 0).all()


@pytest.mark.parametrize("normalizer", [Normalizer.sparsemax, Normalizer.entmax15])
def test_sparse_normalizers_give_exact_zeros_on_real_positions(normalizer):
    scores = torch.tensor([[[4.0, 3.9, 0.0, -2.0, 1.0]]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    weights = normalize(scores, mask, normalizer)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (weights == 0).sum() >= 2 and weights[0, 0, 0] > weights[0, 0, 1] > 0
    assert (normalize(scores, mask, Normalizer.softmax) > 0).all()  # softmax: never exactly 0


def test_sparse_normalizers_keep_float32_under_bf16_scores():
    scores = torch.randn(2, 3, 5).bfloat16()
    mask = torch.ones(2, 5, dtype=torch.bool)
    for normalizer in Normalizer:
        assert normalize(scores, mask, normalizer).dtype == torch.float32


def test_scaled_dot_is_dot_over_the_square_root_of_the_size():
    mem = memory(dtype=torch.float32)
    query = torch.randn(2, 3, 8)
    scaled = MultiplicativeAttention(8, 8, general=False, scaled=True)(query, mem).weights
    plain = MultiplicativeAttention(8, 8, general=False)(query / math.sqrt(8), mem).weights
    torch.testing.assert_close(scaled, plain)


def test_each_head_reads_only_its_own_slice_of_the_encoder_states():
    """Dot-product heads over split states: changing the states of head 1's slice leaves head
    0's half of the context alone (its scores and values are its own), and changes head 1's."""
    raw = memory(dtype=torch.float32)
    module = MultiplicativeAttention(8, 8, general=False, scaled=True, heads=2)

    def prepared(states: torch.Tensor) -> AttentionMemory:
        return module.prepare(type("Enc", (), {"outputs": states, "mask": raw.mask})())

    query = torch.randn(2, 3, 8)
    before = module(query, prepared(raw.values)).context
    changed = raw.values.clone()
    changed[..., 4:] += torch.randn_like(changed[..., 4:])
    after = module(query, prepared(changed)).context
    torch.testing.assert_close(after[..., :4], before[..., :4])
    assert (after[..., 4:] - before[..., 4:]).abs().max() > 1e-3


def test_the_lab_runs_the_reference_model_under_the_fast_engine():
    for variant in ("bahdanau-h4", "luong-scaled_dot-feed", "bahdanau-entmax15"):
        assert engine_of(make_model(variant), "fast").name == "reference"
    assert engine_of(make_model("bahdanau"), "fast").name == "fast"


def lab_config(**attention) -> ModelConfig:
    return ModelConfig(embedding_size=16, encoder_hidden_size=12, decoder_hidden_size=24,
                       attention=AttentionConfig(hidden_size=16, **attention))


@pytest.mark.parametrize("attention, fragment", [
    (dict(type=AttentionType.bahdanau, heads=5), "model.attention.heads=5 must divide"),
    (dict(type=AttentionType.luong, score=LuongScore.general, heads=7), "model.attention.heads=7 must divide"),
    (dict(type=AttentionType.luong, heads=0), "model.attention.heads must be a positive integer"),
    (dict(type=AttentionType.none, heads=2), "model.attention.heads=2 needs an attention"),
    (dict(type=AttentionType.none, normalizer=Normalizer.sparsemax), "normalizer=sparsemax needs an attention"),
])
def test_combinations_that_make_no_sense_are_refused_in_one_line(attention, fragment):
    with pytest.raises(ConfigError) as err:
        check_model_config(lab_config(**attention))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_search_row_operations_keep_per_head_memory_head_major():
    """select (beam expansion, compaction), widen, cat and put (refills) give the same numbers as
    on plain tensors and keep the head-major storage, so search steps read it without copies."""
    from seq2seq.model.attention import head_major

    g = torch.Generator().manual_seed(0)
    memory = AttentionMemory(head_major(torch.randn(3, 5, 8, generator=g), 4),
                             head_major(torch.randn(3, 5, 12, generator=g), 4), torch.ones(3, 5, dtype=torch.bool))

    def head_major_storage(m: AttentionMemory) -> bool:
        return all(t.transpose(1, 2).is_contiguous() for t in m[:2])

    picked = memory.select(torch.tensor([2, 0, 0, 1]))
    wide = memory.widen(7)
    joined = AttentionMemory.cat([memory, picked], 7)
    refilled = memory.widen(7).put(torch.tensor([1]), picked.rows(0, 1))  # in place
    assert all(map(head_major_storage, (picked, wide, joined, refilled)))
    for i in range(2):
        plain = memory[i].contiguous()
        assert torch.equal(picked[i], plain[[2, 0, 0, 1]])
        assert torch.equal(wide[i][:, :5], plain) and not wide[i][:, 5:].any()
        assert torch.equal(joined[i][:3, :5], plain) and torch.equal(joined[i][3:, :5], plain[[2, 0, 0, 1]])
        assert torch.equal(refilled[i][1, :5], plain[2]) and torch.equal(refilled[i][0, :5], plain[0])


def test_heads_1_keeps_the_state_dict_layout():
    """A checkpoint of a one-head model from before the switch loads unchanged."""
    model = build_model(lab_config(type=AttentionType.bahdanau), 20, 20, 0)
    assert tuple(model.state_dict()["decoder.attention.energy.weight"].shape) == (1, 16)


# ----------------------------------------------------------------------------- from the command line


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


SHORT = ["experiment=smoke", "trainer.max_steps=12", "trainer.valid_every=6", "eval.bootstrap_samples=100"]


# Every switch once, combined where they combine (each run costs a training, an evaluation and a
# translation in subprocesses).
@pytest.mark.parametrize("overrides, description", [
    (["model/attention=luong", "model.attention.score=scaled_dot", "model.attention.heads=4",
      "model.attention.normalizer=entmax15", "model.attention.position_bias=relative",
      "model.attention.max_distance=8", "model.decoder_hidden_size=64", "model.encoder_hidden_size=32"],
     "luong-scaled_dot-feed-h4-entmax15-rel"),
    (["model/attention=local", "model.attention.mode=predictive", "model.attention.window=4",
      "model.attention.position_bias=relative", "model.decoder_self_attention=true"],
     "local-p4-general-feed-rel-sa"),
    (["model.attention.normalizer=sparsemax", "model.attention.coverage=true", "trainer.coverage_loss=1.0"],
     "bahdanau-sparsemax-cov"),
])
def test_a_variant_trains_evaluates_and_translates(overrides, description, tmp_path, cache_dir):
    ok(run_cli("seq2seq-train", [*SHORT, *overrides], tmp_path, cache_dir))
    [run] = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == description and summary["engine"]["name"] == "reference"
    ok(run_cli("seq2seq-evaluate", [f"run_dir={run}", "search=beam", "search.beam_size=3",
                                    "eval.bootstrap_samples=100"], tmp_path, cache_dir))
    beam = run / "eval" / "test-beam3"
    assert len(list(beam.glob("attention_*.png"))) == EvalConfig().heatmaps  # of the beam's own hypotheses
    assert json.loads((beam / "report.json").read_text())["attention"]["pad_mass"] == 0.0
    out = ok(run_cli("seq2seq-translate", [f"run_dir={run}"], tmp_path, cache_dir, stdin=b"ba ki du .\n\n"))
    assert len(out.stdout.splitlines()) == 2


@pytest.mark.parametrize("overrides, fragment", [
    (["model/attention=none", "model.attention.heads=2"], "model.attention.heads=2 needs an attention"),
    (["model/attention=local", "model.attention.window=0"], "model.attention.window must be a positive integer"),
    (["model/attention=local", "model.attention.position_bias=relative", "model.attention.max_distance=0"],
     "model.attention.max_distance must be a positive integer"),
    (["model/attention=luong", "model.attention.coverage=true"], "feeds the coverage vector into an additive"),
    (["trainer.coverage_loss=-1"], "trainer.coverage_loss must be 0 (off) or a positive number"),
    (["model.attention.heads=5"], "model.attention.heads=5 must divide"),
])
def test_a_bad_combination_is_refused_before_anything_runs(overrides, fragment, tmp_path, cache_dir):
    proc = run_cli("seq2seq-train", [*SHORT, *overrides], tmp_path, cache_dir)
    assert fragment in one_line_error(proc)
    assert not (tmp_path / "outputs").exists()


# ----------------------------------------------------------------------------- local attention


def local(window: int, predictive: bool = False, score: str = "general", relative_distance: int = 0):
    from seq2seq.model.attention import LocalAttention

    scorer = (AdditiveAttention(8, 8, hidden_size=6) if score == "concat"
              else MultiplicativeAttention(8, 8, general=score == "general", scaled=score == "scaled_dot"))
    return LocalAttention(scorer, window, predictive, relative_distance)


def test_local_m_weighs_only_the_window_around_each_step():
    torch.manual_seed(0)
    module = local(window=1)
    mem = memory(b=2, s=6, dtype=torch.float32)  # row 0 has 3 real positions, row 1 six
    t = 5
    positions = torch.arange(t).expand(2, t)
    weights = module(torch.randn(2, t, 8), mem, positions).weights
    for b, length in ((0, 3), (1, 6)):
        for step in range(t):
            centre = min(step, length - 1)  # p_t = t, inside the sentence
            inside = [s for s in range(6) if abs(s - centre) <= 1 and s < length]
            outside = [s for s in range(6) if s not in inside]
            assert (weights[b, step, outside] == 0).all()
            assert (weights[b, step, inside] > 0).all()
            assert weights[b, step].sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("score", ["general", "scaled_dot", "concat"])
def test_a_window_covering_the_sentence_is_global_attention(score):
    torch.manual_seed(1)
    module = local(window=20, score=score)
    raw = memory(dtype=torch.float32)
    mem = module.prepare(type("Enc", (), {"outputs": raw.values, "mask": raw.mask})())
    query = torch.randn(2, 4, 8)
    got = module(query, mem, torch.arange(4).expand(2, 4))
    want = module.scorer(query, mem)
    torch.testing.assert_close(got.weights, want.weights)
    torch.testing.assert_close(got.context, want.context)


def test_local_p_centres_a_gaussian_on_its_predicted_position_and_learns_it():
    torch.manual_seed(2)
    module = local(window=2, predictive=True).double()
    mem = memory()
    query = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out = module(query, mem)
    assert (out.weights.sum(-1) <= 1 + 1e-9).all()  # eq. 10: the Gaussian is not renormalised
    out.context.sum().backward()
    assert module.position_proj.weight.grad.abs().sum() > 0  # p_t is trained through the Gaussian
    assert torch.autograd.gradcheck(lambda q: module(q, mem).context, (query.detach().requires_grad_(),))


def test_local_m_passes_gradcheck():
    module = local(window=1).double()
    mem = memory()
    query = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: module(q, mem, torch.arange(3).expand(2, 3)).context, (query,))


@pytest.mark.parametrize("attention, fragment", [
    (dict(type=AttentionType.local, window=0), "model.attention.window must be a positive integer"),
    (dict(type=AttentionType.local, heads=2), "model.attention.heads=2 does not combine with local attention"),
])
def test_local_refusals(attention, fragment):
    with pytest.raises(ConfigError) as err:
        check_model_config(lab_config(**attention))
    assert fragment in str(err.value)


# ----------------------------------------------------------------------------- coverage


def test_the_coverage_vector_is_the_attention_so_far_and_changes_the_scores():
    from helpers_model import make_batch

    model = make_model("bahdanau-cov", scale=2.0)
    batch = make_batch([[4, 5, 6, 7], [8, 9]], [[4, 5, 6], [7]])
    with torch.no_grad():
        encoded = model.encode(batch.src, batch.src_lengths, batch.src_mask)
        state, total = encoded.state, torch.zeros(batch.src.shape)
        assert torch.equal(state.coverage, total)
        for t in range(3):
            out = model.decode_step(batch.tgt_in[:, t], state, encoded.memory)
            total = total + out.attention
            torch.testing.assert_close(out.state.coverage, total)
            state = out.state
        # the same step scored without its coverage attends differently
        attention = model.decoder.attention
        query = torch.randn(2, 1, attention.query_size)
        with_cov = attention(query, encoded.memory, coverage=total.unsqueeze(1)).weights
        without = attention(query, encoded.memory).weights
        assert (with_cov - without).abs().max() > 1e-3


def test_no_gradient_flows_back_through_the_coverage_vector():
    """A step's scores read the coverage vector as a constant: the loss of step 2 reaches the
    encoder only through step 2's own attention, not again through steps 0 and 1's weights summed
    into its coverage (that path compounds over long targets; see Decoder.step)."""
    from helpers_model import make_batch

    model = make_model("bahdanau-cov", scale=2.0)
    batch = make_batch([[4, 5, 6, 7], [8, 9]], [[4, 5, 6], [7]])
    encoded = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    state, weights = encoded.state, []
    for t in range(3):
        out = model.decode_step(batch.tgt_in[:, t], state, encoded.memory)
        weights.append(out.attention)
        state = out.state
    assert not state.coverage.requires_grad
    torch.testing.assert_close(state.coverage, sum(w.detach() for w in weights))
    assert weights[2].requires_grad  # the weights themselves still train (the coverage loss reads them)
    earlier = torch.autograd.grad(weights[2].sum() + out.logits.sum(), weights[:2], allow_unused=True)
    assert all(g is None for g in earlier)


def test_the_coverage_penalty_counts_attention_paid_again():
    from seq2seq.model.losses import coverage_penalty

    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # step 2 attends again to position 0
    assert coverage_penalty(a, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(1 / 3)
    assert coverage_penalty(a, torch.tensor([[True, False, False]])).item() == 0.0  # padding is not counted
    spread = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert coverage_penalty(spread, torch.ones(1, 2, dtype=torch.bool)).item() == 0.0


def test_coverage_scores_pass_gradcheck():
    module = AdditiveAttention(6, 8, hidden_size=6, coverage=True).double()
    raw = memory()
    mem = module.prepare(type("Enc", (), {"outputs": raw.values, "mask": raw.mask})())
    query = torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True)
    cov = torch.rand(2, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, c: module(q, mem, coverage=c).context, (query, cov))


@pytest.mark.parametrize("attention, fragment", [
    (dict(type=AttentionType.luong, score=LuongScore.general, coverage=True), "feeds the coverage vector into an additive"),
    (dict(type=AttentionType.none, coverage=True), "model.attention.coverage=true needs an attention"),
])
def test_coverage_refusals(attention, fragment):
    with pytest.raises(ConfigError) as err:
        check_model_config(lab_config(**attention))
    assert fragment in str(err.value)


@pytest.mark.parametrize("value, fragment", [
    ("-1", "trainer.coverage_loss must be 0 (off) or a positive number"),
])
def test_a_bad_coverage_loss_is_refused(value, fragment):
    from conftest import smoke_config

    from seq2seq.training.trainer import check_trainer_config

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check_trainer_config(smoke_config(Path("/tmp"), f"trainer.coverage_loss={value}"))
    with pytest.raises(ConfigError, match="model/attention=none has none"):
        check_trainer_config(smoke_config(Path("/tmp"), "model/attention=none", "trainer.coverage_loss=1"))
    with pytest.raises(ConfigError, match=re.escape("trainer.coverage_loss_start must be 0")):
        check_trainer_config(smoke_config(Path("/tmp"), "trainer.coverage_loss=1", "trainer.coverage_loss_start=-1"))


def test_the_coverage_penalty_counts_from_its_start_update(prepared, tmp_path):
    """Before trainer.coverage_loss_start the training loss is the cross-entropy alone; from that
    update on the penalty is added."""
    from conftest import smoke_config

    from seq2seq.model.losses import coverage_penalty
    from seq2seq.training.trainer import Trainer

    cache, data = prepared
    # fp32: the reference below runs outside the trainer's autocast, which precision=auto turns on
    # where the CPU has native bf16; the test is about when the penalty counts, not about bf16 sums
    cfg = smoke_config(cache, "model.attention.coverage=true", "trainer.coverage_loss=0.5",
                       "trainer.coverage_loss_start=3", "model.dropout=0", "trainer.precision=fp32")
    trainer = Trainer(cfg, data, tmp_path / "run")
    batch = trainer._batch(trainer.sampler.batches(0)[0])
    with torch.no_grad():
        out = trainer.engine.forward(batch, teacher_forcing=1.0)
        nll = trainer.engine.loss(out, batch, cfg.trainer.label_smoothing)
        penalty = coverage_penalty(out.attention, batch.tgt_mask)
        assert penalty > 0
        losses = {}
        for step in (0, 2, 3, 10):
            trainer.progress.step = step
            losses[step] = trainer._loss(batch, teacher_forcing=1.0)
    torch.testing.assert_close(losses[0], nll)
    torch.testing.assert_close(losses[2], nll)
    torch.testing.assert_close(losses[3], nll + 0.5 * penalty)
    torch.testing.assert_close(losses[10], nll + 0.5 * penalty)


# ----------------------------------------------------------------------------- relative position bias


def test_a_relative_bias_depends_only_on_the_clipped_distance_to_the_expected_position():
    from seq2seq.model.attention import RelativeBias

    rel = RelativeBias(max_distance=2, heads=1)
    with torch.no_grad():
        rel.bias.weight.copy_(torch.arange(5.0).view(5, 1))  # bias = distance + 2
        rel.length_ratio.fill_(2.0)  # step t expects source position 2t
    bias = rel(torch.tensor([[0, 1, 3]]), length=7)[0, 0]  # (T, S)
    assert bias[0].tolist() == [2, 3, 4, 4, 4, 4, 4]  # distances 0, 1, 2, then clipped
    assert bias[1].tolist() == [0, 1, 2, 3, 4, 4, 4]  # centred on position 2
    assert bias[2].tolist() == [0, 0, 0, 0, 0, 1, 2]  # centred on 6, clipped on the left


def test_a_strong_bias_at_distance_zero_puts_the_attention_on_the_expected_position():
    torch.manual_seed(3)
    module = MultiplicativeAttention(8, 8, general=True, relative_distance=3)
    with torch.no_grad():
        module.relative.bias.weight.zero_()
        module.relative.bias.weight[3] = 50.0  # distance 0
    mem = memory(b=2, s=6, dtype=torch.float32)
    weights = module(torch.randn(2, 4, 8) * 0.1, mem, torch.arange(4).expand(2, 4)).weights
    assert weights[1].argmax(-1).tolist() == [0, 1, 2, 3]  # ratio 1: step t on position t
    assert weights[0, 3].argmax().item() != 3 and weights[0, 3, 3:].sum() == 0  # position 3 is padding in row 0


def test_relative_scores_pass_gradcheck_and_the_trainer_sets_the_length_ratio(prepared, tmp_path):
    module = AdditiveAttention(6, 8, hidden_size=6, relative_distance=2).double()
    with torch.no_grad():
        module.relative.bias.weight.normal_()
    raw = memory()
    mem = module.prepare(type("Enc", (), {"outputs": raw.values, "mask": raw.mask})())
    query = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: module(q, mem, torch.arange(3).expand(2, 3)).context, (query,))

    from conftest import smoke_config

    from seq2seq.training.trainer import Trainer

    cache, data = prepared
    trainer = Trainer(smoke_config(cache, "model.attention.position_bias=relative"), data, tmp_path)
    ratio = float(trainer.model.decoder.attention.relative.length_ratio)
    assert 0.8 < ratio < 1.2  # the synthetic languages have equally long sentences (+EOS on each side)
    assert "decoder.attention.relative.length_ratio" in trainer.model.state_dict()  # saved with the model


def test_relative_refusals():
    for kind in (AttentionType.luong, AttentionType.local):
        with pytest.raises(ConfigError, match="max_distance must be a positive integer"):
            check_model_config(lab_config(type=kind, position_bias="relative", max_distance=0))


@pytest.mark.parametrize("score", ["general", "concat"])  # the banded pass and the gathered windows
def test_local_attention_biases_the_distance_to_its_window_centre(score):
    torch.manual_seed(4)
    module = local(window=2, score=score, relative_distance=1)
    plain = local(window=2, score=score)
    plain.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("relative.")})
    raw = memory(b=2, s=7, dtype=torch.float32)
    mem = module.prepare(type("Enc", (), {"outputs": raw.values, "mask": raw.mask})())
    query, positions = torch.randn(2, 5, 8), torch.arange(5).expand(2, 5)
    # a zero bias (its initial value) is plain local attention
    torch.testing.assert_close(module(query, mem, positions).weights, plain(query, mem, positions).weights)
    with torch.no_grad():
        module.relative.bias.weight.copy_(torch.tensor([[-40.0], [0.0], [-40.0]]))  # only distance 0 stays
    weights = module(query, mem, positions).weights
    centres = [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]  # p_t = t, inside the sentence (row 0 has 3 positions)
    for b in range(2):
        assert weights[b].argmax(-1).tolist() == centres[b]
        assert (weights[b].max(-1).values > 0.99).all()
        assert (weights[0, :, 3:] == 0).all()  # padding
    with torch.no_grad():  # distance -2 is beyond max_distance=1: it shares the bias of -1
        module.relative.bias.weight.copy_(torch.tensor([[-40.0], [0.0], [0.0]]))
    weights = module(query, mem, positions).weights
    assert (weights[1, 2, [0, 1]] < 1e-9).all() and weights[1, 2, [2, 3, 4]].sum() > 0.99


def test_local_p_with_a_relative_bias_passes_gradcheck():
    torch.manual_seed(5)
    module = local(window=2, predictive=True, relative_distance=2).double()
    with torch.no_grad():
        module.relative.bias.weight.normal_()
    mem = memory()
    query = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: module(q, mem).context, (query,))
    module(query, mem).context.sum().backward()
    assert module.relative.bias.weight.grad.abs().sum() > 0  # the bias is trained


# ----------------------------------------------------------------------------- decoder self-attention

SELF_ATTENTIVE = [("bahdanau-sa", 2, 0.0, 2.5), ("luong-general-sa", 4, 0.0, 2.5)]


def _sa_batch():
    from helpers_model import SRC_VOCAB, TGT_VOCAB, make_batch, random_sentences

    src = random_sentences(3, 3, 9, SRC_VOCAB, 11)
    tgt = random_sentences(3, 6, 6, TGT_VOCAB, 12)
    return make_batch(src, tgt)


@pytest.mark.parametrize("variant", ["bahdanau-sa", "luong-general-sa"])
@pytest.mark.parametrize("steps", [False, True], ids=["parallel", "step-loop"])
def test_self_attention_is_causal_a_step_never_sees_later_target_words(variant, steps):
    from helpers_model import logits_of

    model = make_model(variant, 1, scale=1.5)
    batch = _sa_batch()
    changed = batch.tgt_in.clone()
    changed[:, 4:] = (changed[:, 4:] + 5) % model.output_layer.out_features  # later inputs only
    with torch.no_grad():
        before = logits_of(model, batch, force_steps=steps)
        after = logits_of(model, batch._replace(tgt_in=changed), force_steps=steps)
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=0)  # steps 0-3 read inputs 0-3 only
    assert not torch.allclose(after[:, 4:], before[:, 4:])
    # and it does read the earlier steps: a change at input 1 reaches step 3 beyond the LSTM's own path
    model.decoder.self_attention.query.weight.data.mul_(0.0)  # uniform weights over the past ...
    with torch.no_grad():
        flat = logits_of(model, batch, force_steps=steps)
    assert not torch.allclose(flat, before)  # ... differ from learned ones: the scores matter


def test_self_attention_passes_gradcheck_in_float64():
    from seq2seq.model.attention import DecoderSelfAttention

    torch.manual_seed(0)
    module = DecoderSelfAttention(6).double()
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: module.whole(h), (hidden,))


@pytest.mark.parametrize(("variant", "seed", "eos_bias", "scale"), SELF_ATTENTIVE, ids=[v[0] for v in SELF_ATTENTIVE])
@pytest.mark.parametrize("beam", [1, 3])
def test_the_growing_cache_decodes_each_sentence_in_continuous_search_as_alone(variant, seed, eos_bias, scale, beam):
    """Rows of a pool of 5 start new sentences at other rows' step 20: each overwrites its stale
    columns as it goes, and reads only its own."""
    from helpers_model import SRC_VOCAB, assert_same_or_tie, random_sentences

    from seq2seq.core.config import SearchConfig
    from seq2seq.search.translate import translate_ids

    model = make_model(variant, seed, eos_bias=eos_bias, scale=scale)
    src = random_sentences(23, 1, 17, SRC_VOCAB, seed + 3)
    cpu = torch.device("cpu")
    pooled = translate_ids(engine_of(model, "reference"), src, SearchConfig(beam_size=beam, batch_size=5), cpu,
                           scored=True)
    for s, hyp in zip(src, pooled):
        alone = translate_ids(engine_of(model, "reference"), [s], SearchConfig(beam_size=beam, batch_size=1), cpu,
                              scored=True)[0]
        if beam == 1:
            assert_same_or_tie(model, s, hyp.tokens, alone.tokens)
        if hyp.tokens == alone.tokens:
            assert hyp.score == pytest.approx(alone.score, abs=1e-4)
    assert len({tuple(h.tokens) for h in pooled}) >= 5
    assert max(len(h.tokens) for h in pooled) > 8  # caches grew past their first width


def test_beam_one_is_greedy_with_self_attention():
    from helpers_model import SRC_VOCAB, make_batch, random_sentences
    from reference_search import beam_search, greedy_search

    from seq2seq.core.config import SearchConfig

    model = make_model("luong-general-sa", 4, scale=2.5)
    batch = make_batch(random_sentences(6, 2, 10, SRC_VOCAB, 4))
    engine = engine_of(model, "reference")
    greedy = greedy_search(engine, batch, SearchConfig())
    beam = beam_search(engine, batch, SearchConfig(beam_size=1))
    assert [h.tokens for h in beam] == [h.tokens for h in greedy]


def test_self_attention_adds_its_own_weights_and_runs_the_reference_engine():
    model = make_model("luong-general-sa", 0)
    names = {k for k in model.state_dict() if "self_attention" in k}
    assert names == {"decoder.self_attention.query.weight", "decoder.self_attention.key_value.weight"}
    assert engine_of(model, "fast").name == "reference"
    assert "-sa" not in make_model("luong-general", 0).description
