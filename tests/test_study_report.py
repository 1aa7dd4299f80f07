"""study_report.py: the report of a study from the files its steps wrote. Real probing outputs with planted ties
(both tie rules, the audit's unchecked guarantees); a decomposed study (its transfer.md with knowledge or skill per
tier and mismatched bridges, the manipulation checks, the gap against measured occurrences, the four tiers of the
world, undetermined verdicts) whose world, transfer.json and density.json the real scripts write on planted probing
outputs. The sweep report: tests/test_sweep_report.py."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import write_eval_output, write_run
from scipy.stats import binomtest

import run_density
import run_eval
import run_study
import run_transfer
import study_report
import synthetic_world
from run_study import StudyArguments, build_plan
from study_common import InputError
from study_config import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_report_page_is_its_markdown_rendered_with_raw_html_escaped_and_empty_blocks_left_out(tmp_path):
    blocks = ["## Title", "A **bold** `code` [link](x.html) & <tag>", study_report.table(["a", "b|c"], [[1, "x|y"]]),
              study_report.bullets([]), study_report.image("figures/f.png", "caption")]  # fmt: skip
    page = study_report.write_pages(tmp_path / "report.md", blocks, "t").read_text()
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("## Title\n\nA **bold**") and "| 1 | x\\|y |\n\n![caption](figures/f.png)" in markdown
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page and '<a href="x.html">link</a>' in page
    assert "&lt;tag&gt;" in page and '<img src="figures/f.png"' in page and "<title>t</title>" in page


# --------------------------------------------------------------------------------------
# Real probing outputs with planted ties
# --------------------------------------------------------------------------------------


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


def test_report_shows_ties_both_tie_rules_and_unchecked_guarantees(tmp_path, tiny_model_dir):
    questions_dir = tmp_path / "questions"
    questions_dir.mkdir()
    for lang, items in ITEMS.items():
        records = [{"question": q, "options": o, "answer": a} for q, o, a in items]
        (questions_dir / f"bo-culture-cloze_{lang}.json").write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "study"
    args = StudyArguments(preset="paper", langs=["bo"], questions_dir=str(questions_dir), output_dir=str(out))
    plan = build_plan(args, run_study.configure(args)[0], out)
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

    # per model and file at the final checkpoint: the tie rate and the accuracy under both rules
    questions = record["sections"]["questions"]["bo/real"]
    assert {(e["model"], e["questions"]) for e in questions["final"]} == {
        (model, stem)
        for model in ("base", "bridges", "no_bridges")
        for stem in ("bo-culture-cloze_en", "bo-culture-cloze_bo")
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

    # transfer.md, whose table says its tie rule and which shows the analysis under both rules where they differ
    transfer = json.loads((Path(group["transfer"]) / "transfer.json").read_text())
    assert record["sections"]["transfer"]["bo/real"] == {
        "transfer_json": str(Path(group["transfer"]) / "transfer.json")
    }
    directions = [d for lang in transfer["languages"] for d in lang["directions"]]
    assert len(directions) == 2
    for source in directions:
        assert source["tie_policies_differ"] is True  # ties credit first-rule accuracy that random breaking does not
        for policy in ("first", "fractional"):
            summary = source["tie_policies"][policy]
            assert (
                f"| {policy} | {summary['accuracy_with'][-1]:.3f} | {summary['accuracy_without'][-1]:.3f} | "
                in report_md
            )
    assert "Tie policy: first (McNemar: first-wins)" in report_md and "#### Both tie rules" in report_md

    # the packing section lists what an audit could not check
    packing = record["sections"]["packing"]
    assert packing["guarantees_hold"] is False
    assert packing["unchecked"] == {"bo-real-no_bridges-s0": ["document isolation: flex attention on CPU"]}
    assert (
        "**bo-real-no_bridges-s0: unchecked**, so not shown to hold: document isolation: flex attention on CPU"
        in report_md
    )

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


# --------------------------------------------------------------------------------------
# The bridge effect, decomposed
# --------------------------------------------------------------------------------------


LANG, KEY = "mn", "mn/native"


STEMS = {"en": f"{LANG}-culture-cloze_en", LANG: f"{LANG}-culture-cloze_{LANG}"}


#: micro's study with the decomposition: three CPT settings, 4 absent and 4 en_only places (8 facts per tier).
DECOMPOSED = replace(
    PRESETS["micro"],
    variants=["native"],
    settings=["bridges", "no_bridges", "mismatched_bridges"],
    world={**PRESETS["micro"].world, "absent_places": 4, "en_only_places": 4},
)


def _decomposed_plan(out: Path):
    return build_plan(StudyArguments(preset="micro"), DECOMPOSED, out)


def _right_on_first(tier_of: np.ndarray, per_tier: dict[str, int]) -> np.ndarray:
    """3 steps x items: right on the first per_tier[tier] items of each tier."""
    correct = np.zeros((3, len(tier_of)), bool)
    for tier, k in per_tier.items():
        correct[:, np.flatnonzero(tier_of == tier)[:k]] = True
    return correct


#: Right answers per setting, question language and tier (of 8). Target questions (English -> mn, high vs absent):
#: bridges and mismatched bridges gain 4 of 8 on every tier over none: skill, not knowledge; mismatched = bridges.
#: English questions (mn -> English, high vs en_only): bridges gain 6 of 8 on high facts only: knowledge; mismatched
#: = none.
PLANTED = {
    "bridges": {LANG: dict.fromkeys(("high", "low", "absent", "en_only"), 6),
                "en": {"high": 8, "low": 2, "absent": 2, "en_only": 2}},
    "no_bridges": {LANG: dict.fromkeys(("high", "low", "absent", "en_only"), 2),
                   "en": dict.fromkeys(("high", "low", "absent", "en_only"), 2)},
}  # fmt: skip


PLANTED["mismatched_bridges"] = {LANG: PLANTED["bridges"][LANG], "en": PLANTED["no_bridges"]["en"]}


def _checks(step: int, alignment: dict, tiers: dict) -> dict:
    """A manipulation_checks.json of one checkpoint as run_eval.py writes it (C5): alignment = accuracy per
    direction of the 4-way name choice over 32 entities; tiers = accuracy per question language and tier."""
    return {
        "checkpoints": [
            {"step": step, "path": f"checkpoint-{step}", "weights_sha256": "w",
             "name_alignment": {d: {"accuracy": a, "n": 32, "chance": 0.25} for d, a in alignment.items()},
             "embedding_match": {d: {"accuracy": 0.0, "n": 32, "chance": 1 / 32} for d in alignment},
             "tier_accuracy": {STEMS[q]: by_tier for q, by_tier in tiers.items()}}
        ],
        "model_name_or_path": "m", "cpt_setting": None, "dtype": "float32", "pair_separator": "",
        "item_tiers": {"file": "item_tiers.json", "parallel_group": f"{LANG}-culture-cloze",
                       "items_per_tier": {"high": 8, "low": 8, "absent": 8, "en_only": 8}, "meaning": {}},
    }  # fmt: skip


#: Name alignment per setting and seed: with bridges above chance English -> mn (0.875, 0.9375) and at chance
#: mn -> English; at chance in the base model and without (true) bridges. English retention: the base model knows
#: the English facts; with bridges the en_only ones are back at chance. Target learning: CPT with bridges taught
#: the absent facts, the other settings did not.
ALIGNMENT = {
    "base": [{f"en->{LANG}": 0.25, f"{LANG}->en": 0.25}],
    "bridges": [{f"en->{LANG}": 0.875, f"{LANG}->en": 0.25}, {f"en->{LANG}": 0.9375, f"{LANG}->en": 0.28125}],
    "no_bridges": [{f"en->{LANG}": 0.25, f"{LANG}->en": 0.25}] * 2,
    "mismatched_bridges": [{f"en->{LANG}": 0.28125, f"{LANG}->en": 0.25}] * 2,
}


RETENTION = {"base": 1.0, "bridges": 0.25, "no_bridges": 1.0, "mismatched_bridges": 1.0}  # English, en_only facts


TARGET = {"base": 0.25, "bridges": 1.0, "no_bridges": 0.25, "mismatched_bridges": 0.25}  # target, absent facts


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _as_run_eval_writes(eval_dir: Path) -> None:
    """accuracy.json with what run_eval.py records besides accuracy and the helper that writes the planted outputs
    does not: each question file's chance accuracy, and no ties."""
    accuracy = json.loads((eval_dir / "accuracy.json").read_text())
    for entry in accuracy["questions"].values():
        entry["chance_accuracy"] = 0.25
    for checkpoint in accuracy["checkpoints"]:
        for a in checkpoint["accuracy"].values():
            a.update(ties=0, tie_rate=0.0, accuracy_fractional=a["accuracy"], ties_advantage=0.0)
    (eval_dir / "accuracy.json").write_text(json.dumps(accuracy))


def _tiers(model: str) -> dict:
    return {"en": {"high": 1.0, "low": 0.5, "absent": 0.25, "en_only": RETENTION[model]},
            LANG: {"high": 0.25, "low": 0.25, "absent": TARGET[model], "en_only": 0.25}}  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The study folder: the world (synthetic_world.py), planted probing outputs of the base model and of two seeds
    per setting, their manipulation checks, transfer.json (run_transfer.py) and density.json (run_density.py)."""
    out = tmp_path_factory.mktemp("decomposed") / "study"
    plan = _decomposed_plan(out)
    steps = {s.kind: s for s in plan.steps}
    synthetic_world.main(steps["world"].command[2:])
    group = plan.groups[KEY]
    tier_of = np.array([item["tier"] for item in json.loads(Path(group["item_tiers"]).read_text())["items"]])
    for run in plan.runs:
        correct = {STEMS[q]: _right_on_first(tier_of, PLANTED[run.setting][q]) for q in STEMS}
        eval_dir = write_run(Path(run.eval_dir), run.setting, run.seed, correct, lang=LANG)
        _as_run_eval_writes(eval_dir)
        checks = _checks(30, ALIGNMENT[run.setting][run.seed], _tiers(run.setting))
        _write_json(eval_dir / "manipulation_checks.json", checks)
    base = write_eval_output(Path(group["base_eval"]), {s: np.zeros((1, len(tier_of)), bool) for s in STEMS.values()},
                             [100], None)  # fmt: skip
    _as_run_eval_writes(base)
    _write_json(base / "manipulation_checks.json", _checks(100, ALIGNMENT["base"][0], _tiers("base")))
    run_transfer.main([*steps["transfer"].command[2:], "--n_bootstrap", "1000"])
    run_density.main(steps["density"].command[2:])
    return out


def _report(study: Path, tmp_path: Path, change=None) -> tuple[str, dict, object]:
    """The report of a copy of the study (``change(plan)`` edits its files first): report.md, report.json, plan."""
    out = tmp_path / "study"
    shutil.copytree(study, out)
    plan = _decomposed_plan(out)
    if change:
        change(plan)
    study_report.write_report(plan)
    return (out / "report.md").read_text(encoding="utf-8"), json.loads((out / "report.json").read_text()), plan


def _transfer(plan) -> dict:
    return json.loads((Path(plan.groups[KEY]["transfer"]) / "transfer.json").read_text())


def _directions(transfer: dict) -> dict:
    return {d["direction"]: d for d in transfer["languages"][0]["directions"]}


def _shown(value: float, ci) -> str:
    return f"{value:+.3f} {study_report._ci(ci)}"


def test_the_transfer_section_is_transfer_md_with_skill_and_knowledge_read_from_the_tiers(study, tmp_path):
    report, record, plan = _report(study, tmp_path)
    transfer, path = _transfer(plan), Path(plan.groups[KEY]["transfer"]) / "transfer.json"
    assert record["sections"]["transfer"][KEY] == {"transfer_json": str(path)}  # its numbers stay in transfer.json
    assert run_transfer.transfer_markdown(transfer, level=4, standalone=False) in report
    directions = _directions(transfer)
    for d in directions.values():
        source = d["knowledge_transfer"]
        # the table: every tier's gap from transfer.json's tiers, then the difference-in-differences
        for stats in d["tiers"].values():
            assert f" | {_shown(stats['mean_gap'], stats['mean_gap_ci'])} | " in report
        row = (
            f"| **knowledge**: gap high − gap {source['never_tier']} | – | – | – | "
            f"{_shown(source['mean_did'], source['mean_did_ci'])} | {_shown(source['final_did'], source['final_did_ci'])} "
            f"| {source['verdict']} |"
        )
        assert row in report
    # English -> mn: bridges gain 0.5 on every tier, so on absent facts too (skill) and nothing more on high ones
    to_mn = directions[f"en->{LANG}"]["knowledge_transfer"]
    assert (to_mn["verdict"], to_mn["skill_verdict"]) == ("no evidence", "transfer")
    assert to_mn["skill_mean_gap"] == pytest.approx(0.5) and to_mn["mean_did"] == pytest.approx(0.0)
    assert (
        f"English → {LANG} ({LANG} questions): the gap is skill, not knowledge: "
        f"{_shown(0.5, to_mn['skill_mean_gap_ci'])} on facts English never states (absent), difference-in-differences "
        f"(high − absent) {_shown(to_mn['mean_did'], to_mn['mean_did_ci'])} includes 0"
    ) in report
    assert "| tier absent (the source never states it: skill) | 8 |" in report
    # mn -> English: bridges gain 0.75 on high facts only: knowledge, and no skill part
    to_en = directions[f"{LANG}->en"]["knowledge_transfer"]
    assert (to_en["verdict"], to_en["skill_verdict"]) == ("transfer", "no evidence")
    assert (
        f"- {LANG} → English (English questions): knowledge crossed from {LANG}: the gap on facts {LANG} states often "
        f"exceeds the gap on facts it never states, difference-in-differences (high − en_only) "
        f"{_shown(0.75, to_en['mean_did_ci'])} excludes 0; no evidence of a skill part: "
        f"{_shown(0.0, to_en['skill_mean_gap_ci'])} on facts {LANG} never states (en_only).\n"
    ) in report


def test_mismatched_bridges_are_tabled_per_direction_with_what_each_difference_means(study, tmp_path):
    report, _, plan = _report(study, tmp_path)
    directions = _directions(_transfer(plan))
    for direction, d in directions.items():
        above, below = d["bridges_minus_mismatched"], d["mismatched_minus_none"]
        assert (
            f"| {run_transfer.direction_words(direction, LANG)} | {_shown(above['mean_gap'], above['mean_gap_ci'])} | "
            f"{above['verdict']} | {_shown(below['mean_gap'], below['mean_gap_ci'])} | {below['verdict']} |"
        ) in report
    # target questions: mismatched bridges score as bridges (the partner does not matter), above none
    assert (
        f"- English → {LANG} ({LANG} questions): no evidence that the right partner matters (bridges − mismatched "
        f"+0.000 [+0.000, +0.000] includes 0); mere bilingual co-location helps (mismatched − none "
        f"{_shown(0.5, directions[f'en->{LANG}']['mismatched_minus_none']['mean_gap_ci'])} excludes 0).\n"
    ) in report
    # English questions: mismatched bridges score as none (the partner is what matters)
    (sentence,) = [line for line in report.splitlines()
                   if line.startswith(f"- {LANG} → English (English questions)") and "partner" in line]  # fmt: skip
    assert "the right partner matters (bridges − mismatched +0.188 [" in sentence  # 6 of 32 items
    assert "no evidence that bilingual co-location without the translation helps (mismatched − none +0.000" in sentence


def test_manipulation_checks_at_chance_are_said_plainly_with_what_they_mean_for_the_gap(study, tmp_path):
    report, record, plan = _report(study, tmp_path)
    section = record["sections"]["manipulation_checks"][KEY]
    checks = {(c["check"], c["what"], c["model"]): c for c in section["checks"]}
    assert len(section["files"]) == 1 + len(plan.runs)
    # name alignment with bridges: the mean over seeds (0.875, 0.9375) over 32 entities, exact binomial interval
    aligned = checks[("name alignment", f"en->{LANG}", "bridges")]
    expected = binomtest(29, 32).proportion_ci(0.95, method="exact")
    assert aligned["accuracy"] == pytest.approx(0.90625) and aligned["per_seed"] == [0.875, 0.9375]
    assert aligned["ci"] == pytest.approx([expected.low, expected.high]) and aligned["relation"] == "above chance"
    assert aligned["seeds"] == 2 and aligned["steps"] == [30] and aligned["chance"] == 0.25
    assert "| name alignment | en->mn | CPT bridges (final) | 2 | 30 | 0.906 [" in report
    assert checks[("name alignment", f"en->{LANG}", "base")]["relation"] == "at chance"
    assert checks[("embedding match", f"{LANG}->en", "no_bridges")]["chance"] == 1 / 32
    sentences = section["sentences"]
    # at chance with bridges: the gap cannot be knowledge crossing through aligned names
    (reverse,) = [s for s in sentences if s.startswith(f"**Name alignment ({LANG}->en) is at chance**")]
    assert "names are not aligned outside the bridge; with bridges too, so a with-minus-without gap cannot be " \
           "knowledge crossing through aligned names." in reverse  # fmt: skip
    (forward,) = [s for s in sentences if s.startswith(f"**Name alignment (en->{LANG}) is at chance**")]
    assert "CPT no bridges (final) 0.250" in forward and "CPT bridges (final)" not in forward.split(":")[1]
    assert forward.endswith("bridges aligned the names.") and "with bridges too" not in forward
    assert any(s.startswith("**Embedding match (en->mn) is at chance**") for s in sentences)
    # English retention: kept on high facts, erased by CPT with bridges on en_only facts
    assert checks[("English retention", f"{STEMS['en']}, high facts", "bridges")]["relation"] == "above chance"
    erased = checks[("English retention", f"{STEMS['en']}, en_only facts", "bridges")]
    assert erased["n"] == 8 and erased["relation"] == "at chance"
    assert not any(f"({STEMS['en']}, high facts)" in s for s in sentences)  # above chance everywhere: the table says it
    (en_only,) = [s for s in sentences if f"({STEMS['en']}, en_only facts)" in s]
    assert en_only.startswith("**English retention") and "CPT bridges (final) 0.250" in en_only
    assert "CPT erased these English facts" in en_only and "CPT no bridges" not in en_only
    # target learning: CPT with bridges taught the absent facts, the other settings left them at chance
    (target,) = [s for s in sentences if s.startswith("**Target learning")]
    assert "CPT no bridges (final) 0.250" in target and "CPT mismatched bridges (final) 0.250" in target
    assert f"did not teach these runs the facts only the {LANG} corpus states, and taught them to CPT bridges " \
           "(final) 1.000" in target  # fmt: skip
    assert target.endswith(f"compares a model that learned {LANG} facts with one that did not.")
    for sentence in sentences:
        assert sentence in report


def _nothing_learned(plan) -> None:
    """The runs with bridges left at chance on the absent facts too."""
    for run in (r for r in plan.runs if r.setting == "bridges"):
        path = Path(run.eval_dir) / "manipulation_checks.json"
        checks = json.loads(path.read_text())
        checks["checkpoints"][-1]["tier_accuracy"][STEMS[LANG]]["absent"] = 0.25
        path.write_text(json.dumps(checks))


def test_target_learning_at_chance_in_every_setting_says_the_gap_compares_models_that_know_none(study, tmp_path):
    _, record, _ = _report(study, tmp_path, _nothing_learned)
    sentences = record["sections"]["manipulation_checks"][KEY]["sentences"]
    (target,) = [s for s in sentences if s.startswith("**Target learning")]
    assert all(setting in target for setting in ("CPT bridges", "CPT no bridges", "CPT mismatched bridges"))
    assert target.endswith(
        f"CPT did not teach the facts only the {LANG} corpus states: at this scale the model did not learn {LANG} "
        "facts, so the gap on them (the skill measure) compares models that know none of them."
    )


def test_density_shows_the_gap_against_log_occurrences_per_analysed_question_file(study, tmp_path):
    report, record, plan = _report(study, tmp_path)
    density = json.loads((Path(plan.groups[KEY]["density"]) / "density.json").read_text())
    results = density["instance_analysis"]["results"]
    slopes = {s["questions"]: s for s in record["sections"]["density"][KEY]["gap_slopes"]}
    assert set(slopes) == {r["questions"] for r in results} == set(STEMS.values())
    for r in results:
        fit, shown = r["gap_vs_log_occurrences"], slopes[r["questions"]]
        assert (shown["slope"], shown["slope_ci"], shown["n_items"]) == (fit["slope"], fit["slope_ci"], fit["n_items"])
        lo, hi = fit["slope_ci"]
        assert shown["verdict"] == ("above 0" if lo > 0 else "below 0" if hi < 0 else "includes 0")
        assert shown["reading"].startswith(f"{shown['verdict']}: ")
        assert f" | {_shown(fit['slope'], fit['slope_ci'])} | {fit['n_items']} | {shown['reading']} |" in report
    assert report.count(f"The slope is the {results[0]['gap_vs_log_occurrences']['meaning']}.") == 1


def test_the_world_section_tables_every_tier_with_en_only_at_ratio_zero_and_absent_at_infinity(study, tmp_path):
    report, record, _ = _report(study, tmp_path)
    densities = record["sections"]["world"]["densities"][LANG]
    assert densities["en_only"]["tgt_over_en"] == 0 and densities["absent"]["tgt_over_en"] is None
    rows = {line.split(" | ")[1]: line for line in report.splitlines() if line.startswith(f"| {LANG} | ")}
    assert set(rows) == {"high", "low", "absent", "en_only"}
    assert rows["en_only"].endswith(" | 0.0 |") and rows["absent"].endswith(" | ∞ |")
    assert rows["absent"].startswith(f"| {LANG} | absent | 8 | 0 | ")  # planted: never stated in English


def _mark_undetermined(plan) -> None:
    """transfer.json whose English -> mn gap and knowledge estimates lie outside their intervals."""
    path = Path(plan.groups[KEY]["transfer"]) / "transfer.json"
    transfer = json.loads(path.read_text())
    d = _directions(transfer)[f"en->{LANG}"]
    d["mean_gap"], d["verdict"] = d["mean_gap_ci"][1] + 0.1, "undetermined"
    d["knowledge_transfer"].update(mean_did=d["knowledge_transfer"]["mean_did_ci"][1] + 0.1, verdict="undetermined")
    d["bridges_minus_mismatched"]["verdict"] = "undetermined"
    path.write_text(json.dumps(transfer))


def test_undetermined_verdicts_are_shown_as_such_and_no_conclusion_rests_on_them(study, tmp_path):
    report, _, plan = _report(study, tmp_path, _mark_undetermined)
    assert (
        f"- English → {LANG} ({LANG} questions): undetermined: the difference lies outside its own interval" in report
    )
    assert "skill, not knowledge" not in report
    assert "| **undetermined** |" in report and run_transfer.UNDETERMINED_TEXT in report
    direction = _directions(_transfer(plan))[f"en->{LANG}"]
    row = next(
        line for line in report.splitlines() if f"| {_shown(direction['mean_gap'], direction['mean_gap_ci'])} |" in line
    )
    assert row.startswith(f"| English → {LANG} ({LANG} questions) |") and row.endswith("| **undetermined** |")
    (mismatched,) = [line for line in report.splitlines() if line.startswith(f"- English → {LANG} ({LANG} questions): ")
                     and "partner" in line]  # fmt: skip
    assert "whether the right partner matters is undetermined" in mismatched


def _diagnosed(plan) -> None:
    """bridge_diagnostic.json of every run: its own English side helps with bridges only; another pair's barely."""
    for run in plan.runs:
        own = {"bridges": 1.0, "no_bridges": 2.99, "mismatched_bridges": 2.98}[run.setting]
        checkpoints = [{"step": step, "alone": 3.0, "after_own_context": own, "after_mismatched_context": 2.95}
                       for step in (10, 20, 30)]  # fmt: skip
        _write_json(Path(run.eval_dir) / "bridge_diagnostic.json", {"checkpoints": checkpoints, "context_side": "en"})


def test_the_bridge_diagnostic_shows_every_setting_a_group_ran_mismatched_bridges_included(study, tmp_path):
    report, record, plan = _report(study, tmp_path, _diagnosed)
    shown = {entry["setting"]: entry for entry in record["sections"]["diagnostic"][KEY]}
    assert set(shown) == {"bridges", "no_bridges", "mismatched_bridges"}
    assert shown["bridges"]["uses_own_side"] and shown["bridges"]["own_minus_alone_per_seed"] == [-2.0, -2.0]
    assert shown["mismatched_bridges"]["after_own_context"] == 2.98 and not shown["mismatched_bridges"]["uses_own_side"]
    assert "| mn/native | mismatched bridges | 2 | 30 | 3.000 | 2.980 | 2.950 | -0.020, -0.020 | no |" in report
    assert (Path(plan.out) / "figures" / "bridge_diagnostic.png").read_bytes()[:4] == b"\x89PNG"
