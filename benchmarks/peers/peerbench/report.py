"""The summary table (per toolkit and attention), ours/best-peer ratios, markdown and JSON files."""

from __future__ import annotations

import json
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    better: str | None  # "max" | "min": which peer value the ratio compares with; None: no ratio
    fmt: str


COLUMNS = (
    Column("params", "params", None, "{:,.0f}"),
    Column("train_tok_s", "train tgt tok/s", "max", "{:,.0f}"),
    Column("greedy_sent_s", "greedy sent/s", "max", "{:,.1f}"),
    Column("greedy_tok_s", "greedy tok/s", "max", "{:,.0f}"),
    Column("beam_sent_s", "beam-{beam} sent/s", "max", "{:,.1f}"),
    Column("beam_tok_s", "beam-{beam} tok/s", "max", "{:,.0f}"),
    Column("peak_rss_gb", "peak RSS train (GB)", "min", "{:,.2f}"),
    Column("bleu_greedy", "BLEU greedy", "max", "{:.2f}"),
    Column("bleu_beam", "BLEU beam-{beam}", "max", "{:.2f}"),
)
MISSING = "—"


def _ok(records: list[dict], **match) -> list[dict]:
    return [r for r in records if r.get("error") is None and all(r[k] == v for k, v in match.items())]


def summary_rows(results: dict) -> list[dict]:
    """One row per (attention, toolkit): medians over repeats for training, and over the decodes
    of the last repeat's model for decoding (BLEU from the last decode: the output is the same),
    the largest peak RSS of the training processes."""
    beam = f"beam{results['settings']['beam']}"
    rows = []
    for attention in results["settings"]["attentions"]:
        for tk in results["toolkits"]:
            train = _ok(results["train"], toolkit=tk["name"], attention=attention)
            rates = [r["tokens_per_s"] for r in train]
            row: dict = {"toolkit": tk["name"], "label": tk["label"], "attention": attention,
                         "repeats": len(train),
                         "params": train[-1]["params"] if train else None,
                         "train_tok_s": statistics.median(rates) if rates else None,
                         "peak_rss_gb": max(r["peak_rss_mb"] for r in train) / 1024 if train else None}
            for search, prefix in (("greedy", "greedy"), (beam, "beam")):
                dec = _ok(results["decode"], toolkit=tk["name"], attention=attention, search=search)
                row[f"{prefix}_sent_s"] = statistics.median(r["sent_per_s"] for r in dec) if dec else None
                row[f"{prefix}_tok_s"] = statistics.median(r["tok_per_s"] for r in dec) if dec else None
                row[f"bleu_{prefix}"] = dec[-1]["bleu"] if dec else None
            rows.append(row)
    return rows


def ratio_rows(rows: list[dict], attentions: list[str]) -> list[dict]:
    """ours / the best peer, per column and attention (best: fastest, or smallest for RSS)."""
    out = []
    for attention in attentions:
        ours = next((r for r in rows if r["attention"] == attention and r["toolkit"] == "ours"), None)
        peers = [r for r in rows if r["attention"] == attention and r["toolkit"] != "ours"]
        ratio: dict = {"attention": attention}
        for col in COLUMNS:
            values = [(r[col.key], r["label"]) for r in peers if r[col.key] is not None]
            if col.better is None or ours is None or ours[col.key] is None or not values:
                ratio[col.key] = None
                continue
            best, label = (max if col.better == "max" else min)(values)
            ratio[col.key] = {"ratio": ours[col.key] / best if best else None, "peer": label}
        out.append(ratio)
    return out


def _cell(value, fmt: str) -> str:
    return MISSING if value is None else fmt.format(value)


def _table(header: list[str], body: list[list[str]], right_from: int) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in body)]


def _titles(beam: int) -> list[str]:
    return [c.title.format(beam=beam) for c in COLUMNS]


def markdown(results: dict, rows: list[dict], ratios: list[dict]) -> str:
    s, m, v, d = results["settings"], results["machine"], results["versions"], results["data"]
    beam = s["beam"]
    lines = [f"# Peer speed benchmark, {results['date']}", ""]
    if s["steps"] < 300 or s["limit"] is not None or s["repeats"] < 3:
        lines += [f"**A reduced run** (--steps {s['steps']}, --repeats {s['repeats']}, --limit {s['limit']}): "
                  "figures for checking the harness, not for comparison.", ""]
    ver = {name: info for name, info in v.items()}
    toolkit_versions = ", ".join(
        f"{tk['label']} {ver.get(tk['name'], {}).get(_dist(tk['name']), '?')}"
        + (f" (commit {ver[tk['name']].get('commit')})" if tk["name"] == "ours" and tk["name"] in ver else "")
        for tk in results["toolkits"])
    torches = ", ".join(f"{tk['label']}: {ver.get(tk['name'], {}).get('torch', '?')}" for tk in results["toolkits"])
    lines += [
        f"- Command: `{shlex.join(results['command'])}`",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores; threads: **{m['threads']}** for every toolkit "
        f"(OMP/MKL_NUM_THREADS, and our trainer.num_threads); load average "
        f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end",
        f"- Toolkits: {toolkit_versions}",
        f"- torch: {torches}",
        f"- Data: {d['corpus']} {d['src_lang']}→{d['tgt_lang']}, {d['tokenizer']} SentencePiece, "
        f"{d['vocab_size']:,} pieces, {d['train']['sentences']:,} training pairs (made by our pipeline; "
        f"the peers read the same pieces); test `{d['test_split']}`, {d['test_sentences']:,} sentences",
        f"- Training: {s['steps']} updates of "
        + (f"{s['batch_sentences']}-sentence batches" if s["batching"] == "sentences"
           else f"batches of {s['max_tokens']} tokens (padding included)")
        + f", no validation; tokens/s over updates {s['warmup_steps'] + 1}–{s['steps']} (the first "
        f"{s['warmup_steps']} and start-up excluded), "
        + (f"median of {s['repeats']} repeats run interleaved" if s["repeats"] > 1 else "one run each"),
        f"- Decoding: the last repeat's models, batches of 64 sentences, greedy and beam {beam} (length "
        f"penalty ((5+n)/6)^1), "
        + (f"median of {s.get('decode_repeats', 1)} decodes run interleaved" if s.get("decode_repeats", 1) > 1
           else "one decode each")
        + "; tok/s counts output pieces (EOS excluded); BLEU: sacreBLEU on the de-segmented output against "
        "the raw references",
        f"- Started {results['started']}, took {results['elapsed_s'] / 60:.0f} min",
        "",
    ]
    body = [[r["label"], r["attention"], *[_cell(r[c.key], c.fmt) for c in COLUMNS]] for r in rows]
    lines += _table(["toolkit", "attention", *_titles(beam)], body, 2)
    lines += ["", "ours / best peer (higher is better for speed and BLEU; for RSS lower is better):", ""]
    body = [[r["attention"], *[MISSING if r[c.key] is None or r[c.key]["ratio"] is None
                                else f"{r[c.key]['ratio']:.2f} ({r[c.key]['peer']})" for c in COLUMNS[1:]]]
            for r in ratios]
    lines += _table(["attention", *_titles(beam)[1:]], body, 1)
    lines += ["", *roofline_section(results), "", *per_repeat_section(results), ""]
    decode_timing = sorted({f"{r['toolkit']}: {r['timing']}" for r in results["decode"] if r.get("timing")})
    if decode_timing:
        lines += ["Decoding time measured by: " + "; ".join(decode_timing) + ".", ""]
    if results["errors"]:
        lines += ["## Errors", "", *[f"- {e}" for e in results["errors"]], ""]
    return "\n".join(lines)


def _dist(name: str) -> str:
    return {"ours": "seq2seq", "joey": "joeynmt", "onmt": "OpenNMT-py"}.get(name, name)


def roofline_section(results: dict) -> list[str]:
    roof = results.get("roofline") or {}
    lines = ["## Roofline (ours)", ""]
    if not roof:
        return [*lines, "No figures (our training or the matmul measurement failed)."]
    body = []
    for attention, r in roof.items():
        util = MISSING if r["utilisation"] is None else f"{100 * r['utilisation']:.1f}%"
        body.append([attention, f"{r['train_flops_per_tgt_token'] / 1e6:.1f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['achieved_gflops']:.1f}", r["precision"],
                     _cell(r["peak_gflops"].get(r["precision"]), "{:,.0f}"), util])
    lines += _table(["attention", "train MFLOP / tgt token", "tgt tok/s", "achieved GFLOP/s", "precision",
                     "peak matmul GFLOP/s", "utilisation"], body, 1)
    first = next(iter(roof.values()))
    lines += ["", "FLOPs: multiply-adds of the matrix products ×2, training = 3× forward; per target token "
              "the encoder and key projections are scaled by the source/target token ratio "
              f"({results['data']['train']['src_per_tgt_token']:.3f}). Forward multiply-adds per target token "
              "(first attention): " + ", ".join(f"{k} {v / 1e6:.2f}M"
                                                for k, v in first["forward_macs_per_tgt_token"].items()) + ".", ""]
    body = [[row["dtype"], f"{row['m']}×{row['k']}×{row['n']}", f"{row['gflops']:,.1f}"] for row in first["matmul"]]
    lines += ["Dense matmul on this machine, same threads:", "",
              *_table(["dtype", "m×k×n", "GFLOP/s"], body, 1)]
    return lines


def per_repeat_section(results: dict) -> list[str]:
    body = []
    for r in results["train"]:
        if r.get("error"):
            body.append([r["toolkit"], r["attention"], str(r["repeat"]), "failed", *[MISSING] * 4])
            continue
        w = r["window"]
        body.append([r["toolkit"], r["attention"], str(r["repeat"]), f"{r['tokens_per_s']:,.0f}",
                     f"{w['first_step'] + 1}–{w['last_step']}: {w['tokens']:,.0f} tok / {w['seconds']:.1f} s",
                     _cell(r["first_update_s"], "{:.1f}"), f"{r['wall_s']:.0f}", f"{r['peak_rss_mb']:,.0f}"])
    lines = ["## Training runs", "", *_table(["toolkit", "attention", "repeat", "tgt tok/s", "window",
                                              "launch → update 1 (s)", "wall (s)", "peak RSS (MB)"], body, 3)]
    decodes = [[r["toolkit"], r["attention"], r["search"], str(r.get("repeat", 1)),
                *(["failed", MISSING, MISSING] if r.get("error") else
                  [f"{r['seconds']:.2f}", f"{r['sent_per_s']:,.1f}", f"{r['tok_per_s']:,.0f}"])]
               for r in results["decode"]]
    if decodes:
        lines += ["", "## Decoding runs", "", *_table(["toolkit", "attention", "search", "repeat", "seconds",
                                                        "sent/s", "tok/s"], decodes, 4)]
    return lines


def unique_stem(folder: Path, date: str) -> Path:
    """``<date>`` in ``folder``, or ``<date>-2``, ``-3``... when a report of that day exists."""
    stem, n = folder / date, 1
    while stem.with_suffix(".md").exists() or stem.with_suffix(".json").exists():
        n += 1
        stem = folder / f"{date}-{n}"
    return stem


def write_report(results: dict, folder: Path) -> tuple[Path, Path, str]:
    rows = summary_rows(results)
    ratios = ratio_rows(rows, results["settings"]["attentions"])
    results = {**results, "summary": rows, "ratios": ratios}
    text = markdown(results, rows, ratios)
    folder.mkdir(parents=True, exist_ok=True)
    stem = unique_stem(folder, results["date"])
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(text + "\n", encoding="utf-8")
    js.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    return md, js, text
