"""From a data + tokenizer config to tokenized splits: load, clean, SentencePiece, tokenize.

Tokenized splits are cached as Arrow files under a name keyed by the cleaned text and the
tokenizer model, so a second run with the same inputs skips tokenization and a changed file never
reuses stale ids; each cached file verifies itself before it is used (``seq2seq/data/cache.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_progress_bars

from seq2seq.core.config import DataConfig, TokenizerConfig
from seq2seq.core.errors import DataError
from seq2seq.core.files import make_writable_dir
from seq2seq.data import cache
from seq2seq.data.batching import TokenIds
from seq2seq.data.cleaning import clean_corpus, fingerprint
from seq2seq.data.corpus import load_corpus
from seq2seq.data.tokenizer import Tokenizer, build_tokenizer, tokenizer_key

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    # split -> Dataset with columns src, tgt (cleaned text), line, src_ids, tgt_ids
    splits: DatasetDict
    train_split: str
    valid_split: str
    test_splits: list[str]

    @property
    def train(self) -> Dataset:
        return self.splits[self.train_split]

    @property
    def valid(self) -> Dataset:
        return self.splits[self.valid_split]


def token_ids(ds: Dataset, column: str) -> TokenIds:
    """A token-id column as flat arrays (read through Arrow, no Python list per sentence)."""
    array = ds.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()
    offsets = array.offsets.to_numpy()
    return TokenIds(array.flatten().to_numpy(), offsets - offsets[0])


def _tokenize(ds: Dataset, tokenizer: Tokenizer, cache_file: Path) -> Dataset:
    """``ds`` with its token ids, from the cache when the cached file verifies (seq2seq/data/cache.py):
    the right number of rows, the bytes its manifest recorded."""

    def encode(batch: dict) -> dict:
        return {"src_ids": tokenizer.encode_src(batch["src"]), "tgt_ids": tokenizer.encode_tgt(batch["tgt"])}

    if cache.verified(cache_file, rows=len(ds)):
        try:
            return Dataset.from_file(str(cache_file))
        except Exception as err:  # verified, yet unreadable (another datasets version): rebuild
            log.warning("tokenized cache %s is unreadable (%s); rebuilding it", cache_file, err)
    cache.remove(cache_file)
    _writable_dir(cache_file.parent)
    out = ds.map(encode, batched=True, batch_size=2000, cache_file_name=str(cache_file),
                 load_from_cache_file=False, new_fingerprint=cache_file.stem)
    cache.write_manifest(cache_file, rows=len(out))
    return out


def _writable_dir(folder: Path) -> None:
    """``folder`` exists and takes new files, or a one-line error naming it."""
    try:
        make_writable_dir(folder)
    except OSError as err:
        raise DataError(f"the cache folder {folder} is not writable ({err.strerror}); point data.cache_dir "
                        "(or SEQ2SEQ_CACHE) at a writable folder") from None


def prepare_data(data: DataConfig, tok: TokenizerConfig) -> PreparedData:
    """Load, clean, tokenize. Raises ``DataError``/``ConfigError`` with one-line messages."""
    disable_progress_bars()
    cleaned = clean_corpus(load_corpus(data), data)
    train = cleaned[data.train_split]
    key = tokenizer_key(tok, fingerprint(train), data.src_lang, data.tgt_lang)
    cache_dir = Path(data.cache_dir).expanduser()
    _writable_dir(cache_dir)
    tokenizer = build_tokenizer(train["src"], train["tgt"], tok, cache_dir, key)
    tokenized = {}
    for split, ds in cleaned.items():
        split_key = f"{key}-{tokenizer.digest()}-{fingerprint(ds, tuple(ds.column_names))[:16]}"
        tokenized[split] = _tokenize(ds, tokenizer, cache_dir / "tokenized" / f"{split_key}.arrow")
    return PreparedData(
        tokenizer=tokenizer,
        splits=DatasetDict(tokenized),
        train_split=data.train_split,
        valid_split=data.valid_split,
        test_splits=list(data.test_splits),
    )
