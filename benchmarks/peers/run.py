"""Side-by-side speed of seq2seq, Joey NMT 2.3.0 and OpenNMT-py 3.5.1 on identical data, one command.

    python benchmarks/peers/run.py --data ../shared/data

Run it with the project's Python (the virtualenv where seq2seq is installed). It sets up the peers'
virtualenvs under --work (reused when ready), prepares Multi30k de->en with our pipeline (joint
SentencePiece BPE, 8,000 pieces) and writes the same pieces for the peers, measures dense-matmul
GFLOP/s, trains the matched models of every toolkit and attention with the toolkits' repeats
interleaved, decodes the test set greedy and with beam search, and writes
results/<date>.md and .json. See README.md in this folder for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peerbench.bench import Settings, run_benchmark, say  # noqa: E402
from peerbench.procs import BenchError  # noqa: E402
from peerbench.report import write_report  # noqa: E402
from peerbench.toolkit import ATTENTIONS  # noqa: E402

TOOLKITS = ("ours", "joey", "onmt")


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from "
                                         f"{', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("SEQ2SEQ_DATA", "../shared/data")),
                   help="corpus root holding multi30k/ (default: $SEQ2SEQ_DATA or ../shared/data)")
    p.add_argument("--work", type=Path, default=HERE / ".work",
                   help="work folder for venvs, data, runs, logs (default: benchmarks/peers/.work; gitignored)")
    p.add_argument("--results", type=Path, default=HERE / "results",
                   help="where <date>.md and <date>.json go (default: benchmarks/peers/results)")
    p.add_argument("--steps", type=_positive, default=300, help="updates per training run (default 300)")
    p.add_argument("--repeats", type=_positive, default=3, help="training runs per toolkit and attention; "
                   "the median is reported (default 3)")
    p.add_argument("--threads", type=_positive, default=2, help="CPU threads for every toolkit (default 2)")
    p.add_argument("--toolkits", default=",".join(TOOLKITS), help="comma list of ours,joey,onmt")
    p.add_argument("--attention", default=",".join(ATTENTIONS), help="comma list of bahdanau,luong")
    p.add_argument("--batching", choices=("sentences", "tokens"), default="sentences",
                   help="sentences: --batch-sentences per batch; tokens: --max-tokens per batch, padding "
                        "included (default sentences)")
    p.add_argument("--batch-sentences", type=_positive, default=64)
    p.add_argument("--max-tokens", type=_positive, default=1024)
    p.add_argument("--warmup", type=float, default=0.1,
                   help="fraction of the updates left out of the tokens/s window (default 0.1)")
    p.add_argument("--beam", type=_positive, default=5, help="beam size of the beam-search decode (default 5)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="decode only the first N test sentences (for quick checks)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for our training config (repeatable), e.g. trainer.precision=bf16")
    p.add_argument("--decode-repeats", type=_positive, default=3,
                   help="decodes of the test set per toolkit, attention and search, run interleaved; the "
                        "median time is reported (default 3)")
    p.add_argument("--no-decode", action="store_true", help="train only")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the weights of every repeat")
    a = p.parse_args(argv)
    try:
        toolkits = _choices(a.toolkits, TOOLKITS, "--toolkits")
        attentions = _choices(a.attention, ATTENTIONS, "--attention")
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    if not 0.0 <= a.warmup < 1.0:
        p.error(f"--warmup must be in [0, 1) (got {a.warmup})")
    return Settings(data_root=a.data.resolve(), work=a.work.resolve(), results=a.results.resolve(),
                    steps=a.steps, repeats=a.repeats, decode_repeats=a.decode_repeats, threads=a.threads, toolkits=toolkits,
                    attentions=attentions, batching=a.batching, batch_sentences=a.batch_sentences,
                    max_tokens=a.max_tokens, warmup=a.warmup, beam=a.beam, limit=a.limit, seed=a.seed,
                    ours_overrides=a.ours_override, decode=not a.no_decode, keep_checkpoints=a.keep_checkpoints)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main() -> None:
    settings = parse_args(sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the corpus comes from --data, never from the hub
    try:
        from seq2seq.core.errors import Seq2SeqError
    except ImportError:
        fail(f"seq2seq is not importable by {sys.executable}; run this with the project's virtualenv "
             "(pip install -e .)")
    try:
        results = run_benchmark(settings, [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    except (Seq2SeqError, BenchError) as err:
        fail(str(err))
    md, js, text = write_report(results, settings.results)
    print("\n" + text)
    say(f"wrote {md} and {js}")
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
