"""Decoding speed of a trained run on its corpus' test split: greedy and beam 5.

    python scripts/bench_decode.py RUN_DIR [--repeats 3] [--beam 5] [--ensemble RUN_DIR ...]

Reports sentences/s and generated tokens/s (hypothesis lengths differ between models, so both
matter), median of --repeats. Prints the numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--split", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--precision", choices=["run", "fp32", "bf16"], default="run",
                        help="decode in the run's own precision (default) or force float32 / bf16 autocast")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences decoded together (default: the run's)")
    parser.add_argument("--kernels", choices=["auto", "fast", "reference"], default="auto",
                        help="the engine that decodes (docs/engines.md)")
    parser.add_argument("--ensemble", type=Path, nargs="*", default=[],
                        help="more runs decoding with RUN_DIR as an ensemble (the speed cost of ensembles)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last", "averaged"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from seq2seq.core.config import Device, Kernels, SearchConfig
    from seq2seq.data.cleaning import normalize
    from seq2seq.evaluation.evaluate import load_models
    from seq2seq.pipeline import load_split
    from seq2seq.search.translate import translate_ids

    loaded = load_models(args.run_dir, args.checkpoint, [str(p) for p in args.ensemble], Device.auto,
                         Kernels(args.kernels))
    cfg = loaded.cfg
    if args.data_root:
        cfg.data.root = args.data_root
    split = args.split or cfg.data.test_splits[0]
    src = [normalize(s)[0] for s in load_split(cfg, split)["src"]]
    ids = loaded.tokenizer.encode_src(src)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {loaded.description}; "
          f"{cfg.data.corpus}/{split}: {len(ids)} sentences")
    amp = {"run": loaded.amp_dtype, "fp32": None, "bf16": torch.bfloat16}[args.precision]
    batch = {"batch_size": args.batch_size} if args.batch_size else {}
    print(f"precision: {'bf16 autocast' if amp else 'float32'}")
    for name, search in (("greedy", SearchConfig(beam_size=1, **batch)),
                         (f"beam{args.beam}", SearchConfig(beam_size=args.beam, **batch))):
        times, tokens = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            hyps = translate_ids(loaded.engine, ids, search, loaded.device, amp)
            times.append(time.perf_counter() - start)
            tokens = sum(len(h.tokens) + 1 for h in hyps)
        t = statistics.median(times)
        print(f"{name:<8} {len(ids) / t:8.1f} sent/s {tokens / t:10.0f} generated tok/s  ({t:.2f} s)")


if __name__ == "__main__":
    main()
