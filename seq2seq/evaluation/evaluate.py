"""Evaluate a trained model: decode a split, score it with sacreBLEU, bucket BLEU by source length,
write the report files and attention heatmaps, and log the same figures to TensorBoard."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from seq2seq.core.checkpoint import load_checkpoint, tensor_to_bytes
from seq2seq.core.config import (
    Device,
    EvalConfig,
    Kernels,
    SearchConfig,
    TrainConfig,
    from_plain_dict,
)
from seq2seq.core.errors import CheckpointError, ConfigError, RunDirError
from seq2seq.core.files import write_text_atomic
from seq2seq.core.tracking import Tracker
from seq2seq.data.cleaning import normalize
from seq2seq.data.tokenizer import PAD_ID, Tokenizer
from seq2seq.evaluation.alignment import alignment_score, attention_links, parse_links
from seq2seq.evaluation.attention_stats import ATTENTION_KEYS, diagnose
from seq2seq.evaluation.metrics import (
    assign_buckets,
    bleu_by_length,
    bucket_labels,
    corpus_score,
    source_length,
)
from seq2seq.evaluation.report import EvalReport, unique_dir, write_report
from seq2seq.model.devices import autocast_dtype, resolve_device
from seq2seq.model.engine import Engine, build_engine, describe_engine
from seq2seq.model.network import Seq2Seq, build_model, state_mismatch
from seq2seq.search.common import search_label
from seq2seq.search.ensemble import EnsembleEngine
from seq2seq.search.translate import attention_pass, translate_ids

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Seq2Seq
    tokenizer: Tokenizer
    cfg: TrainConfig
    checkpoint: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    engine: Engine
    members: tuple[Path, ...] = ()  # an ensemble's checkpoints (``checkpoint`` is the first); () for one model

    @property
    def description(self) -> str:
        """The model's description, or the ensemble's (``ensemble of 3: bahdanau + ...``)."""
        if not self.members:
            return self.model.description
        engines = self.engine.engines  # type: ignore[attr-defined]
        return f"ensemble of {len(engines)}: " + " + ".join(e.model.description for e in engines)

    @property
    def source(self) -> str:
        """Where the weights came from, for reports: the checkpoint file(s)."""
        return " + ".join(str(p) for p in self.members) if self.members else str(self.checkpoint)


def check_eval_config(cfg: EvalConfig) -> None:
    """Reject ``eval.*`` settings that would only fail once the evaluation runs (after a whole
    training), naming the key."""
    try:
        bucket_labels(list(cfg.bucket_edges))
    except ValueError as err:
        raise ConfigError(f"eval.bucket_edges: {err}; e.g. eval.bucket_edges=[1,11,21]") from None
    if cfg.bootstrap_samples < 1:
        raise ConfigError(f"eval.bootstrap_samples must be an integer >= 1 (got {cfg.bootstrap_samples})")
    if cfg.heatmaps < 0:
        raise ConfigError(f"eval.heatmaps must be 0 or more (got {cfg.heatmaps})")


def find_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """``best.pt`` (or ``which``) in a run directory; ``best`` falls back to ``last.pt`` (a run
    stopped before its first validation), ``averaged`` never does."""
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass run_dir=outputs/<name>/<timestamp>")
    if which == "averaged":
        path = run_dir / "checkpoints" / "averaged.pt"
        if not path.is_file():
            raise RunDirError(f"{run_dir} has no checkpoints/averaged.pt; write it first with "
                              f"seq2seq-average run_dir={run_dir} last=5 (or best=5)")
        return path
    for name in (which, "last"):
        path = run_dir / "checkpoints" / f"{name}.pt"
        if path.is_file():
            return path
    raise RunDirError(f"{run_dir} has no checkpoints/{which}.pt or checkpoints/last.pt; "
                      "train it first, or pass the directory of a run that saved a checkpoint")


def load_model(path: Path, device: Device = Device.auto, kernels: Kernels = Kernels.auto) -> LoadedModel:
    """Rebuild the model and tokenizer from a checkpoint file alone."""
    payload = load_checkpoint(path)
    try:
        cfg = from_plain_dict(payload["config"])
        src = tensor_to_bytes(payload["tokenizer"]["src"])
        tgt_t = payload["tokenizer"]["tgt"]
        tokenizer = Tokenizer(src, tensor_to_bytes(tgt_t) if tgt_t is not None else None)
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as err:
        raise CheckpointError(f"{path}: incomplete checkpoint ({type(err).__name__}: {err})") from None
    vocab = payload.get("vocab", {})
    if (vocab.get("src"), vocab.get("tgt")) != (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size):
        raise CheckpointError(f"{path}: the model's vocabulary sizes {vocab} do not match its tokenizer "
                              f"({tokenizer.src_vocab_size}/{tokenizer.tgt_vocab_size})")
    dev = resolve_device(device, key="device")
    model = build_model(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, PAD_ID)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not match the config stored with them "
                              f"({state_mismatch(model, payload['model'])})") from None
    model.to(dev).eval()
    engine = build_engine(model, kernels, dev, key="kernels")
    log.info("%s", describe_engine(engine))
    return LoadedModel(model, tokenizer, cfg, path, dev, autocast_dtype(cfg.trainer.precision, dev, saved=True), engine)


def load_models(run_dir: Path, which: str, ensemble: list[str], device: Device = Device.auto,
                kernels: Kernels = Kernels.auto) -> LoadedModel:
    """The model of ``run_dir``, or with ``ensemble`` (more run directories) the ensemble of all of
    them, each with its ``which`` checkpoint; every run is checked before any translation."""
    if not ensemble:
        return load_model(find_checkpoint(run_dir, which), device, kernels)
    dirs = [run_dir, *(Path(d) for d in ensemble)]
    seen: dict[Path, Path] = {}
    for d in dirs:
        if d.resolve() in seen:
            raise ConfigError(f"ensemble: {d} is listed twice (as {seen[d.resolve()]}); give each run once")
        seen[d.resolve()] = d
    for d in dirs[1:]:
        if not d.is_dir():
            raise RunDirError(f"ensemble: run directory {d} does not exist; list training runs: ensemble=[DIR,DIR]")
    paths = [find_checkpoint(d, which) for d in dirs]  # every run exists before any is loaded
    members = [load_model(p, device, kernels) for p in paths]
    first = members[0]
    for m in members[1:]:
        if (m.tokenizer.src_proto, m.tokenizer.tgt_proto) != (first.tokenizer.src_proto, first.tokenizer.tgt_proto):
            raise ConfigError(f"ensemble: {m.checkpoint} and {first.checkpoint} use different tokenizers; only runs "
                              "that share one (the same corpus and tokenizer settings) can be ensembled")
        if (m.cfg.data.src_lang, m.cfg.data.tgt_lang) != (first.cfg.data.src_lang, first.cfg.data.tgt_lang):
            raise ConfigError(f"ensemble: {m.checkpoint} translates {m.cfg.data.src_lang}->{m.cfg.data.tgt_lang} "
                              f"but {first.checkpoint} {first.cfg.data.src_lang}->{first.cfg.data.tgt_lang}")
    engine = EnsembleEngine([m.engine for m in members])
    return dataclasses.replace(first, engine=engine, members=tuple(paths))


@dataclass
class Decoded:
    """A split's translations and what produced them (the lines that were not empty)."""

    texts: list[str]  # one per input line; "" for an empty line
    todo: list[int]  # the input lines that were translated
    clean: list[str]  # their normalised text
    src_ids: list[list[int]]
    hyp_ids: list[list[int]]
    # with search.nbest > 1, per input line: (translation, score) best first; [] for an empty line
    nbest: list[list[tuple[str, float]]] | None = None


def decode_lines(loaded: LoadedModel, lines: list[str], search: SearchConfig) -> Decoded:
    """Translate raw source lines; an empty (or all-space) line gives an empty line."""
    normalised = [normalize(line)[0] for line in lines]
    todo = [i for i, line in enumerate(normalised) if line]
    clean = [normalised[i] for i in todo]
    ids = loaded.tokenizer.encode_src(clean)
    hyps = translate_ids(loaded.engine, ids, search, loaded.device, loaded.amp_dtype)
    hyp_ids = [list(h.tokens) for h in hyps]
    texts = [""] * len(lines)
    for i, text in zip(todo, loaded.tokenizer.decode_tgt(hyp_ids)):
        texts[i] = text
    nbest = None
    if search.nbest > 1:
        nbest = [[] for _ in lines]
        for i, h in zip(todo, hyps):
            alternatives = h.nbest or [(h.tokens, h.score)]
            nbest[i] = list(zip(loaded.tokenizer.decode_tgt([t for t, _ in alternatives]),
                                [score for _, score in alternatives]))
    return Decoded(texts, todo, clean, [list(x) for x in ids], hyp_ids, nbest)


def translate_lines(loaded: LoadedModel, lines: list[str], search: SearchConfig) -> list[str]:
    """Translate raw source lines; an empty (or all-space) line gives an empty line."""
    return decode_lines(loaded, lines, search).texts


def _heatmap(weights: torch.Tensor, src_pieces: list[str], hyp_pieces: list[str], title: str):
    from matplotlib.figure import Figure

    rows, cols = weights.shape
    fig = Figure(figsize=(max(4.5, 0.35 * cols + 3), max(3.5, 0.35 * rows + 2.5)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(weights.float().numpy(), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="attention weight")
    ax.set_xticks(range(cols), src_pieces, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), hyp_pieces, fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    return fig


def write_heatmaps(loaded: LoadedModel, decoded: Decoded, weights: list[torch.Tensor | None], search: SearchConfig,
                   out_dir: Path, count: int, tracker: Tracker | None, tag: str) -> list[Path]:
    """Attention heatmaps (PNG, and TensorBoard images) of the evaluation's own hypotheses
    (greedy or beam), for its first ``count`` sentences of at most 25 words (readable pictures)."""
    if count <= 0 or not weights or weights[0] is None:  # a model without attention has nothing to show
        return []
    short = [k for k, line in enumerate(decoded.clean) if len(line.split()) <= 25]
    chosen = (short or list(range(len(decoded.clean))))[:count]
    paths = []
    for n, k in enumerate(chosen, start=1):
        src_pieces = [*loaded.tokenizer.src_pieces(decoded.clean[k]), "</s>"]
        hyp_pieces = [*loaded.tokenizer.tgt_pieces(decoded.hyp_ids[k]), "</s>"]
        hypothesis = decoded.texts[decoded.todo[k]]
        shown = hypothesis if len(hypothesis) <= 90 else hypothesis[:87] + "..."
        fig = _heatmap(weights[k][: len(hyp_pieces), : len(src_pieces)], src_pieces, hyp_pieces,
                       f"{loaded.model.description}, {search_label(search)}: sentence {n}\n{shown}")
        path = out_dir / f"attention_{n}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
        if tracker is not None:
            tracker.image_file(f"{tag}/attention_{n}", path, 0)
    return paths


def _alignments(loaded: LoadedModel, decoded: Decoded, outputs: list[list[int]],
                batch_size: int = 64) -> list[set[tuple[int, int]]]:
    """Word links of the attention of a teacher-forced pass over each translated source of
    ``decoded`` and its output ``outputs[k]`` (seq2seq/evaluation/alignment.py)."""
    weights, _ = attention_pass(loaded.engine, decoded.src_ids, outputs, loaded.device, loaded.amp_dtype,
                                batch_size)
    return [attention_links(w, loaded.tokenizer.src_pieces(src), loaded.tokenizer.tgt_pieces(ids))
            for w, src, ids in zip(weights, decoded.clean, outputs)]


def hypothesis_alignments(loaded: LoadedModel, decoded: Decoded, batch_size: int = 64) -> list[set[tuple[int, int]]]:
    """Word alignments of each translation of ``decoded`` to its source, as its attention gives them."""
    return _alignments(loaded, decoded, decoded.hyp_ids, batch_size)


def reference_alignments(loaded: LoadedModel, decoded: Decoded, refs: list[str]) -> list[set[tuple[int, int]]]:
    """Word alignments the model's attention gives each (source, reference) pair it is forced to
    produce: the pairs of ``decoded.todo``."""
    clean_refs = [normalize(refs[i])[0] for i in decoded.todo]
    return _alignments(loaded, decoded, [list(x) for x in loaded.tokenizer.encode_tgt(clean_refs)])


def score_alignments(loaded: LoadedModel, decoded: Decoded, refs: list[str], raw_src: list[str], gold: list[str],
                     edges: list[int], where: str) -> dict:
    """Precision, recall and AER of the attention's word alignments against ``gold`` (a Pharaoh
    line per sentence), over the set and per source-length bucket."""
    parsed = [parse_links(gold[i], f"{where} line {i + 1}") for i in decoded.todo]
    predicted = reference_alignments(loaded, decoded, refs)
    buckets = assign_buckets([source_length(raw_src[i]) for i in decoded.todo], edges)
    out = asdict(alignment_score(predicted, parsed))
    out["buckets"] = []
    for b, label in enumerate(bucket_labels(edges)):
        rows = [k for k, x in enumerate(buckets) if x == b]
        score = asdict(alignment_score([predicted[k] for k in rows], [parsed[k] for k in rows]))
        out["buckets"].append({"label": label, **score})
    return out


def _one_line(text: str) -> str:
    """``text`` with any line break turned into a space: one line per sentence in srcs.txt, and
    the same whitespace word count, so its length bucket does not change."""
    return text.replace("\r", " ").replace("\n", " ")


def evaluate(loaded: LoadedModel, raw_src: list[str], refs: list[str], corpus: str, split: str,
             search: SearchConfig, eval_cfg: EvalConfig, out_base: Path, tracker: Tracker | None = None,
             tag: str = "test", step: int = 0, gold_alignments: list[str] | None = None,
             gold_source: str = "the corpus") -> tuple[EvalReport, Path]:
    """Translate every line of a split, score it and write ``out_base[-N]/``; returns the report.
    With ``gold_alignments`` (a Pharaoh line per sentence) an attention model's alignments are
    scored too (``report.json["attention"]["alignment"]``)."""
    if len(raw_src) != len(refs):
        raise ConfigError(f"{len(raw_src)} source lines but {len(refs)} reference lines; they must match")
    started = time.perf_counter()
    decoded = decode_lines(loaded, raw_src, search)
    seconds = time.perf_counter() - started  # the texts are back on the host: a GPU has finished
    hyps = decoded.texts
    score = corpus_score(hyps, refs)
    # The attention of the hypotheses just produced (a teacher-forced pass over them): the
    # diagnostics and the heatmaps show what this search saw.
    # An ensemble has no one attention: its members' are their own.
    weights, pad_mass = ([], []) if loaded.members else attention_pass(
        loaded.engine, decoded.src_ids, decoded.hyp_ids, loaded.device, loaded.amp_dtype, max(1, search.batch_size))
    diagnostics = None
    if weights and weights[0] is not None:
        diagnostics = diagnose(weights, pad_mass, [raw_src[i] for i in decoded.todo],
                               list(eval_cfg.bucket_edges)).to_dict()
        if gold_alignments is not None:
            diagnostics["alignment"] = score_alignments(loaded, decoded, refs, raw_src, gold_alignments,
                                                        list(eval_cfg.bucket_edges), gold_source)
    buckets = bleu_by_length(raw_src, hyps, refs, list(eval_cfg.bucket_edges), eval_cfg.bootstrap_samples,
                             eval_cfg.bootstrap_seed)
    cfg = loaded.cfg
    report = EvalReport(
        corpus=corpus, split=split, src_lang=cfg.data.src_lang, tgt_lang=cfg.data.tgt_lang,
        model=loaded.description, checkpoint=loaded.source,
        # nbest=1 (the default) is left out, so reports stay comparable with those written before it
        search={k: v for k, v in asdict(search).items() if k != "batch_size" and (k, v) != ("nbest", 1)},
        score=score, buckets=buckets, num_sentences=len(hyps),
        bootstrap={"samples": eval_cfg.bootstrap_samples, "seed": eval_cfg.bootstrap_seed, "confidence": 0.95},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        attention=diagnostics,
        speed={"decode_seconds": round(seconds, 3), "sentences_per_s": round(len(hyps) / max(seconds, 1e-9), 1),
               "device": loaded.device.type, "threads": torch.get_num_threads()},
    )
    out_dir = write_report(report, unique_dir(out_base), hyps)
    # The references and sources travel with the hypotheses, so reports can be re-scored and
    # compared later, by source length too (seq2seq-compare's ΔBLEU per length bucket).
    write_text_atomic(out_dir / "refs.txt", "".join(f"{r}\n" for r in refs))
    write_text_atomic(out_dir / "srcs.txt", "".join(f"{_one_line(s)}\n" for s in raw_src))
    write_heatmaps(loaded, decoded, weights, search, out_dir, eval_cfg.heatmaps, tracker, tag)
    if tracker is not None:
        values = {f"{tag}/bleu": score.bleu, f"{tag}/chrf": score.chrf}
        if diagnostics is not None:
            values.update({f"{tag}/attention/{key}": diagnostics[key] for key in ATTENTION_KEYS
                           if diagnostics[key] is not None})
            if "alignment" in diagnostics:
                values.update({f"{tag}/attention/{key}": diagnostics["alignment"][key]
                               for key in ("precision", "recall", "aer")})
        values.update({f"{tag}/bleu_len_{b.label}": b.bleu for b in buckets if b.bleu is not None})
        tracker.scalars(values, step)
        tracker.image_file(f"{tag}/bleu_by_length", out_dir / "bleu_by_length.png", step)
    log.info("%s/%s (%s): BLEU %.2f, chrF %.2f -> %s", corpus, split, search_label(search), score.bleu,
             score.chrf, out_dir)
    return report, out_dir


def eval_dir_name(split: str, search: SearchConfig, model: str = "best") -> str:
    """``<split>`` for greedy decoding, ``<split>-<search>`` otherwise (``test-beam5``), then
    ``-<model>`` for anything but the best checkpoint (``test-beam5-averaged``, ``test-ensemble3``),
    so seq2seq-compare's ``--search beam5`` finds the best checkpoint's reports only."""
    label = search_label(search)
    name = split if label == "greedy" else f"{split}-{label}"
    return name if model == "best" else f"{name}-{model}"
