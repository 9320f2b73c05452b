"""Our toolkit: training and decoding through our own API in a child process (``ours_child.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from peerbench.corpus import data_overrides
from peerbench.envs import package_versions
from peerbench.matched import ours_model_overrides
from peerbench.procs import BenchError, StepPoint, check_ok, child_env, run_logged
from peerbench.toolkit import DecodeOutcome, DecodeSpec, Toolkit, TrainOutcome, TrainSpec, Workspace

CHILD = Path(__file__).with_name("ours_child.py")

ATTENTION_OVERRIDES = {
    "bahdanau": ["model/attention=bahdanau"],
    "luong": ["model/attention=luong", "model.attention.score=general", "model.attention.input_feeding=true"],
}


def batching_overrides(batching: str, batch_sentences: int, max_tokens: int) -> list[str]:
    if batching == "tokens":
        return [f"trainer.max_tokens={max_tokens}", "trainer.max_sentences=100000"]
    return [f"trainer.max_sentences={batch_sentences}", "trainer.max_tokens=1000000"]


def git_revision(folder: Path) -> str:
    """Short commit of the checkout, with ``+dirty`` when the package or configs have edits."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "seq2seq", "configs") else "")


class Ours(Toolkit):
    name = "ours"
    label = "seq2seq (ours)"

    def __init__(self, work: Workspace, data_root: Path, overrides: list[str], python: str = sys.executable) -> None:
        super().__init__(work)
        self.data_root = data_root
        self.overrides = overrides
        self.python = python

    def setup(self, log: Path) -> None:
        result = run_logged([self.python, "-c", "import seq2seq.training.trainer"], log, child_env(1))
        check_ok(result, "import seq2seq", log)

    def versions(self) -> dict[str, str]:
        import seq2seq

        found = package_versions(Path(self.python), ("seq2seq",))
        return {**found, "commit": git_revision(Path(seq2seq.__file__).resolve().parent.parent)}

    def train_overrides(self, attention: str, steps: int, threads: int, seed: int, batching: str,
                        batch_sentences: int, max_tokens: int) -> list[str]:
        """Our training config for one benchmark run; ``--ours-override`` values come last and win."""
        return [*data_overrides(self.data_root, self.work.cache), *ours_model_overrides(),
                *ATTENTION_OVERRIDES[attention], *batching_overrides(batching, batch_sentences, max_tokens),
                f"trainer.num_threads={threads}", f"trainer.max_steps={steps}", f"seed={seed}",
                "trainer.device=cpu", *self.overrides]

    def check_config(self, attentions: list[str], **run: int | str) -> None:
        """Compose every config we will train with, so a bad override stops the benchmark at once
        (before any set-up) with our one-line message; raises ``Seq2SeqError``."""
        from seq2seq.cli import compose_checked
        from seq2seq.core.config import register_configs

        register_configs()
        for attention in attentions:
            compose_checked("train", self.train_overrides(attention, **run))

    def train(self, spec: TrainSpec) -> TrainOutcome:
        overrides = self.train_overrides(spec.attention, spec.steps, spec.threads, spec.seed, spec.batching,
                                         spec.batch_sentences, spec.max_tokens)
        result_file = spec.run_dir / "bench-result.json"
        cmd = [self.python, str(CHILD), "train", "--run-dir", str(spec.run_dir), "--steps", str(spec.steps),
               "--result", str(result_file), "--", *overrides]
        proc = run_logged(cmd, spec.log, child_env(spec.threads))
        check_ok(proc, "training", spec.log)
        try:
            result = json.loads(result_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BenchError(f"training wrote no result ({err}); log: {spec.log}") from None
        points = [StepPoint(step=int(s), time=float(t), tokens=float(n)) for s, t, n in result.pop("points")]
        return TrainOutcome(points=points, params=result.pop("params"), proc=proc, model=spec.run_dir, info=result)

    def decode(self, spec: DecodeSpec) -> DecodeOutcome:
        result_file = spec.out.with_suffix(".json")
        corpus = spec.corpus
        cmd = [self.python, str(CHILD), "decode", "--run-dir", str(spec.model),
               "--src", str(corpus.file(corpus.test, corpus.src_lang)), "--out", str(spec.out),
               "--beam", str(spec.beam), "--threads", str(spec.threads), "--result", str(result_file)]
        proc = run_logged(cmd, spec.log, child_env(spec.threads))
        check_ok(proc, "decoding", spec.log)
        result = json.loads(result_file.read_text(encoding="utf-8"))
        return DecodeOutcome(seconds=result["seconds"], timing="in-process timer around translate_ids", proc=proc)

    def matmul(self, threads: int, result_file: Path, log: Path) -> dict:
        """This machine's dense-matmul GFLOP/s (float32 and bf16) with our torch and ``threads``."""
        cmd = [self.python, str(CHILD), "matmul", "--threads", str(threads), "--result", str(result_file)]
        proc = run_logged(cmd, log, child_env(threads))
        check_ok(proc, "matmul benchmark", log)
        return json.loads(result_file.read_text(encoding="utf-8"))
