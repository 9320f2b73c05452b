"""The benchmark plan: set up, prepare, measure the machine, train interleaved, decode, summarise.

A toolkit that fails a step is reported in one line (with its log) and left out of the later
steps; the others go on, and the report marks what is missing.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from peerbench.corpus import desegment, prepare_corpus
from peerbench.joey import Joey
from peerbench.onmt import OpenNMT
from peerbench.ours import Ours
from peerbench.procs import BenchError, steady_window
from peerbench.records import DecodeRecord, Settings, TrainRecord
from peerbench.roofline import roofline
from peerbench.toolkit import CorpusFiles, DecodeSpec, Toolkit, TrainSpec, Workspace


def say(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def build_toolkits(settings: Settings, work: Workspace) -> list[Toolkit]:
    known: dict[str, Toolkit] = {
        "ours": Ours(work, settings.data_root, settings.ours_overrides),
        "joey": Joey(work),
        "onmt": OpenNMT(work),
    }
    return [known[name] for name in settings.toolkits]


def setup_toolkits(toolkits: list[Toolkit], work: Workspace, errors: list[str]) -> list[Toolkit]:
    ready = []
    for tk in toolkits:
        log = work.logs / f"setup-{tk.name}.log"
        say(f"setting up {tk.label} (reused when already installed; log: {log})")
        try:
            tk.setup(log)
            ready.append(tk)
        except BenchError as err:
            errors.append(f"{tk.name}: setup failed: {err}")
            print(f"error: {tk.name}: setup failed: {err}", flush=True)
    return ready


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _remove_checkpoints(run_dir: Path) -> None:
    """Earlier repeats' weights are not decoded; keep their logs and configs, drop their weights."""
    for path in run_dir.rglob("*"):
        if path.suffix in (".pt", ".ckpt") and (path.is_file() or path.is_symlink()):
            path.unlink()


def train_one(tk: Toolkit, settings: Settings, work: Workspace, corpus: CorpusFiles, attention: str,
              repeat: int) -> tuple[TrainRecord, Path | None]:
    run_dir = work.runs / f"{tk.name}-{attention}-r{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = work.logs / f"train-{tk.name}-{attention}-r{repeat}.log"
    record = TrainRecord(toolkit=tk.name, attention=attention, repeat=repeat, log=str(log))
    spec = TrainSpec(attention=attention, steps=settings.steps, threads=settings.threads, seed=settings.seed,
                     batching=settings.batching, batch_sentences=settings.batch_sentences,
                     max_tokens=settings.max_tokens, corpus=corpus, run_dir=run_dir, log=log)
    try:
        outcome = tk.train(spec)
        window = steady_window(outcome.points, settings.warmup_steps)
    except BenchError as err:
        record.error = str(err)
        print(f"error: {tk.name}: train {attention} repeat {repeat}: {err}", flush=True)
        return record, None
    first = [p for p in outcome.points if p.step == 1]
    record.tokens_per_s = window.tokens_per_s
    record.window = asdict(window)
    record.params = outcome.params
    record.peak_rss_mb = outcome.proc.peak_rss_mb
    record.wall_s = outcome.proc.wall_s
    record.first_update_s = first[0].time - outcome.proc.started if first else None
    record.info = outcome.info
    return record, outcome.model


def train_all(toolkits: list[Toolkit], settings: Settings, work: Workspace, corpus: CorpusFiles
              ) -> tuple[list[TrainRecord], dict[tuple[str, str], Path]]:
    """Every (repeat, attention, toolkit) in that nesting, so the toolkits' repeats interleave."""
    records, models = [], {}
    total = settings.repeats * len(settings.attentions) * len(toolkits)
    done = 0
    for repeat in range(1, settings.repeats + 1):
        for attention in settings.attentions:
            for tk in toolkits:
                done += 1
                say(f"train {done}/{total}: {tk.label}, {attention}, repeat {repeat}")
                record, model = train_one(tk, settings, work, corpus, attention, repeat)
                records.append(record)
                if record.error is None:
                    say(f"  {record.tokens_per_s:,.0f} target tok/s (updates {record.window['first_step'] + 1}-"
                        f"{record.window['last_step']}), {record.params or 0:,} parameters, peak RSS "
                        f"{record.peak_rss_mb:,.0f} MB, {record.wall_s:.0f} s in all")
                    if repeat == settings.repeats:
                        models[(tk.name, attention)] = model
                    elif not settings.keep_checkpoints:
                        _remove_checkpoints(work.runs / f"{tk.name}-{attention}-r{repeat}")
    return records, models


def decode_one(tk: Toolkit, settings: Settings, work: Workspace, corpus: CorpusFiles, attention: str,
               beam: int, model: Path, refs: list[str], repeat: int = 1) -> DecodeRecord:
    from seq2seq.evaluation.metrics import corpus_score

    search = "greedy" if beam == 1 else f"beam{beam}"
    out = work.runs / "decode" / f"{tk.name}-{attention}-{search}.txt"
    log = work.logs / f"decode-{tk.name}-{attention}-{search}-r{repeat}.log"
    record = DecodeRecord(toolkit=tk.name, attention=attention, search=search, repeat=repeat, hyps=str(out),
                          log=str(log))
    out.unlink(missing_ok=True)
    spec = DecodeSpec(attention=attention, beam=beam, threads=settings.threads, corpus=corpus, model=model,
                      out=out, log=log)
    try:
        outcome = tk.decode(spec)
        lines = out.read_text(encoding="utf-8").splitlines()
        if len(lines) != len(refs):
            raise BenchError(f"{len(lines)} hypotheses for {len(refs)} test sentences; log: {log}")
    except (BenchError, OSError) as err:
        record.error = str(err)
        print(f"error: {tk.name}: decode {attention} {search}: {err}", flush=True)
        return record
    score = corpus_score(desegment(corpus.spm_model, lines), refs)
    record.sentences = len(lines)
    record.tokens = sum(len(line.split()) for line in lines)
    record.seconds = outcome.seconds
    record.sent_per_s = len(lines) / outcome.seconds
    record.tok_per_s = record.tokens / outcome.seconds
    record.bleu, record.chrf, record.bleu_signature = score.bleu, score.chrf, score.bleu_signature
    record.timing = outcome.timing
    record.wall_s = outcome.proc.wall_s
    record.peak_rss_mb = outcome.proc.peak_rss_mb
    return record


def decode_all(toolkits: list[Toolkit], settings: Settings, work: Workspace, corpus: CorpusFiles,
               models: dict[tuple[str, str], Path]) -> list[DecodeRecord]:
    """Every (attention, search, repeat, toolkit) in that nesting: a decode takes seconds, so one
    slow moment of the machine would decide a single measurement; interleaved repeats spread it
    over the toolkits and the median drops it."""
    refs = corpus.refs.read_text(encoding="utf-8").splitlines()
    records = []
    for attention in settings.attentions:
        for beam in (1, settings.beam):
            search = "greedy" if beam == 1 else f"beam{beam}"
            for repeat in range(1, settings.decode_repeats + 1):
                for tk in toolkits:
                    model = models.get((tk.name, attention))
                    if model is None:
                        records.append(DecodeRecord(tk.name, attention, search, error="no trained model",
                                                    repeat=repeat))
                        continue
                    say(f"decode: {tk.label}, {attention}, {search}, repeat {repeat}")
                    record = decode_one(tk, settings, work, corpus, attention, beam, model, refs, repeat)
                    if record.error is None:
                        say(f"  {record.sent_per_s:,.1f} sent/s, {record.tok_per_s:,.0f} tok/s, "
                            f"BLEU {record.bleu:.2f}")
                    records.append(record)
    return records


def median_tokens_per_s(records: list[TrainRecord], toolkit: str, attention: str) -> float | None:
    rates = [r.tokens_per_s for r in records if r.toolkit == toolkit and r.attention == attention
             and r.error is None and r.tokens_per_s is not None]
    return statistics.median(rates) if rates else None


def ours_roofline(records: list[TrainRecord], settings: Settings, corpus: CorpusFiles, matmul: dict | None
                  ) -> dict[str, dict]:
    out = {}
    for attention in settings.attentions:
        rate = median_tokens_per_s(records, "ours", attention)
        last = [r for r in records if r.toolkit == "ours" and r.attention == attention and r.error is None]
        if rate is None or not last:
            continue
        info = last[-1].info
        out[attention] = roofline(info["model"], info["src_vocab_size"], info["tgt_vocab_size"],
                                  corpus.stats["train"], rate, info["precision"],
                                  matmul["matmul"] if matmul else [])
    return out


def run_benchmark(settings: Settings, argv: list[str]) -> dict:
    """Run the whole plan; returns the results (everything the report shows, and more)."""
    work = Workspace(settings.work)
    errors: list[str] = []
    started = datetime.now()
    load_start = os.getloadavg()
    toolkits = build_toolkits(settings, work)
    for tk in toolkits:
        if isinstance(tk, Ours):
            tk.check_config(settings.attentions, steps=settings.steps, threads=settings.threads, seed=settings.seed,
                            batching=settings.batching, batch_sentences=settings.batch_sentences,
                            max_tokens=settings.max_tokens)
    say(f"preparing the corpus with our pipeline into {work.corpus}")
    corpus = prepare_corpus(work, settings.data_root, settings.ours_overrides, settings.limit)
    toolkits = setup_toolkits(toolkits, work, errors)
    versions = {tk.name: tk.versions() for tk in toolkits}
    matmul = None
    ours = next((tk for tk in toolkits if isinstance(tk, Ours)), None)
    if ours is not None:
        say(f"measuring dense matmul GFLOP/s ({settings.threads} threads)")
        try:
            matmul = ours.matmul(settings.threads, work.runs / "matmul.json", work.logs / "matmul.log")
        except BenchError as err:
            errors.append(f"matmul: {err}")
            print(f"error: matmul: {err}", flush=True)
    train_records, models = train_all(toolkits, settings, work, corpus)
    decode_records = decode_all(toolkits, settings, work, corpus, models) if settings.decode else []
    errors += [f"{r.toolkit}: train {r.attention} repeat {r.repeat}: {r.error}" for r in train_records if r.error]
    errors += [f"{r.toolkit}: decode {r.attention} {r.search} repeat {r.repeat}: {r.error}" for r in decode_records
               if r.error and r.error != "no trained model"]
    return {
        "schema_version": 1,
        "date": started.strftime("%Y-%m-%d"),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "command": argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
        | {"warmup_steps": settings.warmup_steps},
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": settings.threads,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "toolkits": [{"name": tk.name, "label": tk.label} for tk in build_toolkits(settings, work)],
        "failed_setup": [name for name in settings.toolkits if name not in {tk.name for tk in toolkits}],
        "versions": versions,
        "data": corpus.stats,
        "train": [asdict(r) for r in train_records],
        "decode": [asdict(r) for r in decode_records],
        "matmul": matmul,
        "roofline": ours_roofline(train_records, settings, corpus, matmul),
        "errors": errors,
        "elapsed_s": time.time() - started.timestamp(),
    }
