"""Shared fixtures: tiny parallel corpora written into ``tmp_path``, typed data configs, shared data.

The hub is switched off for the whole test session (set at import, before ``datasets`` is
imported by any test module), so a missing local corpus fails fast instead of going online.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")



@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; several competing for two cores slow down badly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_bf16():
    """For tests that run bf16 autocast on the CPU. Where this CPU's oneDNN has no bf16 LSTM (no
    AVX512: it raises), the test runs with oneDNN switched off, on torch's own bf16 kernels: the
    same model, search and kernel code, so the bf16 paths are tested on every machine (the
    trainer itself refuses precision=bf16 there)."""
    import torch

    from seq2seq.kernels.compat import cpu_runs_bf16_lstm

    if cpu_runs_bf16_lstm():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration")  # torch's note on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A small German-English corpus with accents, sharp s, typographic quotes and a few rare
# characters; big enough to train a SentencePiece model of a few hundred pieces.
_DE_NOUNS = ["Hund", "Katze", "Mädchen", "Junge", "Straße", "Fußball", "Bäcker", "Löwe", "Brücke",
             "Küche", "Frau", "Mann", "Gärtnerin", "Wasserfontäne", "Fahrrad"]
_EN_NOUNS = ["dog", "cat", "girl", "boy", "street", "football", "baker", "lion", "bridge",
             "kitchen", "woman", "man", "gardener", "fountain", "bicycle"]
_DE_VERBS = ["läuft über", "springt auf", "schläft neben", "wartet vor", "spielt mit"]
_EN_VERBS = ["runs across", "jumps onto", "sleeps next to", "waits in front of", "plays with"]


def small_parallel(n: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """``n`` deterministic aligned (de, en) sentences; ``offset`` gives a different slice."""
    de, en = [], []
    for i in range(offset, offset + n):
        a, b, v = i % len(_DE_NOUNS), (i * 7 + 3) % len(_DE_NOUNS), (i // 3) % len(_DE_VERBS)
        de.append(f"Der {_DE_NOUNS[a]} {_DE_VERBS[v]} „{_DE_NOUNS[b]}“ Nr. {i}.")
        en.append(f"The {_EN_NOUNS[a]} {_EN_VERBS[v]} “{_EN_NOUNS[b]}” no. {i}.")
    return de, en


def write_corpus(root: Path, name: str, splits: dict[str, dict[str, list[str] | bytes]],
                 gz: bool = False) -> Path:
    """Write ``<root>/<name>/<split>.<lang>[.gz]``; a side given as bytes is written verbatim."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for split, sides in splits.items():
        for lang, content in sides.items():
            raw = content if isinstance(content, bytes) else "".join(f"{x}\n" for x in content).encode()
            path = directory / f"{split}.{lang}{'.gz' if gz else ''}"
            path.write_bytes(gzip.compress(raw) if gz else raw)
    return directory


@pytest.fixture
def corpus_writer(tmp_path: Path) -> Callable[..., Path]:
    """``corpus_writer(splits, name="toy", gz=False)`` writes a corpus under ``tmp_path/data``."""

    def write(splits: dict, name: str = "toy", gz: bool = False) -> Path:
        return write_corpus(tmp_path / "data", name, splits, gz=gz)

    return write


@pytest.fixture(scope="session")
def make_parallel() -> Callable[[int, int], tuple[list[str], list[str]]]:
    """``make_parallel(n, offset=0)``: ``n`` aligned (de, en) toy sentences."""
    return small_parallel


@pytest.fixture
def toy_splits() -> dict[str, dict[str, list[str]]]:
    """train/valid/test of the small de-en corpus (120/10/10 pairs)."""
    train, valid, test = small_parallel(120), small_parallel(10, 500), small_parallel(10, 600)
    return {
        "train": {"de": train[0], "en": train[1]},
        "valid": {"de": valid[0], "en": valid[1]},
        "test": {"de": test[0], "en": test[1]},
    }


@pytest.fixture
def make_data_cfg(tmp_path: Path) -> Callable[..., object]:
    """A typed ``DataConfig``; keywords override.

    ``make_data_cfg(**kw)``: the corpus ``toy`` under ``tmp_path/data`` (languages de, en; splits
    train/valid/test). ``make_data_cfg("multi30k", **kw)``: composed from ``data=multi30k`` exactly
    as ``seq2seq-train`` would. Either way the cache goes to ``tmp_path/cache`` and interpolated
    defaults resolve as in a real run.
    """
    from omegaconf import OmegaConf

    from seq2seq.core.config import DataConfig, register_configs

    def make(option: str | None = None, **overrides):
        local = {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")}
        if option is not None:
            from seq2seq.cli import compose_checked

            register_configs()
            data = compose_checked("train", [f"data={option}"]).data
            layers = [data, OmegaConf.create(local), OmegaConf.create(overrides)]
        else:
            base = {
                "corpus": "toy", "languages": ["de", "en"], "src_lang": "de", "tgt_lang": "en",
                "train_split": "train", "valid_split": "valid", "test_splits": ["test"], **local,
            }
            layers = [OmegaConf.structured(DataConfig), OmegaConf.create(base), OmegaConf.create(overrides)]
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
        assert isinstance(cfg, DataConfig)
        return cfg

    return make


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` next to the checkout, or skip when this machine does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared corpora not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def multi30k(shared_data: Path) -> Path:
    if not (shared_data / "multi30k").is_dir():
        pytest.skip(f"Multi30k not available at {shared_data / 'multi30k'}")
    return shared_data / "multi30k"


def smoke_config(cache: Path, *overrides: str):
    """A typed ``TrainConfig`` of ``experiment=smoke`` with its caches in ``cache``, logging every step."""
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import register_configs

    register_configs()
    cfg = compose_checked("train", ["experiment=smoke", f"data.cache_dir={cache}", "trainer.log_every=1",
                                    "trainer.valid_max_sentences=8", "model.dropout=0.1", *overrides])
    return OmegaConf.to_object(cfg)


def signal_once_training(proc: subprocess.Popen, log: Path, sig: int, timeout: float = 240) -> tuple[str, str]:
    """Send ``sig`` to a running seq2seq-train once ``log`` shows its third update (so the signal
    lands inside the training loop, not during start-up), then wait for it: (stdout, stderr).
    The process is killed on the way out whatever happens, so a hung run cannot outlive the test."""
    try:
        deadline = time.monotonic() + timeout
        while not (log.exists() and "step 3: train loss" in log.read_text(encoding="utf-8")):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(sig)
        return proc.communicate(timeout=120)
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(cache dir, prepared smoke data): SentencePiece trained once per test module."""
    from seq2seq.data.prepare import prepare_data

    cache = tmp_path_factory.mktemp("cache")
    cfg = smoke_config(cache)
    return cache, prepare_data(cfg.data, cfg.tokenizer)


@pytest.fixture(params=["fast", "reference"])
def kernels(request) -> str:
    """Each engine in turn: tests that take this run on both (``helpers_model.engine_of``)."""
    return request.param


def pytest_collection_modifyitems(config, items) -> None:
    """The attention lab's variants have no CPU kernels: ``kernels=fast`` hands them to the
    reference engine (tests/test_attention_lab.py checks that), so their ``fast`` cases would
    repeat the ``reference`` ones. They are deselected, not skipped: nothing is left untested."""
    from helpers_model import LAB

    lab = set(LAB)
    keep, repeats = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (repeats if params.get("kernels") == "fast" and params.get("variant") in lab else keep).append(item)
    if repeats:
        config.hook.pytest_deselected(items=repeats)
        items[:] = keep
