"""Run directories for ``seq2seq-compare``: finding them, reading their config, training summary and
newest evaluation report, and the data types of a comparison (see ``seq2seq/evaluation/compare.py``)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from seq2seq.core.errors import Seq2SeqError
from seq2seq.evaluation.metrics import BucketScore, PairedResult
from seq2seq.evaluation.report import EvalReport

log = logging.getLogger(__name__)

# --search: the search (greedy, beam5, beam5-lp0.6), then which model decoded when it was not the
# best checkpoint, as seq2seq-evaluate names its report folders: beam5-averaged, greedy-last,
# beam5-ensemble3, beam5-ensemble3-averaged (folders test-beam5-averaged, test-last, ...)
SEARCH_RE = re.compile(r"(?P<search>greedy|beam\d+(?:-lp[0-9.eE+-]+)?)"
                       r"(?:-(?P<model>averaged|last|ensemble\d+(?:-(?:averaged|last))?))?")


class CompareError(Seq2SeqError):
    """Runs that cannot be compared: nothing usable, or different test sets or settings."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "model.attention.type" -> "luong"
    description: str
    seed: int | None
    label: str = ""
    eval_dir: Path | None = None
    report: EvalReport | None = None
    refs_sha256: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # num_parameters, train_seconds, ...
    finished: bool = False
    problems: list[str] = field(default_factory=list)


@dataclass
class Group:
    label: str
    runs: list[Run]
    metrics: dict[str, tuple[float | None, float | None]]  # name -> (mean, std)
    buckets: list[BucketScore]  # mean bucket BLEU and mean bootstrap interval, for the plots
    paired: PairedResult | None = None
    paired_buckets: list[PairedResult | None] | None = None  # per length bucket, vs the baseline


@dataclass
class Comparison:
    groups: list[Group]
    baseline: str
    skipped: list[Run]  # runs found but not compared, each with its problems
    unfinished_used: list[Run]
    split: str
    search: str
    reference: EvalReport  # the first compared report: test set and signatures
    refs_sha256: str | None
    bootstrap: dict[str, Any]  # {"samples", "seed", "computed"}


# ----------------------------------------------------------------------------- finding runs


def natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory, or a sweep directory with runs one or two levels down."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise CompareError(f"{path}: no such directory; pass a multirun sweep directory or run directories")
        if _is_run(path):
            found.append(path)
            continue
        runs = [p for p in path.glob("*") if p.is_dir() and _is_run(p)]
        runs = runs or [p for p in path.glob("*/*") if p.is_dir() and _is_run(p)]
        if not runs:
            raise CompareError(f"{path}: neither a run directory (no .hydra/config.yaml) nor a sweep "
                               "directory with run directories inside")
        found.extend(sorted(runs, key=natural_key))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [Path(p) for p in unique]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


@functools.cache
def default_config() -> dict[str, Any]:
    """Today's TrainConfig defaults, flattened (interpolations left as text)."""
    from seq2seq.core.config import TrainConfig

    return _flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))


def _load_config(run_dir: Path) -> dict[str, Any]:
    """The run's flattened config. A key it lacks (added to the config since the run was made)
    takes today's default, which is what the run did: without it, a new key would set every
    older run apart from the newer ones in the comparison (``trainer.max_minutes=<unset>``)."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot resolve here (an env var): keep it as text
        data = OmegaConf.to_container(cfg, resolve=False)
    flat = _flatten(data if isinstance(data, dict) else {})
    return {**default_config(), **flat}


def describe(cfg: dict[str, Any]) -> str:
    """The model description from a flattened config: ``seq2seq.model.network.describe`` of the
    run's attention settings (a config it cannot read gives the attention type alone)."""
    from seq2seq.core.config import AttentionConfig, ModelConfig
    from seq2seq.model.network import describe as model_describe

    prefix = "model.attention."
    attention = {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)}
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AttentionConfig), attention))
    except Exception:  # a run written by another version: keys or values this one does not know
        return str(cfg.get("model.attention.type", "bahdanau"))
    self_attention = bool(cfg.get("model.decoder_self_attention", False))
    return model_describe(ModelConfig(attention=typed, decoder_self_attention=self_attention))  # type: ignore[arg-type]


def parse_search(search: str) -> re.Match[str]:
    """``--search`` split into its search and model parts (see SEARCH_RE); CompareError if malformed."""
    m = SEARCH_RE.fullmatch(search)
    if m is None:
        raise CompareError(f"--search {search!r}: expected greedy, beam<k> or beam<k>-lp<alpha> (e.g. beam5), "
                           "optionally followed by -averaged, -last or -ensemble<N>")
    return m


def eval_dir_name(split: str, search: str) -> str:
    """The report folder seq2seq-evaluate writes for ``--search``."""
    m = parse_search(search)
    name = split if m["search"] == "greedy" else f"{split}-{m['search']}"
    return name if m["model"] is None else f"{name}-{m['model']}"


def newest_eval_dir(run_dir: Path, split: str, search: str) -> Path | None:
    """The newest complete ``eval/<name>[-N]`` (highest N with a report.json)."""
    base = eval_dir_name(split, search)
    pattern = re.compile(re.escape(base) + r"(?:-(\d+))?")
    found = []
    for d in (run_dir / "eval").glob("*"):
        m = pattern.fullmatch(d.name)
        if m and (d / "report.json").is_file():
            found.append((int(m.group(1) or 1), d))
    return max(found)[1] if found else None


def _job_peak(summary: dict) -> float | None:
    """The largest rank's peak resident memory of this job's training. None when the summary's
    figure is the process's (``peak_memory_scope`` other than "job", or a summary written before it
    existed): in a -m sweep that includes the jobs before it."""
    peaks = summary.get("peak_rss_mb")
    if summary.get("peak_memory_scope") != "job" or not isinstance(peaks, list) or not peaks:
        return None
    return max(float(p) for p in peaks)


def _engine_name(summary: dict[str, Any]) -> str | None:
    """The engine that trained the run and its precision ("fast bf16", "reference float32"; the
    name alone in older summaries, None before there were two engines): training and decoding
    speeds differ by engine and precision as much as by model."""
    engine = summary.get("engine")
    if not isinstance(engine, dict) or not engine.get("name"):
        return None
    precision = summary.get("precision")  # written since 2026-12-06
    return f"{engine['name']} {precision}" if precision else str(engine["name"])


def _training_stats(run: Run) -> None:
    """Fill ``run.stats`` and ``run.finished`` from summary.json, else from the checkpoint."""
    summary_path = run.path / "summary.json"
    if summary_path.is_file():
        try:
            s = json.loads(summary_path.read_text(encoding="utf-8"))
            run.stats = {"num_parameters": s.get("num_parameters"), "best_step": s.get("best_step"),
                         "steps": s.get("steps"), "train_seconds": s.get("train_seconds"),
                         "tokens_per_s": s.get("train_tokens_per_s"), "peak_rss_mb": _job_peak(s),
                         "engine": _engine_name(s)}
            run.finished = bool(s.get("finished"))
            if not run.finished:
                run.problems.append("unfinished (summary.json: finished is false)")
            return
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s: unreadable summary.json (%s); using the checkpoint", run.path, err)
    ckpt = run.path / "checkpoints"
    if not (ckpt / "last.pt").is_file():
        run.problems.append("unfinished (no summary.json and no checkpoints/last.pt)")
        return
    from seq2seq.core.checkpoint import load_checkpoint  # torch: only needed for this fallback

    try:
        payload = load_checkpoint(ckpt / "last.pt")
        p = payload["progress"]
    except (Seq2SeqError, KeyError, TypeError) as err:
        run.problems.append(f"unfinished (unreadable checkpoints/last.pt: {err})")
        return
    seconds = float(p.get("train_seconds", 0.0))
    run.stats = {"num_parameters": payload.get("num_parameters"), "best_step": p.get("best_step"),
                 "steps": p.get("step"), "train_seconds": seconds,
                 "tokens_per_s": p.get("train_tokens", 0) / seconds if seconds > 0 else None}
    run.finished = bool(p.get("finished")) and (ckpt / "best.pt").is_file()
    if not run.finished:
        why = "no best.pt" if p.get("finished") else f"last.pt at step {p.get('step')} is not finished"
        run.problems.append(f"unfinished ({why}; no summary.json)")


def load_run(run_dir: Path, split: str | None, search: str) -> Run:
    cfg = _load_config(run_dir)
    seed = cfg.get("seed")
    run = Run(run_dir, cfg, describe(cfg), seed if isinstance(seed, int) else None)
    _training_stats(run)
    tests = cfg.get("data.test_splits") or ["test"]
    split = split or str(tests[0])
    run.eval_dir = newest_eval_dir(run_dir, split, search)
    if run.eval_dir is None:
        run.problems.append(f"no eval report eval/{eval_dir_name(split, search)} (split {split}, {search})")
        return run
    try:
        run.report = EvalReport.from_dict(json.loads((run.eval_dir / "report.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        run.problems.append(f"unreadable {run.eval_dir / 'report.json'}: {err}")
        return run
    refs = run.eval_dir / "refs.txt"
    run.refs_sha256 = hashlib.sha256(refs.read_bytes()).hexdigest() if refs.is_file() else None
    return run
