"""The child process for our toolkit (run with the project's own Python): train, decode, matmul.

    python ours_child.py train  --run-dir D --steps N --result R.json -- OVERRIDES...
    python ours_child.py decode --run-dir D --src PIECES --out HYPS --beam K --threads T --result R.json
    python ours_child.py matmul --threads T --result R.json

``train`` composes our training config from the overrides, prepares the data (cached), and runs
exactly ``--steps`` updates through our ``Trainer`` with no validation, recording the end time and
target tokens of every update; then it saves ``checkpoints/last.pt``. ``decode`` times our batched
search over pre-segmented source pieces. ``matmul`` measures this machine's dense-matmul rate.
Self-contained on purpose: it imports only our package, torch and the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def run_updates(trainer, steps: int) -> list[list[float]]:
    """``steps`` updates in the trainer's own batch order: [[step, end time, target tokens], ...],
    with a point at step 0 for the start. Batch assembly is inside the timed loop, as it is in the
    peers' loops. Times are wall-clock (``time.time``), like the peers' log timestamps."""
    progress = trainer.progress
    points = [[0, time.time(), 0]]
    while progress.step < steps:
        for indices in trainer.sampler.iterate(progress.epoch, progress.batch_in_epoch):
            batch = trainer._batch(indices)
            trainer.train_step(batch)
            progress.step += 1
            progress.batch_in_epoch += 1
            points.append([progress.step, time.time(), batch.num_tgt_tokens])
            if progress.step >= steps:
                break
        else:  # the epoch ran out before the budget did
            progress.epoch += 1
            progress.batch_in_epoch = 0
    return points


def train(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import as_plain_dict, register_configs
    from seq2seq.data.prepare import prepare_data
    from seq2seq.training.trainer import Trainer

    register_configs()
    cfg = OmegaConf.to_object(compose_checked("train", args.overrides))
    data = prepare_data(cfg.data, cfg.tokenizer)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, data, args.run_dir)
    points = run_updates(trainer, args.steps)
    trainer.save()  # checkpoints/last.pt
    import torch

    _write(args.result, {
        "points": points,
        "params": trainer.num_parameters,
        "precision": "bf16" if trainer.amp_dtype == torch.bfloat16 else "fp32",
        "threads": torch.get_num_threads(),
        "model": as_plain_dict(cfg)["model"],
        "src_vocab_size": data.tokenizer.src_vocab_size,
        "tgt_vocab_size": data.tokenizer.tgt_vocab_size,
        "description": trainer.model.description,
    })


def decode(args: argparse.Namespace) -> None:
    import torch

    from seq2seq.core.config import SearchConfig
    from seq2seq.evaluation.evaluate import find_checkpoint, load_model
    from seq2seq.search.translate import translate_ids

    torch.set_num_threads(args.threads)
    loaded = load_model(find_checkpoint(args.run_dir, "last"))
    tok = loaded.tokenizer
    lines = args.src.read_text(encoding="utf-8").splitlines()
    ids = [[tok.src.piece_to_id(p) for p in line.split()] for line in lines]
    start = time.perf_counter()
    hyps = translate_ids(loaded.engine, ids, SearchConfig(beam_size=args.beam), loaded.device, loaded.amp_dtype)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(" ".join(tok.tgt_pieces(h.tokens)) + "\n" for h in hyps), encoding="utf-8")
    _write(args.result, {"seconds": seconds, "sentences": len(ids), "threads": torch.get_num_threads()})


def matmul_rate(m: int, k: int, n: int, dtype, min_time: float) -> float:
    """Best GFLOP/s of ``(m, k) @ (k, n)`` over repeated timing rounds of at least ``min_time``/3."""
    import torch

    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):  # warm-up: thread pool, kernel selection
        torch.matmul(a, b)
    best, spent = 0.0, 0.0
    while spent < min_time:
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time / 3:
            torch.matmul(a, b)
            reps += 1
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2.0 * m * k * n * reps / elapsed / 1e9)
    return best


def matmul(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    shapes = [(2048, 2048, 2048), (1024, 512, 8000), (64, 512, 8000)]
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for m, k, n in shapes:
            rows.append({"dtype": name, "m": m, "k": k, "n": n,
                         "gflops": matmul_rate(m, k, n, dtype, args.min_time)})
    _write(args.result, {"threads": torch.get_num_threads(), "torch": torch.__version__, "matmul": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--run-dir", type=Path, required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--result", type=Path, required=True)
    t.add_argument("overrides", nargs="*")
    d = sub.add_parser("decode")
    d.add_argument("--run-dir", type=Path, required=True)
    d.add_argument("--src", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--beam", type=int, default=1)
    d.add_argument("--threads", type=int, required=True)
    d.add_argument("--result", type=Path, required=True)
    m = sub.add_parser("matmul")
    m.add_argument("--threads", type=int, required=True)
    m.add_argument("--min-time", type=float, default=1.5)
    m.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    from seq2seq.core.errors import Seq2SeqError

    try:
        {"train": train, "decode": decode, "matmul": matmul}[args.command](args)
    except Seq2SeqError as err:  # our one-line user errors
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
