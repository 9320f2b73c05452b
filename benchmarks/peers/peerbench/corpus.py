"""Identical input for every toolkit, made by our own pipeline.

Our config is composed with the benchmark's data overrides (one joint SentencePiece BPE model of
8,000 pieces, cached in the work folder), our ``prepare_data`` cleans and tokenizes the corpus, and
the token ids it produces are written out as space-separated pieces. The peers train and decode on
those files, so all three toolkits see exactly the same token sequences; their outputs are turned
back into text with the same SentencePiece model and scored against the same raw references.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from peerbench.toolkit import CorpusFiles, Workspace

# The benchmark's data settings, ahead of any --ours-override (later overrides win).
DATA_OVERRIDES = ("tokenizer=bpe", "tokenizer.vocab_size=8000")


def data_overrides(data_root: Path, cache: Path) -> list[str]:
    return [*DATA_OVERRIDES, f"data.root={data_root}", f"data.cache_dir={cache}"]


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _pieces(processor: spm.SentencePieceProcessor, rows: Sequence[Sequence[int]]) -> list[str]:
    return [" ".join(processor.id_to_piece(list(ids))) if ids else "" for ids in rows]


def _length_stats(src_rows: Sequence[Sequence[int]], tgt_rows: Sequence[Sequence[int]]) -> dict:
    """Lengths as our model sees them: +1 for EOS on the source, +1 for EOS on the target."""
    src = [len(s) + 1 for s in src_rows]
    tgt = [len(t) + 1 for t in tgt_rows]
    return {
        "sentences": len(src),
        "src_tokens": sum(src),
        "tgt_tokens": sum(tgt),
        "src_per_tgt_token": sum(src) / sum(tgt),
        # attention work per target token scales with the length of *its* source sentence
        "src_len_per_tgt_token": sum(s * t for s, t in zip(src, tgt)) / sum(tgt),
        "tgt_len_mean": sum(tgt) / len(tgt),
    }


def prepare_corpus(work: Workspace, data_root: Path, overrides: list[str], limit: int | None) -> CorpusFiles:
    """Prepare with our pipeline and write the segmented files; raises ``Seq2SeqError``."""
    from omegaconf import OmegaConf

    from seq2seq.cli import compose_checked
    from seq2seq.core.config import register_configs
    from seq2seq.data.prepare import prepare_data
    from seq2seq.data.tokenizer import SPECIAL_IDS
    from seq2seq.pipeline import raw_texts

    register_configs()
    cfg = OmegaConf.to_object(compose_checked("train", [*data_overrides(data_root, work.cache), *overrides]))
    data = prepare_data(cfg.data, cfg.tokenizer)
    tok = data.tokenizer
    if not tok.joint:
        raise ValueError("the peer benchmark needs one joint SentencePiece model (tokenizer.joint=true)")
    out = work.corpus
    src, tgt = cfg.data.src_lang, cfg.data.tgt_lang
    test_split = data.test_splits[0]
    splits = {"train": data.train, "valid": data.valid, "test": data.splits[test_split]}
    for name, ds in splits.items():
        ids = ds.select_columns(["src_ids", "tgt_ids"])[:]
        if name == "test" and limit is not None:
            ids = {k: v[:limit] for k, v in ids.items()}
        _write_lines(out / f"{name}.{src}", _pieces(tok.src, ids["src_ids"]))
        _write_lines(out / f"{name}.{tgt}", _pieces(tok.tgt, ids["tgt_ids"]))
    refs = raw_texts(splits["test"])[1]
    _write_lines(out / "test.ref", refs[:limit] if limit is not None else refs)
    _write_lines(out / "vocab.txt", [tok.src.id_to_piece(i) for i in range(tok.src_vocab_size)
                                     if i not in SPECIAL_IDS])
    (out / "spm.model").write_bytes(tok.src_proto)
    train_ids = data.train.select_columns(["src_ids", "tgt_ids"])[:]
    stats = {
        "corpus": cfg.data.corpus, "src_lang": src, "tgt_lang": tgt, "test_split": test_split,
        "test_sentences": len(refs) if limit is None else min(limit, len(refs)),
        "vocab_size": tok.src_vocab_size, "tokenizer": f"{cfg.tokenizer.model_type.value} (joint)",
        "train": _length_stats(train_ids["src_ids"], train_ids["tgt_ids"]),
    }
    (out / "manifest.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return CorpusFiles(src_lang=src, tgt_lang=tgt, train=out / "train", valid=out / "valid", test=out / "test",
                       refs=out / "test.ref", vocab=out / "vocab.txt", spm_model=out / "spm.model", stats=stats)


def desegment(spm_model: Path, lines: Sequence[str]) -> list[str]:
    """Pieces back to text with the same SentencePiece model (``▁`` to spaces, byte pieces to
    characters), exactly as our own detokenizer does it."""
    processor = spm.SentencePieceProcessor(model_file=str(spm_model))
    return [processor.decode_pieces(line.split()) if line.strip() else "" for line in lines]
