"""SentencePiece subword models: training, content-keyed caching, and the special-token ids.

The ids of the special tokens are defined here and nowhere else. Models are trained with the
``identity`` normaliser because the corpus is already normalised (``corpus.normalize``): that way
decoding the ids of a cleaned sentence gives back exactly that sentence.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm

from seq2seq.core.config import TokenizerConfig
from seq2seq.core.errors import ConfigError, DataError
from seq2seq.core.files import write_bytes_atomic
from seq2seq.data import cache

log = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


class Tokenizer:
    """Source and target SentencePiece processors (the same one when the model is joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None) -> None:
        self.src_proto = src_proto
        self.tgt_proto = tgt_proto
        self.src = spm.SentencePieceProcessor(model_proto=src_proto)
        self.tgt = self.src if tgt_proto is None else spm.SentencePieceProcessor(model_proto=tgt_proto)
        for proc in {id(self.src): self.src, id(self.tgt): self.tgt}.values():
            ids = (proc.pad_id(), proc.unk_id(), proc.bos_id(), proc.eos_id())
            if ids != SPECIAL_IDS:
                raise ConfigError(f"SentencePiece model has special ids {ids}, expected {SPECIAL_IDS}")

    @property
    def joint(self) -> bool:
        return self.tgt_proto is None

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, lines: Sequence[str]) -> list[list[int]]:
        return self.src.encode(list(lines))

    def encode_tgt(self, lines: Sequence[str]) -> list[list[int]]:
        return self.tgt.encode(list(lines))

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.tgt.decode(list(seq)) for seq in ids]

    def src_pieces(self, line: str) -> list[str]:
        return self.src.encode(line, out_type=str)

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]

    def digest(self) -> str:
        """Identifies the models, so a checkpoint can be matched with its tokenizer."""
        h = hashlib.sha256(self.src_proto)
        if self.tgt_proto is not None:
            h.update(self.tgt_proto)
        return h.hexdigest()[:16]


def _train_model(lines: Iterable[str], cfg: TokenizerConfig, what: str) -> bytes:
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type=cfg.model_type.value,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            normalization_rule_name="identity",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=max(1, min(8, os.cpu_count() or 1)),
            minloglevel=2,
        )
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        too_high = re.search(r"<= (\d+)", msg)
        too_low = re.search(r"(\d+) vs (\d+)", msg)  # "smaller than required_chars. 300 vs 317"
        if too_high:
            hint = f"set tokenizer.vocab_size to at most {too_high.group(1)}"
        elif too_low:
            hint = f"set tokenizer.vocab_size to more than {too_low.group(2)}"
        else:
            hint = "choose another tokenizer.vocab_size"
        raise ConfigError(
            f"tokenizer.vocab_size={cfg.vocab_size} does not fit the {what} training text "
            f"(SentencePiece: {msg}); {hint}"
        ) from None
    return buf.getvalue()


def tokenizer_key(cfg: TokenizerConfig, train_fingerprint: str, src_lang: str, tgt_lang: str) -> str:
    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()}
    blob = json.dumps({"settings": settings, "train": train_fingerprint, "langs": [src_lang, tgt_lang],
                       "spm": spm.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tokenizer(
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    cfg: TokenizerConfig,
    cache_dir: Path,
    key: str,
) -> Tokenizer:
    """Load the SentencePiece model(s) cached under ``key`` or train and cache them.

    ``key`` must identify the training text and the settings (see ``tokenizer_key``), so a
    changed corpus never reuses a stale model.
    """
    folder = cache_dir / "spm" / key
    names = ["joint"] if cfg.joint else ["src", "tgt"]
    paths = [folder / f"{n}.model" for n in names]
    if all(cache.verified(p) for p in paths):
        try:
            tokenizer = Tokenizer(*[p.read_bytes() for p in paths])
        except (RuntimeError, OSError, ConfigError) as err:  # verified, yet unreadable here
            log.warning("cached SentencePiece model(s) in %s are unreadable (%s); retraining", folder, err)
        else:
            log.info("reusing SentencePiece model(s) in %s", folder)
            return tokenizer
    for path in paths:
        cache.remove(path)
    log.info("training SentencePiece (%s, %d pieces, %s)", cfg.model_type.value, cfg.vocab_size,
             "joint" if cfg.joint else "separate")
    if cfg.joint:
        protos = [_train_model([*src_lines, *tgt_lines], cfg, "joint source+target")]
    else:
        protos = [_train_model(src_lines, cfg, "source"), _train_model(tgt_lines, cfg, "target")]
    try:
        for path, proto in zip(paths, protos):
            write_bytes_atomic(path, proto)
            cache.write_manifest(path)
    except OSError as err:
        raise DataError(f"cannot write the SentencePiece model to {folder} ({err.strerror}); point "
                        "data.cache_dir (or SEQ2SEQ_CACHE) at a writable folder") from None
    return Tokenizer(protos[0], protos[1] if len(protos) > 1 else None)
