"""run_density.py: questions, planted-count recovery, index reuse, judges, instance analysis, bad input (the index
itself: test_bm25_index.py)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, run_script

import run_density as rd
from cloze import BLANK, fill_blanks
from study_common import InputError, read_documents

# --------------------------------------------------------------------------------------
# A generated world: questions in five scripts, a corpus with each fact planted k times
# --------------------------------------------------------------------------------------

# (question, answer, wrong options) per language; the stem suffix sets the language.
SYNTHETIC_QUESTIONS = {
    "en": [
        ("The Korean harvest festival Chuseok falls in ____ every year.", "autumn", ["spring", "winter"]),
        ("Songpyeon rice cakes are steamed on a layer of ____ needles.", "pine", ["cedar", "bamboo"]),
        ("The Mongolian Naadam festival features wrestling, archery and ____ racing.", "horse", ["camel", "boat"]),
    ],
    "ko": [
        ("한국의 추석에는 가족이 모여 ___ 을 빚어 먹는다.", "송편", ["떡국", "김밥"]),
        ("대한민국의 수도는 ___ 이며 한강이 흐른다.", "서울", ["부산", "대구"]),
    ],
    "zh": [
        ("中秋节的时候，汉族人们赏月并且吃____。", "月饼", ["粽子", "汤圆"]),
        ("端午节人们赛____来纪念屈原。", "龙舟", ["竹筏", "帆船"]),
    ],
    "bo": [
        ("བོད་རིགས་ཀྱིས་ལོ་གསར་སྐབས་_____བཟོ་སྲོལ་ཡོད།", "ཁ་ཟས", ["ཆང་རག", "གོས་ཐུང"]),
        ("པོ་ཏ་ལའི་ཕོ་བྲང་ནི་_____གྲོང་ཁྱེར་ན་ཡོད།", "ལྷ་ས", ["གཞིས་ཀ་རྩེ", "ཆབ་མདོ"]),
    ],
    "mn": [
        # U+202F before the case suffix, U+180B (FVS1) and U+180E (MVS) as in real Mongolian text.
        ("ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ ______ ᠤ ᠪᠠᠶᠠᠷ ᠢ ᠵᠢᠯ ᠪᠦᠷᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ᠎ᠡ ᠃", "ᠨᠠᠭᠠᠳᠤᠮ", ["ᠴᠠᠭᠠᠨ ᠰᠠᠷ᠎ᠠ", "ᠣᠪᠣᠭ᠎ᠠ"]),
        (
            "ᠥᠪᠥᠷ ᠮᠣᠩᠭᠣᠯ\u202fᠤᠨ ᠥᠪᠡᠷᠲᠡᠭᠡᠨ ᠵᠠᠰᠠᠬᠤ ᠣᠷᠣᠨ ᠤ ᠨᠡᠶᠢᠰᠯᠡᠯ ᠬᠣᠲᠠ ᠪᠣᠯ ______ ᠶ᠋ᠢᠨ ᠬᠣᠲᠠ ᠮᠥᠨ ᠃",
            "ᠬᠥᠬᠡᠬᠣᠲᠠ",
            ["ᠪᠣᠭᠣᠲᠣ", "ᠪᠠᠭᠤᠲᠤ"],
        ),
    ],
}
# Planted copies per question: zeros included (near misses must not count), max 5.
PLANTED = {"en": [3, 0, 5], "ko": [2, 4], "zh": [1, 3], "bo": [4, 0], "mn": [3, 2]}

_LETTERS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "ko": "".join(chr(c) for c in range(0xAC00, 0xAC00 + 400, 7)),
    "zh": "".join(chr(c) for c in range(0x4E00, 0x4E00 + 2000, 5)),
    "bo": "ཀཁགངཅཆཇཉཏཐདནཔཕབམཙཚཛཝཞཟའཡརལཤསཧཨ",
    "mn": "".join(chr(c) for c in range(0x1820, 0x1843)),
}


def _question_units(lang: str) -> set[str]:
    units = set()
    for question, answer, wrong in SYNTHETIC_QUESTIONS[lang]:
        for text in [question, answer, *wrong]:
            units.update(rd.analyse_text(text).units)
    return units


def filler_words(lang: str, rng: random.Random, n: int) -> list[str]:
    """Random words of ``lang``'s script that share no unit with any question, answer or option."""
    taken = _question_units(lang)
    letters = _LETTERS[lang]
    words: list[str] = []
    while len(words) < n:
        if lang in ("zh", "ko"):  # one unit per character: build 2-4 character words of free characters
            word = "".join(rng.choice([c for c in letters if c not in taken]) for _ in range(rng.randint(2, 4)))
        elif lang == "bo":
            word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 3)))
        else:
            word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 8)))
        if not set(rd.analyse_text(word).units) & taken and rd.retrieval_tokens(word):
            words.append(word)
    return words


def filler_sentence(lang: str, words: list[str], rng: random.Random, n: int) -> str:
    chosen = [rng.choice(words) for _ in range(n)]
    if lang == "zh":
        return "".join(chosen) + "。"
    if lang == "bo":
        return "་".join(chosen) + "།"
    return " ".join(chosen) + (" ᠃" if lang == "mn" else ".")


def fill(question: str, answer: str) -> str:
    return fill_blanks(question, answer, tibetan_tsheg=True)  # as run_density fills a question


def mongolian_variant(text: str) -> str:
    """The same Mongolian text written differently: U+202F as a space, shaping characters dropped."""
    return text.replace("\u202f", " ").replace("\u180b", "").replace("\u180e", "")


def write_world(directory: Path, langs=("en", "ko", "zh", "bo", "mn"), seed: int = 0, background: int = 60):
    """Question files and one corpus (.jsonl) per language with known occurrences per question.

    Per question: PLANTED[lang][i] documents state the fact (the filled sentence inside filler,
    Mongolian copies in a variant spelling); near misses that must NOT count: the sentence with a
    wrong option (key terms, no answer), the answer inside filler (answer, no key terms), the
    answer with the key terms far outside the window; plus background filler documents.
    Returns ({lang: question file}, {lang: corpus file}).
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    question_files, corpus_files = {}, {}
    for lang in langs:
        words = filler_words(lang, rng, 200)
        docs = []
        items = []
        for i, (question, answer, wrong) in enumerate(SYNTHETIC_QUESTIONS[lang]):
            items.append({"question": question, "options": [answer, *wrong], "answer": answer})
            for copy in range(PLANTED[lang][i]):
                sentence = fill(question, answer)
                if lang == "mn" and copy % 2:
                    sentence = mongolian_variant(sentence)
                docs.append(
                    " ".join([filler_sentence(lang, words, rng, 6), sentence, filler_sentence(lang, words, rng, 5)])
                )
            for option in wrong:
                docs.append(" ".join([filler_sentence(lang, words, rng, 4), fill(question, option)]))
            docs.append(" ".join([filler_sentence(lang, words, rng, 5), answer, filler_sentence(lang, words, rng, 5)]))
            far = filler_sentence(lang, words, rng, 4 * len(rd.analyse_text(question).units) + 10)
            docs.append(" ".join([answer, far, fill(question, wrong[0])]))
        docs += [filler_sentence(lang, words, rng, rng.randint(5, 15)) for _ in range(background)]
        rng.shuffle(docs)
        question_files[lang] = directory / f"synthetic-cloze_{lang}.json"
        question_files[lang].write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
        corpus_files[lang] = directory / f"corpus_{lang}.jsonl"
        corpus_files[lang].write_text(
            "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
        )
    return question_files, corpus_files


def run_main(args: list[str]) -> dict:
    return rd.main(args + ["--log_level", "warning"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"))


# --------------------------------------------------------------------------------------
# Questions: the judge's view of a text, query and key terms
# --------------------------------------------------------------------------------------


def test_ascii_fast_path_gives_the_same_tokens_as_the_unicode_path():
    rng = random.Random(0)
    alphabet = "abcXYZ019 .,;'-_()\t\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert rd.retrieval_tokens(text + " ü") == rd.retrieval_tokens(text) + ["ü"], text
        assert rd.analyse_text(text + " ü").units == rd.analyse_text(text).units + ["ü"], text


def test_question_query_is_the_filled_sentence_and_key_terms_exclude_stopwords_and_answer():
    question = rd.prepare_question(0, "Chuseok falls in ____ every year.", ["autumn"])
    assert question.filled == "Chuseok falls in autumn every year."
    assert question.query_tokens == ["chuseok", "falls", "autumn", "every", "year"]
    assert question.key_terms == {"chuseok", "falls", "every", "year"}
    assert question.answer_units == [("autumn",)]
    backslash = rd.prepare_question(1, "Path is ___ here", [r"C:\1"])
    assert backslash.filled == r"Path is C:\1 here"


def test_filling_a_tibetan_blank_keeps_syllables_apart():
    def fill_blank(question, answer):  # what run_density searches for and shows its LM judge
        return rd.prepare_question(0, question, [answer]).filled

    assert fill_blank("རང་རྒྱལ་གྱི་_____ཁྱབ་ཡོད།", "བོད་ལྗོངས") == "རང་རྒྱལ་གྱི་བོད་ལྗོངས་ཁྱབ་ཡོད།"
    assert fill_blank("ཡུལ_____ཁྱབ", "བོད") == "ཡུལ་བོད་ཁྱབ"
    assert fill_blank("a ___ b ___.", "x") == "a x b x."


# --------------------------------------------------------------------------------------
# Lexical judge
# --------------------------------------------------------------------------------------


def _judge(question_text, answer, document, **kwargs):
    question = rd.prepare_question(0, question_text, [answer])
    return rd.LexicalJudge(**kwargs).judge(question, rd.analyse_text(document))


def test_lexical_judge_needs_the_answer_and_enough_key_terms_nearby():
    q = "The Korean harvest festival Chuseok falls in ____ every year."
    assert _judge(q, "autumn", "In Korea the harvest festival Chuseok falls in autumn.").contains
    assert not _judge(q, "autumn", "The harvest festival Chuseok falls in spring every year.").contains
    assert not _judge(q, "autumn", "Leaves turn red in autumn.").contains
    assert _judge(q, "autumn", "In autumn the moon is bright.", min_key_fraction=0.0, min_key_terms=0).contains
    far = "autumn " + "filler " * 60 + "Korean harvest festival Chuseok every year"
    verdict = _judge(q, "autumn", far)
    assert verdict.answer_found and not verdict.contains and verdict.key_terms_matched == 0
    assert _judge(q, "autumn", far, window=80).contains


def test_lexical_judge_threshold_is_a_share_of_key_term_weight():
    question = rd.prepare_question(0, "alpha beta gamma delta ____", ["omega"])
    doc = rd.analyse_text("omega alpha")
    uniform = rd.LexicalJudge(min_key_fraction=0.25).judge(question, doc)
    assert uniform.contains and uniform.key_terms_matched == 1 and uniform.key_weight_matched == 0.25
    assert not rd.LexicalJudge(min_key_fraction=0.3).judge(question, doc).contains
    rare_alpha = {"alpha": 7.0, "beta": 1.0, "gamma": 1.0, "delta": 1.0}
    weighted = rd.LexicalJudge(min_key_fraction=0.5).judge(question, doc, rare_alpha)
    assert weighted.contains and weighted.key_weight_matched == pytest.approx(0.7)
    common_alpha = {"alpha": 0.1, "beta": 3.0, "gamma": 3.0, "delta": 3.0}
    assert not rd.LexicalJudge(min_key_fraction=0.25).judge(question, doc, common_alpha).contains
    assert not rd.LexicalJudge(min_key_fraction=0.0, min_key_terms=2).judge(question, doc).contains
    assert rd.LexicalJudge(min_key_fraction=0.0, min_key_terms=1).judge(question, doc).contains
    no_keys = rd.prepare_question(1, "the ____ of it", ["omega"])
    assert not no_keys.key_terms and rd.LexicalJudge().judge(no_keys, doc).contains


def test_han_key_terms_are_characters_and_bigrams():
    question = rd.prepare_question(0, "端午节人们赛____来纪念屈原。", ["龙舟"])
    assert {"端", "端午", "午节", "屈原", "原"} <= question.key_terms
    assert "龙" not in question.key_terms and "赛" in question.key_terms


def test_lexical_judge_matches_korean_answer_inside_a_word_with_particle():
    assert _judge(
        "한국의 추석에는 가족이 모여 ___ 을 빚어 먹는다.", "송편", "추석에 가족이 모여 송편을 빚어 먹었다."
    ).contains


# --------------------------------------------------------------------------------------
# Planted counts are recovered exactly
# --------------------------------------------------------------------------------------


def test_planted_occurrences_are_recovered_exactly_in_five_scripts(world, tmp_path):
    question_files, corpus_files = world
    for lang in PLANTED:
        report = run_main(
            ["--questions", str(question_files[lang]), "--corpus_files", str(corpus_files[lang]),
             "--top_k", "20", "--output_dir", str(tmp_path / lang)],
        )  # fmt: skip
        got = [e["occurrences"] for e in sorted(report["questions"], key=lambda e: e["index"])]
        assert got == PLANTED[lang], lang
        documents = sum(1 for _ in read_documents(corpus_files[lang]))
        assert report["corpus"]["documents"] == documents
        assert report["corpus"]["occurrences"] == sum(PLANTED[lang])
        assert report["corpus"]["density"] == pytest.approx(sum(PLANTED[lang]) / documents)
        entry = report["questions"][0]
        assert len(entry["retrieved"]) == len(entry["contains"]) == len(entry["bm25"]) <= 20
        markdown = (tmp_path / lang / "density.md").read_text(encoding="utf-8")
        assert f"| corpus_{lang} | synthetic-cloze_{lang} | {documents:,} |" in markdown
        assert f"{sum(PLANTED[lang]) / documents:.2e}" in markdown


def test_top_k_caps_occurrences(tmp_path):
    questions = tmp_path / "cap_en.json"
    questions.write_text(
        json.dumps([{"question": "Chuseok falls in ____.", "options": ["autumn"], "answer": "autumn"}])
    )
    corpus = tmp_path / "cap.txt"
    corpus.write_text("Chuseok falls in autumn.\n" * 6 + "unrelated words here\n" * 3, encoding="utf-8")
    for top_k, expected in [(2, 2), (10, 6)]:
        report = run_main(
            ["--questions", str(questions), "--corpus_files", str(corpus), "--top_k", str(top_k),
             "--output_dir", str(tmp_path / "out")],
        )  # fmt: skip
        assert report["questions"][0]["occurrences"] == expected
        assert report["questions"][0]["retrieved"] == list(range(expected))  # ties: lower document id first


def test_retrieval_ranks_only_documents_holding_an_answer(tmp_path):
    questions = tmp_path / "req_en.json"
    item = {
        "question": "Every year Chuseok falls in ____.",
        "options": ["autumn", "fall"],
        "answer": ["autumn", "fall"],
    }
    questions.write_text(json.dumps([item]), encoding="utf-8")
    corpus = tmp_path / "req.txt"
    lines = ["Every year Chuseok falls in spring."] * 4 + ["Chuseok comes in autumn.", "Chuseok is in the fall.", "x y"]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["--questions", str(questions), "--corpus_files", str(corpus), "--top_k", "3"]
    constrained = run_main(base + ["--output_dir", str(tmp_path / "a")])
    assert sorted(constrained["questions"][0]["retrieved"]) == [4, 5]
    free = run_main(base + ["--output_dir", str(tmp_path / "b"), "--require_answer", "false"])
    assert set(free["questions"][0]["retrieved"]) & {0, 1, 2, 3}  # answer-less documents take top-k places


def test_several_corpora_and_question_files_pair_by_script(world, tmp_path):
    question_files, corpus_files = world
    report = run_main(
        ["--questions", str(question_files["en"]), str(question_files["bo"]),
         "--corpus_files", f"english={corpus_files['en']}", f"tibetan={corpus_files['bo']}",
         "--top_k", "20", "--output_dir", str(tmp_path / "out")],
    )  # fmt: skip
    pairs = {(row["corpus"], row["questions"]): row["occurrences"] for row in report["table"]}
    assert pairs == {
        ("english", "synthetic-cloze_en"): sum(PLANTED["en"]),
        ("tibetan", "synthetic-cloze_bo"): sum(PLANTED["bo"]),
    }
    assert {(s["corpus"], s["questions"]) for s in report["skipped_pairs"]} == {
        ("english", "synthetic-cloze_bo"),
        ("tibetan", "synthetic-cloze_en"),
    }
    assert [c["label"] for c in report["corpora"]] == ["english", "tibetan"]
    assert report["corpus"] == report["corpora"][0]


def test_one_corpus_of_several_files_numbers_documents_across_files(world, tmp_path):
    question_files, corpus_files = world
    both = f"mixed={corpus_files['zh']},{corpus_files['ko']}"
    report = run_main(
        ["--questions", str(question_files["zh"]), str(question_files["ko"]), "--corpus_files", both,
         "--top_k", "20", "--output_dir", str(tmp_path / "out")],
    )  # fmt: skip
    by_set = {}
    for e in report["questions"]:
        by_set.setdefault(e["questions"], []).append(e["occurrences"])
    assert by_set == {"synthetic-cloze_zh": PLANTED["zh"], "synthetic-cloze_ko": PLANTED["ko"]}
    n_zh = sum(1 for _ in read_documents(corpus_files["zh"]))
    ko_docs = [
        d
        for e in report["questions"]
        if e["questions"] == "synthetic-cloze_ko"
        for d, c in zip(e["retrieved"], e["contains"])
        if c
    ]
    assert ko_docs and min(ko_docs) >= n_zh


# --------------------------------------------------------------------------------------
# The sharded index
# --------------------------------------------------------------------------------------


def test_index_is_reused_when_the_corpus_is_unchanged_and_rebuilt_when_it_changes(world, tmp_path, caplog):
    question_files, corpus_files = world
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(corpus_files["en"].read_bytes())
    args = ["--questions", str(question_files["en"]), "--corpus_files", str(corpus), "--top_k", "20",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    first = run_main(args)
    assert first["corpus"]["index"]["reused"] is False
    second = run_main(args)
    assert second["corpus"]["index"]["reused"] is True
    assert second["questions"] == first["questions"]
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "Chuseok falls in autumn every year, the harvest festival of Korea."}) + "\n")
    third = run_main(args)
    assert third["corpus"]["index"]["reused"] is False
    assert third["corpus"]["documents"] == first["corpus"]["documents"] + 1
    assert third["questions"][0]["occurrences"] == PLANTED["en"][0] + 1
    resharded = run_main(args + ["--shard_size", "7"])
    assert resharded["corpus"]["index"]["reused"] is False


def test_dataset_corpus_from_save_to_disk_counts_rows_without_text_and_refuses_a_missing_split(tmp_path, world):
    import datasets

    question_files, corpus_files = world
    texts = list(read_documents(corpus_files["bo"]))
    rows = {"text": texts + [None], "doc_id": list(range(len(texts) + 1))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    report = run_main(
        ["--questions", str(question_files["bo"]), "--corpus_dataset", str(tmp_path / "ds"), "--top_k", "20",
         "--output_dir", str(tmp_path / "out")],
    )  # fmt: skip
    assert [e["occurrences"] for e in report["questions"]] == PLANTED["bo"]
    assert report["corpus"]["label"] == "ds"
    assert report["corpus"]["documents"] == len(texts)
    assert report["corpus"]["skipped"] == {"no text in column 'text'": 1}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(InputError, match=r"splits': no split 'validation'; its splits: train\."):
        run_main(["--questions", str(question_files["bo"]), "--corpus_dataset", str(tmp_path / "splits"),
                  "--corpus_split", "validation", "--output_dir", str(tmp_path / "out2")])  # fmt: skip


def test_streamed_dataset_corpus_is_judged_on_the_texts_its_index_stored(tmp_path, world):
    question_files, corpus_files = world
    folder = tmp_path / "stream"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(corpus_files["mn"].read_bytes())
    report = run_main(
        ["--questions", str(question_files["mn"]), "--corpus_dataset", str(folder), "--corpus_streaming",
         "--corpus_label", "streamed", "--top_k", "20", "--output_dir", str(tmp_path / "out")],
    )  # fmt: skip
    assert [e["occurrences"] for e in report["questions"]] == PLANTED["mn"]
    assert report["corpus"]["label"] == "streamed"
    assert report["corpus"]["source"]["kind"] == "dataset"


# --------------------------------------------------------------------------------------
# Instance-level analysis
# --------------------------------------------------------------------------------------


def _predictions(path: Path, stem: str, lang: str, correct_by_step: dict[int, list[bool]], cpt_setting=None):
    """A run_eval.py output folder: predictions.jsonl and the accuracy.json that lists its checkpoints."""
    path.mkdir(parents=True, exist_ok=True)
    accuracy = {"checkpoints": [{"step": step, "path": f"checkpoint-{step}"} for step in correct_by_step],
                "questions": {stem: {"lang": lang, "items": len(next(iter(correct_by_step.values())))}},
                "cpt_setting": cpt_setting}  # fmt: skip
    (path / "accuracy.json").write_text(json.dumps(accuracy), encoding="utf-8")
    with (path / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for step, correct in correct_by_step.items():
            for index, ok in enumerate(correct):
                row = {"questions": stem, "lang": lang, "index": index, "step": step, "checkpoint": f"checkpoint-{step}",
                       "scores": [1.0, 2.0], "prediction": 0 if ok else 1, "answer": [0], "correct": ok,
                       "credit_fractional": float(ok)}  # fmt: skip
                handle.write(json.dumps(row) + "\n")


def test_instance_analysis_compares_transferred_items_with_all_in_the_source_corpus(world, tmp_path):
    question_files, corpus_files = world
    # Parallel files: the Tibetan questions are measured on the English corpus through their English twins.
    parallel_en = tmp_path / "culture_en.json"
    parallel_bo = tmp_path / "culture_bo.json"
    en_items = json.loads(question_files["en"].read_text(encoding="utf-8"))[:2]
    parallel_en.write_text(json.dumps(en_items), encoding="utf-8")
    parallel_bo.write_text(question_files["bo"].read_text(encoding="utf-8"), encoding="utf-8")
    _predictions(tmp_path / "with", "culture_bo", "bo", {10: [False, False], 20: [True, True]})
    _predictions(tmp_path / "without", "culture_bo", "bo", {10: [False, False], 20: [False, True]})
    args = ["--questions", str(parallel_en), str(parallel_bo),
            "--corpus_files", f"english={corpus_files['en']}", f"tibetan={corpus_files['bo']}",
            "--top_k", "20", "--output_dir", str(tmp_path / "out"),
            "--predictions_with", str(tmp_path / "with"), "--predictions_without", str(tmp_path / "without"),
            "--source_corpus", "bo=english"]  # fmt: skip
    report = run_main(args)
    (result,) = report["instance_analysis"]["results"]
    occurrences_en = PLANTED["en"][:2]  # [3, 0]
    assert result["questions"] == "culture_bo" and result["occurrences_from"] == "culture_en"
    assert result["step_with"] == result["step_without"] == 20
    assert result["transferred_indices"] == [0]
    assert result["mean_occurrences_transferred"] == occurrences_en[0]
    assert result["mean_occurrences_all"] == pytest.approx(np.mean(occurrences_en))
    assert result["mean_occurrences_not_transferred"] == occurrences_en[1]
    markdown = (tmp_path / "out" / "density.md").read_text(encoding="utf-8")
    assert "| culture_bo | english (culture_en) | 2 | 1 | 3.00 | 1.50 | 0.00 |" in markdown

    automatic = run_main([a for a in args if a not in ("--source_corpus", "bo=english")])
    assert automatic["instance_analysis"]["results"] == report["instance_analysis"]["results"]

    at_10 = run_main(args + ["--predictions_step", "10"])
    (result,) = at_10["instance_analysis"]["results"]
    assert result["transferred"] == 0 and result["mean_occurrences_transferred"] is None


def test_instance_analysis_reports_items_without_a_source_measurement(world, tmp_path):
    question_files, corpus_files = world
    _predictions(tmp_path / "with", "other-set_bo", "bo", {5: [True]})
    _predictions(tmp_path / "without", "other-set_bo", "bo", {5: [False]})
    report = run_main(["--questions", str(question_files["en"]), "--corpus_files", f"english={corpus_files['en']}",
         "--output_dir", str(tmp_path / "out"), "--predictions_with", str(tmp_path / "with" / "predictions.jsonl"),
         "--predictions_without", str(tmp_path / "without"), "--source_corpus", "english"],
    )  # fmt: skip
    assert report["instance_analysis"]["results"] == []
    assert report["instance_analysis"]["skipped"][0]["questions"] == "other-set_bo"
    automatic = run_main(
        ["--questions", str(question_files["en"]), "--corpus_files", f"english={corpus_files['en']}",
         "--output_dir", str(tmp_path / "out2"), "--predictions_with", str(tmp_path / "with"),
         "--predictions_without", str(tmp_path / "without")],
    )  # fmt: skip
    assert "ambiguous" in automatic["instance_analysis"]["skipped"][0]["reason"]


def _planted_gaps(tmp_path, gained_at_0: int, gained_at_3: int, n: int = 40):
    """2n items: n stated 0 times in the source corpus, n stated 3 times; of each, the first ``gained_*`` are
    right with bridges and wrong without (gap +1), the rest wrong in both (gap 0). The least-squares slope of
    the gap on log(1 + occurrences) is then exactly (gained_at_3 - gained_at_0) / n / log(4)."""
    gained = [i < gained_at_0 for i in range(n)] + [i < gained_at_3 for i in range(n)]
    _predictions(tmp_path / "with", "set_bo", "bo", {7: gained}, {"setting": "bridges"})
    _predictions(tmp_path / "without", "set_bo", "bo", {7: [False] * 2 * n}, {"setting": "no_bridges"})
    occurrences = {("english", "set_en"): [0] * n + [3] * n}
    (result,) = rd.instance_analysis(tmp_path / "with" / "predictions.jsonl", tmp_path / "without" /
                                     "predictions.jsonl", None, [], occurrences)["results"]  # fmt: skip
    return result


def test_the_gap_slope_on_log_occurrences_recovers_a_planted_slope_with_a_bootstrap_interval(tmp_path):
    result = _planted_gaps(tmp_path / "planted", gained_at_0=10, gained_at_3=30)
    fit = result["gap_vs_log_occurrences"]
    assert fit["slope"] == pytest.approx(0.5 / np.log(4)) and fit["n_items"] == 80 and fit["n_bootstrap"] >= 1000
    low, high = fit["slope_ci"]
    assert 0 < low < fit["slope"] < high < 2 * fit["slope"]  # an effect: the interval excludes 0
    null = _planted_gaps(tmp_path / "null", gained_at_0=10, gained_at_3=10)["gap_vs_log_occurrences"]
    assert null["slope"] == pytest.approx(0) and null["slope_ci"][0] < 0 < null["slope_ci"][1]  # a null, reported
    assert rd.gap_slope(np.ones(5), np.full(5, 2))["slope"] is None  # one occurrence count: no slope to fit
    markdown = rd.markdown_report([], {"results": [result], "skipped": []}, [], 50, "lexical")
    assert f"| {fit['slope']:+.3f} [{low:+.3f}, {high:+.3f}] |" in markdown


def test_predictions_given_under_the_wrong_setting_flag_are_refused(tmp_path):
    _planted_gaps(tmp_path, 1, 2, n=4)
    with_run, without_run = tmp_path / "with" / "predictions.jsonl", tmp_path / "without" / "predictions.jsonl"
    occurrences = {("english", "set_en"): [0, 1, 2, 3] * 2}
    with pytest.raises(InputError, match=r"was given as --predictions_with but its cpt_setting says no_bridges"):
        rd.instance_analysis(without_run, with_run, None, [], occurrences)
    _predictions(tmp_path / "mismatched", "set_bo", "bo", {7: [False] * 8}, {"setting": "mismatched_bridges"})
    with pytest.raises(InputError, match=r"--predictions_without but its cpt_setting says mismatched_bridges"):
        rd.instance_analysis(with_run, tmp_path / "mismatched" / "predictions.jsonl", None, [], occurrences)


def test_a_corpus_file_given_twice_is_refused_rather_than_counted_twice(world, tmp_path):
    question_files, corpus_files = world
    corpus = corpus_files["en"]
    same = corpus.parent / "." / corpus.name  # another spelling of the same file
    for entries in ([f"english={corpus},{same}"], [f"a={corpus}", f"b={same}"]):
        with pytest.raises(InputError, match="names a file more than once"):
            rd.main(["--questions", str(question_files["en"]), "--corpus_files", *entries,
                     "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_inputs_name_the_file_and_line(world, tmp_path):
    question_files, corpus_files = world
    q = str(question_files["en"])
    out = ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(InputError, match=r"missing\.jsonl: no such corpus file"):
        rd.main(["--questions", q, "--corpus_files", str(tmp_path / "missing.jsonl"), *out])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:3: not valid JSON"):
        rd.main(["--questions", q, "--corpus_files", str(bad), *out])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"one\ncaf\xe9\n")
    with pytest.raises(InputError, match=r"latin1\.txt:2: not UTF-8 \(byte 0xe9"):
        rd.main(["--questions", q, "--corpus_files", str(latin1), *out])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="the file is empty"):
        rd.main(["--questions", q, "--corpus_files", str(empty), *out])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(InputError, match="has no documents"):
        rd.main(["--questions", q, "--corpus_files", str(blank), *out])
    no_column = tmp_path / "nocol.jsonl"
    no_column.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nocol\.jsonl:1: no 'text' column"):
        rd.main(["--questions", q, "--corpus_files", str(no_column), *out])
    bad_questions = tmp_path / "q_en.json"
    bad_questions.write_text('[{"question": "a ___", "options": [], "answer": 3}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"q_en\.json item 0: 'answer' must be"):
        rd.main(["--questions", str(bad_questions), "--corpus_files", str(corpus_files["en"]), *out])
    _predictions(tmp_path / "run", "x", "en", {1: [True]})
    predictions = tmp_path / "run" / "predictions.jsonl"
    predictions.write_text(predictions.read_text(encoding="utf-8") + "{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"predictions\.jsonl:2: not valid JSON"):
        rd.main(["--questions", q, "--corpus_files", str(corpus_files["en"]), *out,
                 "--predictions_with", str(predictions), "--predictions_without", str(predictions)])  # fmt: skip
    with pytest.raises(InputError, match=r"expected run_eval\.py's output folder"):  # a folder above the run's
        rd.main(["--questions", q, "--corpus_files", str(corpus_files["en"]), *out,
                 "--predictions_with", str(tmp_path), "--predictions_without", str(tmp_path / "run")])  # fmt: skip
    assert not (tmp_path / "out" / "density.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "Give a corpus"),
        (["--corpus_files", "c.jsonl", "--max_documents", "0"], "--max_documents must be positive"),
        (["--corpus_files", "c.jsonl", "--top_k", "0"], "--top_k, --shard_size"),
        (["--corpus_files", "c.jsonl", "--judge_min_key_fraction", "1.5"], r"must lie in \[0, 1\]"),
        (["--corpus_files", "c.jsonl", "--predictions_with", "run"], "Give both --predictions_with"),
    ],
)
def test_arguments_that_cannot_be_measured_are_refused_naming_the_flag(flags, message):
    with pytest.raises(InputError, match=message):
        rd.main(["--questions", "q_en.json", "--output_dir", "out", *flags])


def test_a_run_whose_every_pair_is_skipped_by_script_exits_2_naming_them_and_writes_no_report(world, tmp_path):
    question_files, corpus_files = world
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_density.py"), "--questions", str(question_files["en"]),
         str(question_files["ko"]), "--corpus_files", f"tibetan={corpus_files['bo']}", "--output_dir", str(out),
         "--log_level", "warning"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("run_density.py: error:")]
    assert "every question/corpus pair was skipped" in error
    assert "synthetic-cloze_en on tibetan: 0.00% of the corpus is in Latin script (< --min_script_fraction" in error
    assert "synthetic-cloze_ko on tibetan: 0.00% of the corpus is in Hangul script" in error
    assert not (out / "density.json").exists() and not (out / "density.md").exists()
    # One measured pair is enough: the other is reported as skipped, and the run succeeds.
    report = run_main(
            ["--questions", str(question_files["en"]), str(question_files["bo"]),
                                 "--corpus_files", f"tibetan={corpus_files['bo']}", "--output_dir", str(out)])  # fmt: skip
    assert [(r["questions"], r["corpus"]) for r in report["table"]] == [("synthetic-cloze_bo", "tibetan")]
    assert [(s["questions"], s["corpus"]) for s in report["skipped_pairs"]] == [("synthetic-cloze_en", "tibetan")]


# --------------------------------------------------------------------------------------
# Language-model judge (mechanics on a tiny random model: it cannot judge, but it must run right)
# --------------------------------------------------------------------------------------


def test_judge_prompt_is_the_documented_template_around_an_excerpt_centred_on_the_answer(tiny_model_dir):
    judge = rd.LanguageModelJudge(str(tiny_model_dir), batch_size=1, excerpt_chars=100, max_tokens=512)

    def prompt(question, document):
        ids = judge.prompt_ids(question, document)
        assert ids[0] == judge.start_id
        return judge.tokenizer.decode(ids[1:], clean_up_tokenization_spaces=False)

    question = rd.prepare_question(0, "Chuseok falls in ____.", ["autumn"])
    assert prompt(question, "Chuseok is in autumn.") == (
        "Document: Chuseok is in autumn.\n\nQuestion: Chuseok falls in ____.\nProposed answer: autumn\n"
        'Does the document state that "Chuseok falls in autumn."? Answer:'
    )
    documented = (REPO_ROOT / "docs" / "density.md").read_text(encoding="utf-8")
    assert 'Does the document state that "{statement}"? Answer:' in documented
    needle = rd.prepare_question(0, "x ___", ["needle"])
    text = prompt(needle, "a" * 1000 + "needle" + "b" * 1000)
    excerpt = text.removeprefix("Document: ").split("\n\nQuestion:")[0]
    assert excerpt == "a" * 50 + "needle" + "b" * 44


def test_language_model_judge_gives_one_margin_per_prompt_independent_of_batching(tiny_model_dir):
    import torch

    question = rd.prepare_question(0, "Chuseok falls in ____.", ["autumn"])
    docs = ["Chuseok is in autumn.", "Songpyeon are rice cakes eaten at Chuseok in the autumn season.", "x"]
    batched = rd.LanguageModelJudge(str(tiny_model_dir), batch_size=3, excerpt_chars=200, max_tokens=256)
    prompts = [batched.prompt_ids(question, d) for d in docs]
    assert all(p[0] == batched.start_id for p in prompts)
    margins = batched.margins(prompts)
    assert margins.shape == (3,) and np.isfinite(margins).all()
    single = rd.LanguageModelJudge(str(tiny_model_dir), batch_size=1, excerpt_chars=200, max_tokens=256)
    np.testing.assert_allclose(single.margins(prompts), margins, atol=1e-4)

    def log_prob(prompt, continuation):  # one unpadded forward pass, every position's logits
        ids = torch.tensor([prompt + continuation])
        logits = batched.model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
        return sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(continuation))

    reference = [log_prob(p, batched.yes_ids) - log_prob(p, batched.no_ids) for p in prompts]
    np.testing.assert_allclose(margins, reference, atol=1e-4)
    short = rd.LanguageModelJudge(str(tiny_model_dir), batch_size=2, excerpt_chars=400, max_tokens=120)
    longest_answer = max(len(short.yes_ids), len(short.no_ids))
    for doc in docs[:2]:
        assert len(batched.prompt_ids(question, doc * 20)) + longest_answer > 120  # it had to be shortened
        assert len(short.prompt_ids(question, doc * 20)) + longest_answer == 120


def test_judge_model_end_to_end_records_booleans_for_every_retrieved_document(world, tiny_model_dir, tmp_path):
    question_files, corpus_files = world
    args = ["--questions", str(question_files["ko"]), "--corpus_files", str(corpus_files["ko"]), "--top_k", "4",
            "--judge_model", str(tiny_model_dir), "--judge_excerpt_chars", "120", "--judge_max_tokens", "256",
            "--judge_batch_size", "4"]  # fmt: skip
    report = run_main(args + ["--output_dir", str(tmp_path / "out")])
    margins = []
    for entry in report["questions"]:
        assert len(entry["contains"]) == len(entry["lm_margin"]) == len(entry["retrieved"]) == 4
        assert all(isinstance(c, bool) for c in entry["contains"])
        assert entry["occurrences"] == sum(entry["contains"])
        assert entry["contains"] == [m > 0 for m in entry["lm_margin"]]
        margins += entry["lm_margin"]
    assert report["setting"]["judge"].startswith("language-model")
    # --judge_margin is the threshold: at the median margin, the documents above it (and only they) count.
    threshold = float(np.median(margins))
    assert min(margins) < threshold < max(margins)  # the random model's margins differ from document to document
    moved = run_main(args + ["--output_dir", str(tmp_path / "out2"), "--judge_margin", repr(threshold)])
    for before, entry in zip(report["questions"], moved["questions"]):
        assert entry["lm_margin"] == before["lm_margin"]
        assert entry["contains"] == [m > threshold for m in before["lm_margin"]]
    assert 0 < sum(sum(e["contains"]) for e in moved["questions"]) < len(margins)


# --------------------------------------------------------------------------------------
# The paper's released questions
# --------------------------------------------------------------------------------------


def test_planted_paper_questions_are_recovered_in_every_language(paper_cloze_dir, tmp_path):
    """Real questions of all eight files, each planted a known number of times among near misses."""
    rng = random.Random(1)
    for path in sorted(paper_cloze_dir.glob("*.json")):
        items = json.loads(path.read_text(encoding="utf-8"))
        chosen = _independent_items(items, 8)
        lang = path.stem.rsplit("_", 1)[-1]
        docs, planted = [], []
        filler_pool = [fill(it["question"], it["options"][0]) for it in items[-40:]]
        for k, item in enumerate(chosen):
            answer = _answers(item)[0]
            planted.append(k % 4)
            for _ in range(k % 4):
                docs.append(" ".join([rng.choice(filler_pool), fill(item["question"], answer)]))
            for option in item["options"]:
                if option not in _answers(item):
                    docs.append(fill(item["question"], option))
        docs += [" ".join(rng.sample(filler_pool, 3)) for _ in range(40)]
        rng.shuffle(docs)
        qfile = tmp_path / f"{path.stem}.json"
        qfile.write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
        cfile = tmp_path / f"corpus_{lang}_{path.stem}.jsonl"
        cfile.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        report = run_main(["--questions", str(qfile), "--corpus_files", str(cfile), "--top_k", "30",
             "--output_dir", str(tmp_path / path.stem), "--min_script_fraction", "0"],
        )  # fmt: skip
        assert [e["occurrences"] for e in report["questions"]] == planted, path.name


def _answers(item) -> list[str]:
    return [item["answer"]] if isinstance(item["answer"], str) else item["answer"]


def _independent_items(items: list[dict], n: int) -> list[dict]:
    """Items with a blank whose answers' units appear in no other chosen item's text, nor in a
    wrong option or in the filler (the last 40 items): then the exact count is known."""
    filler_units = [rd.analyse_text(it["question"] + " " + " ".join(it["options"])).units for it in items[-40:]]
    chosen: list[dict] = []
    for item in items[:-40]:
        answers = _answers(item)
        if not BLANK.search(item["question"]) or not all(a in item["options"] for a in answers):
            continue
        units = [tuple(rd.analyse_text(a).units) for a in answers]
        others = [rd.analyse_text(c["question"] + " " + " ".join(c["options"])).units for c in chosen]
        wrong = [rd.analyse_text(o).units for o in item["options"] if o not in answers]
        own = rd.analyse_text(BLANK.sub(" ", item["question"])).units
        pools = others + wrong + filler_units + [own]
        if any(u and _contains(pool, u) for u in units for pool in pools):
            continue
        if any(_contains(rd.analyse_text(c["question"] + " " + " ".join(c["options"])).units, tuple(rd.analyse_text(a).units))
               for c in [item] for a in sum((_answers(x) for x in chosen), [])):  # fmt: skip
            continue
        chosen.append(item)
        if len(chosen) == n:
            break
    return chosen


def _contains(units: list[str], needle: tuple[str, ...]) -> bool:
    return any(tuple(units[i : i + len(needle)]) == needle for i in range(len(units) - len(needle) + 1))


# --------------------------------------------------------------------------------------
# The judge figures of docs/density.md come from bench/density_judge_recall.py
# --------------------------------------------------------------------------------------


def test_judge_recall_script_counts_every_planted_statement_of_a_world(tmp_path):
    from synthetic_world import WorldArguments, generate_world

    world = tmp_path / "world"
    generate_world(
        WorldArguments(output_dir=str(world), langs=["bo"], places=4, relations=2, en_count=6, tgt_count=4,
                       low_resource_ratio=3.0, en_filler_documents=40, mono_filler_documents=40, pairs=40,
                       diagnostic_pairs=5, pair_mentions=1, mono_mentions=1, name_variants=["native"])
    )  # fmt: skip
    truth = json.loads((world / "truth.json").read_text(encoding="utf-8"))
    proc = run_script([sys.executable, str(REPO_ROOT / "bench" / "density_judge_recall.py"), "--world_dir", str(world),
                       "--langs", "bo", "--thresholds", "0.25"])  # fmt: skip
    rows = {line.split(" | ")[1]: line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| 0.25 |")}
    facts = truth["cultures"]["bo"]["facts"]
    planted_en, planted_tgt = sum(f["counts"]["en"] for f in facts), sum(f["counts"]["tgt"] for f in facts)
    # statements and retrieved statements: every planted statement, found in the top 50
    assert rows["English"][2:4] == [str(planted_en)] * 2 and rows["target"][2:4] == [str(planted_tgt)] * 2
    entities_named_alone = len(facts)  # one filler document per object entity (--mono_mentions 1)
    assert rows["target"][6] == str(entities_named_alone) and rows["English"][6] == "0"
    assert "not retrieved 0" in proc.stdout


def test_max_documents_indexes_only_the_first_n_documents_and_the_density_is_a_share_of_them(tmp_path):
    questions = tmp_path / "firstn_en.json"
    questions.write_text(
        json.dumps([{"question": "Chuseok falls in ____.", "options": ["autumn"], "answer": "autumn"}])
    )
    corpus = tmp_path / "firstn.txt"
    corpus.write_text("unrelated words here\n" * 3 + "Chuseok falls in autumn.\n" * 6, encoding="utf-8")
    arguments = ["--questions", str(questions), "--corpus_files", str(corpus), "--output_dir", str(tmp_path / "out")]
    report = run_main([*arguments, "--max_documents", "5"])
    assert report["corpus"]["documents"] == 5 and report["questions"][0]["occurrences"] == 2
    assert report["setting"]["max_documents"] == 5
    # another budget is another index: the full corpus is indexed again, not read from the capped one
    report = run_main(arguments)
    assert report["corpus"]["documents"] == 9 and report["questions"][0]["occurrences"] == 6
    assert report["corpus"]["index"]["reused"] is False
