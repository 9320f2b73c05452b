"""End to end through the installed console scripts: seq2seq-train, seq2seq-evaluate and
seq2seq-translate on the smoke experiment (a tiny model, a small synthetic corpus, 20 steps)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seq2seq.core.checkpoint import load_checkpoint
from seq2seq.core.config import TrainConfig
from seq2seq.data.corpus import load_corpus

BIN = Path(sys.executable).parent
SHORT = ["trainer.max_steps=20", "trainer.valid_every=10", "eval.bootstrap_samples=1000"]
TEST_SIZE = 100  # data.synthetic.test_size in configs/experiment/smoke.yaml
REPORT_KEYS = {"schema_version", "corpus", "split", "src_lang", "tgt_lang", "model", "checkpoint", "search",
               "num_sentences", "created", "score", "bootstrap", "buckets"}


def script(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/tokenized-data cache for the whole module (SentencePiece trains once)."""
    return tmp_path_factory.mktemp("cache")


def run_cli(name: str, args: list[str], cwd: Path, cache: Path, stdin: bytes | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SEQ2SEQ_CACHE": str(cache),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("SEQ2SEQ_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([script(name), *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2 and exactly one ``error:`` line on stderr, with no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / "smoke").iterdir() if p.is_dir())


def train(cwd: Path, cache: Path, *extra: str) -> Path:
    """Train the smoke experiment in ``cwd``; returns its (only) run directory."""
    cwd.mkdir(parents=True, exist_ok=True)
    ok(run_cli("seq2seq-train", ["experiment=smoke", *SHORT, *extra], cwd, cache))
    dirs = run_dirs(cwd)
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """``trained(variant)``: a finished smoke run with that attention, trained once per module."""
    runs: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in runs:
            runs[variant] = train(tmp_path_factory.mktemp(f"run-{variant}"), cache_dir,
                                  f"model/attention={variant}")
        return runs[variant]

    return get


def smoke_config(run_dir: Path) -> TrainConfig:
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))


def read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", ["none", "bahdanau", "luong"])
def test_train_writes_a_complete_run_directory(trained, variant):
    run = trained(variant)
    assert run.parent.name == "smoke"
    assert (run / ".hydra" / "config.yaml").is_file()
    config = smoke_config(run)
    assert config.model.attention.type.value == variant
    assert config.trainer.max_steps == 20
    for name in ("last.pt", "best.pt"):
        assert (run / "checkpoints" / name).stat().st_size > 0
    # One file per checkpointed step, last/best as links to them, no temp files left behind.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt", "step-10.pt",
                                                                        "step-20.pt"]
    assert (run / "checkpoints" / "last.pt").samefile(run / "checkpoints" / "step-20.pt")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "step 20: valid loss" in log and "training done" in log

    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["progress"]["step"] == 20 and last["progress"]["finished"]
    expected = {"none": "none", "bahdanau": "bahdanau", "luong": "luong-general-feed"}[variant]
    assert last["model_description"] == expected

    out = run / "eval" / "test"
    for name in ("report.json", "report.md", "bleu_by_length.png", "hyps.txt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "bleu_by_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_lines(out / "hyps.txt")) == TEST_SIZE
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert REPORT_KEYS <= report.keys()
    assert report["schema_version"] == 1
    assert report["model"] == expected
    assert report["num_sentences"] == TEST_SIZE
    assert report["corpus"] == "synthetic" and report["split"] == "test"
    assert report["checkpoint"].endswith("best.pt")
    assert 0.0 <= report["score"]["bleu"] <= 100.0
    assert {"bleu", "chrf", "bleu_signature", "chrf_signature", "hyp_len", "ref_len"} <= report["score"].keys()
    buckets = report["buckets"]
    assert [b["label"] for b in buckets][0] == "1-10"
    assert sum(b["count"] for b in buckets) == TEST_SIZE
    # Attention heatmaps and diagnostics exist exactly for models that attend.
    assert bool(list(out.glob("attention_*.png"))) == (variant != "none")
    assert ("attention" in report) == (variant != "none")
    if variant != "none":
        attention = report["attention"]
        assert attention["pad_mass"] == 0.0 and attention["sentences"] == TEST_SIZE
        assert 0.0 <= attention["monotonicity"] <= 1.0 and attention["entropy"] >= 0.0
        assert [b["label"] for b in attention["buckets"]] == [b["label"] for b in buckets]
        assert sum(b["sentences"] for b in attention["buckets"]) == TEST_SIZE
        assert "## Attention" in (out / "report.md").read_text(encoding="utf-8")


def test_report_bleu_matches_the_sacrebleu_command_line(trained):
    run = trained("bahdanau")
    out = run / "eval" / "test"
    # The references, regenerated from the run's own data config.
    refs = list(load_corpus(smoke_config(run).data)["test"]["tgt"])
    assert len(refs) == TEST_SIZE
    ref_file = out.parent.parent / "refs-regenerated.txt"
    ref_file.write_text("".join(f"{r}\n" for r in refs), encoding="utf-8")
    proc = ok(subprocess.run([sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(out / "hyps.txt"),
                              "-m", "bleu", "chrf", "-b", "-w", "4"], capture_output=True, timeout=120))
    bleu, chrf = json.loads(proc.stdout)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["score"]["bleu"] == pytest.approx(bleu, abs=6e-5)
    assert report["score"]["chrf"] == pytest.approx(chrf, abs=6e-5)
    assert chrf > 0  # a real comparison, not 0 == 0
    ref_file.unlink()


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_with_beam_never_overwrites(trained, tmp_path, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(trained("bahdanau"), run)
    args = [f"run_dir={run}", "search=beam", "search.beam_size=3", "eval.heatmaps=0"]  # heatmaps: slow
    ok(run_cli("seq2seq-evaluate", args, tmp_path, cache_dir))
    first = run / "eval" / "test-beam3"
    assert len(read_lines(first / "hyps.txt")) == TEST_SIZE
    report = json.loads((first / "report.json").read_text(encoding="utf-8"))
    assert report["search"]["beam_size"] == 3
    assert not list(first.glob("attention_*.png"))
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}

    ok(run_cli("seq2seq-evaluate", args, tmp_path, cache_dir))
    second = run / "eval" / "test-beam3-2"
    assert second.is_dir()
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before  # untouched
    assert (second / "hyps.txt").read_bytes() == (first / "hyps.txt").read_bytes()  # deterministic
    assert (run / "eval" / "test").is_dir()  # the greedy report is still there


def test_evaluate_rejects_misaligned_files(trained, tmp_path, cache_dir):
    (tmp_path / "src.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("a\nb\n", encoding="utf-8")
    proc = run_cli("seq2seq-evaluate", [f"run_dir={trained('bahdanau')}", "src_file=src.txt",
                                        "ref_file=ref.txt"], tmp_path, cache_dir)
    one_line_error(proc, "src.txt has 3 lines", "ref.txt has 2")


def test_evaluate_rejects_a_non_utf8_source_naming_the_line(trained, tmp_path, cache_dir):
    (tmp_path / "src.txt").write_bytes(b"good line\nalso good\nbad \xff\xfe here\n")
    (tmp_path / "ref.txt").write_text("a\nb\nc\n", encoding="utf-8")
    proc = run_cli("seq2seq-evaluate", [f"run_dir={trained('bahdanau')}", "src_file=src.txt",
                                        "ref_file=ref.txt"], tmp_path, cache_dir)
    one_line_error(proc, "src.txt:3", "UTF-8")


def test_evaluate_rejects_a_run_without_checkpoints(tmp_path, cache_dir):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    proc = run_cli("seq2seq-evaluate", ["run_dir=empty_run"], tmp_path, cache_dir)
    one_line_error(proc, "empty_run", "checkpoints/")
    assert not (tmp_path / "empty_run" / "eval").exists()


def test_evaluate_on_a_file_pair(trained, tmp_path, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(trained("bahdanau"), run)
    src = ["kuba tida .", "", "baku tidi kuba ."]
    (tmp_path / "mine.src").write_text("".join(f"{s}\n" for s in src), encoding="utf-8")
    (tmp_path / "mine.ref").write_text("fo .\nse\nfo se .\n", encoding="utf-8")
    ok(run_cli("seq2seq-evaluate", [f"run_dir={run}", "src_file=mine.src", "ref_file=mine.ref"],
               tmp_path, cache_dir))
    hyps = read_lines(run / "eval" / "mine" / "hyps.txt")
    assert len(hyps) == 3 and hyps[1] == ""
    # the sources travel with hypotheses and references (seq2seq-compare's ΔBLEU by length)
    assert read_lines(run / "eval" / "mine" / "srcs.txt") == src
    assert read_lines(run / "eval" / "mine" / "refs.txt") == ["fo .", "se", "fo se ."]


# ----------------------------------------------------------------------------- translate


def test_translate_keeps_line_count_order_and_empty_lines(trained, tmp_path, cache_dir):
    run = trained("bahdanau")
    test_src = list(load_corpus(smoke_config(run).data)["test"]["src"])
    greedy_hyps = read_lines(run / "eval" / "test" / "hyps.txt")  # best.pt, greedy: the same model
    picks = [5, 0, 42, 17, 99, 3]
    lines = [test_src[i] for i in picks]
    lines.insert(2, "")  # 7 lines, one empty
    proc = ok(run_cli("seq2seq-translate", [f"run_dir={run}"], tmp_path, cache_dir,
                      stdin="".join(f"{x}\n" for x in lines).encode()))
    out = proc.stdout.decode("utf-8").split("\n")
    assert out[-1] == ""
    out = out[:-1]
    assert len(out) == 7
    assert out[2] == ""
    assert [o for i, o in enumerate(out) if i != 2] == [greedy_hyps[i] for i in picks]


def test_translate_rejects_invalid_utf8(trained, tmp_path, cache_dir):
    proc = run_cli("seq2seq-translate", [f"run_dir={trained('bahdanau')}"], tmp_path, cache_dir,
                   stdin=b"kuba tida .\nbad \xff byte\n")
    one_line_error(proc, "line 2", "UTF-8")
    assert proc.stdout == b""


# ----------------------------------------------------------------------------- resume / refuse


def test_resume_continues_in_the_same_directory(tmp_path, cache_dir):
    run = train(tmp_path, cache_dir, "trainer.evaluate_at_end=false")
    first = load_checkpoint(run / "checkpoints" / "last.pt")["progress"]
    assert first["step"] == 20 and first["finished"]

    ok(run_cli("seq2seq-train", [f"trainer.resume={run}", "trainer.max_steps=30"], tmp_path, cache_dir))
    assert run_dirs(tmp_path) == [run]  # no new run directory
    progress = load_checkpoint(run / "checkpoints" / "last.pt")["progress"]
    assert progress["step"] == 30 and progress["finished"]
    assert progress["train_tokens"] > first["train_tokens"]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "step 20: valid loss" in log and "step 30: valid loss" in log  # one log, appended
    assert "resumed from" in log
    assert smoke_config(run).trainer.max_steps == 30

    before = (run / "checkpoints" / "last.pt").read_bytes()
    proc = ok(run_cli("seq2seq-train", [f"trainer.resume={run}", "trainer.max_steps=30"], tmp_path, cache_dir))
    assert "already finished at step 30" in (proc.stdout + proc.stderr).decode()  # Hydra logs to stdout
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert run_dirs(tmp_path) == [run]


def test_a_new_run_into_a_used_directory_is_refused(trained, tmp_path, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(trained("bahdanau"), run)
    watched = [run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt",
               run / ".hydra" / "config.yaml", run / ".hydra" / "overrides.yaml"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    proc = run_cli("seq2seq-train", ["experiment=smoke", "model/attention=none", f"hydra.run.dir={run}"],
                   tmp_path, cache_dir)
    one_line_error(proc, "already holds a run", "trainer.resume=")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == before
    # ... so the run can still be resumed with its own settings.
    ok(run_cli("seq2seq-train", [f"trainer.resume={run}", "trainer.max_steps=21", "trainer.valid_every=21",
                                 "trainer.evaluate_at_end=false"], tmp_path, cache_dir))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == 21


# ----------------------------------------------------------------------------- engines


def _train_losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def test_both_engines_train_evaluate_and_translate_alike(tmp_path, cache_dir):
    """The same seed in float32 gives the same training losses on either engine; each engine's
    checkpoint evaluates and translates under the other one too."""
    runs = {kernels: train(tmp_path / kernels, cache_dir, f"trainer.kernels={kernels}", "trainer.precision=fp32",
                           "trainer.log_every=2")
            for kernels in ("fast", "reference")}
    for kernels, run in runs.items():
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        assert summary["engine"]["name"] == kernels
        assert {"encoder", "decoder", "search"} <= summary["engine"].keys()
        # what the speeds were measured on, beside them
        assert (summary["device"], summary["precision"]) == ("cpu", "float32") and summary["threads"] >= 1
        assert summary["ended_by"] == "trainer.max_steps" and summary["wall_seconds"] > summary["train_seconds"] > 0
        assert f"engine {kernels}:" in (run / "train.log").read_text(encoding="utf-8")
    fast, reference = (_train_losses(runs[k]) for k in ("fast", "reference"))
    assert len(fast) == len(reference) == 10
    for a, b in zip(fast, reference):
        assert a == pytest.approx(b, rel=1e-4)
    for kernels, other in (("fast", "reference"), ("reference", "fast")):
        ok(run_cli("seq2seq-evaluate", [f"run_dir={runs[kernels]}", f"kernels={other}", "split=valid"],
                   tmp_path, cache_dir))
        assert (runs[kernels] / "eval" / "valid" / "report.json").is_file()
        out = ok(run_cli("seq2seq-translate", [f"run_dir={runs[kernels]}", f"kernels={other}", "search=beam"],
                         tmp_path, cache_dir, stdin=b"s1 s2 s3\n\nn4 n5\n"))
        assert len(out.stdout.decode().split("\n")) == 4  # three lines, the empty one kept


# ----------------------------------------------------------------------------- eval keys


@pytest.mark.parametrize(("command", "override", "key"), [
    ("seq2seq-train", "eval.bootstrap_samples=0", "eval.bootstrap_samples"),
    ("seq2seq-train", "eval.bucket_edges=[10,5]", "eval.bucket_edges"),
    ("seq2seq-evaluate", "eval.bucket_edges=[]", "eval.bucket_edges"),
])
def test_bad_eval_keys_are_refused_before_any_work(command, override, key, tmp_path, cache_dir):
    """Not after a whole training: before the data is even prepared, with no run written."""
    args = ["experiment=smoke", override] if command == "seq2seq-train" else [f"run_dir={tmp_path}/none", override]
    one_line_error(run_cli(command, args, tmp_path, tmp_path / "fresh-cache"), key)
    assert not (tmp_path / "fresh-cache").exists()  # no data was prepared
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.parametrize("override", ["trainer.max_minutes=0", "trainer.max_minutes=-5", "trainer.max_minutes=nan",
                                      "trainer.max_minutes=inf", "trainer.max_minutes=ten",
                                      "trainer.coverage_loss_start=-1"])
def test_a_bad_trainer_budget_is_refused_before_any_work(override, tmp_path):
    """trainer.max_minutes or trainer.coverage_loss_start as a user mistypes them: one line naming
    the key, no data prepared and no run directory left behind (a budget that could never end, or
    end at once, is not a budget)."""
    key = override.split("=")[0]
    one_line_error(run_cli("seq2seq-train", ["experiment=smoke", override], tmp_path, tmp_path / "fresh-cache"), key)
    assert not (tmp_path / "fresh-cache").exists()
    assert not (tmp_path / "outputs").exists()


def test_bf16_on_a_cpu_that_cannot_is_refused_before_any_work(tmp_path, cache_dir):
    """Forced bf16 on a CPU whose oneDNN has no bf16 LSTM: one line naming the key, no data
    prepared. Where the CPU can, the same config passes the checks."""
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import register_configs
    from seq2seq.kernels.compat import cpu_runs_bf16_lstm
    from seq2seq.training.trainer import check_trainer_config

    if cpu_runs_bf16_lstm():
        register_configs()
        check_trainer_config(OmegaConf.to_object(compose_checked("train", ["experiment=smoke",
                                                                          "trainer.precision=bf16"])))
        return
    one_line_error(run_cli("seq2seq-train", ["experiment=smoke", "trainer.precision=bf16"], tmp_path,
                           tmp_path / "fresh-cache"), "trainer.precision=bf16", "precision=auto")
    assert not (tmp_path / "fresh-cache").exists()
