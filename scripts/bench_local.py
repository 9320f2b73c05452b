"""Local against global attention as the source grows: time and peak memory of the attention.

    python scripts/bench_local.py [--lengths 50 100 200 400 --window 10]

For each source length S, one fresh process per attention builds a batch of encoder states
(64 sentences x S positions x 512) and times (a) the teacher-forced pass of all S target steps
at once, forward and backward (Luong's parallel path), and (b) 200 single decoder steps (search);
it reports the growth of the process's peak RSS during (a), which is dominated by the
(B, T, S) score tensors of global attention and the (B, T, 2D+1) window of local attention.
Global is Luong's ``general`` score; local is local-m with the same score and window D.
Prints a table and asserts nothing. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, length: int, window: int) -> dict:
    import torch

    from seq2seq.model.attention import AttentionMemory, LocalAttention, MultiplicativeAttention

    torch.manual_seed(0)
    batch, size = 64, 512
    scorer = MultiplicativeAttention(size, size, general=True)
    module = LocalAttention(scorer, window, predictive=False) if kind == "local" else scorer
    values = torch.randn(batch, length, size)
    memory = AttentionMemory(keys=scorer.key_proj(values).detach(), values=values,
                             mask=torch.ones(batch, length, dtype=torch.bool))
    queries = torch.randn(batch, length, size, requires_grad=True)
    positions = torch.arange(length).expand(batch, length)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = module(queries, memory, positions)
    out.context.sum().backward()
    train_s = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    with torch.no_grad():
        step_q = torch.randn(batch, 1, size)
        for t in range(20):  # warm-up
            module(step_q, memory, torch.full((batch, 1), t % length))
        start = time.perf_counter()
        for t in range(200):
            module(step_q, memory, torch.full((batch, 1), t % length))
        step_ms = (time.perf_counter() - start) / 200 * 1000
    return {"train_s": train_s, "peak_mb": peak_mb, "step_ms": step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, length, window = args.child
        print(json.dumps(measure(kind, int(length), int(window))))
        return
    print("| source length | attention | training pass, fwd+bwd (s) | peak RSS growth (MB) | search step (ms) |")
    print("|---:|---|---:|---:|---:|")
    for length in args.lengths:
        for kind in ("global", "local"):
            proc = subprocess.run([sys.executable, __file__, "--child", kind, str(length), str(args.window)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            label = "global (general)" if kind == "global" else f"local-m, D={args.window}"
            print(f"| {length} | {label} | {r['train_s']:.3f} | {r['peak_mb']:.0f} | {r['step_ms']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
