"""scripts/join_sentences.py: the long-sentence test set built from consecutive short sentences."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/join_sentences.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def write(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def test_blocks_join_whole_groups_in_order_and_stay_aligned(tmp_path: Path) -> None:
    src = write(tmp_path / "t.de.gz", ["a1", "a2 x", "a3", "a4", "a5"])
    ref = write(tmp_path / "t.en.gz", ["b1", "b2", "b3 y", "b4", "b5"])
    proc = run(src, ref, tmp_path / "out/j.de", tmp_path / "out/j.en", "--max-join", "3")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/j.de").read_text().splitlines() == [
        "a1", "a2 x", "a3", "a4", "a5",            # k = 1: the test set itself
        "a1 a2 x", "a3 a4",                        # k = 2: the incomplete last group is dropped
        "a1 a2 x a3"]                              # k = 3
    assert (tmp_path / "out/j.en").read_text().splitlines() == [
        "b1", "b2", "b3 y", "b4", "b5", "b1 b2", "b3 y b4", "b1 b2 b3 y"]


def test_refuses_bad_input_in_one_line_and_never_replaces_output(tmp_path: Path) -> None:
    src = write(tmp_path / "t.de.gz", ["a1", "a2"])
    short = write(tmp_path / "s.en.gz", ["b1"])
    out_src, out_ref = tmp_path / "j.de", tmp_path / "j.en"

    proc = run(src, short, out_src, out_ref)
    assert proc.returncode == 2 and "t.de.gz has 2 lines but" in proc.stderr and "line-aligned" in proc.stderr
    assert not out_src.exists() and not out_ref.exists()

    proc = run(src, tmp_path / "missing.en", out_src, out_ref)
    assert proc.returncode == 2 and "cannot read the input" in proc.stderr and "Traceback" not in proc.stderr

    proc = run(src, src, out_src, out_ref, "--max-join", "0")
    assert proc.returncode == 2 and "--max-join must be at least 1" in proc.stderr

    out_src.write_text("mine\n")
    proc = run(src, src, out_src, out_ref)
    assert proc.returncode == 2 and "j.de already exists" in proc.stderr
    assert out_src.read_text() == "mine\n" and not out_ref.exists()
