"""Data-parallel training against one process on the same cores, through the real commands.

    python scripts/bench_ddp.py --data ../shared/data [--steps 100 --ranks 2]

Trains the default model (Multi30k, Bahdanau) for --steps updates three ways, one after another:
one process with --ranks threads; the same with a --ranks times larger batch (the DDP run's
effective batch); and ``torchrun --nproc_per_node=--ranks`` with one thread per rank. Prints each
run's target tokens/s (training steps only, all ranks together, from summary.json), the peak RSS
of each rank and the ratio to the first run. Run it on an otherwise idle machine. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def train(label: str, launcher: list[str], overrides: list[str], run_dir: Path, env: dict[str, str]) -> dict:
    cmd = [*launcher, shutil.which("seq2seq-train") or "seq2seq-train", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"# {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"label": label, "tokens_per_s": summary["train_tokens_per_s"], "rss": summary["peak_rss_mb"],
            "steps": summary["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="corpus root (SEQ2SEQ_DATA)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    env = {**os.environ, "SEQ2SEQ_DATA": str(Path(args.data).resolve()), "SEQ2SEQ_CACHE": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    common = [f"trainer.max_steps={args.steps}", "trainer.valid_every=100000", "trainer.evaluate_at_end=false",
              "trainer.valid_max_sentences=64", "trainer.progress=false", *args.extra]
    n = args.ranks
    # prepare the corpus once, outside the timed runs
    train("prepare", [], [*common, "trainer.max_steps=1"], work / "prepare", env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    runs = [
        train(f"1 process x {n} threads", [], [*common, f"trainer.num_threads={n}",
                                               f"trainer.max_tokens={args.max_tokens}"], work / "single", env),
        train(f"1 process x {n} threads, batch x{n}", [], [*common, f"trainer.num_threads={n}",
                                                          f"trainer.max_tokens={n * args.max_tokens}"],
              work / "single-big", env),
        train(f"{n} ranks x 1 thread", torchrun, [*common, "trainer.num_threads=1",
                                                  f"trainer.max_tokens={args.max_tokens}"], work / "ddp", env),
    ]
    base = runs[0]["tokens_per_s"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.steps} updates, "
          f"trainer.max_tokens={args.max_tokens} per process unless said")
    print("| run | target tokens/s | ratio | peak RSS per rank (MB) |")
    print("|---|---|---|---|")
    for r in runs:
        print(f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{' / '.join(f'{m:,.0f}' for m in r['rss'])} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
