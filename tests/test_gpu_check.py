"""scripts/gpu_check.py --dry-run: the GPU check runs end to end on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from seq2seq.kernels.compat import cpu_runs_bf16_lstm

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["meta"]["dry_run"] and report["meta"]["complete"] and report["meta"]["device"] == "cpu"
    assert report["passed"] and report["failures"] == [] and report["errors"] == {}
    for section in ("parity", "training", "timing"):
        assert report[section]["passed"], section

    checks = report["parity"]["checks"]
    families = {c["family"] for c in checks}
    assert families == {"none", "bahdanau", "luong-general-feed", "luong-dot", "luong-concat"}
    assert {c["engine"] for c in checks} == {"reference", "fast"}
    for c in checks:
        assert c["passed"] and c["logits_ok"] and c["grads_ok"] and c["outputs_ok"], c
        assert c["logits_max_abs_diff"] <= 1e-4 and c["grad_max_rel_err"] < 1e-3, c

    runs = report["training"]["runs"]
    # bf16 too where this CPU's oneDNN has a bf16 LSTM (the trainer refuses it elsewhere)
    precisions = ("bf16", "fp32") if cpu_runs_bf16_lstm() else ("fp32",)
    assert {(r["family"], r["precision"]) for r in runs} == {
        (f, p) for f in ("none", "bahdanau", "luong-general-feed") for p in precisions}
    for r in runs:
        assert r["returncode"] == 0 and len(r["losses"]) >= 2, r
        assert r["last_loss"] < r["first_loss"], r

    timing = report["timing"]["runs"]
    assert [t["family"] for t in timing] == ["none", "bahdanau", "luong-general-feed"]
    for t in timing:
        assert t["steps"] == 6 and t["train_tokens_per_s"] > 0 and t["wall_s"] > 0, t
        for search in ("greedy", "beam5"):
            assert t["decode"][search]["sentences"] > 0 and t["decode"][search]["sentences_per_s"] > 0, t

    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Parity", "## Training", "## Timing"):
        assert heading in md
    assert "gpu_check passed" in proc.stdout
