"""Training throughput of the default model per attention variant.

    python scripts/bench_train.py --data ../shared/data [--steps 60 --warmup 10]

For each variant, a fresh process prepares Multi30k (cached after the first), trains the default
model (embeddings 256, bi-LSTM 2x256, decoder 512, SentencePiece 8k) for --steps updates and
reports steady-state target tokens/s (after --warmup updates), parameters and peak RSS.
Prints the numbers; asserts nothing.

A variant may also be the name of a lab file (configs/lab/<name>.yaml), and the overrides pick
the experiment and engine, e.g. the attention_zoo's variants on one engine, on an idle machine:

    python scripts/bench_train.py --variants none,bahdanau,luong,scaled_dot,heads4,sparsemax,\
        entmax15,local_m,local_p,relative,coverage,self_attention \
        experiment=attention_zoo trainer.kernels=reference trainer.num_threads=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "none": ["model/attention=none"],
    "bahdanau": ["model/attention=bahdanau"],
    "luong-general-feed": ["model/attention=luong", "model.attention.score=general"],
    "luong-general": ["model/attention=luong", "model.attention.score=general",
                      "model.attention.input_feeding=false"],
    "luong-dot": ["model/attention=luong", "model.attention.score=dot", "model.attention.input_feeding=false"],
}


LAB_DIR = Path(__file__).resolve().parent.parent / "configs" / "lab"


def variant_overrides(name: str) -> list[str]:
    """The overrides of a named variant above, or ``lab=<name>`` for a lab file."""
    if name in VARIANTS:
        return VARIANTS[name]
    if (LAB_DIR / f"{name}.yaml").is_file():
        return [f"lab={name}"]
    known = ", ".join(dict.fromkeys([*VARIANTS, *sorted(p.stem for p in LAB_DIR.glob("*.yaml"))]))
    raise SystemExit(f"--variants: unknown variant {name!r}; known: {known}")


def run_variant(name: str, data_root: str, cache: str, steps: int, warmup: int, extra: list[str]) -> dict:
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import register_configs
    from seq2seq.data.prepare import prepare_data
    from seq2seq.training.trainer import Trainer

    register_configs()
    overrides = [f"data.root={data_root}", f"data.cache_dir={cache}", *variant_overrides(name), *extra]
    cfg = OmegaConf.to_object(compose_checked("train", overrides))
    data = prepare_data(cfg.data, cfg.tokenizer)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, data, Path(run_dir))
        batches = trainer.sampler.batches(0)
        tokens, seconds = 0, 0.0
        for i, indices in enumerate(batches[: steps]):
            batch = trainer._batch(indices)
            start = time.perf_counter()
            trainer.train_step(batch)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                tokens += batch.num_tgt_tokens
                seconds += elapsed
    return {"variant": name, "engine": trainer.engine.name, "params": trainer.num_parameters, "tokens_per_s": tokens / seconds,
            "steps": steps - warmup, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SEQ2SEQ_DATA", "../shared/data"))
    parser.add_argument("--cache", default="data/cache")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.num_threads=2")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.data, args.cache, args.steps, args.warmup, args.overrides)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}")
    print(f"{'variant':<22}{'engine':>10}{'params':>12}{'tgt tok/s':>12}{'peak RSS MB':>14}")
    names = args.variants.split(",")
    for name in names:
        variant_overrides(name)  # unknown names before any training
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--cache", args.cache,
                              "--steps", str(args.steps), "--warmup", str(args.warmup), "--child", name,
                              *args.overrides], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['variant']:<22}{r['engine']:>10}{r['params']:>12,}{r['tokens_per_s']:>12,.0f}{r['peak_rss_mb']:>14,.0f}")


if __name__ == "__main__":
    main()
