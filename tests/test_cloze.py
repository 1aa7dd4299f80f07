"""cloze.py: question loading, validation and language, filling blanks, ties, and the predictions reader."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cloze_samples import SAMPLE_QUESTIONS
from eval_helpers import write_eval_output, write_questions

import cloze
from study_common import InputError


def test_fill_blanks_replaces_every_underscore_run():
    assert cloze.fill_blanks("A __ b ____ c", "xyz") == "A xyz b xyz c"
    # A backslash or group reference in an option is text, not a regex replacement pattern.
    assert cloze.fill_blanks("x ___ y", r"\1 \n") == r"x \1 \n y"
    assert cloze.fill_blanks("no blank here", "opt") == "no blank here"


def test_paper_files_quirks_are_counted_as_the_data_readme_lists_them(paper_cloze_dir):
    sets = {qs.stem: qs for qs in cloze.load_question_sets([str(paper_cloze_dir)])}
    assert len(sets) == 8
    assert {stem: len(qs.items) for stem, qs in sets.items() if stem.endswith("_en")} == {
        "bo-culture-cloze_en": 268,
        "ko-culture-cloze_en": 598,
        "mn-culture-cloze_en": 276,
        "zh-culture-cloze_en": 328,
    }
    assert sets["ko-culture-cloze_ko"].quirks["no_blank"] == [353]
    assert sets["mn-culture-cloze_en"].quirks["no_blank"] == [32, 88, 98, 99, 153, 174, 191, 223]
    assert sets["mn-culture-cloze_mn"].quirks["no_blank"] == [17, 23]
    assert sets["ko-culture-cloze_en"].quirks["several_blanks"] == [486]
    assert sets["mn-culture-cloze_en"].quirks["answer_not_in_options"] == [69]
    assert sets["mn-culture-cloze_en"].items[69]["answer"] == []
    assert sets["ko-culture-cloze_en"].quirks["duplicate_options"] == [146, 161, 296]
    # Language from the file-name suffix: the _en file of the Korean culture is English.
    assert sets["ko-culture-cloze_en"].lang == "en" and sets["ko-culture-cloze_ko"].lang == "ko"
    assert sets["ko-culture-cloze_en"].base == sets["ko-culture-cloze_ko"].base == "ko-culture-cloze"


def test_strict_turns_every_quirk_into_an_error_naming_file_and_item(tmp_path):
    path = write_questions(
        tmp_path / "q_en.json",
        [
            {"question": "A ___ b", "options": ["x", "y"], "answer": "x"},
            {"question": "no blank", "options": ["x", "y"], "answer": "x"},
            {"question": "A ___ b", "options": ["x", "y"], "answer": "z"},
            *[{"question": "C ___ d", "options": ["x", "y"], "answer": "y"}] * 2,  # quirks are a minority
        ],
    )
    sets = cloze.load_question_sets([str(path)])
    assert sets[0].quirks == {"no_blank": [1], "answer_not_in_options": [2]}
    with pytest.raises(ValueError) as err:
        cloze.load_question_sets([str(path)], strict=True)
    assert f"{path} item 1: has no blank" in str(err.value)
    assert f"{path} item 2: has an answer that is not among its options" in str(err.value)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"question": "A ___", "answer": "x"}, "needs 'question', 'options' and 'answer'"),
        ({"question": "", "options": ["x", "y"], "answer": "x"}, "'question' must be a non-empty string"),
        ({"question": "A ___", "options": "x y", "answer": "x"}, "'options' must be a non-empty list"),
        ({"question": "A ___", "options": ["x", ""], "answer": "x"}, "'options' must be a non-empty list"),
        ({"question": "A ___", "options": ["x", "y"], "answer": 3}, "'answer' must be a string"),
    ],
)
def test_malformed_items_are_errors_naming_file_and_item(tmp_path, item, message):
    path = write_questions(tmp_path / "q_en.json", [{"question": "ok ___", "options": ["a", "b"], "answer": "a"}, item])
    with pytest.raises(ValueError, match=re.escape(f"{path} item 1: ") + ".*" + re.escape(message)):
        cloze.load_question_sets([str(path)])


def test_parallel_files_of_different_length_are_an_error(tmp_path):
    item = {"question": "A ___", "options": ["x", "y"], "answer": "x"}
    write_questions(tmp_path / "q" / "culture_en.json", [item, item])
    write_questions(tmp_path / "q" / "culture_ko.json", [item])
    with pytest.raises(
        ValueError, match=r"lengths differ: .*culture_en.json \(2 items\), .*culture_ko.json \(1 items\)"
    ):
        cloze.load_question_sets([str(tmp_path / "q")])


def test_a_question_source_that_is_missing_or_given_twice_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"nope\.json: not a file, a folder or a Hub dataset id"):
        cloze.load_question_sets([str(tmp_path / "nope.json")])
    path = write_questions(tmp_path / "q_en.json", [{"question": "A ___", "options": ["x", "y"], "answer": "x"}])
    with pytest.raises(InputError, match="a question set named 'q_en' was already loaded"):
        cloze.load_question_sets([str(path), str(path)])


def test_question_language_needs_a_suffix_or_an_override(tmp_path):
    path = write_questions(tmp_path / "myquestions.json", [{"question": "A ___", "options": ["x", "y"], "answer": "x"}])
    with pytest.raises(ValueError, match="--question_langs myquestions=LANG"):
        cloze.load_question_sets([str(path)])
    assert cloze.load_question_sets([str(path)], ["myquestions=bo"])[0].lang == "bo"
    assert cloze.load_question_sets([str(path)], ["mn"])[0].lang == "mn"


def test_questions_load_from_a_saved_dataset_and_a_hub_style_dataset_repository(tmp_path):
    from datasets import Dataset, DatasetDict

    def as_lists(items):  # an Arrow column holds one type: every answer as a list
        return [{**it, "answer": it["answer"] if isinstance(it["answer"], list) else [it["answer"]]} for it in items]

    splits = {f"sample_{lang}": Dataset.from_list(as_lists(SAMPLE_QUESTIONS[lang][:4])) for lang in ("en", "ko")}
    DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    saved = cloze.load_question_sets([str(tmp_path / "saved")])
    assert [(qs.stem, qs.lang, len(qs.items)) for qs in saved] == [("sample_en", "en", 4), ("sample_ko", "ko", 4)]
    # A dataset repository as on the Hub (data files + README configs) goes through datasets.load_dataset,
    # the same code path as a Hub id; only the download is not exercised here (no network).
    repo = tmp_path / "hub_repo"
    (repo / "data").mkdir(parents=True)
    for lang in ("en", "zh"):
        (repo / "data" / f"{lang}.json").write_text(json.dumps(as_lists(SAMPLE_QUESTIONS[lang]), ensure_ascii=False))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: culture_en\n    path: data/en.json\n  - split: culture_zh\n    path: data/zh.json\n---\n"
    )
    hub = cloze.load_question_sets([str(repo)])
    assert [(qs.stem, qs.lang, len(qs.items)) for qs in hub] == [("culture_en", "en", 6), ("culture_zh", "zh", 6)]
    # List-valued answers survive the round trip through a dataset.
    assert hub[0].items[3]["answer"] == [0, 2]


def test_tie_credit_counts_exact_ties_for_the_best_and_gives_one_over_k():
    assert cloze.tie_credit([1.0, 1.0, 2.0], [1]) == (2, 0.5)
    assert cloze.tie_credit([3.0, 1.0, 1.0, 1.0], [0]) == (3, 0.0)
    assert cloze.tie_credit([2.0, 1.0, 1.0, 1.0], [1, 3]) == (3, pytest.approx(2 / 3))
    assert cloze.tie_credit([2.0, 1.0, 1.5], [1]) == (1, 1.0)
    assert cloze.tie_credit([2.0, 1.0, 1.0 + 1e-12], [2]) == (1, 0.0)  # near is not equal
    assert cloze.tie_credit([1.0, 1.0], []) == (2, 0.0)  # answer not among the options


def test_position_bias_of_the_released_files_puts_answers_first_far_more_often_than_chance(paper_cloze_dir):
    sets = {qs.stem: qs for qs in cloze.load_question_sets([str(paper_cloze_dir)])}
    first = {stem: cloze.position_bias(qs.items)["always_first_accuracy"] for stem, qs in sets.items()}
    for culture, share in (("zh", 0.89), ("mn", 0.62), ("bo", 0.56), ("ko", 0.38)):
        for lang in ("en", culture):
            assert first[f"{culture}-culture-cloze_{lang}"] == pytest.approx(share, abs=0.01), (culture, lang)


def test_items_missing_or_repeated_in_predictions_are_an_error_naming_file_questions_step_and_items(tmp_path):
    data = {"c_ko": np.ones((2, 10), bool), "c_en": np.ones((2, 10), bool)}
    eval_dir = write_eval_output(tmp_path / "r", data, [1, 2], {"lang": "ko", "bridges": True, "seed": 0})
    predictions = eval_dir / "predictions.jsonl"
    lines = predictions.read_text().splitlines()
    # Drop items 3 and 7 of c_ko at step 2 (lines 20.. hold step 2; c_ko comes first).
    kept = [line for k, line in enumerate(lines) if k not in (23, 27)]
    predictions.write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError) as err:
        cloze.read_predictions(eval_dir)
    message = str(err.value)
    assert str(predictions) in message and "c_ko step 2: 2 item(s) missing: 3, 7" in message
    assert "--overwrite_output_dir" in message and "c_en" not in message
    predictions.write_text("\n".join(lines + [lines[4]]) + "\n")
    with pytest.raises(ValueError, match=r"c_ko step 1: 1 item\(s\) listed twice: 4"):
        cloze.read_predictions(eval_dir)
    predictions.write_text("\n".join(lines) + "\n")
    _, correct = cloze.read_predictions(eval_dir)
    assert correct["c_ko"][2].all() and correct["c_en"][1].all()


def test_read_predictions_credits_a_tied_item_first_wins_or_one_over_k(tmp_path):
    data = {"c_ko": np.array([[True, False, False]])}
    eval_dir = write_eval_output(tmp_path / "r", data, [1], None, tied={"c_ko": np.array([[False, True, False]])})
    _, first = cloze.read_predictions(eval_dir)
    _, fractional = cloze.read_predictions(eval_dir, tie_policy="fractional")
    assert first["c_ko"][1].tolist() == [True, True, False]
    assert fractional["c_ko"][1].tolist() == [1.0, 0.5, 0.0]


def test_question_names_follow_the_study_s_convention_and_give_back_their_language():
    assert cloze.question_stem("ko", "en") == "ko-culture-cloze_en"
    assert cloze.question_file_name("bo", "bo") == "bo-culture-cloze_bo.json"
    assert cloze.question_lang_from_stem(cloze.question_stem("mn", "mn")) == "mn"
    assert cloze.question_lang_from_stem("culture_zh-Hans") == "zh-hans"
    assert cloze.question_lang_from_stem("myquestions") is None


def test_tibetan_tsheg_is_added_only_where_the_blank_touches_a_tibetan_syllable():
    # The paper's files write the blank against the next syllable: the filled answer gets its own tsheg.
    assert cloze.fill_blanks("_____ཁྱབ་ཡོད།", "ལྷ་ས", tibetan_tsheg=True) == "ལྷ་ས\u0f0bཁྱབ་ཡོད།"
    assert cloze.fill_blanks("བོད་ཀྱི____", "ཇ", tibetan_tsheg=True) == "བོད་ཀྱི\u0f0bཇ"
    # Already separated (a tsheg or a space), a Latin answer, or the paper's scoring: nothing added.
    assert cloze.fill_blanks("བོད་____ཡིན།", "ཇ", tibetan_tsheg=True) == "བོད་ཇ\u0f0bཡིན།"
    assert cloze.fill_blanks("Tea ____ ཡིན", "hot", tibetan_tsheg=True) == "Tea hot ཡིན"
    assert cloze.fill_blanks("_____ཁྱབ་ཡོད།", "ལྷ་ས") == "ལྷ་སཁྱབ་ཡོད།"
    assert cloze.fill_blanks("ཀ___ཁ___ག", "ཇ", tibetan_tsheg=True) == "ཀ\u0f0bཇ\u0f0bཁ\u0f0bཇ\u0f0bག"


def test_a_tibetan_letter_is_a_letter_or_mark_of_the_tibetan_script():
    regex = pytest.importorskip("regex")
    letter = regex.compile(r"[\p{sc=Tibetan}&&[\p{L}\p{M}]]", regex.VERSION1)
    for code in range(0x0E80, 0x1080):
        char = chr(code)
        assert cloze._is_tibetan_letter(char) == bool(letter.match(char)), hex(code)
    assert not cloze._is_tibetan_letter("")


def test_questions_read_as_facts_need_no_options_and_drop_blank_answers(tmp_path):
    path = write_questions(
        tmp_path / "facts.json",
        [
            {"question": "Tea is ____.", "answer": ["hot", " "]},
            {"question": "Milk is ____.", "options": ["white", "black"], "answer": "white"},
        ],
    )
    (facts,) = cloze.load_question_sets([str(path)], require_options=False)
    assert facts.lang == "" and [it["answers"] for it in facts.items] == [["hot"], ["white"]]
    assert facts.items[1]["answer"] == [0]
    with pytest.raises(ValueError, match="cannot tell the question language"):
        cloze.load_question_sets([str(path)])  # to score, a set needs its language and its options
    # Files sharing a base need not be parallel when read as facts.
    write_questions(tmp_path / "q" / "c_en.json", [{"question": "A ___", "answer": "x"}] * 2)
    write_questions(tmp_path / "q" / "c_ko.json", [{"question": "A ___", "answer": "x"}])
    assert [qs.lang for qs in cloze.load_question_sets([str(tmp_path / "q")], require_options=False)] == ["en", "ko"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"answer": "x"}, "expected an object with a 'question' string"),
        ({"question": "A ___", "answer": 3}, "'answer' must be a string or a list of strings (found 3)"),
        ({"question": "A ___", "answer": ["", " "]}, "the answer is empty"),
    ],
)
def test_malformed_facts_are_errors_naming_file_and_item(tmp_path, item, message):
    path = write_questions(tmp_path / "q_en.json", [{"question": "ok ___", "answer": "a"}, item])
    with pytest.raises(ValueError, match=re.escape(f"{path} item 1: {message}")):
        cloze.load_question_sets([str(path)], require_options=False)


def test_a_file_whose_answers_are_option_letters_is_refused_but_a_minority_of_quirks_is_not(tmp_path):
    mmlu = [{"question": f"Q{i} ___.", "options": ["red", "green", "blue"], "answer": "B"} for i in range(4)]
    path = write_questions(tmp_path / "letters_en.json", mmlu)
    with pytest.raises(InputError, match=r"letters_en\.json: 4 of 4 items cannot be scored .*option letters"):
        cloze.load_question_sets([str(path)])
    with pytest.raises(InputError, match="cannot be scored"):  # read as facts, "B" is no fact either
        cloze.load_question_sets([str(path)], require_options=False)
    fine = [{**item, "answer": "green"} for item in mmlu[:2]]
    half = write_questions(tmp_path / "half_en.json", fine + mmlu[2:])  # 2 of 4: flagged, not refused
    assert cloze.load_question_sets([str(half)])[0].quirks == {"answer_not_in_options": [2, 3]}


def test_a_folder_reads_jsonl_question_files_like_json_and_keeps_each_language_apart(tmp_path):
    def jsonl(path, items):
        path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")

    folder = tmp_path / "q"
    write_questions(folder / "culture_en.json", SAMPLE_QUESTIONS["en"])
    jsonl(folder / "culture_bo.jsonl", SAMPLE_QUESTIONS["bo"])
    loaded = cloze.load_question_sets([str(folder)])
    assert [(qs.stem, qs.lang, len(qs.items)) for qs in loaded] == [("culture_bo", "bo", 6), ("culture_en", "en", 6)]
    (folder / "culture_en.json").unlink()
    jsonl(folder / "culture_en.jsonl", SAMPLE_QUESTIONS["en"])  # only .jsonl files: still one set per file
    facts = cloze.load_question_sets([str(folder)], require_options=False)
    assert [(qs.stem, qs.lang, len(qs.items)) for qs in facts] == [("culture_bo", "bo", 6), ("culture_en", "en", 6)]


def test_a_set_that_mixes_languages_is_refused_even_under_an_explicit_language(tmp_path):
    mixed = write_questions(tmp_path / "mixed.json", SAMPLE_QUESTIONS["en"] + SAMPLE_QUESTIONS["bo"])
    with pytest.raises(InputError, match=r"mixed\.json: 6 of 12 items hold no .* letter.*mixes languages"):
        cloze.load_question_sets([str(mixed)], ["mixed=bo"])
    with pytest.raises(InputError, match="mixes languages"):
        cloze.load_question_sets([str(mixed)], require_options=False)
    for lang in SAMPLE_QUESTIONS:  # every sample language, itself, is one set
        assert cloze.load_question_sets([str(write_questions(tmp_path / f"s_{lang}.json", SAMPLE_QUESTIONS[lang]))])


def test_a_question_file_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "q_en.json"
    path.write_bytes(b'[{"question": "A ___",\n "options": ["x", "y"],\n "answer": "caf\xe9"}]\n')
    with pytest.raises(InputError, match=r"q_en\.json:3: not UTF-8 \(byte 0xe9: .*Re-encode it as UTF-8"):
        cloze.load_question_sets([str(path)])
