"""Evaluate a trained model: decode a split, score it with sacreBLEU, bucket BLEU by source length,
write the report files and attention heatmaps, and log the same figures to TensorBoard."""

from __future__ import annotations

import logging
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
from seq2seq.evaluation.metrics import bleu_by_length, bucket_labels, corpus_score
from seq2seq.evaluation.report import EvalReport, unique_dir, write_report
from seq2seq.model.devices import autocast_dtype, resolve_device
from seq2seq.model.engine import Engine, build_engine, describe_engine
from seq2seq.model.network import Seq2Seq, build_model, state_mismatch
from seq2seq.search.common import search_label
from seq2seq.search.translate import translate_ids

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
    """``best.pt`` (or ``which``) in a run directory, falling back to ``last.pt``."""
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass run_dir=outputs/<name>/<timestamp>")
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
    return LoadedModel(model, tokenizer, cfg, path, dev, autocast_dtype(cfg.trainer.precision, dev), engine)


def translate_lines(loaded: LoadedModel, lines: list[str], search: SearchConfig) -> list[str]:
    """Translate raw source lines; an empty (or all-space) line gives an empty line."""
    clean = [normalize(line)[0] for line in lines]
    todo = [i for i, line in enumerate(clean) if line]
    ids = loaded.tokenizer.encode_src([clean[i] for i in todo])
    hyps = translate_ids(loaded.engine, ids, search, loaded.device, loaded.amp_dtype)
    out = [""] * len(lines)
    for i, text in zip(todo, loaded.tokenizer.decode_tgt([h.tokens for h in hyps])):
        out[i] = text
    return out


def _heatmap(weights: torch.Tensor, src_pieces: list[str], hyp_pieces: list[str], title: str):
    from matplotlib.figure import Figure

    rows, cols = weights.shape
    fig = Figure(figsize=(max(4.0, 0.35 * cols + 2), max(3.0, 0.35 * rows + 2)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(weights.float().numpy(), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(cols), src_pieces, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), hyp_pieces, fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_heatmaps(loaded: LoadedModel, src_clean: list[str], out_dir: Path, count: int,
                   tracker: Tracker | None, tag: str) -> list[Path]:
    """Attention heatmaps (PNG, and TensorBoard images) for the first ``count`` sentences."""
    if count <= 0 or not src_clean:
        return []
    # Short sentences make readable pictures (and cheap ones): take the first that fit.
    short = [s for s in src_clean if len(s.split()) <= 25]
    chosen = (short or src_clean)[:count]
    ids = loaded.tokenizer.encode_src(chosen)
    hyps = translate_ids(loaded.engine, ids, SearchConfig(), loaded.device, keep_attention=True)
    paths = []
    for i, hyp in enumerate(hyps):
        if hyp.attention is None:  # a model without attention has nothing to show
            return []
        src_pieces = [*loaded.tokenizer.src_pieces(chosen[i]), "</s>"]
        hyp_pieces = [*loaded.tokenizer.tgt_pieces(hyp.tokens), "</s>"]
        fig = _heatmap(hyp.attention[: len(hyp_pieces), : len(src_pieces)], src_pieces, hyp_pieces,
                       f"{loaded.model.description}: sentence {i + 1}")
        path = out_dir / f"attention_{i + 1}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
        if tracker is not None:
            tracker.image_file(f"{tag}/attention_{i + 1}", path, 0)
    return paths


def evaluate(loaded: LoadedModel, raw_src: list[str], refs: list[str], corpus: str, split: str,
             search: SearchConfig, eval_cfg: EvalConfig, out_base: Path, tracker: Tracker | None = None,
             tag: str = "test", step: int = 0) -> tuple[EvalReport, Path]:
    """Translate every line of a split, score it and write ``out_base[-N]/``; returns the report."""
    if len(raw_src) != len(refs):
        raise ConfigError(f"{len(raw_src)} source lines but {len(refs)} reference lines; they must match")
    hyps = translate_lines(loaded, raw_src, search)
    score = corpus_score(hyps, refs)
    buckets = bleu_by_length(raw_src, hyps, refs, list(eval_cfg.bucket_edges), eval_cfg.bootstrap_samples,
                             eval_cfg.bootstrap_seed)
    cfg = loaded.cfg
    report = EvalReport(
        corpus=corpus, split=split, src_lang=cfg.data.src_lang, tgt_lang=cfg.data.tgt_lang,
        model=loaded.model.description, checkpoint=str(loaded.checkpoint),
        search={k: v for k, v in asdict(search).items() if k != "batch_size"},
        score=score, buckets=buckets, num_sentences=len(hyps),
        bootstrap={"samples": eval_cfg.bootstrap_samples, "seed": eval_cfg.bootstrap_seed, "confidence": 0.95},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    out_dir = write_report(report, unique_dir(out_base), hyps)
    # The references travel with the hypotheses, so reports can be re-scored and compared later.
    write_text_atomic(out_dir / "refs.txt", "".join(f"{r}\n" for r in refs))
    clean = [normalize(s)[0] for s in raw_src]
    write_heatmaps(loaded, [s for s in clean if s], out_dir, eval_cfg.heatmaps, tracker, tag)
    if tracker is not None:
        values = {f"{tag}/bleu": score.bleu, f"{tag}/chrf": score.chrf}
        values.update({f"{tag}/bleu_len_{b.label}": b.bleu for b in buckets if b.bleu is not None})
        tracker.scalars(values, step)
        tracker.image_file(f"{tag}/bleu_by_length", out_dir / "bleu_by_length.png", step)
    log.info("%s/%s (%s): BLEU %.2f, chrF %.2f -> %s", corpus, split, search_label(search), score.bleu,
             score.chrf, out_dir)
    return report, out_dir


def eval_dir_name(split: str, search: SearchConfig) -> str:
    """``<split>`` for greedy decoding, ``<split>-<search>`` otherwise (``test-beam5``)."""
    label = search_label(search)
    return split if label == "greedy" else f"{split}-{label}"
