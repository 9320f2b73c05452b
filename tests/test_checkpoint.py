"""Checkpoint files: atomic writes, and loading that refuses anything but a sound seq2seq file,
with a one-line ``CheckpointError`` naming the file, without ever running code from it."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq.core.checkpoint import (
    FORMAT,
    VERSION,
    bytes_to_tensor,
    load_checkpoint,
    save_checkpoint,
    tensor_to_bytes,
)
from seq2seq.core.errors import CheckpointError, Seq2SeqError


def payload() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(8, 4), "b": torch.zeros(4)},
        "progress": {"step": 12, "best_bleu": 3.5, "finished": False},
        "config": {"name": "x", "list": [1, 2, 3], "none": None},
        "tokenizer": {"src": bytes_to_tensor(b"\x00\x01proto\xff"), "tgt": None},
    }


class Evil:
    """Unpickling this runs ``touch <marker>``: the attack a weights-only load must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_round_trip(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(payload(), path)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == VERSION
    assert torch.equal(loaded["model"]["w"], payload()["model"]["w"])
    assert loaded["progress"] == payload()["progress"]
    assert loaded["config"] == payload()["config"]
    assert tensor_to_bytes(loaded["tokenizer"]["src"]) == b"\x00\x01proto\xff"


def test_atomic_write_leaves_only_the_file(tmp_path):
    path = tmp_path / "checkpoints" / "best.pt"
    for _ in range(3):  # overwriting works too
        save_checkpoint(payload(), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(payload(), path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a lambda
        save_checkpoint({"model": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["progress"]["step"] == 12


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file_names_the_file(tmp_path, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(payload(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message
    assert isinstance(err.value, Seq2SeqError) and err.value.exit_code == 2


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04garbage", b"hello\n"],
                         ids=["random", "empty", "bad-zip", "text"])
def test_garbage_file_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"format": FORMAT, "version": VERSION, "model": {}, "x": Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "loading the checkpoint ran the pickled payload"


def test_the_malicious_file_is_really_malicious(tmp_path):
    """The file of the test above does run its payload when loaded unsafely (so that test can
    fail): checked in a child process."""
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"x": Evil(marker)}, path)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_raw_pickle_with_a_global_opcode_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(Evil(marker), protocol=protocol))
    assert b"system" in path.read_bytes()  # (STACK_)GLOBAL for os.system / posix.system
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_foreign_torch_file_is_not_a_seq2seq_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a seq2seq checkpoint"):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a seq2seq checkpoint"):
        load_checkpoint(path)


def test_other_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1}, path)
    with pytest.raises(CheckpointError, match=f"version {VERSION + 1}"):
        load_checkpoint(path)


def test_bytes_tensor_round_trip():
    for data in (b"\x00", bytes(range(256)) * 3):
        t = bytes_to_tensor(data)
        assert t.dtype == torch.uint8
        assert tensor_to_bytes(t) == data
