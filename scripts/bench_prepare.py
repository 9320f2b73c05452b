"""Time corpus preparation (load, clean, SentencePiece, tokenize) cold and warm.

    python scripts/bench_prepare.py --data ../shared/data [--corpus multi30k]

Cold uses an empty cache folder; warm repeats the call in a fresh process with the cache it left.
Prints the numbers; asserts nothing (targets on a 2-core machine: cold < 60 s, warm < 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def prepare_once(data_root: str, corpus: str, cache: str) -> dict:
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import register_configs

    register_configs()
    cfg = OmegaConf.to_object(compose_checked("train", [f"data={corpus}", f"data.root={data_root}",
                                                        f"data.cache_dir={cache}"]))
    from seq2seq.data.prepare import prepare_data

    start = time.perf_counter()
    prepared = prepare_data(cfg.data, cfg.tokenizer)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "train_pairs": len(prepared.train),
            "vocab": prepared.tokenizer.src_vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SEQ2SEQ_DATA", "../shared/data"))
    parser.add_argument("--corpus", default="multi30k")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prepare_once(args.data, args.corpus, args.child)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as cache:
        results = {}
        for phase in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--data", args.data, "--corpus", args.corpus,
                                  "--child", cache], check=True, capture_output=True, text=True)
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"corpus {args.corpus}: {results['cold']['train_pairs']} training pairs, "
          f"vocabulary {results['cold']['vocab']}")
    print(f"prepare cold: {results['cold']['seconds']:.2f} s   (target < 60 s)")
    print(f"prepare warm: {results['warm']['seconds']:.2f} s   (target < 5 s)")


if __name__ == "__main__":
    main()
