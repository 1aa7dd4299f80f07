"""run_study.py's report on real probing outputs with planted ties: answer positions, both tie rules, the audit's
unchecked guarantees."""

import json
import re
import shutil
from pathlib import Path

import pytest

import run_eval
import run_study
import run_transfer
import study_report
from run_study import PRESETS, StudyArguments, build_plan
from study_common import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Four items per file; answers at options 0, 0, 1, 2. Items 0 and 1 have no blank: every option fills the same
# sentence, so all four options tie exactly whatever the model, and the first rule credits option 0 (their answer)
# where random tie-breaking gives 1/4.
ITEMS = {
    "en": [
        ("Losar is a festival of Tibet.", ["Losar", "Chuseok", "Holi", "Diwali"], "Losar"),
        ("Tsampa is a food of Tibet.", ["tsampa", "kimchi", "mooncake", "bagel"], "tsampa"),
        ("The capital of Tibet is ____.", ["Beijing", "Lhasa", "Seoul", "Ulaanbaatar"], "Lhasa"),
        ("People in Tibet drink ____ tea.", ["green", "mint", "butter", "black"], "butter"),
    ],
    "bo": [
        ("ལོ་གསར་ནི་བོད་ཀྱི་དུས་ཆེན་ཡིན།", ["ལོ་གསར", "ཁ་ཟས", "སྣ་ཚོགས", "བཟོ"], "ལོ་གསར"),
        ("རྩམ་པ་ནི་བོད་ཀྱི་ཁ་ཟས་ཡིན།", ["རྩམ་པ", "ལོ་གསར", "སྣ་ཚོགས", "བཟོ"], "རྩམ་པ"),
        ("བོད་ཀྱི་____ཡིན།", ["ཁ་ཟས", "ལྷ་ས", "སྣ་ཚོགས", "བཟོ"], "ལྷ་ས"),
        ("བོད་རིགས་ཀྱིས་____བཟོ་གི་ཡོད།", ["ལོ་གསར", "ཁ་ཟས", "ཇ", "སྣ་ཚོགས"], "ཇ"),
    ],
}


def _probe(model_dir: Path, questions: list[str], output_dir: str) -> None:
    run_eval.main(["--model_name_or_path", str(model_dir), "--questions", *questions, "--output_dir", output_dir])


def test_report_shows_answer_positions_ties_both_tie_rules_and_unchecked_guarantees(tmp_path, tiny_model_dir):
    questions_dir = tmp_path / "questions"
    questions_dir.mkdir()
    for lang, items in ITEMS.items():
        records = [{"question": q, "options": o, "answer": a} for q, o, a in items]
        (questions_dir / f"bo-culture-cloze_{lang}.json").write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "study"
    args = StudyArguments(preset="paper", langs=["bo"], questions_dir=str(questions_dir), output_dir=str(out))
    plan = build_plan(args, PRESETS["paper"], out)
    group = plan.groups["bo/real"]
    # the plan's own probing and transfer outputs, written by run_eval.py and run_transfer.py on a real (tiny) model
    _probe(tiny_model_dir, group["questions"], group["base_eval"])
    for run in plan.runs:
        shutil.copytree(tiny_model_dir, run.dir)
        config = json.loads((Path(run.dir) / "config.json").read_text())
        config["cpt_setting"] = {"lang": "bo", "bridges": run.setting == "bridges", "seed": run.seed}
        (Path(run.dir) / "config.json").write_text(json.dumps(config))
        _probe(Path(run.dir), group["questions"], run.eval_dir)
        audit = {"pairs": {"total": 10, "co_located": 10 if run.setting == "bridges" else 0},
                 "guarantees_hold": run.setting == "bridges",
                 "unchecked": [] if run.setting == "bridges" else ["document isolation: flex attention on CPU"]}  # fmt: skip
        (Path(run.dir) / "packing_audit.json").write_text(json.dumps(audit))
    with_dirs = [r.eval_dir for r in plan.runs if r.setting == "bridges"]
    without_dirs = [r.eval_dir for r in plan.runs if r.setting == "no_bridges"]
    run_transfer.main(
        ["--with_bridges", *with_dirs, "--without_bridges", *without_dirs, "--output_dir", group["transfer"]]
    )

    study_report.write_report(plan)
    report_md = (out / "report.md").read_text(encoding="utf-8")
    record = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (out / "report.html").read_text(encoding="utf-8").count("tie rule") >= 1

    # answer positions and "always option 0", per question file, as run_eval.py recorded them
    questions = record["sections"]["questions"]["bo/real"]
    for stem in ("bo-culture-cloze_en", "bo-culture-cloze_bo"):
        shown = questions["files"][stem]
        assert shown["answer_position_counts"] == {"0": 2, "1": 1, "2": 1}
        assert shown["always_first_accuracy"] == 0.5
        assert f"| {stem} | 4 | 0: 0.50, 1: 0.25, 2: 0.25 | 0.500 | 0.250 |" in report_md
    # per model and file at the final checkpoint: the tie rate and the accuracy under both rules
    assert {(e["model"], e["questions"]) for e in questions["final"]} == {
        (model, stem) for model in ("base", "bridges", "no_bridges") for stem in questions["files"]
    }
    for entry in questions["final"]:
        eval_dir = group["base_eval"] if entry["model"] == "base" else next(
            r.eval_dir for r in plan.runs if r.setting == entry["model"]
        )  # fmt: skip
        source = json.loads((Path(eval_dir) / "accuracy.json").read_text())["checkpoints"][-1]["accuracy"]
        source = source[entry["questions"]]
        assert entry["tie_rate"] == source["tie_rate"] >= 0.5  # the two blank-less items tie at least
        assert entry["accuracy_first"] == source["accuracy"]
        assert entry["accuracy_fractional"] == source["accuracy_fractional"]
        assert entry["accuracy_first"] - entry["accuracy_fractional"] == pytest.approx(source["ties_advantage"])
        assert f"| {study_report._f(entry['tie_rate'])} | {study_report._f(entry['accuracy_first'])} | " in report_md
    assert questions["tie_flags"] and "of items tie for the best score (above 5%)" in report_md

    # the transfer table says its tie rule, and the analysis is shown under both rules where they differ
    transfer = json.loads((Path(group["transfer"]) / "transfer.json").read_text())
    directions = record["sections"]["transfer"]["bo/real"]["directions"]
    assert len(directions) == 2
    for entry in directions:
        source = next(
            d for lang in transfer["languages"] for d in lang["directions"] if d["direction"] == entry["direction"]
        )
        assert entry["tie_policy"] == "first" and entry["tie_policies"] == source["tie_policies"]
        assert entry["tie_policies_differ"] is True  # ties credit first-rule accuracy that random breaking does not
        for policy in ("first", "fractional"):
            summary = source["tie_policies"][policy]
            assert (
                f"| {policy} | {summary['accuracy_with'][-1]:.3f} | {summary['accuracy_without'][-1]:.3f} | "
                in report_md
            )
    assert "Tie rule of the table above: **first**" in report_md

    # the packing section lists what an audit could not check
    packing = record["sections"]["packing"]
    assert packing["guarantees_hold"] is False
    assert packing["unchecked"] == {"bo-real-no_bridges-s0": ["document isolation: flex attention on CPU"]}
    assert (
        "**bo-real-no_bridges-s0: unchecked**, so not shown to hold: document isolation: flex attention on CPU"
        in report_md
    )
    assert "| document isolation: flex attention on CPU |" in report_md

    # on its own (python study_report.py STUDY_DIR): the same report from the plan record the study wrote
    (out / "plan.json").write_text(json.dumps(run_study.plan_record(plan)))
    for name in ("report.md", "report.html", "report.json"):
        (out / name).unlink()
    assert study_report.main([str(out)]) == 0
    again = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert again["sections"] == record["sections"]
    generated = re.compile(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
    assert generated.sub("", (out / "report.md").read_text(encoding="utf-8")) == generated.sub("", report_md)


def test_report_alone_refuses_a_folder_without_the_plan_record_of_a_study(tmp_path):
    with pytest.raises(InputError, match="is not the output folder of a run_study.py run"):
        study_report.main([str(tmp_path)])
