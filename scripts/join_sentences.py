"""Long test sentences from short ones: join runs of consecutive source/reference lines.

    python scripts/join_sentences.py SRC REF OUT_SRC OUT_REF [--max-join 4]

Multi30k's test sets have almost no source over 25 words, so BLEU by length cannot show how a
model degrades on long inputs. This writes a line-aligned test set in which every line joins k
consecutive sentences of SRC (and the same k of REF) with a space, for k = 1 .. --max-join: the
k = 1 block is the test set itself, the k = 2 block pairs lines 1+2, 3+4, ... (a last incomplete
group is dropped), and so on. Sources of 20-100 words result, made of real sentences whose
reference is known; a model trained on single captions has never seen such inputs, so the figure
mixes the fixed-vector bottleneck with length extrapolation. Evaluate on it with

    seq2seq-evaluate run_dir=DIR src_file=OUT_SRC ref_file=OUT_REF name=NAME

SRC/REF may be gzipped (.gz). Existing output files are never replaced.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The corpus reader, so these files are read as training reads them: gzip, CRLF, BOM, U+0085 inside lines.
from seq2seq.core.errors import DataError
from seq2seq.data.corpus import read_lines


def join_runs(lines: list[str], max_join: int) -> list[str]:
    """Blocks for k = 1 .. max_join, each the lines grouped k by k (whole groups only)."""
    out = []
    for k in range(1, max_join + 1):
        out += [" ".join(lines[i:i + k]) for i in range(0, len(lines) - k + 1, k)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("ref", type=Path)
    parser.add_argument("out_src", type=Path)
    parser.add_argument("out_ref", type=Path)
    parser.add_argument("--max-join", type=int, default=4, help="join up to this many sentences (default 4)")
    args = parser.parse_args(argv)
    if args.max_join < 1:
        parser.error(f"--max-join must be at least 1 (got {args.max_join})")
    for p in (args.out_src, args.out_ref):
        if p.exists():
            parser.error(f"{p} already exists; remove it or choose another name")
    try:
        src, ref = read_lines(args.src), read_lines(args.ref)
    except DataError as err:
        parser.error(f"cannot read the input: {err}")
    if len(src) != len(ref):
        parser.error(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}; they must be line-aligned")
    if not src:
        parser.error(f"{args.src} is empty")
    joined_src, joined_ref = join_runs(src, args.max_join), join_runs(ref, args.max_join)
    for p, lines in ((args.out_src, joined_src), (args.out_ref, joined_ref)):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"{args.out_src}, {args.out_ref}: {len(joined_src)} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
