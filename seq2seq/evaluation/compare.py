"""Compare training runs: one table of configs, mean ± std over seeds, paired bootstrap vs a baseline.

Runs are found from run directories (``.hydra/config.yaml``) or sweep directories whose
sub-folders (one or two levels down) are run directories. Each run contributes the newest
``eval/<split>[-<search>][-N]`` report (default: the corpus' first test split, greedy).

Grouping rule: a run's label is its model description (``none``, ``bahdanau``,
``luong-general-feed``; the same as ``seq2seq.model.network.describe``) followed by ``key=value`` for every
other config key whose value differs between the runs found, except keys that do not change what
is trained (``seed``, ``name``, paths, logging, ``search.*``, ``eval.*``: see ``IGNORED_KEYS``).
Runs with the same label form one config; their scores are averaged over seeds (sample std,
ddof=1, with two runs or more).

Significance: each config's first run (lowest seed) is compared with the baseline config's first
run by paired bootstrap resampling (``metrics.paired_bootstrap``) on the references stored next to
the hypotheses (``refs.txt``); a single pair of runs, not an average over seeds. The same test runs
within each source-length bucket when a report stored its sources (``srcs.txt``).

Runs without a report for the split and search, and unfinished runs (``summary.json`` says
``finished: false``, or without it ``checkpoints/last.pt`` is not finished or ``best.pt`` is
missing), are left out (unfinished ones can be kept with ``include_unfinished``) and listed.
Reports that differ in test set (corpus, split, languages, sentence count, length buckets, the
hash of refs.txt), search settings or sacreBLEU signatures are never compared.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from seq2seq.core.files import make_writable_dir
from seq2seq.evaluation.attention_stats import ATTENTION_KEYS
from seq2seq.evaluation.compare_runs import (
    CompareError,
    Comparison,
    Group,
    Run,
    default_config,
    find_run_dirs,
    load_run,
    natural_key,
    parse_search,
)
from seq2seq.evaluation.metrics import (
    BucketScore,
    Interval,
    paired_bootstrap,
    paired_bootstrap_by_length,
)
from seq2seq.evaluation.report import EvalReport

log = logging.getLogger(__name__)

IGNORED_KEYS = frozenset({
    "seed", "name", "data.root", "data.cache_dir", "trainer.resume", "trainer.progress",
    "trainer.num_threads", "trainer.log_every", "trainer.sample_translations",
    "trainer.evaluate_at_end", "trainer.save_every", "trainer.keep_checkpoints", "trainer.keep_best_checkpoints",
    "trainer.max_oom_steps", "trainer.max_nonfinite_steps",
    # covered by the model description (seq2seq.model.network.describe): "-rel", "-h4", "-sa", ...
    "model.attention.type", "model.attention.score", "model.attention.input_feeding",
    "model.attention.heads", "model.attention.normalizer", "model.attention.mode", "model.attention.window",
    "model.attention.coverage", "model.attention.position_bias", "model.decoder_self_attention",
})
IGNORED_PREFIXES = ("search.", "eval.")


def _as_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def assign_labels(runs: list[Run]) -> None:
    """Description plus every config key (but the ignored ones) that differs between the runs,
    shown on the runs that set it away from its default: the zoo's coverage arm is
    ``bahdanau-cov trainer.coverage_loss=1.0`` and the other arms keep their model names.
    Two configs that differ in a key still get different labels, as at most one of them
    can hold the default."""
    keys = sorted({k for r in runs for k in r.config})
    differing = [k for k in keys if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)
                 and len({_as_text(r.config.get(k, "<unset>")) for r in runs}) > 1]
    defaults = default_config()
    for r in runs:
        shown = [k for k in differing
                 if k not in defaults or _as_text(r.config.get(k, "<unset>")) != _as_text(defaults[k])]
        r.label = " ".join([r.description, *(f"{k}={r.config.get(k, '<unset>')}" for k in shown)])


# ----------------------------------------------------------------------------- checks and statistics


def _fingerprint(run: Run) -> dict[str, Any]:
    r = run.report
    assert r is not None
    return {"corpus": r.corpus, "split": r.split, "language pair": f"{r.src_lang}-{r.tgt_lang}",
            "num_sentences": r.num_sentences, "search settings": r.search,
            "BLEU signature": r.score.bleu_signature, "chrF signature": r.score.chrf_signature,
            "length buckets (label, sentences)": [(b.label, b.count) for b in r.buckets]}


def check_comparable(runs: list[Run]) -> None:
    """CompareError naming both runs and the field when two reports are not comparable."""
    first, fp0 = runs[0], _fingerprint(runs[0])
    for run in runs[1:]:
        for key, value in _fingerprint(run).items():
            if value != fp0[key]:
                raise CompareError(f"cannot compare {first.path} and {run.path}: {key} differs "
                                   f"({fp0[key]} vs {value})")
    with_refs = [r for r in runs if r.refs_sha256]
    for run in with_refs[1:]:
        if run.refs_sha256 != with_refs[0].refs_sha256:
            raise CompareError(f"cannot compare {with_refs[0].path} and {run.path}: the references "
                               "(refs.txt) differ")


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the known values; std is None below two values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) >= 2 else None


def _mean_buckets(runs: list[Run]) -> list[BucketScore]:
    out = []
    for i, b in enumerate(runs[0].report.buckets):  # type: ignore[union-attr]
        these = [r.report.buckets[i] for r in runs]  # type: ignore[union-attr]
        bleu = mean_std([x.bleu for x in these])[0]
        cis = [x.bleu_ci for x in these if x.bleu_ci is not None]
        ci = (Interval(statistics.fmean(c.low for c in cis), statistics.fmean(c.high for c in cis))
              if cis and len(cis) == len(these) else None)
        out.append(BucketScore(b.label, b.low, b.high, b.count, bleu, None, None, ci, None))
    return out


def _bucket_aer(report: EvalReport, label: str) -> float | None:
    """AER of one length bucket of a report scored against gold alignments (None: no gold, or
    an empty bucket)."""
    alignment = (report.attention or {}).get("alignment") or {}
    for bucket in alignment.get("buckets") or []:
        if bucket.get("label") == label:
            return bucket.get("aer")
    return None


def make_group(label: str, runs: list[Run]) -> Group:
    runs = sorted(runs, key=lambda r: (r.seed is None, r.seed or 0, natural_key(r.path)))
    reports = [r.report for r in runs]
    metrics = {"bleu": mean_std([rep.score.bleu for rep in reports]),  # type: ignore[union-attr]
               "bleu_lc": mean_std([rep.score.bleu_lc for rep in reports]),  # type: ignore[union-attr]
               "chrf": mean_std([rep.score.chrf for rep in reports])}  # type: ignore[union-attr]
    for i, b in enumerate(reports[0].buckets):  # type: ignore[union-attr]
        metrics[f"bleu_len_{b.label}"] = mean_std([rep.buckets[i].bleu for rep in reports])  # type: ignore[union-attr]
    for key in ("num_parameters", "train_seconds", "tokens_per_s", "peak_rss_mb", "best_step"):
        metrics[key] = mean_std([r.stats.get(key) for r in runs])
    metrics["decode_sentences_per_s"] = mean_std([(rep.speed or {}).get("sentences_per_s")  # type: ignore[union-attr]
                                                  for rep in reports])
    for key in ATTENTION_KEYS:  # (None, None) for models without attention
        metrics[f"attention_{key}"] = mean_std([(rep.attention or {}).get(key) for rep in reports])  # type: ignore[union-attr]
    metrics["attention_aer"] = mean_std([((rep.attention or {}).get("alignment") or {}).get("aer")  # type: ignore[union-attr]
                                         for rep in reports])
    for b in reports[0].buckets:  # type: ignore[union-attr]
        metrics[f"aer_len_{b.label}"] = mean_std([_bucket_aer(rep, b.label) for rep in reports])
    return Group(label, runs, metrics, _mean_buckets(runs))


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def run_paired_bootstrap(groups: list[Group], baseline: Group, n_boot: int, seed: int) -> bool:
    """Paired bootstrap of each group's first run against the baseline's first run."""
    base = baseline.runs[0]
    refs_path = base.eval_dir / "refs.txt"  # type: ignore[operator]
    if not refs_path.is_file():
        log.warning("%s has no refs.txt: no paired bootstrap (re-evaluate the run to store references)",
                    base.eval_dir)
        return False
    refs = _read_lines(refs_path)

    def hyps_of(run: Run) -> list[str] | None:
        path = run.eval_dir / "hyps.txt"  # type: ignore[operator]
        if not path.is_file():
            log.warning("%s: no hyps.txt; no paired bootstrap for this config", run.eval_dir)
            return None
        hyps = _read_lines(path)
        if len(hyps) != len(refs):
            raise CompareError(f"{path} has {len(hyps)} lines but {refs_path} has {len(refs)}")
        return hyps

    base_hyps = hyps_of(base)
    if base_hyps is None:
        return False
    srcs = _sources([base, *(g.runs[0] for g in groups)], len(refs))
    edges = [b.low for b in base.report.buckets]  # type: ignore[union-attr]
    for g in groups:
        hyps = hyps_of(g.runs[0]) if g is not baseline else None
        if hyps is not None:
            g.paired = paired_bootstrap(hyps, base_hyps, refs, n_boot=n_boot, seed=seed)
            if srcs is not None:
                g.paired_buckets = paired_bootstrap_by_length(srcs, hyps, base_hyps, refs, edges,
                                                              n_boot=n_boot, seed=seed)
    return True


def _sources(runs: list[Run], count: int) -> list[str] | None:
    """The test set's source lines, from the first of ``runs`` whose report stored them
    (``srcs.txt``; the runs share one test set, checked by the references' hash). Reports written
    before srcs.txt existed have none: then no ΔBLEU by length."""
    for run in runs:
        path = run.eval_dir / "srcs.txt"  # type: ignore[operator]
        if path.is_file():
            srcs = _read_lines(path)
            if len(srcs) != count:
                raise CompareError(f"{path} has {len(srcs)} lines but the references have {count}")
            return srcs
    log.warning("no compared report has srcs.txt: no ΔBLEU by length (re-evaluate one run with "
                "seq2seq-evaluate to store its sources)")
    return None


def choose_baseline(groups: list[Group], baseline: str | None) -> Group:
    """The group labelled ``baseline``, else the one group whose model description it is (a label can
    carry training keys that other configs set, e.g. ``bahdanau trainer.coverage_loss=0.0``).
    Without ``baseline``: ``none`` the same way when present, else the first group."""
    labels = [g.label for g in groups]
    wanted = "none" if baseline is None else baseline
    if wanted in labels:
        return groups[labels.index(wanted)]
    by_model = [g for g in groups if g.runs[0].description == wanted]
    if len(by_model) == 1:
        return by_model[0]
    if baseline is None:
        return groups[0]
    if by_model:
        raise CompareError(f"--baseline {baseline!r} names {len(by_model)} configs; give one label in full: "
                           + ", ".join(repr(g.label) for g in by_model))
    raise CompareError(f"--baseline {baseline!r} is not a config here; choose one of: {', '.join(labels)}")


def build_comparison(paths: list[Path], split: str | None = None, search: str = "greedy",
                     baseline: str | None = None, n_boot: int = 1000, seed: int = 12345,
                     include_unfinished: bool = False) -> Comparison:
    parse_search(search)  # a bad --search fails here, before any run is read
    if n_boot < 0:
        raise CompareError(f"--bootstrap must be >= 0 (0 skips the paired bootstrap), got {n_boot}")
    runs = [load_run(p, split, search) for p in find_run_dirs(paths)]
    assign_labels(runs)
    used, skipped = [], []
    for r in runs:
        ok = r.report is not None and (r.finished or include_unfinished)
        (used if ok else skipped).append(r)
        for problem in r.problems:
            log.warning("%s (%s): %s%s", r.path, r.label, problem, "; included" if ok else "; not compared")
    if not used:
        raise CompareError(f"nothing to compare: none of the {len(runs)} run(s) found has a finished "
                           f"training and an eval report for {split or 'the first test split'} ({search})")
    check_comparable(used)
    by_label: dict[str, list[Run]] = {}
    for r in used:
        by_label.setdefault(r.label, []).append(r)
    groups = [make_group(label, rs) for label, rs in by_label.items()]
    base_group = choose_baseline(groups, baseline)
    base_label = base_group.label
    computed = n_boot > 0 and len(groups) > 1 and run_paired_bootstrap(groups, base_group, n_boot, seed)
    first = used[0]
    return Comparison(groups, base_label, skipped, [r for r in used if not r.finished],
                      first.report.split, search, first.report,  # type: ignore[union-attr]
                      next((r.refs_sha256 for r in used if r.refs_sha256), None),
                      {"samples": n_boot, "seed": seed, "computed": bool(computed)})


def output_dir(paths: list[Path], out: Path | None) -> Path:
    """``out``, else the one sweep directory given; several paths or a run directory need ``out``."""
    if out is not None:
        return out
    if len(paths) == 1 and paths[0].is_dir() and not (paths[0] / ".hydra" / "config.yaml").is_file():
        return paths[0]
    raise CompareError("pass --out DIR for the comparison files (needed unless a single sweep "
                       "directory is given)")


def _check_writable(folder: Path, what: str) -> None:
    """``folder`` exists (made here if need be) and takes files, or one line naming it."""
    try:
        make_writable_dir(folder)
    except OSError as err:
        raise CompareError(f"{what} {folder} cannot hold the comparison files ({err.strerror}); "
                           "pass --out DIR with a writable folder") from None


def run_compare(paths: list[Path], out: Path | None = None, split: str | None = None,
                search: str = "greedy", baseline: str | None = None, n_boot: int = 1000,
                seed: int = 12345, include_unfinished: bool = False) -> tuple[Comparison, dict[str, Path], str]:
    """Compare, write the files (see ``compare_report``); returns the comparison, paths and table.

    The options are ``build_comparison``'s."""
    from seq2seq.evaluation.compare_report import markdown_table, write_comparison

    find_run_dirs(paths)  # path errors first
    out_dir = output_dir(paths, out)
    comparison = build_comparison(paths, split=split, search=search, baseline=baseline, n_boot=n_boot,
                                  seed=seed, include_unfinished=include_unfinished)
    _check_writable(out_dir, "--out" if out is not None else "the sweep directory")
    written = write_comparison(comparison, out_dir)
    return comparison, written, markdown_table(comparison)
