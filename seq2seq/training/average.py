"""Checkpoint averaging: the element-wise mean of the weights of several checkpoints of one run
(Vaswani et al. 2017, 6.1; Junczys-Dowmunt et al. 2016), written as ``checkpoints/averaged.pt``,
which ``seq2seq-evaluate``/``seq2seq-translate checkpoint=averaged`` read like any other.

``last=N`` takes the N newest ``step-<N>.pt`` files (train with ``trainer.keep_checkpoints`` >= N),
``best=N`` the N with the best valid BLEU (``trainer.keep_best_checkpoints`` >= N; ``best.pt``
counts). Every chosen checkpoint is checked to hold the same model config, tokenizer and weight
shapes before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from seq2seq.core.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints, step_of
from seq2seq.core.config import AverageConfig
from seq2seq.core.errors import CheckpointError, ConfigError, RunDirError

log = logging.getLogger(__name__)

AVERAGED = "averaged.pt"


def check_average_config(cfg: AverageConfig) -> tuple[str, int]:
    """("last" | "best", N) of a config that gives exactly one of them, N >= 1."""
    given = [(mode, n) for mode, n in (("last", cfg.last), ("best", cfg.best)) if n is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of last=N (the N newest checkpoints) or best=N (the N with the best "
                          f"valid BLEU): seq2seq-average run_dir={cfg.run_dir} last=5")
    mode, n = given[0]
    if n < 1:
        raise ConfigError(f"{mode} must be a positive number of checkpoints (got {n})")
    return mode, n


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint without its optimizer state, which averaging never reads (two thirds of the bytes)."""
    payload = load_checkpoint(path)
    payload.pop("optimizer", None)
    return payload


def choose(ckpt_dir: Path, mode: str, n: int) -> list[tuple[Path, dict[str, Any]]]:
    """The N checkpoints ``mode`` picks, loaded once each, newest first. ``best`` also considers
    ``best.pt`` when its step file is gone (it is usually a hard link to one)."""
    files = step_checkpoints(ckpt_dir)  # newest first
    keep_key = "trainer.keep_checkpoints" if mode == "last" else "trainer.keep_best_checkpoints"
    if mode == "last":
        if len(files) < n:
            raise RunDirError(f"{ckpt_dir} holds {len(files)} step checkpoints but last={n} needs {n}; "
                              f"average fewer, or train with {keep_key}={n}")
        return [(path, _load(path)) for path in files[:n]]
    loaded = {step_of(path): (path, _load(path)) for path in files}
    best = ckpt_dir / "best.pt"
    if best.is_file() and not any(best.samefile(path) for path in files):
        payload = _load(best)
        loaded.setdefault(int(payload["progress"]["step"]), (best, payload))
    scored = [(float(payload["valid_bleu"]), step, path, payload) for step, (path, payload) in loaded.items()
              if payload.get("valid_bleu") is not None]
    if len(scored) < n:
        raise RunDirError(f"{ckpt_dir} holds {len(scored)} checkpoints with a valid BLEU but best={n} needs {n}; "
                          f"average fewer, or train with {keep_key}={n}")
    scored.sort(key=lambda x: (-x[0], x[1]))  # the earlier of equal scores, as best.pt
    chosen = sorted(scored[:n], key=lambda x: -x[1])
    return [(path, payload) for _, _, path, payload in chosen]


def _check_same_model(chosen: list[tuple[Path, dict[str, Any]]]) -> None:
    first_path, first = chosen[0]
    for path, payload in chosen[1:]:
        if payload["config"]["model"] != first["config"]["model"]:
            raise CheckpointError(f"{path} and {first_path} have different model configs; only checkpoints of one "
                                  "model can be averaged")
        for side in ("src", "tgt"):
            a, b = payload["tokenizer"][side], first["tokenizer"][side]
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise CheckpointError(f"{path} and {first_path} have different tokenizers; only checkpoints of one "
                                      "run can be averaged")
        shapes = {k: tuple(v.shape) for k, v in payload["model"].items()}
        if shapes != {k: tuple(v.shape) for k, v in first["model"].items()}:
            raise CheckpointError(f"{path} and {first_path} have different weights; only checkpoints of one "
                                  "model can be averaged")


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (summed in float64, returned in each
    tensor's own dtype); other tensors are taken from the first state."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64)
            for state in states:
                total += state[key].to(torch.float64)
            out[key] = (total / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def average_checkpoints(cfg: AverageConfig) -> Path:
    """Write ``<run_dir>/checkpoints/averaged.pt``; its path."""
    mode, n = check_average_config(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise RunDirError(f"{run_dir} has no checkpoints/ folder; pass the directory of a training run "
                          "(outputs/<name>/<timestamp>)")
    out = ckpt_dir / AVERAGED
    if out.exists() and not cfg.overwrite:
        raise RunDirError(f"{out} already exists; pass overwrite=true to replace it (its evaluations keep their "
                          "reports), or copy it away first")
    chosen = choose(ckpt_dir, mode, n)
    _check_same_model(chosen)
    newest = chosen[0][1]
    steps = [int(payload["progress"]["step"]) for _, payload in chosen]
    payload = {key: newest[key] for key in ("config", "vocab", "tokenizer", "model_description", "num_parameters",
                                            "progress") if key in newest}
    payload["model"] = average_weights([p["model"] for _, p in chosen])
    payload["averaged"] = {"mode": mode, "n": n, "steps": steps, "files": [p.name for p, _ in chosen],
                           "valid_bleu": [p.get("valid_bleu") for _, p in chosen]}
    save_checkpoint(payload, out)
    log.info("averaged %d checkpoints (%s=%d: steps %s) into %s", n, mode, n, ", ".join(map(str, steps)), out)
    return out
