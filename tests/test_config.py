"""Config composition: every experiment and data config composes into the typed schema, the
documented override names work, and every mistake becomes a one-line ``ConfigError``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seq2seq.cli import CONFIG_DIR, compose_checked
from seq2seq.core.config import (
    AttentionType,
    Device,
    EvaluateConfig,
    LuongScore,
    TrainConfig,
    TranslateConfig,
    register_configs,
)
from seq2seq.core.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _schemas() -> None:
    register_configs()


def train_cfg(*overrides: str) -> TrainConfig:
    cfg = OmegaConf.to_object(compose_checked("train", list(overrides)))
    assert isinstance(cfg, TrainConfig)
    return cfg


def config_error(config_name: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        compose_checked(config_name, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    return message


# ----------------------------------------------------------------------------- composing


def test_config_folders_are_not_empty():
    assert EXPERIMENTS and DATA
    assert {"smoke", "synthetic"} <= set(EXPERIMENTS)
    assert "multi30k" in DATA


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name: str):
    cfg = train_cfg(f"experiment={name}")
    assert cfg.name == OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml").get("name", "default")
    # experiment files override on top of the defaults (they are loaded after _self_)
    experiment = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
    for key in ("tokenizer", "model", "trainer"):
        for sub, value in experiment.get(key, {}).items():
            if not OmegaConf.is_config(value):
                got = getattr(getattr(cfg, key), sub)
                assert (got.value if hasattr(got, "value") else got) == value, f"{key}.{sub}"


def test_default_train_config():
    cfg = train_cfg()
    assert cfg.name == "default"
    assert cfg.data.corpus == "multi30k"
    assert cfg.model.attention.type == AttentionType.bahdanau


def test_smoke_experiment_uses_synthetic_data():
    cfg = train_cfg("experiment=smoke")
    assert cfg.data.corpus == "synthetic"
    assert cfg.data.source.value == "synthetic"
    assert cfg.data.synthetic.train_size == 1500
    assert cfg.trainer.max_steps == 40 and cfg.trainer.max_epochs is None


def test_command_line_beats_experiment():
    cfg = train_cfg("experiment=smoke", "name=mine", "trainer.max_steps=3", "model/attention=none")
    assert cfg.name == "mine"
    assert cfg.trainer.max_steps == 3
    assert cfg.model.attention.type == AttentionType.none
    assert cfg.model.embedding_size == 32  # the rest of the experiment still applies


@pytest.mark.parametrize("config_name, schema", [("evaluate", EvaluateConfig), ("translate", TranslateConfig)])
def test_evaluate_and_translate_compose(config_name: str, schema: type):
    cfg = OmegaConf.to_object(compose_checked(config_name, ["run_dir=x"]))
    assert isinstance(cfg, schema)
    assert cfg.run_dir == "x"
    assert cfg.search.beam_size == 1
    beam = OmegaConf.to_object(compose_checked(config_name, ["run_dir=x", "search=beam"]))
    assert beam.search.beam_size == 5


@pytest.mark.parametrize("name", DATA)
def test_every_data_config_composes(name: str):
    cfg = train_cfg(f"data={name}")
    assert cfg.data.corpus == name
    assert cfg.data.src_lang != cfg.data.tgt_lang
    assert cfg.data.src_lang in cfg.data.languages and cfg.data.tgt_lang in cfg.data.languages
    assert cfg.data.test_splits


def test_documented_overrides(tmp_path: Path):
    cfg = train_cfg(
        "data=synthetic", f"data.root={tmp_path}", "model/attention=luong",
        "model.attention.score=dot", "model.attention.input_feeding=false",
        "trainer.max_steps=7", "trainer.max_epochs=2", "trainer.device=cpu", "seed=99", "name=mine",
    )
    assert cfg.data.corpus == "synthetic"
    assert cfg.data.root == str(tmp_path)
    assert cfg.model.attention.type == AttentionType.luong
    assert cfg.model.attention.score == LuongScore.dot
    assert cfg.model.attention.input_feeding is False
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (7, 2)
    assert cfg.trainer.device == Device.cpu
    assert (cfg.seed, cfg.name) == (99, "mine")


@pytest.mark.parametrize("attention", ["none", "bahdanau", "luong"])
def test_attention_group(attention: str):
    assert train_cfg(f"model/attention={attention}").model.attention.type == AttentionType(attention)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_scores(score: str):
    cfg = train_cfg("model/attention=luong", f"model.attention.score={score}")
    assert cfg.model.attention.score == LuongScore(score)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_devices(device: str):
    assert train_cfg(f"trainer.device={device}").trainer.device == Device(device)


def test_null_max_epochs():
    cfg = train_cfg("trainer.max_steps=5", "trainer.max_epochs=null")
    assert cfg.trainer.max_steps == 5 and cfg.trainer.max_epochs is None


def test_valid_sweep_composes():
    cfg = compose_checked("train", ["model/attention=none,bahdanau,luong"])
    assert OmegaConf.to_object(cfg).model.attention.type == AttentionType.none  # the first value


# ----------------------------------------------------------------------------- environment


def test_data_root_defaults_from_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("SEQ2SEQ_DATA", str(tmp_path / "corpora"))
    assert train_cfg().data.root == str(tmp_path / "corpora")
    assert train_cfg(f"data.root={tmp_path}").data.root == str(tmp_path)  # the override wins
    monkeypatch.delenv("SEQ2SEQ_DATA")
    assert train_cfg().data.root == "data"


def test_cache_dir_defaults_from_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(tmp_path / "cache"))
    assert train_cfg().data.cache_dir == str(tmp_path / "cache")
    monkeypatch.delenv("SEQ2SEQ_CACHE")
    assert train_cfg().data.cache_dir == "data/cache"


# ----------------------------------------------------------------------------- mistakes


def test_mistyped_trainer_key():
    message = config_error("train", "trainer.max_stpes=3")
    assert "trainer.max_stpes" in message
    assert "max_steps" in message  # the suggestion
    assert "did you mean 'trainer.max_steps'" in message
    for valid in ("max_epochs", "max_tokens", "device", "patience"):  # the valid keys are listed
        assert valid in message


def test_mistyped_top_level_key():
    message = config_error("train", "modle.x=1")
    assert "'modle" in message
    assert "did you mean 'model'" in message
    for valid in ("data", "model", "trainer", "optim", "seed", "name"):
        assert valid in message


def test_unknown_key_in_evaluate():
    message = config_error("evaluate", "run_dir=x", "chekpoint=last")
    assert "chekpoint" in message and "checkpoint" in message


@pytest.mark.parametrize(
    "override, group, valid",
    [
        ("model/attention=foo", "model/attention", ["none", "bahdanau", "luong"]),
        ("data=nope", "data", DATA),
        ("experiment=nope", "experiment", EXPERIMENTS),
        ("model/attention=none,bahdanau,foo", "model/attention", ["none", "bahdanau", "luong"]),
    ],
)
def test_unknown_group_choice(override: str, group: str, valid: list[str]):
    message = config_error("train", override)
    bad = override.rsplit(",", 1)[-1].split("=")[-1]
    assert f"'{bad}'" in message
    assert group in message
    for choice in valid:
        assert choice in message


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("model.attention.score=xyz", "model.attention.score", ["dot", "general", "concat"]),
        ("trainer.device=gpu", "trainer.device", ["auto", "cpu", "cuda"]),
        ("optim.scheduler=linear", "optim.scheduler", ["constant", "plateau", "warmup_decay", "cosine"]),
    ],
)
def test_bad_enum_value(override: str, key: str, valid: list[str]):
    message = config_error("train", override)
    assert key in message
    assert repr(override.split("=")[1]) in message
    for choice in valid:
        assert choice in message


def test_bad_enum_in_translate():
    message = config_error("translate", "run_dir=x", "device=gpu")
    assert "device" in message and "cuda" in message


@pytest.mark.parametrize("override, key", [("trainer.max_steps=abc", "trainer.max_steps"), ("seed=1.5x", "seed")])
def test_non_integer(override: str, key: str):
    message = config_error("train", override)
    assert key in message
    assert override.split("=")[1] in message


def test_sweep_checks_every_value():
    # the bad value is the last one: checking only the first value of a sweep would miss it
    message = config_error("train", "model/attention=none,bahdanau,foo")
    assert "foo" in message
    message = config_error("train", "trainer.device=cpu,gpu")
    assert "'gpu'" in message


# ----------------------------------------------------------------------------- the console script


def _console_script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"console script {path} is missing; install the package (pip install -e .)")
    return path


@pytest.mark.parametrize(
    "args, expect",
    [
        (["trainer.max_stpes=3"], "max_steps"),
        (["model/attention=foo"], "bahdanau"),
        (["--multirun", "model/attention=none,foo"], "foo"),
    ],
)
def test_train_cli_reports_one_line(tmp_path: Path, args: list[str], expect: str):
    env = {k: v for k, v in os.environ.items() if k not in ("SEQ2SEQ_DEBUG", "HYDRA_FULL_ERROR")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([str(_console_script("seq2seq-train")), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert expect in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists()
    assert not (tmp_path / "multirun").exists()


def test_evaluate_cli_without_run_dir(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SEQ2SEQ_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([str(_console_script("seq2seq-evaluate"))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "run_dir" in lines[0], proc.stderr
