"""study_common.read_documents: every accepted file type read as documents, every other one refused; the
resume convention of the training scripts."""

import json
import re

import pytest

import run_density as rd
from study_common import DOCUMENT_FILE_TYPES, InputError, read_delimited, read_documents


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


def test_density_corpus_reads_csv_and_tsv_like_read_documents_and_refuses_other_types(tmp_path):
    csv_file, tsv_file = tmp_path / "a.csv", tmp_path / "b.tsv"
    csv_file.write_text('text,id\n"Chuseok falls in autumn, every year.",1\n"two\nlines",2\n', encoding="utf-8")
    tsv_file.write_text("id\ttext\n1\tSongpyeon are rice cakes.\n", encoding="utf-8")
    corpus = rd.FileCorpus("c", [csv_file, tsv_file], "text")
    assert not corpus.random_access
    streamed = list(corpus.iter_documents(rd.Counter()))
    expected = list(read_documents(csv_file)) + list(read_documents(tsv_file))
    assert (
        [t for t, _, _ in streamed]
        == expected
        == [
            "Chuseok falls in autumn, every year.",
            "two\nlines",
            "Songpyeon are rice cakes.",
        ]
    )
    assert corpus.fetch({i: (f, o) for i, (_, f, o) in enumerate(streamed)}) == dict(enumerate(expected))
    with pytest.raises(ValueError, match=r"b\.tsv:1: no column 'body' in the header .*Pass --corpus_text_column"):
        list(rd.FileCorpus("c", [tsv_file], "body").iter_documents(rd.Counter()))
    other = tmp_path / "c.md"
    other.write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.md: unknown file type '\.md'; accepted: \.txt"):
        rd.FileCorpus("c", [other], "text")


def test_a_reader_without_a_column_flag_asks_for_the_column_by_name(tmp_path):
    from run_eval import read_pairs

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("en\ttibetan\nTea\tཇ\nMilk\tའོ་མ\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\.tsv:1: no column 'tgt' .*The file needs a column named 'tgt'\.$"):
        read_pairs(str(pairs))


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
    assert [t for t, _, _ in rd.FileCorpus("c", [path], "en").iter_documents(rd.Counter())] == ["Tea"]
    if suffix in (".tsv", ".csv"):
        assert list(read_delimited(path, [("en", None), ("tgt", None)])) == [(f"{path}:2", ["Tea", "ཇ"])]


def test_one_resume_convention_for_both_training_scripts(tmp_path):
    from study_common import InputError
    from train_common import resume_checkpoint

    run = tmp_path / "run"
    assert resume_checkpoint(None, run) is None  # a new folder starts afresh
    with pytest.raises(InputError, match=r"latest: no checkpoint-N in"):
        resume_checkpoint("latest", run)
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    with pytest.raises(InputError, match=r"already holds .*checkpoint-10\. Pass --resume_from_checkpoint"):
        resume_checkpoint(None, run)  # never an earlier run's checkpoints without saying so
    for value in ("latest", "true", "last", "True"):
        assert resume_checkpoint(value, run) == str(run / "checkpoint-10")
    assert resume_checkpoint(str(run / "checkpoint-2"), run) == str(run / "checkpoint-2")
    with pytest.raises(InputError, match=r"checkpoint-7: no such checkpoint folder"):
        resume_checkpoint(str(run / "checkpoint-7"), run)
