"""One-shot check of the package on a CUDA machine: parity, training, timing.

    python scripts/gpu_check.py [--device cuda|cpu] [--data ../shared/data] [--out outputs/gpu_check]
                                [--steps 300] [--jobs N] [--only parity,training,timing] [--dry-run]

Three sections, each printed as it goes and written to ``<out>/gpu_check.json`` and
``<out>/gpu_check.md`` (rewritten after every section, so a run killed half-way still leaves the
finished sections behind):

(a) parity: tiny models of five attention families (none, bahdanau, luong-general-feed,
    luong-dot, luong-concat), each with the reference engine on the CPU (float32) as the
    baseline, compared against a deep copy on ``--device`` (reference engine) and against the
    fast engine on the CPU: teacher-forced logits (atol 1e-4), every parameter's gradient of a
    random linear function of the logits (relative error < 1e-3), and greedy and beam-5 outputs
    of ``translate_ids`` on 20 random sentences (reported; fails below 90% identical, since float
    rounding may break near-ties either way). TF32 is switched off for this section only.
(b) training: none, bahdanau and luong-general-feed, each in bf16 and fp32, trained for
    ``--steps`` updates on Multi30k through the real CLI (``seq2seq.cli:train``, the
    ``seq2seq-train`` entry point, in a subprocess; ``--jobs`` at a time) with
    ``trainer.kernels=reference``; the first and last logged training loss are read from the run's
    ``train.log`` (TensorBoard's ``train/loss`` as a fallback) and the loss must fall.
(c) timing: one Multi30k epoch per family, trained in this process (``pipeline.run_training``,
    which builds the ``Trainer``): wall time, the ``train_seconds`` and ``train_tokens_per_s``
    of its ``summary.json``, and peak GPU memory (``torch.cuda.max_memory_allocated``); then
    greedy and beam-5 decoding of the test split from the saved checkpoint, with sentences/s and
    peak GPU memory.

Exits 1 when any check failed, after one ``FAIL ...`` line per failure; 0 otherwise.

``--dry-run`` is what CI runs (tests/test_gpu_check.py): the CPU unless ``--device cuda`` is
given, ``experiment=smoke`` sizes on ``data=synthetic`` (no files needed), 6 updates per
training run, the smoke run as the "epoch"; about a minute on 2 cores.

Running it on the lent H200 (the device tool; see /work/.library/device/README.md)
-----------------------------------------------------------------------------------
The device machine has torch, sentencepiece, sacrebleu, tensorboard, matplotlib, tqdm, pandas,
pyarrow, xxhash, fsspec and huggingface-hub, but not hydra-core, omegaconf, antlr4 (their
parser runtime), datasets, dill or multiprocess; they travel as wheels. ``../shared`` does not
travel either, so Multi30k is copied into an ignored folder of the checkout. Once, here, in the
repository root, with this project's venv active (the versions are the venv's own)::

    echo /.gpu_data/ >> .git/info/exclude          # /.whl/ is already in .gitignore
    mkdir -p .gpu_data && cp -r ../shared/data/multi30k .gpu_data/
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl \\
        $(python -m pip freeze | grep -iE '^(hydra-core|omegaconf|datasets|dill|multiprocess)==')
    # antlr4-python3-runtime 4.9.x is a source distribution only on PyPI: build its (pure
    # Python) wheel here instead
    python -m pip wheel --no-deps -w .whl $(python -m pip freeze | grep -i '^antlr4-python3-runtime==')

Then one device call (``run``) with ``carry: [".whl", ".gpu_data"]`` (add ``"data/cache"``
to reuse this machine's SentencePiece and tokenized caches: it saves about a minute when they
hold Multi30k) and ``timeout_s: 540``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    export PYTHONUNBUFFERED=1; python3 scripts/gpu_check.py --data .gpu_data --out /tmp/gc \\
        2>&1 | tee $OUT/gpu_check.log; rc=${PIPESTATUS[0]};
    cp /tmp/gc/gpu_check.json /tmp/gc/gpu_check.md $OUT/ 2>/dev/null; exit $rc

Keep ``--out`` outside ``$OUT``: the runs' checkpoints are too large and too many to come back.
The three sections take about 4-6 minutes on an H200 with the default ``--steps 300`` (the
Multi30k tokenizer is trained once first, unless ``data/cache`` was carried). If time is short,
rerun a section alone with ``--only training`` (or ``parity``, ``timing``).

The script puts the repository root on ``sys.path`` (and on the children's ``PYTHONPATH``), so
the package needs no ``pip install -e .`` there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import gc
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")

SECTIONS = ("parity", "training", "timing")

# Parity: tiny sizes as in tests/helpers_model.py (decoder 2 x encoder, so that `dot` composes).
SRC_VOCAB, TGT_VOCAB, FIRST_WORD = 41, 37, 4  # ids below FIRST_WORD: PAD, UNK, BOS, EOS
LOGITS_ATOL = 1e-4
GRAD_RTOL = 1e-3
OUTPUTS_MIN_AGREE = 0.9
PARITY_SENTENCES = 20

# Training and timing: config overrides per family (names as the model describes itself).
TRAIN_FAMILIES: dict[str, list[str]] = {
    "none": ["model/attention=none"],
    "bahdanau": ["model/attention=bahdanau"],
    "luong-general-feed": ["model/attention=luong", "model.attention.score=general",
                           "model.attention.input_feeding=true"],
}
PRECISIONS = ("bf16", "fp32")
DRY_RUN_STEPS = 6
DRY_RUN_DECODE = 40  # test sentences decoded by the dry run's timing section
TRAIN_LOSS_RE = re.compile(r"step (\d+): train loss (\S+),")


# ----------------------------------------------------------------------------- helpers


def _say(line: str) -> None:
    """A user-facing progress line (stdout, flushed: the device tool returns stdout)."""
    print(line, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _setup_paths() -> None:
    """Make ``seq2seq`` importable from a bare checkout (no ``pip install -e .``)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _clear_run_dir(path: Path) -> None:
    """Remove a run directory an earlier gpu_check left (the CLI refuses to reuse one)."""
    if path.is_dir() and ((path / ".hydra").is_dir() or (path / "checkpoints").is_dir()
                          or (path / "summary.json").is_file()):
        shutil.rmtree(path)


def _peak_gpu_mb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- (a) parity


def _parity_families():
    from seq2seq.core.config import AttentionConfig, AttentionType, LuongScore

    return {
        "none": AttentionConfig(type=AttentionType.none, hidden_size=16),
        "bahdanau": AttentionConfig(type=AttentionType.bahdanau, hidden_size=16),
        "luong-general-feed": AttentionConfig(type=AttentionType.luong, score=LuongScore.general,
                                              input_feeding=True, hidden_size=16),
        "luong-dot": AttentionConfig(type=AttentionType.luong, score=LuongScore.dot, input_feeding=False,
                                     hidden_size=16),
        "luong-concat": AttentionConfig(type=AttentionType.luong, score=LuongScore.concat,
                                        input_feeding=False, hidden_size=16),
    }


def _tiny_model(attention, seed: int):
    """A randomly initialised tiny model, every weight doubled so that outputs depend more on the
    source (as tests/helpers_model.py's ``scale``)."""
    import torch

    from seq2seq.core.config import ModelConfig
    from seq2seq.data.tokenizer import PAD_ID
    from seq2seq.model.network import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(embedding_size=16, encoder_hidden_size=12, decoder_hidden_size=24, dropout=0.0,
                      attention=attention)
    model = build_model(cfg, SRC_VOCAB, TGT_VOCAB, PAD_ID)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model.eval()


def _ended(outputs: list[list[int]], sentences: list[list[int]]) -> int:
    """Outputs that are not empty and ended with EOS before the length cap (ratio 2, offset 10)."""
    return sum(0 < len(out) < 2 * (len(src) + 1) + 10 - 1 for out, src in zip(outputs, sentences))


def _calibrate_eos(model, sentences: list[list[int]]) -> tuple[float, dict[int, list[list[int]]]]:
    """Shift the EOS bias of an untrained model so that greedy and beam outputs are a mix of
    sentences that end on their own and sentences that run to the cap (an untrained model
    otherwise tends to write nothing or never stop, which leaves search's finishing and refilling
    of rows untested). Picked on the CPU reference engine, the baseline, so it is the same on
    every machine. Returns the shift and the baseline outputs at it."""
    import torch

    from seq2seq.core.config import Kernels
    from seq2seq.data.tokenizer import EOS_ID
    from seq2seq.model.engine import build_engine

    cpu = torch.device("cpu")
    engine = build_engine(model, Kernels.reference, cpu)
    bias = model.output_layer.bias
    base = float(bias[EOS_ID].detach())
    best: tuple[tuple[int, int], float, dict[int, list[list[int]]]] | None = None
    for shift in (0.0, -0.25, 0.25, -0.5, 0.5, -0.75, 0.75, -1.0, 1.0, -1.5, 1.5):
        with torch.no_grad():
            bias[EOS_ID] = base + shift
        outs = {b: _outputs(engine, sentences, b, cpu) for b in (1, 5)}
        ended = (_ended(outs[1], sentences), _ended(outs[5], sentences))
        n = len(sentences)
        key = (min(min(e, n - e) for e in ended), sum(ended))  # both mixed, then most ended
        if best is None or key > best[0]:
            best = (key, shift, outs)
        if key[0] >= n // 4:
            break
    assert best is not None
    with torch.no_grad():
        bias[EOS_ID] = base + best[1]
    return best[1], best[2]


def _random_sentences(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(FIRST_WORD, vocab, (k,), generator=g).tolist() for k in lengths]


def _logits(engine, batch):
    out = engine.forward(batch)
    return out.logits if out.logits is not None else engine.model.project(out.hidden)


def _forward_and_grads(engine, batch, weights) -> tuple[Any, dict[str, Any]]:
    """Teacher-forced float32 logits (eval mode, no grad) and every parameter's gradient of
    sum(logits * weights) over the real target positions (train mode; dropout is 0)."""
    import torch

    model = engine.model
    model.eval()
    with torch.no_grad():
        logits = _logits(engine, batch).float()
    model.train()
    model.zero_grad(set_to_none=True)
    mask = batch.tgt_mask.unsqueeze(-1).to(weights.dtype)
    (_logits(engine, batch).float() * weights * mask).sum().backward()
    grads = {name: (p.grad.detach().float().cpu() if p.grad is not None else None)
             for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.eval()
    return logits.cpu(), grads


def _compare_grads(grads, base) -> tuple[float, str, list[str]]:
    """Worst relative error ||g - g_base|| / ||g_base|| over parameters, its name, and problems
    (a gradient present on one side only, or non-finite)."""
    import torch

    worst, worst_name, problems = 0.0, "", []
    for name, ref in base.items():
        got = grads.get(name)
        if ref is None and got is None:
            continue
        if ref is None or got is None:
            problems.append(f"{name}: gradient {'missing' if got is None else 'unexpected'}")
            continue
        if not bool(torch.isfinite(got).all()):
            problems.append(f"{name}: non-finite gradient")
            continue
        err = float((got - ref).norm()) / max(float(ref.norm()), 1e-6)
        if err > worst or not worst_name:
            worst, worst_name = err, name
    return worst, worst_name, problems


def _outputs(engine, src_ids, beam: int, device) -> list[list[int]]:
    from seq2seq.core.config import SearchConfig
    from seq2seq.search.translate import translate_ids

    return [list(h.tokens) for h in translate_ids(engine, src_ids, SearchConfig(beam_size=beam), device)]


def run_parity(device, seed: int = 0) -> dict:
    import torch

    from seq2seq.core.config import Kernels
    from seq2seq.data.batching import collate
    from seq2seq.model.engine import build_engine

    cpu = torch.device("cpu")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 products
    torch.backends.cudnn.allow_tf32 = False
    rows: list[dict] = []
    try:
        for k, (family, attention) in enumerate(_parity_families().items()):
            start = time.perf_counter()
            model = _tiny_model(attention, seed + k)
            src = _random_sentences(8, 2, 11, SRC_VOCAB, seed + 100 + k)
            tgt = _random_sentences(8, 1, 12, TGT_VOCAB, seed + 200 + k)
            batch = collate(src, tgt, range(len(src)))
            g = torch.Generator().manual_seed(seed + 300 + k)
            weights = torch.randn(*batch.tgt_out.shape, TGT_VOCAB, generator=g)
            sentences = _random_sentences(PARITY_SENTENCES, 1, 15, SRC_VOCAB, seed + 400 + k)

            eos_shift, base_out = _calibrate_eos(model, sentences)
            base_engine = build_engine(model, Kernels.reference, cpu)
            base_logits, base_grads = _forward_and_grads(base_engine, batch, weights)
            ended = {b: _ended(base_out[b], sentences) for b in (1, 5)}

            dev_model = copy.deepcopy(model).to(device)
            candidates = [
                (f"{device.type}-reference vs cpu-reference",
                 build_engine(dev_model, Kernels.reference, device), device),
                ("cpu-fast vs cpu-reference", build_engine(model, Kernels.fast, cpu), cpu),
            ]
            for comparison, engine, dev in candidates:
                logits, grads = _forward_and_grads(engine, batch.to(dev), weights.to(dev))
                mask = batch.tgt_mask
                logit_err = float((logits[mask] - base_logits[mask]).abs().max())
                grad_err, grad_name, grad_problems = _compare_grads(grads, base_grads)
                same = {b: sum(a == c for a, c in zip(_outputs(engine, sentences, b, dev), base_out[b]))
                        for b in (1, 5)}
                n = len(sentences)
                row = {
                    "family": family, "comparison": comparison, "engine": engine.name,
                    "logits_max_abs_diff": logit_err, "logits_ok": logit_err <= LOGITS_ATOL,
                    "grad_max_rel_err": grad_err, "grad_worst_param": grad_name,
                    "grad_problems": grad_problems,
                    "grads_ok": grad_err < GRAD_RTOL and not grad_problems,
                    "sentences": n, "greedy_same": same[1], "beam5_same": same[5],
                    "eos_bias_shift": eos_shift,
                    "baseline_greedy_ended": ended[1], "baseline_beam5_ended": ended[5],
                    "outputs_ok": min(same.values()) >= OUTPUTS_MIN_AGREE * n,
                }
                row["passed"] = row["logits_ok"] and row["grads_ok"] and row["outputs_ok"]
                rows.append(row)
                _say(f"[parity] {family:<19} {comparison:<34} logits {logit_err:.1e}  grads {grad_err:.1e} "
                     f"({grad_name})  greedy {same[1]}/{n}  beam5 {same[5]}/{n} "
                     f"(ended early {ended[1]}, {ended[5]})  "
                     f"{'ok' if row['passed'] else 'FAILED'}  ({time.perf_counter() - start:.1f} s)")
            del dev_model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"tolerances": {"logits_atol": LOGITS_ATOL, "grad_rtol": GRAD_RTOL,
                           "outputs_min_agree": OUTPUTS_MIN_AGREE},
            "checks": rows, "passed": bool(rows) and all(r["passed"] for r in rows)}


# ----------------------------------------------------------------------------- (b) training


def _data_overrides(args) -> list[str]:
    """What picks the corpus: the smoke preset on synthetic data, or Multi30k under --data."""
    if args.dry_run:
        base = ["experiment=smoke"]
    else:
        base = [f"data.root={args.data}", "data=multi30k"]
    if args.cache:
        base.append(f"data.cache_dir={args.cache}")
    return base


def _train_overrides(args, family: str, precision: str, run_dir: Path, threads: int) -> list[str]:
    steps = args.steps
    return [
        *_data_overrides(args), *TRAIN_FAMILIES[family],
        f"trainer.device={args.device}", "trainer.kernels=reference", f"trainer.precision={precision}",
        f"trainer.max_steps={steps}", "trainer.max_epochs=null", f"trainer.valid_every={steps}",
        f"trainer.log_every={max(1, steps // 10) if not args.dry_run else 2}",
        "trainer.evaluate_at_end=false", "trainer.progress=false",
        f"trainer.valid_max_sentences={20 if args.dry_run else 200}", f"trainer.num_threads={threads}",
        f"name=gpu_check-{family}-{precision}", f"hydra.run.dir={run_dir}",
    ]


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, mean training loss) as the trainer logged them: train.log, else TensorBoard."""
    points: list[tuple[int, float]] = []
    log_file = run_dir / "train.log"
    if log_file.is_file():
        for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
            m = TRAIN_LOSS_RE.search(line)
            if m:
                points.append((int(m.group(1)), float(m.group(2))))
    if len(points) >= 2:
        return points
    tb = run_dir / "tensorboard"
    if tb.is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            by_step = {e.step: e.value for e in acc.Scalars("train/loss")}
            points = sorted(by_step.items())
    return points


def _train_one(args, family: str, precision: str, threads: int) -> dict:
    name = f"{family}-{precision}"
    run_dir = args.out / "runs" / name
    _clear_run_dir(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = _train_overrides(args, family, precision, run_dir, threads)
    # seq2seq-train is the console script of seq2seq.cli:train; calling that function from this
    # interpreter runs the same code without needing the package installed.
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'seq2seq-train'; "
           "from seq2seq.cli import train; train()", *overrides]
    console = args.out / "runs" / f"{name}.console.txt"
    start = time.perf_counter()
    try:
        with console.open("w", encoding="utf-8") as sink:
            rc = subprocess.run(cmd, cwd=REPO, env=_child_env(threads), stdout=sink, stderr=subprocess.STDOUT,
                                timeout=args.run_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = None
    seconds = time.perf_counter() - start
    losses = read_losses(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    first = losses[0][1] if losses else None
    last = losses[-1][1] if losses else None
    finite = bool(losses) and all(math.isfinite(v) for _, v in losses)
    fell = finite and len(losses) >= 2 and last < first
    error = None
    if rc != 0:
        text = console.read_text(encoding="utf-8", errors="replace") if console.is_file() else ""
        tail = text.strip().splitlines()[-1:]
        error = f"exit {rc if rc is not None else 'timeout'}" + (f": {tail[0][:200]}" if tail else "")
    elif len(losses) < 2:
        error = f"only {len(losses)} logged loss value(s) in {run_dir / 'train.log'}"
    elif not fell:
        error = f"loss did not fall: {first:.4f} -> {last:.4f}"
    return {"family": family, "precision": precision, "steps": args.steps, "returncode": rc,
            "seconds": seconds, "losses": [[s, v] for s, v in losses], "first_loss": first, "last_loss": last,
            "loss_fell": fell, "skipped_steps": summary.get("skipped_steps"),
            "tokens_per_s": summary.get("train_tokens_per_s"), "run_dir": str(run_dir),
            "console": str(console), "error": error, "passed": rc == 0 and fell}


def _warm_data_cache(args) -> None:
    """Prepare the corpus once in this process (tokenizer trained and cached) so the parallel
    training runs only read the cache instead of racing to build it."""
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.data.prepare import prepare_data

    cfg = OmegaConf.to_object(compose_checked("train", _data_overrides(args)))
    start = time.perf_counter()
    prepare_data(cfg.data, cfg.tokenizer)
    _say(f"[training] corpus {cfg.data.corpus} prepared ({time.perf_counter() - start:.1f} s)")


def _precisions(device: str) -> tuple[str, ...]:
    """The precisions to train in: both, but fp32 alone on a CPU whose oneDNN has no bf16 LSTM
    (where the trainer refuses precision=bf16), said once."""
    from seq2seq.kernels.compat import cpu_runs_bf16_lstm

    if device == "cpu" and not cpu_runs_bf16_lstm():
        _say("[training] this CPU has no bf16 LSTM in oneDNN (no AVX512): fp32 runs only")
        return tuple(p for p in PRECISIONS if p != "bf16")
    return PRECISIONS


def run_training(args) -> dict:
    _warm_data_cache(args)
    precisions = _precisions(args.device)
    jobs = [(f, p) for f in TRAIN_FAMILIES for p in precisions]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.threads is None else args.threads
    rows: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_train_one, args, f, p, threads): (f, p) for f, p in jobs}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows.append(row)
            _say(f"[training] {row['family']:<19} {row['precision']:<5} "
                 f"loss {_fmt(row['first_loss'], '.4f')} -> {_fmt(row['last_loss'], '.4f')}  "
                 f"{row['seconds']:.1f} s  "
                 f"{'ok' if row['passed'] else 'FAILED: ' + str(row['error'])}")
    order = {job: i for i, job in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["family"], r["precision"])])
    return {"steps": args.steps, "jobs": args.jobs, "threads_per_run": threads, "runs": rows,
            "passed": bool(rows) and all(r["passed"] for r in rows)}


# ----------------------------------------------------------------------------- (c) timing


def _timing_overrides(args, family: str, threads: int) -> list[str]:
    if args.dry_run:
        budget = [f"trainer.max_steps={DRY_RUN_STEPS}", "trainer.max_epochs=null",
                  f"trainer.valid_every={DRY_RUN_STEPS}", "trainer.log_every=2",
                  "trainer.valid_max_sentences=20"]
    else:
        budget = ["trainer.max_epochs=1", "trainer.max_steps=null", "trainer.valid_max_sentences=200"]
    return [*_data_overrides(args), *TRAIN_FAMILIES[family], *budget, f"trainer.device={args.device}",
            "trainer.kernels=auto", "trainer.precision=auto", "trainer.evaluate_at_end=false",
            "trainer.progress=false", f"trainer.num_threads={threads}", f"name=gpu_check-timing-{family}"]


def _time_decode(loaded, src_ids, beam: int) -> dict:
    import torch

    from seq2seq.core.config import SearchConfig
    from seq2seq.search.translate import translate_ids

    search = SearchConfig(beam_size=beam)
    translate_ids(loaded.engine, src_ids[:16], search, loaded.device, loaded.amp_dtype)  # warm-up
    _reset_peak(loaded.device)
    start = time.perf_counter()
    hyps = translate_ids(loaded.engine, src_ids, search, loaded.device, loaded.amp_dtype)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(h.tokens) + 1 for h in hyps)
    return {"sentences": len(src_ids), "seconds": seconds, "sentences_per_s": len(src_ids) / seconds,
            "generated_tokens_per_s": tokens / seconds, "peak_gpu_mb": _peak_gpu_mb(loaded.device)}


def _time_one(args, family: str, threads: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import Device, Kernels
    from seq2seq.data.prepare import prepare_data
    from seq2seq.evaluation.evaluate import find_checkpoint, load_model
    from seq2seq.pipeline import run_training as pipeline_run_training

    run_dir = args.out / "timing" / family
    _clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.to_object(compose_checked("train", _timing_overrides(args, family, threads)))
    device = torch.device(args.device)
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    package_log = logging.getLogger("seq2seq")
    package_log.addHandler(handler)
    row: dict[str, Any] = {"family": family, "run_dir": str(run_dir)}
    try:
        gc.collect()
        _reset_peak(device)
        start = time.perf_counter()
        pipeline_run_training(cfg, run_dir)
        row["wall_s"] = time.perf_counter() - start
        row["train_peak_gpu_mb"] = _peak_gpu_mb(device)
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update({k: summary.get(k) for k in ("steps", "epochs", "train_seconds", "train_tokens_per_s",
                                                "num_parameters", "skipped_steps")})
        row["engine"] = summary.get("engine", {}).get("name")
        gc.collect()
        loaded = load_model(find_checkpoint(run_dir, "last"), Device(args.device), Kernels.auto)
        row["precision"] = "bf16" if loaded.amp_dtype == torch.bfloat16 else "fp32"
        data = prepare_data(cfg.data, cfg.tokenizer)  # cached: the same tokenizer the run used
        split = cfg.data.test_splits[0]
        src_ids = list(data.splits[split]["src_ids"])
        if args.dry_run:
            src_ids = src_ids[:DRY_RUN_DECODE]
        row["test_split"] = split
        row["decode"] = {name: _time_decode(loaded, src_ids, beam)
                         for name, beam in (("greedy", 1), ("beam5", 5))}
        del loaded
        row["error"] = None
    except Exception as err:  # noqa: BLE001 - a crash is this check's failure, reported with the rest
        log.exception("timing run %s failed", family)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        package_log.removeHandler(handler)
        handler.close()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["passed"] = row["error"] is None
    return row


def run_timing(args) -> dict:
    import torch

    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    rows = []
    for family in TRAIN_FAMILIES:
        row = _time_one(args, family, threads)
        rows.append(row)
        if row["passed"]:
            d = row["decode"]
            _say(f"[timing] {family:<19} {row['steps']} steps in {row['wall_s']:.1f} s wall "
                 f"({row['train_seconds']:.1f} s updates, {row['train_tokens_per_s']:,.0f} tok/s, "
                 f"peak {_fmt(row['train_peak_gpu_mb'], '.0f')} MB); "
                 f"greedy {d['greedy']['sentences_per_s']:.1f} sent/s, "
                 f"beam5 {d['beam5']['sentences_per_s']:.1f} sent/s")
        else:
            _say(f"[timing] {family:<19} FAILED: {row['error']}")
    return {"threads": threads if args.device == "cpu" else None, "runs": rows,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "peak_rss_mb": _peak_rss_mb(), "passed": bool(rows) and all(r["passed"] for r in rows)}


# ----------------------------------------------------------------------------- report


def failures(report: dict) -> list[str]:
    lines = []
    for row in report.get("parity", {}).get("checks", []):
        if not row["logits_ok"]:
            lines.append(f"parity {row['family']} {row['comparison']}: logits max abs diff "
                         f"{row['logits_max_abs_diff']:.2e} > {LOGITS_ATOL:g}")
        if not row["grads_ok"]:
            why = "; ".join(row["grad_problems"]) or (
                f"relative error {row['grad_max_rel_err']:.2e} >= {GRAD_RTOL:g} ({row['grad_worst_param']})")
            lines.append(f"parity {row['family']} {row['comparison']}: gradients: {why}")
        if not row["outputs_ok"]:
            lines.append(f"parity {row['family']} {row['comparison']}: outputs agree "
                         f"greedy {row['greedy_same']}/{row['sentences']}, "
                         f"beam5 {row['beam5_same']}/{row['sentences']} "
                         f"(< {OUTPUTS_MIN_AGREE:.0%})")
    for row in report.get("training", {}).get("runs", []):
        if not row["passed"]:
            lines.append(f"training {row['family']} {row['precision']}: {row['error']} "
                         f"(see {row['console']})")
    for row in report.get("timing", {}).get("runs", []):
        if not row["passed"]:
            lines.append(f"timing {row['family']}: {row['error']}")
    for section, error in report.get("errors", {}).items():
        lines.append(f"{section}: crashed: {error}")
    return lines


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def markdown(report: dict) -> str:
    meta = report["meta"]
    parts = [f"# gpu_check: {'passed' if report['passed'] else 'FAILED'}", "",
             f"{meta['created']}; device {meta['device']} ({meta['device_name']}); torch {meta['torch']}; "
             f"{'dry run; ' if meta['dry_run'] else ''}{meta['seconds']:.0f} s", ""]
    if "parity" in report and not report["parity"].get("crashed"):
        p = report["parity"]
        tol = p["tolerances"]
        parts += ["## Parity (float32, tiny models)", "",
                  f"Baseline: the reference engine on the CPU. Logits atol {tol['logits_atol']:g}; "
                  f"gradient relative error < {tol['grad_rtol']:g}; outputs fail below "
                  f"{tol['outputs_min_agree']:.0%} identical.", "",
                  "Outputs: an untrained model's EOS bias is shifted so that some outputs end on their own; "
                  "'ended' counts the baseline's outputs that did (greedy / beam5).", "",
                  _table(["family", "comparison", "logits max abs diff", "grad max rel err", "worst param",
                          "greedy same", "beam5 same", "ended", "result"],
                         [[r["family"], r["comparison"], f"{r['logits_max_abs_diff']:.2e}",
                           f"{r['grad_max_rel_err']:.2e}", r["grad_worst_param"],
                           f"{r['greedy_same']}/{r['sentences']}", f"{r['beam5_same']}/{r['sentences']}",
                           f"{r['baseline_greedy_ended']} / {r['baseline_beam5_ended']}",
                           "ok" if r["passed"] else "**FAIL**"] for r in p["checks"]]), ""]
    if "training" in report and not report["training"].get("crashed"):
        t = report["training"]
        parts += [f"## Training ({t['steps']} updates, reference kernels, {t['jobs']} at a time)", "",
                  _table(["family", "precision", "first loss", "last loss", "logged points", "skipped steps",
                          "tokens/s", "seconds", "result"],
                         [[r["family"], r["precision"], _fmt(r["first_loss"], ".4f"),
                           _fmt(r["last_loss"], ".4f"),
                           len(r["losses"]), _fmt(r["skipped_steps"]), _fmt(r["tokens_per_s"], ",.0f"),
                           f"{r['seconds']:.1f}", "ok" if r["passed"] else f"**FAIL**: {r['error']}"]
                          for r in t["runs"]]), ""]
    if "timing" in report and not report["timing"].get("crashed"):
        t = report["timing"]
        rows = []
        for r in t["runs"]:
            if not r["passed"]:
                rows.append([r["family"], *["-"] * 10, f"**FAIL**: {r['error']}"])
                continue
            g, b = r["decode"]["greedy"], r["decode"]["beam5"]
            rows.append([r["family"], r["engine"], r["precision"], r["steps"], f"{r['wall_s']:.1f}",
                         f"{r['train_seconds']:.1f}", f"{r['train_tokens_per_s']:,.0f}",
                         _fmt(r["train_peak_gpu_mb"], ",.0f"), f"{g['sentences_per_s']:.1f}",
                         f"{b['sentences_per_s']:.1f}",
                         f"{_fmt(g['peak_gpu_mb'], ',.0f')} / {_fmt(b['peak_gpu_mb'], ',.0f')}",
                         "ok"])
        split = t["runs"][0].get("test_split", "?") if t["runs"] else "?"
        title = "smoke run" if meta["dry_run"] else "one epoch"
        parts += [f"## Timing ({title}, in-process)",
                  "", f"Decoding: the run's test split ({split}), "
                  "the run's precision. Peak memory is torch.cuda.max_memory_allocated (n/a on the CPU; "
                  f"process peak RSS {t['peak_rss_mb']:,.0f} MB).", "",
                  _table(["family", "engine", "precision", "updates", "wall s", "update s", "train tok/s",
                          "train peak MB", "greedy sent/s", "beam5 sent/s", "decode peak MB (greedy / beam5)",
                          "result"], rows), ""]
    fails = failures(report)
    if fails:
        parts += ["## Failures", "", *[f"- {line}" for line in fails], ""]
    return "\n".join(parts)


def write_report(report: dict, out: Path) -> None:
    report["failures"] = failures(report)
    sections = [s for s in SECTIONS if s in report]
    report["passed"] = not report["failures"] and all(report[s]["passed"] for s in sections)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda if available else cpu (--dry-run: cpu)")
    parser.add_argument("--data", default=os.environ.get("SEQ2SEQ_DATA", "../shared/data"),
                        help="corpus root holding multi30k/ (not read by --dry-run)")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    parser.add_argument("--cache", default=None,
                        help="data.cache_dir for every run (default: the config's; --dry-run: <out>/cache)")
    parser.add_argument("--steps", type=int, default=300, help="updates per training run (--dry-run: 6)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="training runs at a time (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: cores / jobs for training, all cores "
                             "for timing; --dry-run: 1)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a training run is killed (default 480; --dry-run 120)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, synthetic smoke-sized data, tiny budgets")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the loss is compared between two logged points)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_paths()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda r: r.name.startswith("gpu_check") or r.levelno >= logging.WARNING)
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    import torch

    from seq2seq.core.config import register_configs

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        _say("FAIL setup: --device cuda but torch sees no CUDA device")
        return 2
    if args.dry_run:
        args.steps = DRY_RUN_STEPS
        if args.threads is None:
            args.threads = 1
    if args.jobs is None:
        args.jobs = 3
    args.run_timeout = args.run_timeout or (120.0 if args.dry_run else 480.0)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = str(Path(args.data).resolve())
    if args.dry_run and args.cache is None:
        args.cache = str(args.out / "cache")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    register_configs()
    device = torch.device(args.device)

    started = time.perf_counter()
    report: dict[str, Any] = {"meta": {
        "created": _now(), "dry_run": args.dry_run, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(), "data": None if args.dry_run else args.data, "steps": args.steps,
        "sections": args.sections, "seconds": 0.0, "complete": False}, "errors": {}}
    _say(f"gpu_check: device {report['meta']['device_name']}, torch {torch.__version__}, "
         f"sections {', '.join(args.sections)}{', dry run' if args.dry_run else ''}; writing {args.out}")
    runners = {"parity": lambda: run_parity(device), "training": lambda: run_training(args),
               "timing": lambda: run_timing(args)}
    for section in args.sections:
        start = time.perf_counter()
        _say(f"== {section}")
        try:
            report[section] = runners[section]()
        except Exception as err:  # noqa: BLE001 - report the crash as this section's failure, go on
            log.exception("section %s crashed", section)
            report["errors"][section] = f"{type(err).__name__}: {err}"
            report[section] = {"passed": False, "crashed": True}
        report[section]["seconds"] = time.perf_counter() - start
        report["meta"]["seconds"] = time.perf_counter() - started
        write_report(report, args.out)
        _say(f"== {section}: {'passed' if report[section]['passed'] else 'FAILED'} "
             f"({report[section]['seconds']:.1f} s)")
    report["meta"]["complete"] = True
    report["meta"]["seconds"] = time.perf_counter() - started
    write_report(report, args.out)
    for line in report["failures"]:
        _say(f"FAIL {line}")
    _say(f"gpu_check {'passed' if report['passed'] else 'FAILED'} in {report['meta']['seconds']:.0f} s: "
         f"{args.out / 'gpu_check.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
