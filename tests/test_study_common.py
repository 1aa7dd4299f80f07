"""study_common: every accepted file type read as documents, every other one refused; the Latin filter against
its rule."""

import json
import random
import re
import unicodedata

import pytest
import regex

import run_density as rd
from study_common import (
    DOCUMENT_FILE_TYPES,
    InputError,
    filter_to_latin,
    has_non_latin_letter,
    read_delimited,
    read_documents,
)


def test_csv_documents_come_from_the_named_column_without_the_header_even_across_lines(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text('id,text\n1,"Tea, with milk."\n2,"Two\nlines"\n\n3,plain\n', encoding="utf-8")
    assert list(read_documents(path)) == ["Tea, with milk.", "Two\nlines", "plain"]
    assert list(read_documents(path, "id")) == ["1", "2", "3"]


def test_tsv_pairs_give_each_column_its_own_side(tmp_path):
    import run_eval

    path = tmp_path / "diagnostic_pairs.tsv"
    path.write_text("en\ttgt\nThe tea is hot.\tཇ་ཚ་པོ་འདུག\nThe sky is blue.\tནམ་མཁའ་སྔོན་པོ་འདུག\n", encoding="utf-8")
    assert list(read_documents(path, "en")) == ["The tea is hot.", "The sky is blue."]
    assert run_eval.read_pairs(str(path)) == [
        ("The tea is hot.", "ཇ་ཚ་པོ་འདུག"),
        ("The sky is blue.", "ནམ་མཁའ་སྔོན་པོ་འདུག"),
    ]


@pytest.mark.parametrize(
    "suffix, content, message",
    [
        (
            ".csv",
            "body,id\nx,1\n",
            r"corpus\.csv:1: no column 'text' in the header \(found: body, id\)\. Pass --text_column",
        ),
        (".tsv", "text\tid\nx\t1\ny\n", r"corpus\.tsv:3: 1 fields where the header has 2"),
        (".csv", '\ntext\n"x"\n', r"corpus\.csv:1: no header row"),
        (".csv", 'text\n"never closed\n', r"corpus\.csv:\d+: not valid CSV"),
    ],
)
def test_bad_delimited_files_name_the_file_and_line(tmp_path, suffix, content, message):
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        list(read_documents(path))


@pytest.mark.parametrize("name", ["corpus.md", "corpus.text", "corpus", "corpus.parquet"])
def test_unknown_file_types_are_refused_with_the_accepted_suffixes(tmp_path, name):
    path = tmp_path / name
    path.write_text("a document\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown file type")) as caught:
        list(read_documents(path))
    assert all(suffix in str(caught.value) for suffix in DOCUMENT_FILE_TYPES)


def test_the_caller_names_its_own_column_flag(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"corpus\.jsonl:1: no 'text' column \(found: body\)\. Pass --mono_text_column"
    ):
        list(read_documents(path, column_flag="--mono_text_column"))


def test_a_reader_without_a_column_flag_asks_for_the_column_by_name(tmp_path):
    from run_eval import read_pairs

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("en\ttibetan\nTea\tཇ\nMilk\tའོ་མ\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\.tsv:1: no column 'tgt' .*The file needs a column named 'tgt'\.$"):
        read_pairs(str(pairs))


def test_a_json_file_that_is_not_a_list_of_records_is_refused(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}), encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{path}: expected a JSON list of records.")):
        list(read_documents(path))


# The bad byte is on line 3 of each file; every reader names that line.
NOT_UTF8 = {
    ".txt": b"one\ntwo\ncaf\xe9\n",
    ".jsonl": b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n',
    ".json": b'[{"text": "one"},\n{"text": "two"},\n{"text": "caf\xe9"}]\n',
    ".csv": b"text\none\ncaf\xe9\n",
    ".tsv": b"text\none\ncaf\xe9\n",
}


@pytest.mark.parametrize("suffix", sorted(NOT_UTF8))
def test_text_that_is_not_utf8_is_named_by_file_and_line_in_every_reader(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(NOT_UTF8[suffix])
    message = re.escape(f"{path}:3: not UTF-8 (byte 0xe9: invalid continuation byte). Re-encode it as UTF-8.")
    with pytest.raises(InputError, match=message):
        list(read_documents(path))
    with pytest.raises(InputError, match=message):  # run_density's own streaming reader says the same
        list(rd.FileCorpus("c", [path], "text").iter_documents(rd.Counter()))


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".txt"])
def test_a_byte_order_mark_is_not_part_of_the_first_column_or_document(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    content = {".tsv": "en\ttgt\nTea\tཇ\n", ".csv": "en,tgt\nTea,ཇ\n", ".jsonl": '{"en": "Tea"}\n', ".txt": "Tea\n"}
    path.write_text(content[suffix], encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert list(read_documents(path, "en")) == ["Tea"]
    assert list(rd.FileCorpus("c", [path], "en").iter_documents(rd.Counter())) == ["Tea"]
    if suffix in (".tsv", ".csv"):
        assert list(read_delimited(path, [("en", None), ("tgt", None)])) == [(f"{path}:2", ["Tea", "ཇ"])]


# --------------------------------------------------------------------------------------
# The Latin filter: the fast implementation against the rule written as a loop
# --------------------------------------------------------------------------------------

_LATIN_OR_COMMON = regex.compile(r"[\p{scx=Latin}\p{scx=Zyyy}]")
_MARK = regex.compile(r"\p{M}")
_LETTER = regex.compile(r"\p{L}")


def latin_filter_rule(text: str) -> tuple[str, int]:
    """The filter's definition, one character at a time: a combining mark is kept iff the last
    non-mark character before it is a kept letter; any other character iff it is Latin or Common."""
    kept, removed, after_kept_letter = [], 0, False
    for char in text:
        if _MARK.match(char):
            keep = after_kept_letter
        else:
            keep = bool(_LATIN_OR_COMMON.match(char))
            after_kept_letter = keep and bool(_LETTER.match(char))
        if keep:
            kept.append(char)
        else:
            removed += 1
    return "".join(kept), removed


@pytest.fixture(scope="module")
def assigned():
    """Every assigned code point except surrogates and private use (~160k characters)."""
    every = "".join(map(chr, range(0x110000)))
    return regex.findall(r"[^\p{Cn}\p{Cs}\p{Co}]", every)


def test_latin_filter_matches_its_character_rule_on_every_assigned_code_point(assigned):
    # every code point after a Latin letter, after a digit, doubled with a Latin-script mark,
    # and followed by an acute accent: bases, marks in every context, leading marks
    text = "".join(f"a{c}\u0301 1{c}{c}\u0363 {c}" for c in assigned)
    assert filter_to_latin(text) == latin_filter_rule(text)
    marks = [c for c in assigned if _MARK.match(c)]
    rng = random.Random(0)
    for _ in range(3000):
        pools = [assigned, marks, "aé1 .,\u0301"]
        sample = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 12)))
        assert filter_to_latin(sample) == latin_filter_rule(sample), ascii(sample)


def test_latin_filter_keeps_accented_latin_and_removes_other_scripts_and_their_punctuation():
    assert filter_to_latin("Café naïve e\u0301 1234, «ok»!") == ("Café naïve e\u0301 1234, «ok»!", 0)
    assert filter_to_latin("Seoul (서울) 。end") == ("Seoul () end", 3)  # U+3002 is Han/Hangul punctuation
    assert filter_to_latin("བོད་ ༣ ᠮᠣ᠂x") == ("  x", 8)  # Tibetan letters, marks, digit; Mongolian comma
    assert filter_to_latin("\u0301a") == ("a", 1)  # a mark with no letter before it


def test_non_latin_letter_check_matches_its_rule_where_python_knows_the_character(assigned):
    def rule(c):
        return bool((_LETTER.match(c) or unicodedata.category(c) == "Nd") and not _LATIN_OR_COMMON.match(c))

    # Python's unicodedata is older than the regex module's tables: skip what it does not know.
    known = [c for c in assigned if unicodedata.category(c) != "Cn"]
    assert [c for c in known if has_non_latin_letter(c) != rule(c)] == []
    assert has_non_latin_letter("Paris ༣") and not has_non_latin_letter("Café 123 — «ok» \u0301")


def test_a_dataset_split_loads_from_a_saved_folder_and_one_that_cannot_be_loaded_is_named_by_its_flag(tmp_path):
    import datasets

    from study_common import load_dataset_split

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_split(str(tmp_path / "saved"), None, "train", flag="--x")["text"] == ["a", "b"]
    streamed = load_dataset_split(str(tmp_path / "saved"), None, "train", flag="--x", streaming=True)
    assert [row["text"] for row in streamed] == ["a", "b"]
    with pytest.raises(
        InputError, match=r"--mono_dataset '\S*nope' \(config None, split 'train'\) could not be loaded"
    ):
        load_dataset_split(str(tmp_path / "nope"), None, "train", flag="--mono_dataset")
