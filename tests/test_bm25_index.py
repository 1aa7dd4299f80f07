"""bm25_index.py: tokenisation by script, shard scores equal one index of the corpus, deterministic top-k, the
corpus readers, and the module's worked example."""

import doctest
from pathlib import Path

import bm25s
import numpy as np
import pytest
from test_run_density import write_world

import bm25_index as bi
import run_density as rd
from study_common import InputError, read_documents


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"))


def test_the_worked_example_in_the_module_docstring_runs():
    result = doctest.testmod(bi)
    assert result.failed == 0 and result.attempted >= 10


# --------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------


def test_latin_tokens_are_lowercased_words_without_stopwords():
    assert bi.retrieval_tokens("The Korean people celebrate Chuseok in Autumn.") == [
        "korean",
        "people",
        "celebrate",
        "chuseok",
        "autumn",
    ]


def test_hangul_tokens_are_eojeol_plus_syllable_bigrams_so_particles_still_match():
    tokens = bi.retrieval_tokens("추석을 지낸다 봄")
    assert tokens == ["추석을", "추", "석", "을", "추석", "석을", "지낸다", "지", "낸", "다", "지낸", "낸다", "봄"]
    assert "추석" in bi.retrieval_tokens("추석에") and "추석" in bi.retrieval_tokens("추석")


def test_han_tokens_are_character_unigrams_and_bigrams_of_each_run():
    assert bi.retrieval_tokens("中秋节，吃月饼") == ["中", "秋", "节", "中秋", "秋节", "吃", "月", "饼", "吃月", "月饼"]


def test_tibetan_tokens_are_syllables_split_on_tsheg_and_shad():
    assert bi.retrieval_tokens("བོད་རིགས་ཀྱིས།ལོ་གསར") == ["བོད", "རིགས", "ཀྱིས", "ལོ", "གསར"]


def test_mongolian_words_split_on_nnbsp_and_ignore_variation_selectors_and_vowel_separator():
    plain = bi.retrieval_tokens("ᠮᠣᠩᠭᠣᠯ ᠤᠨ ᠶᠢᠨ ᠪᠠᠶᠢᠨᠠ")
    assert plain == ["ᠮᠣᠩᠭᠣᠯ", "ᠤᠨ", "ᠶᠢᠨ", "ᠪᠠᠶᠢᠨᠠ"]
    assert bi.retrieval_tokens("ᠮᠣᠩᠭᠣᠯ\u202fᠤᠨ ᠶ\u180bᠢᠨ ᠪᠠᠶᠢᠨ\u180eᠠ") == plain


def test_mixed_script_text_is_cut_into_runs_of_one_script_and_digits_are_unified():
    assert bi.retrieval_tokens("汉族Chuseok한국어 ᠮᠣᠩᠭᠣᠯ 50 ༥༠ ᠕᠐ ５０") == [
        "汉",
        "族",
        "汉族",
        "chuseok",
        "한국어",
        "한",
        "국",
        "어",
        "한국",
        "국어",
        "ᠮᠣᠩᠭᠣᠯ",
        "50",
        "50",
        "50",
        "50",
    ]


def _build(corpus_file: Path, directory: Path, shard_size: int) -> bi.ShardedBM25:
    corpus = bi.FileCorpus("c", [corpus_file], "text")
    bi.build_index(corpus, directory, shard_size, {"test": True})
    return bi.ShardedBM25(directory)


def test_shard_scores_equal_a_single_bm25s_index_of_the_corpus(world, tmp_path):
    _, corpus_files = world
    texts = list(read_documents(corpus_files["zh"]))
    index = _build(corpus_files["zh"], tmp_path / "idx", shard_size=17)
    assert len(index.shard_starts) == -(-len(texts) // 17)
    reference = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    reference.index([bi.retrieval_tokens(t) for t in texts], show_progress=False)
    query = bi.retrieval_tokens("中秋节的时候，汉族人们赏月并且吃月饼。")  # repeats 节 and 月: counted twice
    expected = reference.get_scores(query)
    ours = np.concatenate(
        [
            bm25s.BM25.load(tmp_path / "idx" / f"shard_{n:05d}", load_vocab=False).get_scores_from_ids(
                np.array([index.vocab[t] for t in query])
            )
            for n in range(len(index.shard_starts))
        ]
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    ((ids, scores),) = index.search([query], 10, show_progress=False)
    _, expected_scores = reference.retrieve([query], k=10, show_progress=False)
    np.testing.assert_allclose(scores, expected_scores[0], rtol=1e-5)
    # The documented order, from the reference's scores: highest score first, ties by lower document id.
    by_rank = np.lexsort((np.arange(len(expected)), -expected))
    assert ids.tolist() == [int(d) for d in by_rank[:10] if expected[d] > 0]
    assert np.unique(expected_scores[0]).size < 10  # the query ties documents, so the tie rule is exercised


def test_sharded_search_returns_what_one_shard_returns(world, tmp_path):
    question_files, corpus_files = world
    queries = [q.query_tokens for q in rd.read_question_sets([str(question_files["en"])])[0].questions]
    one = _build(corpus_files["en"], tmp_path / "one", shard_size=10_000).search(queries, 15, show_progress=False)
    many = _build(corpus_files["en"], tmp_path / "many", shard_size=7).search(queries, 15, show_progress=False)
    for (ids_a, scores_a), (ids_b, scores_b) in zip(one, many):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_allclose(scores_a, scores_b, rtol=1e-6)
        assert np.all(np.diff(scores_a) <= 0) and np.all(scores_a > 0)


def test_top_k_breaks_ties_by_document_id_and_skips_zero_scores():
    ids, scores = bi.top_k_deterministic(np.array([0.0, 2.0, 1.0, 2.0, 2.0, 0.0], dtype=np.float32), 2)
    assert ids.tolist() == [1, 3] and scores.tolist() == [2.0, 2.0]
    ids, _ = bi.top_k_deterministic(np.array([0.0, 1.0, 0.0], dtype=np.float32), 5)
    assert ids.tolist() == [1]


def test_interrupted_build_leaves_no_index_that_looks_complete(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one doc"}\n{"text": "two"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl:3: not valid JSON"):
        bi.build_index(bi.FileCorpus("c", [corpus], "text"), tmp_path / "index" / "c", 10, {})
    assert not (tmp_path / "index" / "c").exists()
    assert list((tmp_path / "index").iterdir()) == []


def test_the_index_returns_every_document_of_every_file_type_as_study_common_reads_it(tmp_path):
    files = {
        "a.jsonl": '\ufeff{"text": "α one"}\n\n{"text": "lone \\ud800"}\r\n{"text": ""}\n',
        "b.txt": "first line\r\n\n  \nsecond 한국\n",
        "c.csv": 'text,id\n"Chuseok falls in autumn, every year.",1\n"two\nlines",2\n',
        "d.tsv": "id\ttext\n1\tSongpyeon are rice cakes.\n",
        "e.json": '[{"text": "listed"}, "a bare string"]',
    }
    paths = [tmp_path / name for name in files]
    for path, content in zip(paths, files.values()):
        path.write_bytes(content.encode())
    bi.build_index(bi.FileCorpus("all", paths, "text"), tmp_path / "index", 3, {})
    expected = [text for path in paths for text in read_documents(path)]
    assert {"lone \ud800", "", "second 한국", "two\nlines", "a bare string"} <= set(expected) and len(expected) == 10
    assert bi.ShardedBM25(tmp_path / "index").texts(range(len(expected))) == dict(enumerate(expected))


def test_corpus_files_of_unknown_type_or_without_the_text_column_are_refused_naming_the_flag(tmp_path):
    other = tmp_path / "c.md"
    other.write_text("x\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.md: unknown file type '\.md'; accepted: \.txt"):
        bi.FileCorpus("c", [other], "text")
    tsv = tmp_path / "b.tsv"
    tsv.write_text("id\ttext\n1\tSongpyeon.\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"b\.tsv:1: no column 'body' in the header .*Pass --corpus_text_column"):
        list(bi.FileCorpus("c", [tsv], "body").iter_documents(bi.Counter()))
