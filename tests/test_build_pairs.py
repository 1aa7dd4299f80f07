"""build_pairs.py: one CPT dataset per language, every drop counted by reason, clear input errors."""

import json
import re
from pathlib import Path

import pytest
from datasets import load_from_disk

import build_pairs
from study_common import InputError

BO = ["བོད་རིགས་ཀྱིས་ཇ་མར་འཐུང་།", "བོད་རིགས་གྲྭ་བཙུན་ཤ་ཟ།", "ལྷ་སའི་ལོ་གསར་ལ་རྩམ་པ་ཟ།", "ཡུལ་ལུང་མཐོ་པོ་ཡོད།"]
EN = ["Tibetans drink butter tea.", "Monks eat tsampa.", "Lhasa celebrates the new year.", "The valleys are high."]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build(tmp_path: Path, tokenizer_dir: Path, *extra: str, pairs=None, mono=None, name="data") -> Path:
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs or [{"en": e, "bo": b} for e, b in zip(EN, BO)])
    mono_file = tmp_path / "mono.txt"
    mono_file.write_text("\n".join(mono or BO) + "\n", encoding="utf-8")
    output = tmp_path / name
    build_pairs.main([
        "--lang", "bo", "--pairs_files", str(pairs_file), "--en_column", "en", "--tgt_column", "bo",
        "--mono_files", str(mono_file), "--tokenizer_name", str(tokenizer_dir), "--block_size", "128",
        "--output_dir", str(output), *extra,
    ])  # fmt: skip
    return output


def stats(output: Path) -> dict:
    return json.loads((output / "build_stats.json").read_text())


def test_builds_document_records_with_stable_ids_stats_and_a_card(tmp_path, tiny_model_dir):
    output = build(tmp_path, tiny_model_dir)
    dataset = load_from_disk(str(output))
    assert dataset.column_names == ["doc_id", "kind", "text", "pair_id", "en", "tgt", "source"]
    pairs = [r for r in dataset if r["kind"] == "pair"]
    mono = [r for r in dataset if r["kind"] == "mono"]
    assert [p["doc_id"] for p in pairs] == [f"pair-{i:09d}" for i in range(4)]
    assert [(p["pair_id"], p["en"], p["tgt"], p["text"]) for p in pairs] == [(i, EN[i], BO[i], None) for i in range(4)]
    assert [m["text"] for m in mono] == BO and all(m["pair_id"] is None for m in mono)
    assert pairs[2]["source"].endswith("pairs.jsonl:3")
    assert stats(output)["kept"] == {"mono": 4, "pair": 4, "replay": 0}
    no_guard = {"files": [], "sentences_guarded": 0, "sentences_too_short_to_guard": []}
    assert stats(output)["eval_questions"] == no_guard
    card = (output / "README.md").read_text()
    assert str(tiny_model_dir) in card and "| block_size | 128 |" in card and "| lang | bo |" in card


def test_every_drop_is_counted_by_its_reason(tmp_path, tiny_model_dir):
    cloze = tmp_path / "questions.json"
    cloze.write_text(json.dumps([{"question": "Monks ___ tsampa.", "options": ["eat", "sell"], "answer": "eat"}]))
    long_side = "ཇ་" * 200  # far over a 128-token window
    pairs = [
        {"en": EN[0], "bo": BO[0]},
        {"en": EN[0], "bo": BO[0]},  # exact duplicate
        {"en": f"  {EN[0]} ", "bo": BO[0]},  # duplicate once whitespace is stripped
        {"en": "   ", "bo": BO[1]},  # empty side
        {"en": EN[2], "bo": "Lhasa new year (Latin only)"},  # target side not Tibetan
        {"en": BO[3], "bo": BO[3]},  # English side not Latin (swapped columns)
        {"en": "MONKS  eat tsampa every day.", "bo": BO[1]},  # holds the filled eval sentence
        {"en": EN[3], "bo": long_side},  # cannot share one window
    ]
    mono = [BO[0], "Only Latin letters here", "ལྷ་ས།"]
    output = build(tmp_path, tiny_model_dir, "--eval_questions", str(cloze), pairs=pairs, mono=mono)
    dropped = stats(output)["dropped"]
    assert dropped["pair"] == {
        "empty": 1, "not_in_script": 2, "contains_eval_sentence": 1, "over_block_size": 1, "duplicate_pair": 2,
    }  # fmt: skip
    assert dropped["mono"] == {"empty": 0, "not_in_script": 1, "contains_eval_sentence": 0}
    assert stats(output)["kept"]["pair"] == 1 and stats(output)["read"]["pair"] == 8
    assert stats(output)["eval_questions"]["sentences_guarded"] == 1
    parallel = build(tmp_path, tiny_model_dir, "--eval_questions", str(cloze), "--num_proc", "2", pairs=pairs,
                     mono=mono, name="parallel")  # fmt: skip
    assert stats(parallel)["dropped"] == stats(output)["dropped"]
    assert load_from_disk(str(parallel))["doc_id"] == load_from_disk(str(output))["doc_id"]


def test_paper_questions_guard_filled_sentences_in_any_case_and_spacing(tmp_path, tiny_model_dir, paper_cloze_dir):
    items = json.loads((paper_cloze_dir / "bo-culture-cloze_en.json").read_text())
    item = next(i for i in items if isinstance(i["answer"], str) and "_" in i["question"])
    filled = re.sub(r"_+", item["answer"], item["question"]).rstrip(".")
    contaminated = "Some context first. " + "  ".join(filled.upper().split()) + "! And more."
    pairs = [{"en": contaminated, "bo": BO[0]}, {"en": EN[1], "bo": BO[1]}]
    output = build(
        tmp_path, tiny_model_dir, "--eval_questions", str(paper_cloze_dir / "bo-culture-cloze_en.json"),
        str(paper_cloze_dir / "bo-culture-cloze_bo.json"), pairs=pairs,
    )  # fmt: skip
    assert stats(output)["dropped"]["pair"]["contains_eval_sentence"] == 1
    assert stats(output)["eval_questions"]["sentences_guarded"] >= 2 * len(items)


def test_filled_sentence_matcher_finds_only_whole_sentences():
    matcher = build_pairs.FilledSentenceMatcher(["The winter is cold.", "汉语属于汉藏语系。", "a"], min_chars=8)
    assert matcher.too_short == ["a"]
    assert matcher.first_match("we said THE   winter is cold!") == "the winter is cold"
    assert matcher.first_match("前言：汉语属于汉藏语系，等等") == "汉语属于汉藏语系"
    assert matcher.first_match("The winter is warm.") is None
    assert matcher.first_match("a" * 50) is None
    # sentences sharing their first characters are each found whole, and a matcher without sentences finds nothing
    shared = build_pairs.FilledSentenceMatcher(["The winter in Lhasa is cold.", "The winter in Lhasa is long."], 8)
    assert shared.first_match("so: the winter in Lhasa is long, and dry") == "the winter in lhasa is long"
    assert shared.first_match("The winter in Lhasa is short.") is None
    assert build_pairs.FilledSentenceMatcher([], min_chars=8).first_match("The winter is cold.") is None


def test_the_guard_catches_a_tibetan_sentence_written_with_a_tsheg_at_the_blank(tmp_path):
    """run_density counts the filled sentence with a tsheg where the blank meets a syllable: the guard catches
    that spelling as well as the plain one, and still not a sentence with another option."""
    questions = tmp_path / "bo-culture-cloze_bo.json"
    item = {"question": "བོད་ཀྱི་རྒྱལ་ས་ནི་_____ཡིན་ནོ།", "options": ["ལྷ་ས", "ཆབ་མདོ"], "answer": "ལྷ་ས"}
    questions.write_text(json.dumps([item], ensure_ascii=False), encoding="utf-8")
    matcher = build_pairs.FilledSentenceMatcher(build_pairs.filled_sentences(str(questions)), min_chars=8)
    assert matcher.first_match("ལོ་རྒྱུས་ལྟར། བོད་ཀྱི་རྒྱལ་ས་ནི་ལྷ་ས་ཡིན་ནོ། དེ་ནས།")  # tsheg at the blank's end
    assert matcher.first_match("བོད་ཀྱི་རྒྱལ་ས་ནི་ལྷ་སཡིན་ནོ།")  # the plain filling, as before
    assert matcher.first_match("བོད་ཀྱི་རྒྱལ་ས་ནི་ཆབ་མདོ་ཡིན་ནོ།") is None


def test_replay_is_drawn_to_the_requested_token_share(tmp_path, tiny_model_dir):
    replay = tmp_path / "replay.txt"
    replay.write_text("\n".join(f"English replay document number {i} about tea and valleys." for i in range(200)))
    output = build(tmp_path, tiny_model_dir, "--replay_files", str(replay), "--replay_ratio", "0.25")
    result = stats(output)
    assert abs(result["replay"]["achieved_ratio"] - 0.25) < 0.02
    assert result["kept"]["replay"] + result["dropped"]["replay"]["replay_beyond_ratio"] == 200
    kept_tokens = result["kept_text_tokens"]
    assert kept_tokens["replay"] == result["replay"]["replay_text_tokens"]
    again = build(tmp_path, tiny_model_dir, "--replay_files", str(replay), "--replay_ratio", "0.25", name="again")
    assert load_from_disk(str(again))["doc_id"] == load_from_disk(str(output))["doc_id"]  # seeded


def test_tsv_csv_and_hub_style_datasets_with_nested_columns(tmp_path, tiny_model_dir):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("id\tenglish\ttibetan\n1\t" + EN[0] + "\t" + BO[0] + "\n", encoding="utf-8")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('english,tibetan\n"Tea, with butter.",' + BO[1] + "\n", encoding="utf-8")
    folder = tmp_path / "hub_style"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"translation": {"en": EN[2], "bo": BO[2]}}])
    common = ["--lang", "bo", "--tokenizer_name", str(tiny_model_dir), "--block_size", "128"]
    build_pairs.main([*common, "--pairs_files", str(tsv), str(csv_file), "--en_column", "english",
                      "--tgt_column", "tibetan", "--output_dir", str(tmp_path / "files")])  # fmt: skip
    build_pairs.main([*common, "--pairs_dataset", str(folder), "--en_column", "translation.en",
                      "--tgt_column", "translation.bo", "--output_dir", str(tmp_path / "hub")])  # fmt: skip
    assert load_from_disk(str(tmp_path / "files"))["en"] == [EN[0], "Tea, with butter."]
    assert load_from_disk(str(tmp_path / "hub"))["tgt"] == [BO[2]]


def test_other_languages_need_a_script(tmp_path, tiny_model_dir):
    pairs_file = write_jsonl(tmp_path / "ru.jsonl", [{"en": "Tea is hot.", "ru": "Чай горячий."}])
    common = ["--lang", "ru", "--pairs_files", str(pairs_file), "--tokenizer_name", str(tiny_model_dir)]
    with pytest.raises(ValueError, match="No script is known for language 'ru'.*--script"):
        build_pairs.main([*common, "--output_dir", str(tmp_path / "none")])
    build_pairs.main([*common, "--script", "Cyrillic", "--output_dir", str(tmp_path / "ru")])
    assert stats(tmp_path / "ru")["kept"]["pair"] == 1


NOT_UTF8_LINE_2 = r"pairs\.(jsonl|tsv):2: not UTF-8 \(byte 0xe9: .*\)\. Re-encode it as UTF-8\."


@pytest.mark.parametrize(
    ("content", "suffix", "columns", "message"),
    [
        ('{"en": "a", "bo": "b"}\n{"en": "broken\n', ".jsonl", ("en", "bo"), r"pairs\.jsonl:2: not valid JSON"),
        ('{"en": "a", "tibetan": "b"}\n', ".jsonl", ("en", "bo"), r"pairs\.jsonl:1: no column 'bo'.*--tgt_column"),
        ("en\tbo\nTea\tཇ\textra\n", ".tsv", ("en", "bo"), r"pairs\.tsv:2: 3 fields where the header has 2"),
        ("english,bo\nTea,ཇ\n", ".csv", ("en", "bo"), r"pairs\.csv:1: no column 'en' in the header.*--en_column"),
        ("en,bo\n", ".parquet", ("en", "bo"), r"unknown pair file type '\.parquet'"),
        # an unclosed quote would otherwise swallow every later row into one field
        ('en,bo\nTea,"ཇ\nMilk,ཇ\n', ".csv", ("en", "bo"), r"pairs\.csv:\d+: not valid CSV .*Fix the quoting"),
        (b'{"en": "a", "bo": "b"}\n{"en": "caf\xe9", "bo": "b"}\n', ".jsonl", ("en", "bo"), NOT_UTF8_LINE_2),
        (b"en\tbo\ncaf\xe9\tb\n", ".tsv", ("en", "bo"), NOT_UTF8_LINE_2),
    ],
)
def test_bad_pair_files_are_named_with_their_line(tmp_path, tiny_model_dir, content, suffix, columns, message):
    pairs_file = tmp_path / f"pairs{suffix}"
    pairs_file.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs_file), "--en_column", columns[0],
                          "--tgt_column", columns[1], "--tokenizer_name", str(tiny_model_dir),
                          "--output_dir", str(output)])  # fmt: skip
    assert not output.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_a_text_file_without_its_column_names_the_kinds_own_flag(tmp_path, tiny_model_dir):
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [{"en": e, "bo": b} for e, b in zip(EN, BO)])
    mono_file = write_jsonl(tmp_path / "mono.jsonl", [{"body": text} for text in BO])
    with pytest.raises(ValueError, match=r"mono\.jsonl:1: no 'text' column.*--mono_text_column"):
        build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs_file), "--mono_files", str(mono_file),
                          "--tokenizer_name", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_argument_errors_say_what_to_do(tmp_path, tiny_model_dir):
    common = ["--lang", "bo", "--tokenizer_name", str(tiny_model_dir), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="Give parallel pairs"):
        build_pairs.main(common)
    pairs_file = write_jsonl(tmp_path / "p.jsonl", [{"en": EN[0], "bo": BO[0]}])
    with pytest.raises(ValueError, match="without --replay_ratio"):
        build_pairs.main([*common, "--pairs_files", str(pairs_file), "--tgt_column", "bo", "--replay_files", "x.txt"])
    with pytest.raises(ValueError, match=r"without --replay_ratio \(or with 0, which takes none of them\)"):
        build_pairs.main([*common, "--pairs_files", str(pairs_file), "--replay_files", "x.txt", "--replay_ratio", "0"])
    with pytest.raises(ValueError, match="--mono_data_files needs --mono_dataset"):
        build_pairs.main([*common, "--pairs_files", str(pairs_file), "--mono_data_files", "bo.jsonl"])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite_output_dir"):
        build_pairs.main([*common, "--pairs_files", str(pairs_file), "--tgt_column", "bo"])


def test_a_first_batch_of_only_mono_documents_still_types_pair_ids(tmp_path, tiny_model_dir):
    # More mono documents than one map batch (1000) come before the first pair: that batch's pair
    # ids are all null, which must not fix the column's type.
    output = build(tmp_path, tiny_model_dir, mono=[BO[i % 4] for i in range(1001)])
    dataset = load_from_disk(str(output))
    assert dataset.features["pair_id"].dtype == "int64"
    assert [r["pair_id"] for r in dataset if r["kind"] == "pair"] == [0, 1, 2, 3]


MN_TRADITIONAL = "ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ ᠨᠠᠭᠠᠳᠤᠮ ᠤ ᠪᠠᠶᠠᠷ ᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ᠎ᠡ᠃"


@pytest.mark.parametrize(
    ("name", "content", "lang", "tgt_column", "message"),
    [
        ("pairs.jsonl", "".join(json.dumps({"en": e, "bo": t}) + "\n" for e, t in zip(EN, [None, "", " ", None])),
         "bo", "bo", r"pairs input \S*pairs\.jsonl kept nothing: read 4, kept 0, dropped empty 4"),
        ("pairs.jsonl", "".join(json.dumps({"en": e, "bo": b, "note": "a Latin note"}, ensure_ascii=False) + "\n"
                                for e, b in zip(EN, BO)),
         "bo", "note", r"pairs\.jsonl kept nothing: read 4, kept 0, dropped not_in_script 4 .*--tgt_column"),
        ("pairs.jsonl", json.dumps({"en": "Tea is hot.", "mn": "Цай халуун байна."}, ensure_ascii=False) + "\n",
         "mn", "mn", r"pairs\.jsonl kept nothing: read 1, kept 0, dropped not_in_script 1 .*Mongolian script"),
        ("pairs.jsonl", "", "bo", "bo", r"pairs\.jsonl kept nothing: read 0 records"),
        ("pairs.json", "[]", "bo", "bo", r"pairs\.json kept nothing: read 0 records"),
        ("pairs.tsv", "en\tbo\n", "bo", "bo", r"pairs\.tsv kept nothing: read 0 records"),
    ],
)  # fmt: skip
def test_a_pair_input_that_keeps_nothing_is_an_error_naming_it_and_its_drops(
    tmp_path, tiny_model_dir, name, content, lang, tgt_column, message
):
    pairs_file = tmp_path / name
    pairs_file.write_text(content, encoding="utf-8")
    mono_file = tmp_path / "mono.txt"  # valid mono text: without the check, a 0-pair dataset would be built
    mono_file.write_text("\n".join(BO if lang == "bo" else [MN_TRADITIONAL]) + "\n", encoding="utf-8")
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        build_pairs.main(["--lang", lang, "--pairs_files", str(pairs_file), "--en_column", "en",
                          "--tgt_column", tgt_column, "--mono_files", str(mono_file),
                          "--tokenizer_name", str(tiny_model_dir), "--block_size", "128",
                          "--output_dir", str(output)])  # fmt: skip
    assert not output.exists()  # nothing that looks like a dataset
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_mono_or_replay_inputs_that_keep_nothing_are_errors_too(tmp_path, tiny_model_dir):
    latin_mono = tmp_path / "latin_mono.txt"
    latin_mono.write_text("Only Latin letters here\nAnd here too\n", encoding="utf-8")
    good_mono = tmp_path / "good_mono.txt"
    good_mono.write_text("\n".join(BO) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mono input \S*latin_mono\.txt kept nothing: read 2, kept 0, "
                                         r"dropped not_in_script 2"):  # fmt: skip
        build(tmp_path, tiny_model_dir, "--mono_files", str(good_mono), str(latin_mono))
    tibetan_replay = tmp_path / "replay.txt"
    tibetan_replay.write_text("\n".join(BO) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"replay input \S*replay\.txt kept nothing: read 4, kept 0, "
                                         r"dropped not_in_script 4 .*English"):  # fmt: skip
        build(tmp_path, tiny_model_dir, "--replay_files", str(tibetan_replay), "--replay_ratio", "0.2")
    assert not (tmp_path / "data").exists()


def test_min_pairs_refuses_a_dataset_with_too_few_pairs_to_mean_anything(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"kept 4 pairs, fewer than --min_pairs 5"):
        build(tmp_path, tiny_model_dir, "--min_pairs", "5")
    assert not (tmp_path / "data").exists()
    output = build(tmp_path, tiny_model_dir, "--min_pairs", "4")
    assert stats(output)["kept"]["pair"] == 4
    inputs = stats(output)["inputs"]
    assert [(i["kind"], Path(i["input"]).name, i["read"], i["kept"]) for i in inputs] == [
        ("mono", "mono.txt", 4, 4), ("pair", "pairs.jsonl", 4, 4)
    ]  # fmt: skip


def test_an_input_that_keeps_nothing_exits_2_on_the_command_line(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("")
    proc = subprocess.run([sys.executable, "build_pairs.py", "--lang", "bo", "--pairs_files", str(pairs_file),
                           "--tokenizer_name", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")],
                          cwd=Path(build_pairs.__file__).parent, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert "build_pairs.py: error: the pairs input" in proc.stderr and "kept nothing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_default_locations_read_the_base_model_of_run_pretrain_and_write_where_run_cpt_looks(
    tmp_path, tiny_model_dir, monkeypatch
):
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [{"en": e, "bo": b} for e, b in zip(EN, BO)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"runs/pretrain: no base model here .*Run run_pretrain\.py first"):
        build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs_file)])
    assert not (tmp_path / "runs" / "data-bo").exists()
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "pretrain")
    output = build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs_file)])
    assert output == (tmp_path / "runs" / "data-bo").resolve()
    assert stats(output)["kept"]["pair"] == 4 and stats(output)["tokenizer"] == "runs/pretrain"


def test_max_records_per_input_reads_the_first_n_of_each_input_and_records_which_reached_it(tmp_path, tiny_model_dir):
    output = build(tmp_path, tiny_model_dir, "--max_records_per_input", "3", mono=BO[:2])
    recorded = stats(output)
    assert recorded["max_records_per_input"] == 3
    by_kind = {entry["kind"]: entry for entry in recorded["inputs"]}
    assert (by_kind["pair"]["read"], by_kind["pair"]["reached_max_records"]) == (3, True)
    assert (by_kind["mono"]["read"], by_kind["mono"]["reached_max_records"]) == (2, False)
    assert [r["en"] for r in load_from_disk(str(output)) if r["kind"] == "pair"] == EN[:3]  # the first three, in order
