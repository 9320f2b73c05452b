"""Evaluation reports: report.json, report.md, bleu_by_length.png and hyps.txt for one evaluation.

One evaluation (one split, one search setting) writes one directory, never overwriting an old one
(``unique_dir`` picks ``eval``, ``eval-2``, ``eval-3``, ...).

report.json schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "corpus": "wmt14", "split": "test", "src_lang": "en", "tgt_lang": "fr",
      "model": "bahdanau",                  # attention variant, or "none"
      "checkpoint": "outputs/run/checkpoints/best.pt",
      "search": {"beam_size": 5, "length_penalty": 1.0, "max_len_ratio": 2.0},
      "num_sentences": 3003,
      "created": "2024-05-01T12:00:00+00:00",   # ISO 8601
      "score": {                            # whole split, sacreBLEU defaults
        "bleu": 27.31, "chrf": 55.02,
        "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
        "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0",
        "hyp_len": 80120, "ref_len": 81377,  # BLEU's 13a-tokenized lengths
        "length_ratio": 0.9846,              # hyp_len / ref_len
        "bleu_lc": 28.02,                    # lowercased (sacrebleu -lc), as most papers report
        "bleu_lc_signature": "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0"
      },
      "bootstrap": {"samples": 1000, "seed": 12345, "confidence": 0.95},
      "buckets": [                          # by source length in words, in order
        {"label": "1-10", "low": 1, "high": 10, "count": 412,
         "bleu": 30.1, "chrf": 52.3, "length_ratio": 1.01,
         "bleu_ci": {"low": 27.0, "high": 33.4}, "chrf_ci": {"low": 50.1, "high": 54.6}},
        ...,
        {"label": "61+", "low": 61, "high": null, "count": 0,   # empty bucket: scores are null
         "bleu": null, "chrf": null, "length_ratio": null, "bleu_ci": null, "chrf_ci": null}
      ],
      "attention": {                        # models with attention only (evaluation/attention_stats.py)
        "sentences": 3003, "entropy": 1.21, "pad_mass": 0.0, "monotonicity": 0.87,
        "coverage_deviation": 0.34,
        "buckets": [{"label": "1-10", "sentences": 412, "entropy": 0.98, ...}, ...]
      },
      "speed": {                            # the decoding of this evaluation (tokenizing, search, detokenizing)
        "decode_seconds": 7.9, "sentences_per_s": 380.2, "device": "cpu", "threads": 2
      }
    }
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from seq2seq.core.files import write_text_atomic
from seq2seq.evaluation.metrics import BucketScore, CorpusScore, Interval

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EMPTY = "—"


@dataclass
class EvalReport:
    corpus: str
    split: str
    src_lang: str
    tgt_lang: str
    model: str  # e.g. "bahdanau" / "luong-general-feed" / "none"
    checkpoint: str  # path of the checkpoint used
    search: dict  # e.g. {"beam_size": 5, "length_penalty": 1.0, "max_len_ratio": 2.0}
    score: CorpusScore
    buckets: list[BucketScore]
    num_sentences: int
    bootstrap: dict  # {"samples": 1000, "seed": 12345, "confidence": 0.95}
    created: str  # ISO timestamp
    attention: dict | None = None  # AttentionDiagnostics.to_dict(); None for a model without attention
    speed: dict | None = None  # decoding time (see the module docstring); None in reports written before it

    def to_dict(self) -> dict:
        """The report.json document (see the module docstring)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "corpus": self.corpus,
            "split": self.split,
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "search": dict(self.search),
            "num_sentences": self.num_sentences,
            "created": self.created,
            "score": asdict(self.score),
            "bootstrap": dict(self.bootstrap),
            "buckets": [asdict(b) for b in self.buckets],
            **({"attention": self.attention} if self.attention is not None else {}),
            **({"speed": self.speed} if self.speed is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """Inverse of ``to_dict``; ValueError for another schema version or a missing key."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"report.json has schema_version {version!r}; this version reads {SCHEMA_VERSION}"
            )
        try:
            buckets = []
            for b in d["buckets"]:
                fields = dict(b)
                for key in ("bleu_ci", "chrf_ci"):
                    fields[key] = Interval(**fields[key]) if fields[key] is not None else None
                buckets.append(BucketScore(**fields))
            return cls(
                corpus=d["corpus"],
                split=d["split"],
                src_lang=d["src_lang"],
                tgt_lang=d["tgt_lang"],
                model=d["model"],
                checkpoint=d["checkpoint"],
                search=dict(d["search"]),
                score=CorpusScore(**d["score"]),
                buckets=buckets,
                num_sentences=d["num_sentences"],
                bootstrap=dict(d["bootstrap"]),
                created=d["created"],
                attention=d.get("attention"),
                speed=d.get("speed"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"report.json is malformed: {e}") from e


def unique_dir(base: Path) -> Path:
    """``base`` if it does not exist, else the first of ``base-2``, ``base-3``, ... that doesn't."""
    base = Path(base)
    if not base.exists():
        return base
    i = 2
    while True:
        candidate = base.with_name(f"{base.name}-{i}")
        if not candidate.exists():
            return candidate
        i += 1


def _num(x: float | None, digits: int = 2) -> str:
    return EMPTY if x is None else f"{x:.{digits}f}"


def _ci_label(report: EvalReport) -> str:
    return f"{100 * float(report.bootstrap.get('confidence', 0.95)):g}% CI"


def _bucket_rows(report: EvalReport) -> list[list[str]]:
    rows = []
    for b in report.buckets:
        if b.count == 0 or b.bleu is None:
            rows.append([b.label, "0", "empty", EMPTY, EMPTY])
            continue
        bleu = _num(b.bleu)
        if b.bleu_ci is not None:
            bleu += f" [{b.bleu_ci.low:.2f}, {b.bleu_ci.high:.2f}]"
        rows.append([b.label, str(b.count), bleu, _num(b.chrf), _num(b.length_ratio, 3)])
    return rows


def _headline(report: EvalReport) -> list[str]:
    s = report.score
    search = ", ".join(f"{k}={v}" for k, v in report.search.items()) or EMPTY
    bs = report.bootstrap
    return [
        f"Model: {report.model}    Checkpoint: {report.checkpoint}",
        f"Data: {report.corpus}/{report.split} ({report.src_lang}->{report.tgt_lang}), "
        f"{report.num_sentences} sentences",
        f"Search: {search}",
        f"BLEU: {s.bleu:.2f}    ({s.bleu_signature})",
        *([f"BLEU lowercased: {s.bleu_lc:.2f}    ({s.bleu_lc_signature})"] if s.bleu_lc is not None else []),
        f"chrF: {s.chrf:.2f}    ({s.chrf_signature})",
        f"Length ratio: {s.length_ratio:.3f} (hyp_len {s.hyp_len} / ref_len {s.ref_len})",
        f"Bootstrap: {bs.get('samples')} resamples within each bucket, seed {bs.get('seed')}, "
        f"percentile {_ci_label(report)}",
        *([f"Decoding: {report.num_sentences} sentences in {report.speed['decode_seconds']:.1f} s "
            f"({report.speed['sentences_per_s']:.1f} sentences/s, {report.speed['device']}, "
            f"{report.speed['threads']} thread{'' if report.speed['threads'] == 1 else 's'})"]
          if report.speed else []),
        f"Created: {report.created}",
    ]


def _attention_line(report: EvalReport) -> list[str]:
    a = report.attention
    if a is None:
        return []
    lines = [f"Attention: entropy {_num(a['entropy'], 3)} nats/step, pad mass {_num(a['pad_mass'], 3)}, "
             f"monotonicity {_num(a['monotonicity'], 3)}, coverage deviation {_num(a['coverage_deviation'], 3)}"]
    g = a.get("alignment")
    if g is not None:
        lines.append(f"Alignment against gold (forced references): precision {g['precision']:.3f}, "
                     f"recall {g['recall']:.3f}, AER {g['aer']:.3f}")
    return lines


def _attention_rows(report: EvalReport) -> list[list[str]]:
    rows = []
    attention = report.attention or {}
    gold = {b["label"]: b for b in (attention.get("alignment") or {}).get("buckets", [])}
    for b in attention.get("buckets", []):
        aer = [] if not gold else [_num(gold[b["label"]]["aer"], 3) if gold[b["label"]]["sentences"] else EMPTY]
        if not b["sentences"]:
            rows.append([b["label"], "0", EMPTY, EMPTY, EMPTY, EMPTY, *aer])
            continue
        rows.append([b["label"], str(b["sentences"])] + [_num(b[k], 3) for k in
                                                          ("entropy", "pad_mass", "monotonicity", "coverage_deviation")]
                    + aer)
    return rows


def format_summary(report: EvalReport) -> str:
    """The headline scores and the per-bucket table as plain text for the terminal."""
    header = ["bucket", "sentences", f"BLEU [{_ci_label(report)}]", "chrF", "len ratio"]
    rows = [header] + _bucket_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    lines = _headline(report) + _attention_line(report) + ["", "BLEU by source length (words):", fmt(header)]
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in rows[1:]]
    return "\n".join(lines) + "\n"


def _markdown(report: EvalReport) -> str:
    lines = [f"# Evaluation: {report.model} on {report.corpus}/{report.split}", ""]
    lines += [f"- {line}" for line in _headline(report)]
    lines += [
        "",
        "## BLEU by source length",
        "",
        f"| Bucket (words) | Sentences | BLEU [{_ci_label(report)}] | chrF | Len ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in _bucket_rows(report)]
    lines += ["", "![BLEU by source length](bleu_by_length.png)", ""]
    if report.attention is not None:
        lines += ["## Attention", "", *_attention_line(report), "",
                  "Entropy of each step's weights (nats); pad mass: the largest weight any step put on padding "
                  "(must be 0); monotonicity: share of steps whose most-attended source piece does not move "
                  "left; coverage deviation: mean over source pieces of |total attention - 1|.", "",
                  "| Bucket (words) | Sentences | Entropy | Pad mass | Monotonicity | Coverage deviation |"
                  + (" AER |" if report.attention.get("alignment") else ""),
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if report.attention.get("alignment") else "")]
        lines += ["| " + " | ".join(r) + " |" for r in _attention_rows(report)]
        lines.append("")
    return "\n".join(lines)


def plot_bleu_by_length(
    reports: list[tuple[str, list[BucketScore]]], path: Path, title: str
) -> None:
    """BLEU per source-length bucket, one line with CI error bars per (label, buckets).

    Empty buckets are left out of each line. The x axis is the union of bucket labels, ordered
    by their lower edge; with a single series the tick labels also show the sentence counts.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    lows: dict[str, int] = {}
    for _, buckets in reports:
        for b in buckets:
            lows.setdefault(b.label, b.low)
    labels = sorted(lows, key=lows.__getitem__)
    pos = {label: i for i, label in enumerate(labels)}

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.3 if len(reports) > 1 else 0.0
    offsets = [width * (i / max(len(reports) - 1, 1) - 0.5) for i in range(len(reports))]
    plotted = False
    for (name, buckets), off in zip(reports, offsets, strict=True):
        full = [b for b in buckets if b.count > 0 and b.bleu is not None]
        if not full:
            continue
        xs = [pos[b.label] + off for b in full]
        ys = [b.bleu for b in full]
        lo = [max(b.bleu - b.bleu_ci.low, 0.0) if b.bleu_ci else 0.0 for b in full]
        hi = [max(b.bleu_ci.high - b.bleu, 0.0) if b.bleu_ci else 0.0 for b in full]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=name)
        plotted = True
    ticks = labels
    if len(reports) == 1:
        counts = {b.label: b.count for b in reports[0][1]}
        ticks = [f"{label}\n(n={counts.get(label, 0)})" for label in labels]
    ax.set_xticks(range(len(labels)), ticks)
    ax.set_xlabel("Source sentence length (words)")
    ax.set_ylabel("BLEU")
    ax.set_ylim(bottom=0)  # BLEU is never negative; an all-zero line should sit on the axis
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if not plotted:
        ax.text(0.5, 0.5, "no sentences", ha="center", va="center", transform=ax.transAxes)
    elif len(reports) > 1:
        ax.legend()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def write_report(report: EvalReport, out_dir: Path, hyps: list[str]) -> Path:
    """Write report.json, report.md, bleu_by_length.png and hyps.txt into a new ``out_dir``.

    ``out_dir`` must not exist yet or be an empty directory; existing results are never
    overwritten (FileExistsError). Use ``unique_dir`` to pick a fresh name.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} already exists and is not an empty directory; refusing to overwrite it"
        )
    if len(hyps) != report.num_sentences:
        raise ValueError(f"{len(hyps)} hypotheses for a report of {report.num_sentences} sentences")
    if any("\n" in h or "\r" in h for h in hyps):
        raise ValueError("a hypothesis contains a line break; hyps.txt needs one line per sentence")
    out_dir.mkdir(parents=True, exist_ok=True)

    write_text_atomic(out_dir / "hyps.txt", "".join(h + "\n" for h in hyps))
    write_text_atomic(
        out_dir / "report.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
    )
    write_text_atomic(out_dir / "report.md", _markdown(report))
    title = f"{report.model}: BLEU by source length, {report.corpus}/{report.split}"
    plot_bleu_by_length([(report.model, report.buckets)], out_dir / "bleu_by_length.png", title)
    log.info("wrote evaluation report to %s", out_dir)
    return out_dir
