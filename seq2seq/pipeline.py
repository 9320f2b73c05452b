"""Wires the pieces for the commands: train, evaluate, translate. No Hydra here (see ``cli.py``)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from seq2seq.config import EvaluateConfig, TrainConfig
from seq2seq.corpus import check_languages, load_corpus, read_lines
from seq2seq.errors import DataError, RunDirError
from seq2seq.evaluation import eval_dir_name, evaluate, find_checkpoint, load_model, translate_lines
from seq2seq.prepare import prepare_data
from seq2seq.report import EvalReport, format_summary
from seq2seq.tracking import Tracker
from seq2seq.trainer import Trainer, check_trainer_config

log = logging.getLogger(__name__)


def check_writable(run_dir: Path) -> None:
    """Fail before any training if the run directory cannot take files."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise RunDirError(f"run directory {run_dir} is not writable ({err.strerror}); "
                          "choose another with hydra.run.dir=... or free the disk") from None


def run_training(cfg: TrainConfig, run_dir: Path) -> list[EvalReport]:
    """Train (or resume) in ``run_dir``, then evaluate the best checkpoint on the test splits."""
    check_writable(run_dir)
    check_trainer_config(cfg)
    check_languages(cfg.data)
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.trainer.resume is None and last.exists():
        raise RunDirError(f"{run_dir} already holds a training run; resume it with trainer.resume={run_dir} "
                          "or start a new run directory")
    data = prepare_data(cfg.data, cfg.tokenizer)
    trainer = Trainer(cfg, data, run_dir)
    if cfg.trainer.resume is not None:
        if not last.exists():
            raise RunDirError(f"cannot resume: {last} does not exist")
        trainer.restore(last)
        if trainer._done():
            log.warning("run %s already finished at step %d (epoch %d); raise trainer.max_steps or "
                        "trainer.max_epochs to train further", run_dir, trainer.progress.step, trainer.progress.epoch)
            return []
    trainer.fit()
    if not cfg.trainer.evaluate_at_end:
        return []
    return evaluate_run(run_dir, cfg, splits=data.test_splits, raw=data.splits)


def evaluate_run(run_dir: Path, cfg: TrainConfig, splits: list[str], raw=None, which: str = "best",
                 search=None, eval_cfg=None) -> list[EvalReport]:
    loaded = load_model(find_checkpoint(run_dir, which), cfg.trainer.device)
    search = search or cfg.search
    eval_cfg = eval_cfg or cfg.eval
    tracker = Tracker(run_dir)
    reports = []
    try:
        for i, split in enumerate(splits):
            ds = raw[split] if raw is not None and split in raw else load_split(cfg, split)
            tag = "test" if i == 0 else f"test_{split}"
            report, out_dir = evaluate(loaded, list(ds["raw_src"] if "raw_src" in ds.column_names else ds["src"]),
                                       list(ds["ref"] if "ref" in ds.column_names else ds["tgt"]),
                                       cfg.data.corpus, split, search, eval_cfg,
                                       run_dir / "eval" / eval_dir_name(split, search), tracker, tag,
                                       0)
            print(format_summary(report), file=sys.stdout, flush=True)
            print(f"report: {out_dir}", file=sys.stdout, flush=True)
            reports.append(report)
    finally:
        tracker.close()
    return reports


def load_split(cfg: TrainConfig, split: str):
    """One raw split of the run's corpus (nothing dropped)."""
    data = dataclasses.replace(cfg.data, train_split=split, valid_split=split, test_splits=[split])
    return load_corpus(data)[split]


def run_evaluate(ecfg: EvaluateConfig) -> list[EvalReport]:
    run_dir = Path(ecfg.run_dir)
    loaded_cfg = load_model(find_checkpoint(run_dir, ecfg.checkpoint.value), ecfg.device).cfg
    if ecfg.data_root is not None:
        loaded_cfg.data.root = ecfg.data_root
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
        name = ecfg.name or src_path.name.split(".")[0]
        raw = {name: _as_dataset(src, ref)}
        splits = [name]
    else:
        splits = [ecfg.split] if ecfg.split else list(loaded_cfg.data.test_splits)
        raw = None
    return evaluate_run(run_dir, loaded_cfg, splits, raw=raw, which=ecfg.checkpoint.value,
                        search=ecfg.search, eval_cfg=ecfg.eval)


def _as_dataset(src: list[str], ref: list[str]):
    from datasets import Dataset

    return Dataset.from_dict({"raw_src": src, "ref": ref})


def run_translate(run_dir: Path, which: str, search, device, stream_in, stream_out) -> int:
    """Translate ``stream_in`` line by line to ``stream_out``, in chunks so output starts early."""
    loaded = load_model(find_checkpoint(run_dir, which), device)
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
            count += _flush(loaded, chunk, search, stream_out)
            chunk = []
    if chunk:
        count += _flush(loaded, chunk, search, stream_out)
    return count


def _flush(loaded, lines: list[str], search, stream_out) -> int:
    for hyp in translate_lines(loaded, lines, search):
        stream_out.write(hyp + "\n")
    stream_out.flush()
    return len(lines)
