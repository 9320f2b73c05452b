"""SentencePiece models: special ids, lossless round trips, content-keyed caching of the models and
of the tokenized splits, and one-line errors that leave the cache as it was."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

import seq2seq.data.tokenizer as tokenizer_module
from seq2seq.core.config import SpmModelType, TokenizerConfig
from seq2seq.core.errors import ConfigError
from seq2seq.data.cleaning import normalize
from seq2seq.data.prepare import prepare_data
from seq2seq.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_IDS,
    UNK_ID,
    Tokenizer,
    build_tokenizer,
    tokenizer_key,
)

TOK = TokenizerConfig(vocab_size=350)  # what the toy corpus supports (it needs >= 317, has <= 380)

# Sentences with characters the toy training text never shows: byte fallback must carry them.
RARE = [
    "Zoë und Chloé trinken Crème brûlée im Café.",
    "Ångström, Łódź, Øresund, Œuvre, naïve façade.",
    "漢字 und かな sind selten 🙂 — ǅ ﬁ ½ € ™.",
    "Tab\tund   viele    Leerzeichen,  Ma\u0308dchen (NFD).",
    "\x84Zitat\x93 mit C1-Zeichen\x85",
]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content hash and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def toy_text(make_parallel) -> tuple[list[str], list[str]]:
    return make_parallel(120)


@pytest.fixture(scope="module")
def joint(tmp_path_factory, toy_text) -> Tokenizer:
    de, en = toy_text
    return build_tokenizer(de, en, TOK, tmp_path_factory.mktemp("spm"), "joint")


# ----------------------------------------------------------------------------- the model


def test_special_ids(joint: Tokenizer):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == SPECIAL_IDS == (0, 1, 2, 3)
    for proc in (joint.src, joint.tgt):
        assert (proc.pad_id(), proc.unk_id(), proc.bos_id(), proc.eos_id()) == (0, 1, 2, 3)
        assert [proc.id_to_piece(i) for i in SPECIAL_IDS] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert joint.joint and joint.src_vocab_size == joint.tgt_vocab_size == TOK.vocab_size


def test_encoding_adds_no_special_tokens(joint: Tokenizer, toy_text):
    de, en = toy_text
    for ids in joint.encode_src(de) + joint.encode_tgt(en):
        assert ids and not set(ids) & {PAD_ID, BOS_ID, EOS_ID}


@pytest.mark.parametrize("model_type", list(SpmModelType))
def test_round_trip_is_lossless(tmp_path: Path, toy_text, model_type: SpmModelType):
    de, en = toy_text
    tok = build_tokenizer(de, en, replace(TOK, model_type=model_type), tmp_path, "k")
    lines = [normalize(s)[0] for s in [*de, *en, *RARE]]
    for line, ids in zip(lines, tok.encode_src(lines)):
        assert UNK_ID not in ids, line  # unseen characters become bytes, not <unk>
        assert tok.src.decode(ids) == line
    for line, text in zip(lines, tok.decode_tgt(tok.encode_tgt(lines))):
        assert text == line


def test_rare_characters_use_byte_pieces(joint: Tokenizer):
    pieces = joint.src_pieces(normalize(RARE[2])[0])
    assert any(p.startswith("<0x") and p.endswith(">") for p in pieces)


def test_separate_models(tmp_path: Path, toy_text):
    de, en = toy_text
    cfg = replace(TOK, joint=False, vocab_size=320)
    tok = build_tokenizer(de, en, cfg, tmp_path, "sep")
    assert not tok.joint
    assert sorted(p.name for p in (tmp_path / "spm" / "sep").glob("*.model")) == ["src.model", "tgt.model"]
    assert tok.src_proto != tok.tgt_proto
    for proc in (tok.src, tok.tgt):
        assert (proc.pad_id(), proc.unk_id(), proc.bos_id(), proc.eos_id()) == SPECIAL_IDS
    assert tok.decode_tgt(tok.encode_tgt(en[:5])) == en[:5]
    assert tok.digest() != build_tokenizer(de, en, TOK, tmp_path, "joint").digest()


def test_vocab_size_too_large(tmp_path: Path, toy_text):
    de, en = toy_text
    with pytest.raises(ConfigError) as err:
        build_tokenizer(de, en, replace(TOK, vocab_size=5000), tmp_path, "big")
    message = str(err.value)
    assert "\n" not in message
    assert "tokenizer.vocab_size=5000" in message
    assert "at most 380" in message  # SentencePiece's limit, passed on as the fix
    assert not (tmp_path / "spm" / "big").exists() or not any((tmp_path / "spm" / "big").iterdir())


def test_vocab_size_too_small(tmp_path: Path, toy_text):
    de, en = toy_text
    with pytest.raises(ConfigError) as err:
        build_tokenizer(de, en, replace(TOK, vocab_size=100), tmp_path, "small")
    assert "\n" not in str(err.value) and "tokenizer.vocab_size=100" in str(err.value)


# ----------------------------------------------------------------------------- model cache


def test_model_cache_is_reused(tmp_path: Path, toy_text, monkeypatch):
    de, en = toy_text
    first = build_tokenizer(de, en, TOK, tmp_path, "key1")
    model = tmp_path / "spm" / "key1" / "joint.model"
    before = snapshot(tmp_path)
    assert list(before) == ["spm/key1/joint.model", "spm/key1/joint.model.manifest.json"]

    def no_training(*args, **kwargs):
        raise AssertionError("SentencePiece was retrained although the model is cached")

    monkeypatch.setattr(tokenizer_module, "_train_model", no_training)
    second = build_tokenizer(de, en, TOK, tmp_path, "key1")
    assert second.digest() == first.digest()
    assert snapshot(tmp_path) == before
    assert model.read_bytes() == first.src_proto
    with pytest.raises(AssertionError, match="retrained"):  # another key does train
        build_tokenizer(de, en, TOK, tmp_path, "key2")


def test_tokenizer_key():
    key = tokenizer_key(TOK, "abc", "de", "en")
    assert key == tokenizer_key(replace(TOK), "abc", "de", "en")
    assert len({
        key,
        tokenizer_key(TOK, "abd", "de", "en"),  # other training text
        tokenizer_key(TOK, "abc", "en", "de"),  # other direction
        tokenizer_key(replace(TOK, vocab_size=351), "abc", "de", "en"),
        tokenizer_key(replace(TOK, model_type=SpmModelType.bpe), "abc", "de", "en"),
        tokenizer_key(replace(TOK, joint=False), "abc", "de", "en"),
    }) == 6


# ----------------------------------------------------------------------------- prepare_data


def test_prepare_data(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path):
    corpus_writer(toy_splits)
    prepared = prepare_data(make_data_cfg(), TOK)
    assert list(prepared.splits) == ["train", "valid", "test"]
    assert prepared.train_split == "train" and prepared.valid_split == "valid"
    assert prepared.test_splits == ["test"]
    for split, ds in prepared.splits.items():
        assert {"src", "tgt", "line", "raw_src", "ref", "src_ids", "tgt_ids"} <= set(ds.column_names)
        assert list(ds["src_ids"]) == prepared.tokenizer.encode_src(list(ds["src"]))
        assert list(ds["tgt_ids"]) == prepared.tokenizer.encode_tgt(list(ds["tgt"]))
        assert list(ds["ref"]) == toy_splits[split]["en"]
    assert len(prepared.train) == 120 and len(prepared.valid) == 10
    models = list((tmp_path / "cache" / "spm").glob("*/joint.model"))
    assert len(models) == 1


def test_prepare_data_reuses_tokenized_splits(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path,
                                              monkeypatch):
    corpus_writer(toy_splits)
    cfg = make_data_cfg()
    first = prepare_data(cfg, TOK)
    tokenized = tmp_path / "cache" / "tokenized"
    before = snapshot(tmp_path / "cache")

    def no_encoding(self, lines):
        raise AssertionError("tokenized again although the splits are cached")

    monkeypatch.setattr(Tokenizer, "encode_src", no_encoding)
    monkeypatch.setattr(tokenizer_module, "_train_model", no_encoding)
    second = prepare_data(cfg, TOK)
    for split, ds in second.splits.items():
        assert ds.cache_files, split
        for f in ds.cache_files:
            assert Path(f["filename"]).parent == tokenized
        assert ds.to_dict() == first.splits[split].to_dict()
    assert snapshot(tmp_path / "cache") == before


def test_changed_corpus_gets_new_cache_entries(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path,
                                               make_parallel):
    directory = corpus_writer(toy_splits)
    cfg = make_data_cfg()
    first = prepare_data(cfg, TOK)
    spm = tmp_path / "cache" / "spm"
    assert len(list(spm.iterdir())) == 1
    # same file name, different contents: a content-keyed cache must not reuse the old model
    de, en = make_parallel(120, 1)
    (directory / "train.de").write_text("".join(f"{x}\n" for x in de), encoding="utf-8")
    (directory / "train.en").write_text("".join(f"{x}\n" for x in en), encoding="utf-8")
    second = prepare_data(cfg, TOK)
    assert len(list(spm.iterdir())) == 2
    assert list(second.train["src"]) == de
    assert second.tokenizer.digest() != first.tokenizer.digest()
    assert {f["filename"] for f in second.valid.cache_files}.isdisjoint(
        f["filename"] for f in first.valid.cache_files)
    # back to the original text: the first model is found again, nothing new is trained
    corpus_writer(toy_splits)
    third = prepare_data(cfg, TOK)
    assert len(list(spm.iterdir())) == 2
    assert third.tokenizer.digest() == first.tokenizer.digest()


def test_changed_evaluation_file_is_not_served_stale(corpus_writer, make_data_cfg, toy_splits):
    """A reference edited only in ways cleaning removes must still come back as it is now."""
    directory = corpus_writer(toy_splits)
    cfg = make_data_cfg()
    prepare_data(cfg, TOK)
    refs = [f"  {x}  " for x in toy_splits["test"]["en"]]  # cleans to the same text
    (directory / "test.en").write_text("".join(f"{x}\n" for x in refs), encoding="utf-8")
    again = prepare_data(cfg, TOK)
    assert list(again.splits["test"]["ref"]) == refs
    assert list(again.splits["test"]["tgt"]) == toy_splits["test"]["en"]


def test_failing_run_leaves_cache_untouched(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path):
    corpus_writer(toy_splits)
    cfg = make_data_cfg()
    prepare_data(cfg, TOK)
    cache = tmp_path / "cache"
    before = snapshot(cache)
    assert any(k.startswith("spm/") for k in before) and any(k.startswith("tokenized/") for k in before)
    with pytest.raises(ConfigError) as err:
        prepare_data(cfg, replace(TOK, vocab_size=5000))
    assert "tokenizer.vocab_size" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(cache) == before
    assert not [p for p in cache.rglob(".*")]  # no temporary files left behind


def test_unwritable_cache_dir(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path):
    corpus_writer(toy_splits)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    from seq2seq.core.errors import DataError

    with pytest.raises(DataError) as err:
        prepare_data(make_data_cfg(cache_dir=str(blocker / "cache")), TOK)
    assert "data.cache_dir" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- damaged caches


def _split_file(prepared, split: str) -> Path:
    (entry,) = prepared.splits[split].cache_files
    return Path(entry["filename"])


def _replace_file(path: Path, data: bytes) -> None:
    """New content under ``path`` as a new file (datasets in this process still maps the old one:
    overwriting it in place would pull the pages from under that mapping)."""
    tmp = path.with_name(path.name + ".damaged")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cut_to_first_batch(path: Path) -> None:
    """Keep the Arrow stream's first record batch only: a file that still reads as a valid table."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_stream(source)
        first = reader.read_next_batch()
        schema = reader.schema
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(first.slice(0, min(first.num_rows, 7)))
    _replace_file(path, sink.getvalue().to_pybytes())


@pytest.mark.parametrize("damage", ["swapped-for-valid", "cut-at-a-batch", "manifest-gone"])
def test_a_damaged_tokenized_split_is_rebuilt_with_a_warning(corpus_writer, make_data_cfg, toy_splits, damage,
                                                             caplog):
    corpus_writer(toy_splits)
    cfg = make_data_cfg()
    first = prepare_data(cfg, TOK)
    expected = first.train.to_dict()
    train = _split_file(first, "train")
    if damage == "swapped-for-valid":
        _replace_file(train, _split_file(first, "valid").read_bytes())
    elif damage == "cut-at-a-batch":
        _cut_to_first_batch(train)
    else:
        train.with_name(train.name + ".manifest.json").unlink()
    second = prepare_data(cfg, TOK)
    assert len(second.train) == 120
    assert second.train.to_dict() == expected
    assert any("rebuilding" in r.getMessage() and str(train) in r.getMessage() for r in caplog.records)
    # and the rebuilt entry verifies: a third run reads it without a word
    caplog.clear()
    assert prepare_data(cfg, TOK).train.to_dict() == expected
    assert not any("rebuilding" in r.getMessage() for r in caplog.records)


def test_a_corrupt_sentencepiece_model_is_retrained(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path,
                                                    caplog):
    corpus_writer(toy_splits)
    cfg = make_data_cfg()
    first = prepare_data(cfg, TOK)
    (model,) = (tmp_path / "cache" / "spm").glob("*/joint.model")
    _replace_file(model, b"\x00garbage" * 100)
    second = prepare_data(cfg, TOK)
    assert second.tokenizer.digest() == first.tokenizer.digest()
    assert any("rebuilding" in r.getMessage() for r in caplog.records)


def test_a_cache_folder_that_cannot_be_made_is_named(corpus_writer, make_data_cfg, toy_splits, tmp_path: Path):
    from seq2seq.core.errors import DataError

    corpus_writer(toy_splits)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match="a-file/cache.*not writable.*data.cache_dir"):
        prepare_data(make_data_cfg(cache_dir=str(tmp_path / "a-file" / "cache")), TOK)
