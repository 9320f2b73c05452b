"""Wires the pieces for the commands: train, evaluate, translate. No Hydra here (see ``cli.py``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from datasets import Dataset

from seq2seq.core.checkpoint import step_checkpoints
from seq2seq.core.config import (
    EvalConfig,
    EvaluateConfig,
    SearchConfig,
    TrainConfig,
    TranslateConfig,
)
from seq2seq.core.errors import ConfigError, DataError, RunDirError
from seq2seq.core.files import make_writable_dir, write_text_atomic
from seq2seq.core.memory import JobMemory
from seq2seq.core.runlock import lock_run_dir
from seq2seq.core.tracking import Tracker
from seq2seq.data.corpus import ALIGN_COLUMN, check_languages, load_corpus, read_lines
from seq2seq.data.prepare import prepare_data
from seq2seq.evaluation.alignment import format_links
from seq2seq.evaluation.evaluate import (
    LoadedModel,
    check_eval_config,
    decode_lines,
    eval_dir_name,
    evaluate,
    find_checkpoint,
    hypothesis_alignments,
    load_model,
    load_models,
    translate_lines,
)
from seq2seq.evaluation.report import EvalReport
from seq2seq.model.devices import set_cpu_threads
from seq2seq.model.network import check_model_config
from seq2seq.search.common import check_search_config
from seq2seq.training.distributed import Dist
from seq2seq.training.trainer import Trainer, check_trainer_config

log = logging.getLogger(__name__)


def check_writable(run_dir: Path) -> None:
    """Fail before any training if the run directory cannot take files."""
    try:
        make_writable_dir(run_dir)
    except OSError as err:
        raise RunDirError(f"run directory {run_dir} is not writable ({err.strerror}); "
                          "choose another with hydra.run.dir=... or free the disk") from None


def check_free_space(run_dir: Path, needed: int) -> None:
    """Fail before training when the run directory cannot hold a new checkpoint beside the last."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise RunDirError(f"run directory {run_dir} has {free / 2**20:.0f} MB free but checkpoints of this model "
                          f"need about {needed / 2**20:.0f} MB; free some space or choose another with "
                          "hydra.run.dir=...")


def check_train_config(cfg: TrainConfig) -> None:
    """Every check of a training config that needs no file: the command runs these before Hydra
    creates the run directory (nothing is left behind by a bad config), and the run again."""
    name = Path(cfg.name)
    if not cfg.name or name.is_absolute() or ".." in name.parts:
        raise ConfigError(f"name={cfg.name} would put the run outside outputs/; use a plain name such as "
                          "name=my-run (or hydra.run.dir=DIR for another place)")
    check_trainer_config(cfg)
    check_model_config(cfg.model)
    check_eval_config(cfg.eval)
    check_languages(cfg.data)


def warn_unused_keys(cfg: TrainConfig) -> None:
    """Say which set keys the chosen model or training budget does not use (they stay in the config, unused)."""
    from seq2seq.core.config import AttentionConfig, AttentionType, LuongScore

    att, default = cfg.model.attention, AttentionConfig()
    family = att.type.value
    scored_after = att.type in (AttentionType.luong, AttentionType.local)

    def shown(key: str) -> str:
        value = getattr(att, key)
        return f"model.attention.{key}={value.value if hasattr(value, 'value') else value}"

    unused = []
    if not scored_after:
        unused += [shown(key) for key in ("score", "input_feeding") if getattr(att, key) != getattr(default, key)]
    if att.type != AttentionType.local:
        unused += [shown(key) for key in ("mode", "window") if getattr(att, key) != getattr(default, key)]
    additive = att.type == AttentionType.bahdanau or (scored_after and att.score == LuongScore.concat)
    if not additive and att.hidden_size != default.hidden_size:
        unused.append(f"model.attention.hidden_size={att.hidden_size}")
        family = f"{att.type.value} {att.score.value}" if scored_after else family
    for key in unused:
        log.warning("%s does not apply to %s attention and is ignored", key, family)
    _warn_unused_coverage_start(cfg)


def _warn_unused_coverage_start(cfg: TrainConfig) -> None:
    """A coverage penalty start that never takes effect: no penalty, or a start past the update budget."""
    t = cfg.trainer
    if t.coverage_loss_start == 0:
        return
    if t.coverage_loss == 0:
        log.warning("trainer.coverage_loss_start=%d has no effect: trainer.coverage_loss=0 (no coverage penalty)",
                    t.coverage_loss_start)
    elif t.max_steps is not None and t.coverage_loss_start >= t.max_steps:
        log.warning("trainer.coverage_loss_start=%d is not reached within trainer.max_steps=%d: the coverage "
                    "penalty never applies; lower the start (half the budget is usual)", t.coverage_loss_start,
                    t.max_steps)


def _claim_run_dir(cfg: TrainConfig, run_dir: Path) -> bool:
    """Rank 0's checks of the run directory before any data work; whether it holds a checkpoint."""
    check_writable(run_dir)
    lock_run_dir(run_dir)  # for the life of this process (see seq2seq/core/runlock.py)
    check_train_config(cfg)  # every config check before the (possibly long) data preparation
    warn_unused_keys(cfg)
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoint = (ckpt_dir / "last.pt").exists() or bool(step_checkpoints(ckpt_dir))
    if cfg.trainer.resume is None and has_checkpoint:
        raise RunDirError(f"{run_dir} already holds a training run; resume it with trainer.resume={run_dir} "
                          "or start a new run directory")
    if cfg.trainer.resume is not None and not has_checkpoint:
        raise RunDirError(f"cannot resume: {ckpt_dir} holds no checkpoint (the run was stopped before "
                          "its first one); start it again without trainer.resume")
    return has_checkpoint


@dataclasses.dataclass
class TrainingResult:
    reports: list[tuple[EvalReport, Path]]  # (report, its folder) per test split; empty when not evaluated
    stopped: bool = False  # SIGINT/SIGTERM ended the training early (saved, resumable, not evaluated)


def run_training(cfg: TrainConfig, run_dir: Path, dist: Dist | None = None) -> TrainingResult:
    """Train (or resume) in ``run_dir``, then evaluate the best checkpoint on the test splits.
    With several ranks (``dist``) every rank trains; rank 0 alone writes ``run_dir`` and evaluates."""
    dist = dist or Dist.single()
    dist.on_primary("checking the run directory", lambda: _claim_run_dir(cfg, run_dir))
    # rank 0 fills the cache first; the others then read it (or, on a node of their own, build their own)
    data = dist.primary_first("preparing the data", lambda: prepare_data(cfg.data, cfg.tokenizer))
    trainer = Trainer(cfg, data, run_dir, dist)
    memory = JobMemory(trainer.device)
    memory.start_job()  # this job's peak from here (model and data loaded), not a sweep's earlier jobs'
    dist.on_primary("checking free space", lambda: check_free_space(run_dir, 2 * trainer.checkpoint_bytes()))
    if cfg.trainer.resume is not None:
        trainer.restore()
        p = trainer.progress
        say = log.warning if dist.is_primary else log.debug  # once per job, not once per rank
        if trainer.budget_spent():
            say("run %s already finished at step %d (epoch %d, %.1f minutes); raise trainer.max_steps, "
                "trainer.max_epochs or trainer.max_minutes to train further", run_dir, p.step, p.epoch,
                p.wall_seconds / 60)
            return TrainingResult([])
        if p.finished and trainer.early_stopped():
            say("run %s already stopped early at step %d (no better valid BLEU in %d validations); "
                "raise trainer.patience to train further", run_dir, p.step, p.bad_validations)
            return TrainingResult([])
        p.finished = False
    progress = trainer.fit()
    peaks = dist.all_gather_objects(memory.peaks(), "the summary")
    if not progress.finished or not dist.is_primary:  # stopped by a signal: evaluation would be premature
        return TrainingResult([], stopped=not progress.finished)
    reports = []
    if cfg.trainer.evaluate_at_end:
        loaded = load_model(find_checkpoint(run_dir, "best"), cfg.trainer.device, cfg.trainer.kernels)
        texts = {split: raw_texts(data.splits[split]) for split in data.test_splits}
        gold = {split: gold_of(data.splits[split]) for split in data.test_splits}
        reports = evaluate_run(run_dir, loaded, texts, cfg.search, cfg.eval, gold)
    summary = {
        "model": trainer.model.description,
        "engine": {"name": trainer.engine.name, **trainer.engine.paths()},
        # what the speed and memory figures below were measured on (the precision changes both)
        "device": trainer.device.type,
        "precision": "float32" if trainer.amp_dtype is None else "bf16",
        "threads": torch.get_num_threads(),
        "num_parameters": trainer.num_parameters,
        "steps": progress.step,
        "epochs": progress.epoch,
        "best_step": progress.best_step,
        "best_valid_bleu": progress.best_bleu,
        "train_seconds": progress.train_seconds,  # in updates
        "train_tokens_per_s": progress.train_tokens / max(progress.train_seconds, 1e-9),
        "wall_seconds": progress.wall_seconds,  # the training loop, validations included (trainer.max_minutes)
        "ended_by": trainer.ended_by(),
        "ranks": dist.world_size,
        # per rank, training only (the data preparation before it and the evaluation after it excluded)
        "peak_rss_mb": [p.rss_mb for p in peaks],
        "peak_memory_scope": peaks[0].scope,  # "job", or "process" where the peak could not be reset
        **({"peak_cuda_mb": [p.cuda_mb for p in peaks]} if peaks[0].cuda_mb is not None else {}),
        "skipped_steps": progress.skipped_steps,
        "oom_skipped_steps": progress.oom_steps,
        "finished": progress.finished,
        "test": {r.split: {"bleu": r.score.bleu, "chrf": r.score.chrf} for r, _ in reports},
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log_hparams(run_dir, cfg, summary, [r for r, _ in reports])
    return TrainingResult(reports)


def log_hparams(run_dir: Path, cfg: TrainConfig, summary: dict, reports: list[EvalReport]) -> None:
    """Hyperparameters and final metrics for TensorBoard's HParams dashboard."""
    m, a = cfg.model, cfg.model.attention
    hparams = {
        "attention": a.type.value, "score": a.score.value if a.type.value in ("luong", "local") else "-",
        "input_feeding": bool(a.input_feeding) if a.type.value in ("luong", "local") else False,
        "local_mode": a.mode.value if a.type.value == "local" else "-",
        "local_window": a.window if a.type.value == "local" else 0,
        "heads": a.heads, "normalizer": a.normalizer.value,
        # The lab's other switches: without them lab=relative, coverage and self_attention runs
        # look like their plain Luong/Bahdanau arms in the HParams table.
        "position_bias": a.position_bias.value, "coverage": bool(a.coverage),
        "coverage_loss": cfg.trainer.coverage_loss, "decoder_self_attention": bool(m.decoder_self_attention),
        "embedding_size": m.embedding_size, "encoder_hidden_size": m.encoder_hidden_size,
        "decoder_hidden_size": m.decoder_hidden_size, "encoder_layers": m.encoder_layers,
        "decoder_layers": m.decoder_layers, "dropout": m.dropout, "lr": cfg.optim.lr,
        "max_tokens": cfg.trainer.max_tokens, "vocab_size": cfg.tokenizer.vocab_size,
        "corpus": cfg.data.corpus, "seed": cfg.seed, "parameters": summary["num_parameters"],
    }
    # The HParams dashboard reads these as scalars too; the Scalars tab sorts tag groups by name,
    # so a group named "z_final" sits below train/, valid/ and test/ instead of above them.
    metrics = {"z_final/best_valid_bleu": summary["best_valid_bleu"], "z_final/best_step": summary["best_step"],
               "z_final/train_tokens_per_s": summary["train_tokens_per_s"]}
    if reports:
        metrics["z_final/test_bleu"] = reports[0].score.bleu
        metrics["z_final/test_chrf"] = reports[0].score.chrf
        if reports[0].attention is not None:
            metrics["z_final/test_attention_entropy"] = reports[0].attention["entropy"]
            if reports[0].attention.get("alignment"):
                metrics["z_final/test_aer"] = reports[0].attention["alignment"]["aer"]
    tracker = Tracker(run_dir)
    try:
        tracker.hparams(hparams, metrics)
    finally:
        tracker.close()


def evaluate_run(run_dir: Path, loaded: LoadedModel, texts: dict[str, tuple[list[str], list[str]]],
                 search: SearchConfig, eval_cfg: EvalConfig, gold: dict[str, list[str] | None] | None = None,
                 gold_source: str = "the corpus", model: str = "best") -> list[tuple[EvalReport, Path]]:
    """Evaluate ``loaded`` on each split of ``texts`` (split -> raw sources, raw references),
    writing ``<run dir>/eval/<split>[-<search>][-<model>]/``; returns each report with its folder.
    ``gold``: split -> gold word alignments (Pharaoh lines), where known; ``model``: which
    checkpoint (``best``, ``last``, ``averaged``) or ``ensemble<N>``."""
    tracker = Tracker(run_dir)
    reports = []
    try:
        for i, (split, (src, refs)) in enumerate(texts.items()):
            tag = "test" if i == 0 else f"test_{split}"
            report, out_dir = evaluate(loaded, src, refs, loaded.cfg.data.corpus, split, search, eval_cfg,
                                       run_dir / "eval" / eval_dir_name(split, search, model), tracker, tag,
                                       gold_alignments=(gold or {}).get(split), gold_source=gold_source)
            reports.append((report, out_dir))
    finally:
        tracker.close()
    return reports


def raw_texts(ds: Dataset) -> tuple[list[str], list[str]]:
    """Raw source lines and raw references of a loaded (or cleaned) split."""
    cols = ("raw_src", "ref") if "ref" in ds.column_names else ("src", "tgt")
    table = ds.select_columns(list(cols))[:]
    return table[cols[0]], table[cols[1]]


def gold_of(ds: Dataset) -> list[str] | None:
    """A split's gold word alignments, where the corpus has them (the synthetic one does)."""
    return list(ds[ALIGN_COLUMN]) if ALIGN_COLUMN in ds.column_names else None


def read_gold_alignments(path: Path, sentences: int) -> list[str]:
    """A gold alignment file, checked before any work: a Pharaoh line per sentence."""
    from seq2seq.evaluation.alignment import parse_links

    if not path.is_file():
        raise DataError(f"align_file={path}: no such file")
    lines = read_lines(path)
    if len(lines) != sentences:
        raise DataError(f"align_file={path} has {len(lines)} lines for {sentences} sentences; it needs one "
                        "Pharaoh line (i-j ...) per sentence")
    for n, line in enumerate(lines, start=1):
        try:
            parse_links(line, f"{path} line {n}")
        except ValueError as err:
            raise DataError(str(err)) from None
    return lines


def load_split(cfg: TrainConfig, split: str) -> Dataset:
    """One raw split of the run's corpus (nothing dropped)."""
    data = dataclasses.replace(cfg.data, train_split=split, valid_split=split, test_splits=[split])
    return load_corpus(data)[split]


def run_evaluate(ecfg: EvaluateConfig) -> list[tuple[EvalReport, Path]]:
    check_search_config(ecfg.search)
    check_eval_config(ecfg.eval)
    set_cpu_threads(ecfg.num_threads, "num_threads")
    run_dir = Path(ecfg.run_dir)
    if ecfg.align_file is not None and ecfg.ensemble:
        raise ConfigError("align_file=... scores one attention model's alignments; an ensemble has none: drop ensemble")
    loaded = load_models(run_dir, ecfg.checkpoint.value, list(ecfg.ensemble), ecfg.device, ecfg.kernels)
    if ecfg.data_root is not None:
        loaded.cfg.data.root = ecfg.data_root
    if ecfg.src_file is not None or ecfg.ref_file is not None:
        if ecfg.src_file is None or ecfg.ref_file is None:
            raise DataError("give both src_file=... and ref_file=... (or neither, to use split=...)")
        src_path, ref_path = Path(ecfg.src_file), Path(ecfg.ref_file)
        for p in (src_path, ref_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file")
        src, ref = read_lines(src_path), read_lines(ref_path)
        if len(src) != len(ref):
            raise DataError(f"{src_path} has {len(src)} lines but {ref_path} has {len(ref)}; they must be line-aligned")
        if not src:
            raise DataError(f"{src_path} is empty")
        texts = {ecfg.name or src_path.name.split(".")[0]: (src, ref)}
        gold = {name: None for name in texts}
    else:
        splits = [ecfg.split] if ecfg.split else list(loaded.cfg.data.test_splits)
        datasets = {split: load_split(loaded.cfg, split) for split in splits}
        texts = {split: raw_texts(ds) for split, ds in datasets.items()}
        gold = {split: gold_of(ds) for split, ds in datasets.items()}
    source = "the corpus"
    if ecfg.align_file is not None:
        if len(texts) != 1:
            raise ConfigError("align_file=... scores one evaluation: give split=... (or src_file/ref_file) too")
        name, (src, _) = next(iter(texts.items()))
        gold = {name: read_gold_alignments(Path(ecfg.align_file), len(src))}
        source = ecfg.align_file
    model = ecfg.checkpoint.value
    if ecfg.ensemble:  # eval/<split>[-<search>]-ensemble<N>[-<checkpoint>] in the first run's folder
        model = f"ensemble{len(loaded.members)}" + ("" if model == "best" else f"-{model}")
    return evaluate_run(run_dir, loaded, texts, ecfg.search, ecfg.eval, gold, source, model)


def run_translate(cfg: TranslateConfig, stream_in, stream_out) -> int:
    """Translate ``stream_in`` line by line to ``stream_out``, in chunks so output starts early.
    With ``alignments`` each line is the translation, a tab and its word alignment (Pharaoh i-j);
    with ``search.nbest`` K > 1 each input line gives K lines ``<line number>\t<score>\t<translation>``."""
    search, run_dir = cfg.search, Path(cfg.run_dir)
    check_search_config(search)
    set_cpu_threads(cfg.num_threads, "num_threads")
    if cfg.alignments and search.nbest > 1:
        raise ConfigError("alignments=true prints one translation per line; drop search.nbest (or alignments)")
    loaded = load_models(run_dir, cfg.checkpoint.value, list(cfg.ensemble), cfg.device, cfg.kernels)
    if cfg.alignments and loaded.members:
        raise ConfigError("alignments=true needs one attention model; an ensemble has none of its own: drop ensemble")
    if cfg.alignments and loaded.model.decoder.attention.query_free:
        raise ConfigError(f"alignments=true needs an attention model; {run_dir} is {loaded.description}")
    chunk: list[str] = []
    count = 0
    line_no = 0
    chunk_size = max(search.batch_size * 8, 64)
    for raw in stream_in.buffer if hasattr(stream_in, "buffer") else stream_in:
        line_no += 1
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"standard input line {line_no}: not valid UTF-8; convert the input to UTF-8") from None
        if line_no == 1 and raw.startswith("\ufeff"):
            raw = raw[1:]  # a UTF-8 byte-order mark is not part of the text
        chunk.append(raw.rstrip("\r\n"))
        if len(chunk) >= chunk_size:
            count += _flush(loaded, chunk, search, stream_out, cfg.alignments, count)
            chunk = []
    if chunk:
        count += _flush(loaded, chunk, search, stream_out, cfg.alignments, count)
    return count


def _flush(loaded: LoadedModel, lines: list[str], search: SearchConfig, stream_out, alignments: bool,
           before: int) -> int:
    """Translate and write ``lines`` (which follow ``before`` lines already written)."""
    if search.nbest > 1:
        decoded = decode_lines(loaded, lines, search)
        for n, alternatives in enumerate(decoded.nbest or [], start=before + 1):
            # an empty input line has no hypotheses: one empty translation keeps every line numbered
            for text, score in alternatives or [("", 0.0)]:
                stream_out.write(f"{n}\t{score:.4f}\t{text}\n")
    elif not alignments:
        for hyp in translate_lines(loaded, lines, search):
            stream_out.write(hyp + "\n")
    else:
        decoded = decode_lines(loaded, lines, search)
        links = [""] * len(lines)
        for i, found in zip(decoded.todo, hypothesis_alignments(loaded, decoded, max(1, search.batch_size))):
            links[i] = format_links(found)
        for hyp, link in zip(decoded.texts, links):
            stream_out.write(f"{hyp}\t{link}\n")
    stream_out.flush()
    return len(lines)
