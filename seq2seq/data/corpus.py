"""Parallel corpora: load through ``datasets`` from local files, the hub, or the synthetic generator.

Every source ends in the same ``datasets.DatasetDict`` with columns ``src``, ``tgt`` (raw text) and
``line`` (1-based line number in the original files), keyed by the corpus' own split names, so the
rest of the pipeline never knows where the text came from (``cleaning.py`` takes it from there).
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

from datasets import Dataset, DatasetDict

from seq2seq.core.config import CorpusSource, DataConfig
from seq2seq.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def needed_splits(cfg: DataConfig) -> list[str]:
    """Train, valid and test splits in that order, without duplicates."""
    return list(dict.fromkeys([cfg.train_split, cfg.valid_split, *cfg.test_splits]))


def corpus_dir(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() / (cfg.dir or cfg.corpus)


def check_languages(cfg: DataConfig) -> None:
    if cfg.src_lang == cfg.tgt_lang:
        raise ConfigError(
            f"data.src_lang and data.tgt_lang are both '{cfg.src_lang}'; pick two languages"
        )
    if cfg.languages:
        for key, lang in (("data.src_lang", cfg.src_lang), ("data.tgt_lang", cfg.tgt_lang)):
            if lang not in cfg.languages:
                raise ConfigError(
                    f"{key}='{lang}' is not a language of corpus '{cfg.corpus}'; "
                    f"choose one of: {', '.join(cfg.languages)}"
                )


def load_corpus(cfg: DataConfig) -> DatasetDict:
    """Load the raw splits the config names, from wherever ``data.source`` says."""
    check_languages(cfg)
    if cfg.source == CorpusSource.synthetic:
        return _load_synthetic(cfg)
    local = corpus_dir(cfg)
    if cfg.source == CorpusSource.local or (cfg.source == CorpusSource.auto and local.is_dir()):
        return _load_local(cfg, local)
    if cfg.source == CorpusSource.auto and not cfg.hub_id:
        raise DataError(
            f"corpus '{cfg.corpus}' not found: no directory {local}; put the files there "
            f"(<split>.<lang>[.gz]) or point data.root (or SEQ2SEQ_DATA) at the folder that holds "
            f"'{local.name}/'"
        )
    return _load_hub(cfg, local)


# ----------------------------------------------------------------------------- local files


def split_file(directory: Path, split: str, lang: str) -> Path | None:
    """``<split>.<lang>``, else ``<split>.<lang>.gz``. A plain file wins over a .gz beside it; when
    the two hold different text, that is said (an unpacked copy edited or left over, say)."""
    plain, packed = directory / f"{split}.{lang}", directory / f"{split}.{lang}.gz"
    for path in (plain, packed):
        if path.is_dir():
            raise DataError(f"{path} is a directory, where the corpus file of split '{split}' ({lang}) "
                            "should be; move it away or put the file there")
    if plain.is_file():
        if packed.is_file() and _differ(plain, packed):
            log.warning("%s is used, and %s beside it holds different text; remove the one you do not mean",
                        plain, packed)
        return plain
    return packed if packed.is_file() else None


def _differ(plain: Path, packed: Path) -> bool:
    try:
        return plain.read_bytes() != gzip.decompress(packed.read_bytes())
    except (OSError, EOFError, zlib.error):
        return True


def _available_splits(directory: Path) -> list[str]:
    names = set()
    for p in directory.iterdir():
        stem = p.name[:-3] if p.name.endswith(".gz") else p.name
        split, _, lang = stem.rpartition(".")
        if split and lang.isalpha() and len(lang) <= 3:  # <split>.<lang>, not README.md
            names.add(split)
    return sorted(names)


def read_lines(path: Path) -> list[str]:
    """Read a UTF-8 text file (optionally gzipped) as lines.

    Only ``\\n`` separates lines: WMT files hold U+0085 (NEL) inside sentences, which
    ``str.splitlines`` would treat as a line break and so misalign the two sides. A trailing
    ``\\r`` (CRLF files) and a leading BOM are dropped.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err}); check or re-download the file") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); "
            "convert the file to UTF-8, e.g. with iconv"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _load_local(cfg: DataConfig, directory: Path) -> DatasetDict:
    if not directory.is_dir():
        raise DataError(
            f"corpus directory {directory} does not exist; set data.root (or SEQ2SEQ_DATA) to the "
            f"folder that holds '{directory.name}/'"
        )
    splits = {}
    for split in needed_splits(cfg):
        sides = {}
        for lang in (cfg.src_lang, cfg.tgt_lang):
            path = split_file(directory, split, lang)
            if path is None:
                raise DataError(
                    f"{directory}/{split}.{lang}[.gz] not found; splits present: "
                    f"{', '.join(_available_splits(directory)) or 'none'}; use one of them (data.train_split, "
                    f"data.valid_split, data.test_splits, or split= when evaluating) or fix the languages"
                )
            sides[lang] = (path, read_lines(path))
        (src_path, src), (tgt_path, tgt) = sides[cfg.src_lang], sides[cfg.tgt_lang]
        if len(src) != len(tgt):
            raise DataError(
                f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                "the two sides of a split must be line-aligned"
            )
        if not src:
            raise DataError(f"{src_path}: split '{split}' is empty; it needs at least one line")
        splits[split] = _to_dataset(src, tgt)
    log.info("loaded corpus '%s' from %s", cfg.corpus, directory)
    return DatasetDict(splits)


# Gold word alignments (Pharaoh "i-j" per line), in the evaluation splits of corpora that have them.
ALIGN_COLUMN = "align"


def _to_dataset(src: list[str], tgt: list[str]) -> Dataset:
    return Dataset.from_dict({"src": src, "tgt": tgt, "line": list(range(1, len(src) + 1))})


# ----------------------------------------------------------------------------- hub and synthetic


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _load_hub(cfg: DataConfig, local: Path) -> DatasetDict:
    fix = (
        f"put the files in {local}/ (<split>.<lang>[.gz]) or point data.root "
        f"(or SEQ2SEQ_DATA) at the folder that holds '{local.name}/'"
    )
    if not cfg.hub_id:
        raise DataError(f"data.source=hub but corpus '{cfg.corpus}' has no data.hub_id; {fix}")
    if _hub_offline():
        raise DataError(
            f"corpus '{cfg.corpus}' not found: no directory {local}, and the hub is disabled "
            f"(HF_HUB_OFFLINE); {fix}"
        )
    from datasets import load_dataset

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its per-retry warnings would bury our one-line message
    try:
        hub = load_dataset(cfg.hub_id, cfg.hub_config)
    except Exception as err:  # the hub raises many types: network, auth, missing repo
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DataError(
            f"corpus '{cfg.corpus}' not found: no directory {local}, and hub dataset "
            f"'{cfg.hub_id}' could not be loaded ({reason}); {fix}"
        ) from None
    finally:
        hub_log.setLevel(level)
    splits = {}
    for split in needed_splits(cfg):
        hub_split = cfg.hub_splits.get(split, split)
        if hub_split not in hub:
            raise DataError(
                f"hub dataset '{cfg.hub_id}' has no split '{hub_split}' (has: "
                f"{', '.join(hub)}); map it with data.hub_splits"
            )
        ds = hub[hub_split]
        if "translation" in ds.column_names:  # WMT-style: one dict column per pair
            pairs = ds["translation"]
            src = [p[cfg.src_lang] for p in pairs]
            tgt = [p[cfg.tgt_lang] for p in pairs]
        elif cfg.src_lang in ds.column_names and cfg.tgt_lang in ds.column_names:
            src, tgt = list(ds[cfg.src_lang]), list(ds[cfg.tgt_lang])
        else:
            raise DataError(
                f"hub dataset '{cfg.hub_id}' split '{hub_split}' has columns "
                f"{ds.column_names}, not '{cfg.src_lang}'/'{cfg.tgt_lang}' or 'translation'"
            )
        if not src:
            raise DataError(f"hub dataset '{cfg.hub_id}' split '{hub_split}' is empty")
        splits[split] = _to_dataset(src, tgt)
    log.info("loaded corpus '%s' from the hub (%s)", cfg.corpus, cfg.hub_id)
    return DatasetDict(splits)


def _load_synthetic(cfg: DataConfig) -> DatasetDict:
    from seq2seq.data.synthetic import SPLITS, build_lexicon, generate_synthetic, gold_alignments

    for split in needed_splits(cfg):
        if split not in SPLITS:
            raise ConfigError(
                f"the synthetic corpus has no split '{split}'; use {', '.join(SPLITS)} in "
                "data.train_split, data.valid_split and data.test_splits"
            )
    if {cfg.src_lang, cfg.tgt_lang} != {"src", "tgt"}:
        raise ConfigError("the synthetic corpus has languages 'src' and 'tgt' only")
    generated = generate_synthetic(cfg.synthetic)
    lexicon = build_lexicon(cfg.synthetic)
    reverse = cfg.src_lang == "tgt"
    splits = {}
    for split in needed_splits(cfg):
        src, tgt = generated[split]
        dataset = _to_dataset(tgt, src) if reverse else _to_dataset(src, tgt)
        if split != cfg.train_split:  # the generator knows each pair's word alignment: evaluation scores AER
            dataset = dataset.add_column(ALIGN_COLUMN, gold_alignments(src, lexicon, flip=reverse))
        splits[split] = dataset
    return DatasetDict(splits)
