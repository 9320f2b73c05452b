"""Corpus loading and cleaning: local files (plain and gzipped), the real Multi30k, the synthetic
corpus, and every kind of bad input the loader must reject with a one-line message."""

from __future__ import annotations

import gzip
import unicodedata
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from seq2seq.core.errors import ConfigError, DataError, Seq2SeqError
from seq2seq.data.cleaning import clean_corpus, clean_split, normalize
from seq2seq.data.corpus import load_corpus, read_lines


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def pairs(ds: Dataset) -> list[tuple[str, str]]:
    return list(zip(ds["src"], ds["tgt"]))


# ----------------------------------------------------------------------------- local files


@pytest.mark.parametrize("gz", [False, True])
def test_load_local(corpus_writer, make_data_cfg, toy_splits, gz: bool):
    directory = corpus_writer(toy_splits, gz=gz)
    assert all(p.name.endswith(".gz") == gz for p in directory.iterdir())
    raw = load_corpus(make_data_cfg())
    assert isinstance(raw, DatasetDict)
    assert list(raw) == ["train", "valid", "test"]
    for split, sides in toy_splits.items():
        ds = raw[split]
        assert ds.column_names == ["src", "tgt", "line"]
        assert ds["src"] == sides["de"]
        assert ds["tgt"] == sides["en"]
        assert ds["line"] == list(range(1, len(sides["de"]) + 1))


def test_direction_switch_swaps_columns(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer(toy_splits)
    forward = load_corpus(make_data_cfg())
    backward = load_corpus(make_data_cfg(src_lang="en", tgt_lang="de"))
    for split in toy_splits:
        assert backward[split]["src"] == forward[split]["tgt"]
        assert backward[split]["tgt"] == forward[split]["src"]


def test_dir_differs_from_corpus_name(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer(toy_splits, name="toy-files")
    raw = load_corpus(make_data_cfg(dir="toy-files"))
    assert raw["train"]["src"] == toy_splits["train"]["de"]


def test_several_test_splits_and_shared_split_names(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer({**toy_splits, "test2": toy_splits["valid"]})
    raw = load_corpus(make_data_cfg(test_splits=["test", "test2", "valid"]))
    assert list(raw) == ["train", "valid", "test", "test2"]  # each split once, in order
    assert raw["test2"]["src"] == toy_splits["valid"]["de"]


def test_third_language_file_is_ignored(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer({s: {**sides, "fr": ["x"]} for s, sides in toy_splits.items()})  # misaligned fr
    raw = load_corpus(make_data_cfg(languages=["de", "en", "fr"]))
    assert len(raw["train"]) == len(toy_splits["train"]["de"])


def test_crlf_and_bom_are_ordinary_input(corpus_writer, make_data_cfg):
    de = "\ufeffErste Zeile\r\nZweite Zeile\r\n".encode()
    en = b"First line\r\nSecond line"  # no final newline
    split = {"de": de, "en": en}
    corpus_writer({"train": split, "valid": split, "test": split}, gz=True)
    raw = load_corpus(make_data_cfg())
    assert raw["train"]["src"] == ["Erste Zeile", "Zweite Zeile"]
    assert raw["train"]["tgt"] == ["First line", "Second line"]
    for text in [*raw["train"]["src"], *raw["train"]["tgt"]]:
        assert "\r" not in text and "\ufeff" not in text


@pytest.mark.parametrize("separator", ["\x85", "\u2028", "\x0c", "\x1c"])
def test_unicode_line_breaks_inside_a_sentence_do_not_split_lines(corpus_writer, make_data_cfg,
                                                                  separator: str):
    de = ["Er sagte" + separator + " und ging.", "Zweiter Satz.", "Dritter Satz."]
    en = ["He said ... and left.", "Second sentence.", "Third sentence."]
    corpus_writer({s: {"de": de, "en": en} for s in ("train", "valid", "test")})
    raw = load_corpus(make_data_cfg())
    assert pairs(raw["test"]) == list(zip(de, en))  # aligned, raw text kept
    cleaned = clean_corpus(raw, make_data_cfg())
    assert len(cleaned["test"]) == 3
    assert cleaned["test"]["tgt"][1] == "Second sentence."
    assert separator not in cleaned["test"]["src"][0]
    if separator == "\x85":  # a mis-decoded Windows-1252 ellipsis (WMT news-test2008)
        assert cleaned["test"]["src"][0] == "Er sagte… und ging."


def test_read_lines_keeps_empty_lines(tmp_path: Path):
    path = tmp_path / "x.de"
    path.write_bytes(b"a\n\n\nb\n")
    assert read_lines(path) == ["a", "", "", "b"]


def test_real_multi30k(multi30k: Path, make_data_cfg):
    cfg = make_data_cfg("multi30k", root=str(multi30k.parent))
    raw = load_corpus(cfg)
    assert {split: len(ds) for split, ds in raw.items()} == {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
    assert raw["train"][0]["src"].startswith("Zwei junge weiße Männer")
    assert raw["train"][0]["tgt"].startswith("Two young, White males")
    cleaned = clean_corpus(raw, cfg)
    # SOURCES.md: two train pairs have a length ratio above 3; evaluation splits are kept whole
    assert {split: len(ds) for split, ds in cleaned.items()} == {"train": 28998, "val": 1014, "test_2016_flickr": 1000}
    assert not any("\t" in s or s != s.strip() for s in cleaned["train"]["src"])
    fr = load_corpus(make_data_cfg("multi30k", root=str(multi30k.parent), tgt_lang="fr"))
    assert len(fr["val"]) == 1014 and fr["val"]["src"] == raw["val"]["src"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides", [{}, {"source": "local"}, {"hub_id": "someone/toy"}])
def test_missing_corpus_directory(make_data_cfg, tmp_path: Path, overrides: dict, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # with a hub_id the loader would go online
    cfg = make_data_cfg(**overrides)
    with pytest.raises(DataError) as err:
        load_corpus(cfg)
    message = one_line(err)
    assert str(tmp_path / "data" / "toy") in message
    assert "data.root" in message and "SEQ2SEQ_DATA" in message


def test_hub_source_without_hub_id(make_data_cfg):
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg(source="hub"))
    assert "data.hub_id" in one_line(err)


def test_missing_split_file(corpus_writer, make_data_cfg, toy_splits):
    directory = corpus_writer({"train": toy_splits["train"], "valid": toy_splits["valid"]})
    (directory / "dev.de").write_text("x\n")
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    message = one_line(err)
    assert "test.de" in message
    assert "splits present: dev, train, valid" in message


def test_missing_target_side(corpus_writer, make_data_cfg, toy_splits):
    directory = corpus_writer(toy_splits)
    (directory / "valid.en").unlink()
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    assert "valid.en" in one_line(err)


@pytest.mark.parametrize("gz", [False, True])
def test_different_line_counts(corpus_writer, make_data_cfg, toy_splits, gz: bool):
    corpus_writer({**toy_splits, "valid": {"de": ["a", "b", "c"], "en": ["a", "b"]}}, gz=gz)
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    message = one_line(err)
    assert "valid.de" in message and "valid.en" in message
    assert "3 lines" in message and "has 2" in message


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_names_the_line(corpus_writer, make_data_cfg, toy_splits, gz: bool):
    bad = b"eins\nzwei\ndrei \xff\xfe vier\nf\xc3\xbcnf\n"
    corpus_writer({**toy_splits, "train": {"de": bad, "en": ["1", "2", "3", "4"]}}, gz=gz)
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    message = one_line(err)
    assert f"train.de{'.gz' if gz else ''}:3:" in message
    assert "UTF-8" in message


def test_empty_split(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer({**toy_splits, "test": {"de": b"", "en": b""}})
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    message = one_line(err)
    assert "test.de" in message and "empty" in message


def test_truncated_gzip(corpus_writer, make_data_cfg, toy_splits):
    directory = corpus_writer(toy_splits, gz=True)
    path = directory / "train.en.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    assert "train.en.gz" in one_line(err)


def test_not_a_gzip_file(corpus_writer, make_data_cfg, toy_splits):
    directory = corpus_writer(toy_splits, gz=True)
    (directory / "valid.de.gz").write_bytes(b"plain text, not gzip\n")
    with pytest.raises(DataError) as err:
        load_corpus(make_data_cfg())
    assert "valid.de.gz" in one_line(err)


@pytest.mark.parametrize("key, lang", [("src_lang", "fr"), ("tgt_lang", "xx")])
def test_unknown_language(corpus_writer, make_data_cfg, toy_splits, key: str, lang: str):
    corpus_writer(toy_splits)
    with pytest.raises(ConfigError) as err:
        load_corpus(make_data_cfg(**{key: lang}))
    message = one_line(err)
    assert f"data.{key}" in message and f"'{lang}'" in message
    assert "de, en" in message


def test_same_source_and_target_language(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer(toy_splits)
    with pytest.raises(ConfigError) as err:
        load_corpus(make_data_cfg(tgt_lang="de"))
    message = one_line(err)
    assert "data.src_lang" in message and "data.tgt_lang" in message


def test_every_training_pair_dropped(corpus_writer, make_data_cfg, toy_splits):
    corpus_writer(toy_splits)
    cfg = make_data_cfg(max_len=2)  # every toy sentence is longer
    with pytest.raises(DataError) as err:
        clean_corpus(load_corpus(cfg), cfg)
    message = one_line(err)
    assert "'train'" in message and "data.max_len" in message


def test_errors_are_user_errors():
    assert issubclass(DataError, Seq2SeqError) and issubclass(ConfigError, Seq2SeqError)
    assert DataError.exit_code == ConfigError.exit_code == 2


# ----------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Ma\u0308dchen und Jungen", "Mädchen und Jungen"),  # NFC
        ("  zwei   Leerzeichen\tund Tab  ", "zwei Leerzeichen und Tab"),
        ("ein\u00a0geschütztes\u2009Leerzeichen", "ein geschütztes Leerzeichen"),
        ("\x84Hallo\x93", "„Hallo“"),  # Windows-1252 read as Latin-1
        ("Preis: 5\x80 \x96 billig\x85", "Preis: 5€ – billig…"),
        ("a\x00b", "ab"),  # NUL
        ("a\x81b\x7fc\x1bd", "abcd"),  # C1 without a Windows-1252 meaning, DEL, ESC
        ("", ""),
    ],
)
def test_normalize(raw: str, clean: str):
    assert normalize(raw)[0] == clean
    assert normalize(clean)[0] == clean  # idempotent
    assert unicodedata.is_normalized("NFC", normalize(raw)[0])


def test_normalize_reports_c1_repairs():
    assert normalize("\x84Hallo\x93")[1] is True
    assert normalize("„Hallo“")[1] is False


def test_training_split_filters_with_counts():
    ds = Dataset.from_dict({
        "src": ["ein guter Satz", "", "eins zwei drei vier fünf sechs", "kurz", "a b", "\x84gut\x93 so"],
        "tgt": ["a good sentence", "empty source", "one two three four five six", "far too long here",
                "  ", "good so"],
        "line": [1, 2, 3, 4, 5, 6],
    })
    cleaned, stats = clean_split(ds, True, max_len=5, max_ratio=3.0)
    assert (stats.pairs, stats.dropped_empty, stats.dropped_long, stats.dropped_ratio) == (6, 2, 1, 1)
    assert stats.kept == len(cleaned) == 2
    assert stats.c1_repaired == 1
    assert cleaned["line"] == [1, 6]
    assert cleaned["src"] == ["ein guter Satz", "„gut“ so"]
    assert cleaned["raw_src"] == ["ein guter Satz", "\x84gut\x93 so"]  # raw text kept beside it
    assert cleaned["ref"] == ["a good sentence", "good so"]


def test_ratio_at_the_limit_is_kept():
    ds = Dataset.from_dict({"src": ["a b c"], "tgt": ["x"], "line": [1]})
    assert len(clean_split(ds, True, max_len=10, max_ratio=3.0)[0]) == 1
    assert len(clean_split(ds, True, max_len=10, max_ratio=2.9)[0]) == 0
    assert len(clean_split(ds, True, max_len=3, max_ratio=3.0)[0]) == 1
    assert len(clean_split(ds, True, max_len=2, max_ratio=3.0)[0]) == 0


def test_evaluation_splits_keep_every_line(corpus_writer, make_data_cfg, toy_splits):
    test = {"de": ["Ein Satz.", "", "sehr " * 150 + "lang", "a b c d e f g h i j"],
            "en": ["A sentence.", "", "very long", "x"]}
    corpus_writer({**toy_splits, "test": test})
    cfg = make_data_cfg(max_len=100)
    cleaned = clean_corpus(load_corpus(cfg), cfg)
    assert len(cleaned["test"]) == len(test["de"])
    assert cleaned["test"]["line"] == [1, 2, 3, 4]
    assert cleaned["test"]["src"][1] == "" and cleaned["test"]["tgt"][1] == ""
    assert cleaned["test"]["ref"] == test["en"]
    assert len(cleaned["valid"]) == len(toy_splits["valid"]["de"])


# ----------------------------------------------------------------------------- synthetic


def _synthetic_cfg(make_data_cfg, seed: int = 13, **overrides):
    sizes = {"seed": seed, "train_size": 60, "valid_size": 8, "test_size": 10, "max_len": 20}
    return make_data_cfg("synthetic", synthetic=sizes, **overrides)


def test_synthetic_is_deterministic(make_data_cfg):
    first = load_corpus(_synthetic_cfg(make_data_cfg))
    second = load_corpus(_synthetic_cfg(make_data_cfg))
    assert list(first) == ["train", "valid", "test"]
    assert {s: len(d) for s, d in first.items()} == {"train": 60, "valid": 8, "test": 10}
    for split in first:
        # the evaluation splits carry the generator's gold word alignments
        assert first[split].column_names == ["src", "tgt", "line"] + (["align"] if split != "train" else [])
        assert pairs(first[split]) == pairs(second[split])
    other = load_corpus(_synthetic_cfg(make_data_cfg, seed=14))
    assert pairs(other["train"]) != pairs(first["train"])


def test_synthetic_reverse_direction(make_data_cfg):
    forward = load_corpus(_synthetic_cfg(make_data_cfg))
    backward = load_corpus(_synthetic_cfg(make_data_cfg, src_lang="tgt", tgt_lang="src"))
    assert backward["test"]["src"] == forward["test"]["tgt"]
    assert backward["test"]["tgt"] == forward["test"]["src"]


def test_synthetic_needs_no_files(make_data_cfg, tmp_path: Path):
    cfg = _synthetic_cfg(make_data_cfg, root=str(tmp_path / "nowhere"))
    assert len(load_corpus(cfg)["train"]) == 60
    assert not (tmp_path / "nowhere").exists()


def test_synthetic_unknown_split(make_data_cfg):
    with pytest.raises(ConfigError) as err:
        load_corpus(_synthetic_cfg(make_data_cfg, test_splits=["test", "extra"]))
    assert "'extra'" in one_line(err)


def test_gzip_helper_round_trip(tmp_path: Path):
    path = tmp_path / "a.de.gz"
    path.write_bytes(gzip.compress("ä\nb\n".encode()))
    assert read_lines(path) == ["ä", "b"]
