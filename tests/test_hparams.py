"""TensorBoard's HParams record tells every attention-lab arm apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seq2seq.cli import compose_checked
from seq2seq.core.config import register_configs
from seq2seq.pipeline import log_hparams


def recorded_hparams(run_dir: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            # Each value is a protobuf Value: its one set field holds the string or number.
            return {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
    raise AssertionError("no HParams session record")


@pytest.fixture(scope="module")
def arms(tmp_path_factory) -> dict[str, dict[str, object]]:
    register_configs()
    out = {}
    for lab in ("bahdanau", "coverage", "luong", "relative", "self_attention"):
        cfg = OmegaConf.to_object(compose_checked("train", ["experiment=attention_zoo", f"lab={lab}"]))
        run = tmp_path_factory.mktemp(lab)
        log_hparams(run, cfg, {"best_valid_bleu": 1.0, "best_step": 2, "train_tokens_per_s": 3.0, "num_parameters": 4}, [])
        out[lab] = recorded_hparams(run)
    return out


def test_every_lab_arm_has_its_own_hparams(arms):
    seen = {tuple(sorted((k, v) for k, v in h.items() if k != "parameters")) for h in arms.values()}
    assert len(seen) == len(arms)


def test_the_lab_switches_are_recorded(arms):
    # torch writes booleans as numbers (1.0, 0.0).
    assert arms["relative"]["position_bias"] == "relative" and arms["luong"]["position_bias"] == "none"
    assert arms["coverage"]["coverage"] == 1 and arms["bahdanau"]["coverage"] == 0
    assert arms["coverage"]["coverage_loss"] == 1.0 and arms["bahdanau"]["coverage_loss"] == 0.0
    assert arms["self_attention"]["decoder_self_attention"] == 1
    assert arms["luong"]["decoder_self_attention"] == 0
