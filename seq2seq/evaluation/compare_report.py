"""Output files of ``seq2seq-compare``: comparison.{md,csv,json}, the two BLEU-by-length plots and,
when the reports were scored against gold word alignments, the AER-by-length plot.

Existing files are never overwritten: when any of the output names exists in the output folder,
all of them get the first free suffix (``comparison-2.md``, ``bleu_by_length-2.png``, ...).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seq2seq.core.files import write_text_atomic
from seq2seq.evaluation.compare_runs import Comparison, Group
from seq2seq.evaluation.report import EMPTY, plot_bleu_by_length

log = logging.getLogger(__name__)

NAMES = ("comparison.md", "comparison.csv", "comparison.json", "bleu_by_length.png",
         "bleu_by_length_relative.png", "aer_by_length.png")
AER_PLOT = "aer_by_length.png"  # written only when some report carries an AER


def output_paths(out_dir: Path) -> dict[str, Path]:
    """The output paths with the first suffix ("", "-2", "-3", ...) that none of them uses."""
    i = 1
    while True:
        suffix = "" if i == 1 else f"-{i}"
        paths = {n: out_dir / n.replace(".", f"{suffix}.", 1) for n in NAMES}
        if not any(p.exists() for p in paths.values()):
            return paths
        i += 1


def bucket_columns(c: Comparison) -> list[tuple[str, int]]:
    """(label, sentences) of the non-empty length buckets of the test set."""
    return [(b.label, b.count) for b in c.reference.buckets if b.count > 0]


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return EMPTY
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return EMPTY
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _delta(g: Group, c: Comparison) -> tuple[str, str]:
    if g.label == c.baseline:
        return "baseline", EMPTY
    if g.paired is None:
        return EMPTY, EMPTY
    p = g.paired
    return f"{p.delta:+.2f} [{p.ci.low:+.2f}, {p.ci.high:+.2f}]", _p_shown(p.p_value, c)


ATTENTION_COLUMNS = {"entropy": "att. entropy", "pad_mass": "pad mass", "monotonicity": "monotonicity",
                     "coverage_deviation": "coverage dev.", "aer": "AER"}


def _attention_shown(c: Comparison) -> bool:
    return any(g.metrics.get("attention_entropy", (None, None))[0] is not None for g in c.groups)


def engines(g: Group) -> str:
    """The engine(s) that trained a config's runs, "" when their summaries do not say."""
    return "/".join(sorted({r.stats["engine"] for r in g.runs if r.stats.get("engine")}))


def markdown_table(c: Comparison) -> str:
    buckets = bucket_columns(c)
    attention = list(ATTENTION_COLUMNS) if _attention_shown(c) else []
    header = ["config", "runs", "BLEU", "BLEU lc", "chrF", *(f"BLEU {lb} (n={n})" for lb, n in buckets),
              *(ATTENTION_COLUMNS[k] for k in attention),
              "params", "train time", "engine", "tok/s", "peak MB", "decode sent/s", "best step", "ΔBLEU [95% CI]",
              "p"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for g in c.groups:
        m = g.metrics
        params, seconds = m["num_parameters"][0], m["train_seconds"]
        row = [g.label, str(len(g.runs)), _pm(*m["bleu"]), _pm(*m["bleu_lc"]), _pm(*m["chrf"]),
               *(_pm(*m[f"bleu_len_{lb}"]) for lb, _ in buckets),
               *(_pm(*m[f"attention_{k}"], digits=3) for k in attention),
               EMPTY if params is None else f"{round(params):,}",
               _duration(seconds[0]) + (f" ± {_duration(seconds[1])}" if seconds[1] is not None else ""),
               engines(g) or EMPTY, _pm(*m["tokens_per_s"], digits=0), _pm(*m["peak_rss_mb"], digits=0),
               _pm(*m["decode_sentences_per_s"], digits=1), _pm(*m["best_step"], digits=0), *_delta(g, c)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def relative_table(c: Comparison) -> str:
    """Each config's bucket BLEU over its own shortest bucket's: the bottleneck without the
    differences in overall quality."""
    labels = [b.label for b in c.reference.buckets]
    shown = [i for i, b in enumerate(c.reference.buckets) if b.count > 0]
    lines = ["| config | " + " | ".join(labels[i] for i in shown) + " |", "|---|" + "---:|" * len(shown)]
    for g in c.groups:
        rel = relative_bleu(g)
        lines.append(f"| {g.label} | " + " | ".join(EMPTY if rel[i] is None else f"{rel[i]:.2f}" for i in shown) + " |")
    return "\n".join(lines) + "\n"


def aer_shown(c: Comparison) -> bool:
    """Whether any compared report was scored against gold alignments (the synthetic corpus)."""
    return any(g.metrics.get(f"aer_len_{b.label}", (None, None))[0] is not None
               for g in c.groups for b in c.reference.buckets)


def aer_by_length_table(c: Comparison) -> str:
    """Each config's alignment error rate per source-length bucket (mean ± std over seeds): where
    attention stops pointing at the right source words as sentences grow."""
    shown = bucket_columns(c)
    lines = ["| config | " + " | ".join(f"AER {lb} (n={n})" for lb, n in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for g in c.groups:
        if all(g.metrics.get(f"aer_len_{lb}", (None, None))[0] is None for lb, _ in shown):
            continue  # no attention, or no gold alignments
        cells = [_pm(*g.metrics[f"aer_len_{lb}"], digits=3) for lb, _ in shown]
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p_shown(p: float, c: Comparison) -> str:
    return f"< {1 / c.bootstrap['samples']:.3g}" if p == 0 else f"{p:.3f}"


def delta_by_length_table(c: Comparison) -> str:
    buckets = c.reference.buckets
    shown = [i for i, b in enumerate(buckets) if b.count > 0]
    lines = ["| config | " + " | ".join(f"{buckets[i].label} (n={buckets[i].count})" for i in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for g in c.groups:
        if g.label == c.baseline or not g.paired_buckets:
            continue
        cells = []
        for i in shown:
            d = g.paired_buckets[i]
            cells.append(EMPTY if d is None else
                         f"{d.delta:+.2f} [{d.ci.low:+.2f}, {d.ci.high:+.2f}] p {_p_shown(d.p_value, c)}")
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _settings(c: Comparison) -> list[str]:
    r = c.reference
    search = ", ".join(f"{k}={v}" for k, v in r.search.items())
    lines = [f"Test set: {r.corpus}/{r.split} ({r.src_lang}->{r.tgt_lang}), {r.num_sentences} sentences"
             + (f", refs.txt sha256 {c.refs_sha256[:16]}" if c.refs_sha256 else ""),
             f"Search: {c.search} ({search})",
             f"BLEU: {r.score.bleu_signature}",
             *([f"BLEU lc: {r.score.bleu_lc_signature}"] if r.score.bleu_lc_signature else []),
             f"chrF: {r.score.chrf_signature}"]
    b = c.bootstrap
    if b["computed"]:
        lines.append(f"ΔBLEU: paired bootstrap ({b['samples']} resamples, seed {b['seed']}) of each "
                     f"config's first run (lowest seed) against the first run of `{c.baseline}`; "
                     "95% percentile interval, one-sided p-value")
    else:
        lines.append("ΔBLEU: not computed (one config, --bootstrap 0, or no refs.txt/hyps.txt)")
    lines.append("± is the standard deviation over seeds (ddof=1); none is shown for a single run")
    lines.append("tok/s: training target tokens per second; peak MB: the training's peak resident memory "
                 "(largest rank; — for runs that recorded only their process's peak); decode sent/s: the "
                 "test set's decoding in this search; engine: fast (the CPU kernels) or reference (the plain "
                 "model, which every variant without a kernel runs). Speeds are as each run measured "
                 "them: compare them only between runs made on one machine under the same load and "
                 "engine")
    return lines


def _shown(path: Path, base: Path | None) -> str:
    """``path`` relative to ``base`` (the markdown's folder) when it lies inside it, else relative to the
    working directory when it lies there (runs compared into docs/ from outputs/ would otherwise put this
    machine's absolute paths into a file meant to be committed), else as given."""
    for folder in (base, Path.cwd()):
        if folder is not None and path.is_relative_to(folder.resolve()):
            return str(path.relative_to(folder.resolve()))
    return str(path)


def _run_rows(c: Comparison, base: Path | None = None) -> list[list[str]]:
    rows = []
    for g in c.groups:
        for r in g.runs:
            status = "ok" if r.finished else "unfinished (included)"
            rows.append([_shown(r.path, base), g.label, str(r.seed), f"{r.report.score.bleu:.2f}",  # type: ignore[union-attr]
                         f"{r.report.score.chrf:.2f}", str(r.eval_dir.name), status])  # type: ignore[union-attr]
    for r in c.skipped:
        rows.append([_shown(r.path, base), r.label, str(r.seed), EMPTY, EMPTY,
                     r.eval_dir.name if r.eval_dir else EMPTY, "; ".join(r.problems)])
    return rows


def comparison_markdown(c: Comparison, paths: dict[str, Path]) -> str:
    r = c.reference
    lines = [f"# Comparison: {r.corpus}/{r.split}, {c.search}", "", markdown_table(c)]
    lines += [f"- {s}" for s in _settings(c)]
    lines += ["", "## BLEU by length relative to each config's shortest bucket", "", relative_table(c)]
    if any(g.paired_buckets for g in c.groups):
        lines += ["", f"## ΔBLEU by length against `{c.baseline}`", "",
                  "Paired bootstrap within each bucket, first run per config: Δ [95% CI], one-sided p.", "",
                  delta_by_length_table(c)]
    if aer_shown(c):
        lines += ["", "## Alignment error rate by length", "",
                  "AER (Och & Ney 2003) of the attention's word alignments against the gold ones, by source "
                  "length; lower is better. Configs without attention have none.", "",
                  aer_by_length_table(c), f"![AER by source length]({paths[AER_PLOT].name})"]
    lines += ["", "## Runs", "", "| run | config | seed | BLEU | chrF | eval | status |",
              "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _run_rows(c, paths["comparison.md"].parent)]
    if c.skipped:
        lines += ["", f"{len(c.skipped)} run(s) not compared: missing eval report or unfinished."]
    lines += ["", f"![BLEU by source length]({paths['bleu_by_length.png'].name})", "",
              f"![BLEU by source length, relative]({paths['bleu_by_length_relative.png'].name})", ""]
    return "\n".join(lines)


def csv_rows(c: Comparison) -> list[dict[str, Any]]:
    rows = []
    for g in c.groups:
        row: dict[str, Any] = {"label": g.label, "runs": len(g.runs),
                               "seeds": " ".join(str(r.seed) for r in g.runs), "engine": engines(g) or None}
        for key, (mean, std) in g.metrics.items():
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        p = g.paired
        row.update({"baseline": g.label == c.baseline, "delta_bleu": p.delta if p else None,
                    "delta_ci_low": p.ci.low if p else None, "delta_ci_high": p.ci.high if p else None,
                    "p_value": p.p_value if p else None})
        for b, rel in zip(c.reference.buckets, relative_bleu(g), strict=True):
            row[f"relative_len_{b.label}"] = rel
        for i, b in enumerate(c.reference.buckets):
            d = g.paired_buckets[i] if g.paired_buckets else None
            row.update({f"delta_len_{b.label}": d.delta if d else None,
                        f"delta_len_{b.label}_ci_low": d.ci.low if d else None,
                        f"delta_len_{b.label}_ci_high": d.ci.high if d else None,
                        f"p_value_len_{b.label}": d.p_value if d else None})
        rows.append(row)
    return rows


def comparison_json(c: Comparison) -> dict[str, Any]:
    r = c.reference
    return {
        "schema_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "test_set": {"corpus": r.corpus, "split": r.split, "src_lang": r.src_lang, "tgt_lang": r.tgt_lang,
                     "num_sentences": r.num_sentences, "refs_sha256": c.refs_sha256},
        "search": {"label": c.search, **r.search},
        "signatures": {"bleu": r.score.bleu_signature, "bleu_lc": r.score.bleu_lc_signature,
                       "chrf": r.score.chrf_signature},
        "baseline": c.baseline,
        "bootstrap": {**c.bootstrap, "confidence": 0.95, "pairs": "first run (lowest seed) per config"},
        "configs": [{**row, "runs": [str(x.path) for x in g.runs]}
                    for row, g in zip(csv_rows(c), c.groups)],
        "runs": [dict(zip(["path", "label", "seed", "bleu", "chrf", "eval", "status"], row))
                 for row in _run_rows(c)],
        "not_compared": [{"path": str(x.path), "label": x.label, "problems": x.problems} for x in c.skipped],
    }


def relative_bleu(g: Group) -> list[float | None]:
    """Mean bucket BLEU / mean BLEU of the shortest non-empty bucket (None: empty, or that BLEU is 0)."""
    values = [b.bleu if b.count > 0 else None for b in g.buckets]
    first = next((v for v in values if v is not None), None)
    if not first:
        return [None] * len(values)
    return [None if v is None else v / first for v in values]


def _plot_buckets(c: Comparison, lines: list[tuple[str, list[tuple[int, float]]]], path: Path, *, ylabel: str,
                  title: str, reference: float | None = None, ylim: tuple[float, float] | None = None) -> None:
    """One line per config over the test set's length buckets ((bucket index, value) points),
    written atomically as a PNG."""
    from matplotlib.figure import Figure

    labels = [b.label for b in c.reference.buckets]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, points in lines:
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("Source sentence length (words)")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def plot_relative(c: Comparison, path: Path) -> None:
    """Each config's mean bucket BLEU divided by its own BLEU in its shortest non-empty bucket."""
    lines = []
    for g in c.groups:
        points = [(i, v) for i, v in enumerate(relative_bleu(g)) if v is not None]
        if not points:
            log.warning("%s: BLEU is 0 in its shortest bucket; left out of the relative plot", g.label)
            continue
        lines.append((g.label, points))
    _plot_buckets(c, lines, path, ylabel="BLEU / BLEU of the shortest bucket", reference=1.0,
                  title=f"BLEU by length relative to short sentences, {c.reference.corpus}/{c.reference.split}")


def plot_aer_by_length(c: Comparison, path: Path) -> None:
    """Each attention config's mean AER per source-length bucket."""
    lines = []
    for g in c.groups:
        values = [g.metrics.get(f"aer_len_{b.label}", (None, None))[0] for b in c.reference.buckets]
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if points:
            lines.append((g.label, points))
    _plot_buckets(c, lines, path, ylabel="AER (lower is better)", ylim=(0, 1),
                  title=f"Alignment error rate by length, {c.reference.corpus}/{c.reference.split} "
                        "(mean over seeds)")


def write_comparison(c: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write the output files into ``out_dir`` (created if needed); returns the written ones by
    base name (the AER plot only when some report has an AER)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir)
    if not aer_shown(c):
        del paths[AER_PLOT]
    write_text_atomic(paths["comparison.md"], comparison_markdown(c, paths))
    rows = csv_rows(c)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(paths["comparison.csv"], buf.getvalue())
    write_text_atomic(paths["comparison.json"], json.dumps(comparison_json(c), indent=2, ensure_ascii=False) + "\n")
    title = (f"BLEU by source length, {c.reference.corpus}/{c.reference.split} "
             "(mean over seeds; bars: mean bootstrap 95% CI)")
    plot_bleu_by_length([(g.label, g.buckets) for g in c.groups], paths["bleu_by_length.png"], title)
    plot_relative(c, paths["bleu_by_length_relative.png"])
    if AER_PLOT in paths:
        plot_aer_by_length(c, paths[AER_PLOT])
    log.info("wrote %s and the plots", paths["comparison.md"])
    return paths
