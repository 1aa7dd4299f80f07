"""The study report's sections on the bridge effect, decomposed: knowledge or skill (per tier and the difference-in-
differences), mismatched bridges, the manipulation checks, the gap against measured occurrences, the four tiers of
the world, and undetermined verdicts. A study planned with three CPT settings on a world with absent and en_only
tiers; the world, transfer.json and density.json are written by the real scripts on planted probing outputs, the
manipulation checks by hand in run_eval.py's format (HELPERS.md C5)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import write_eval_output, write_run
from scipy.stats import binomtest

import run_density
import run_transfer
import study_report
import synthetic_world
from run_study import PRESETS, StudyArguments, build_plan

LANG, KEY = "mn", "mn/native"
STEMS = {"en": f"{LANG}-culture-cloze_en", LANG: f"{LANG}-culture-cloze_{LANG}"}
#: micro's study with the decomposition: three CPT settings, 4 absent and 4 en_only places (8 facts per tier).
DECOMPOSED = replace(
    PRESETS["micro"],
    variants=["native"],
    settings=["bridges", "no_bridges", "mismatched_bridges"],
    world={**PRESETS["micro"].world, "absent_places": 4, "en_only_places": 4},
)


def _plan(out: Path):
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
    plan = _plan(out)
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
    plan = _plan(out)
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


def test_a_skill_only_gap_reads_skill_not_knowledge_and_a_high_tier_gain_reads_knowledge(study, tmp_path):
    report, record, plan = _report(study, tmp_path)
    directions = _directions(_transfer(plan))
    section = record["sections"]["transfer"][KEY]
    knowledge = {k["direction"]: k for k in section["knowledge"]}
    assert set(knowledge) == {f"en->{LANG}", f"{LANG}->en"}
    for direction, d in directions.items():
        source = d["knowledge_transfer"]
        assert {f: knowledge[direction][f] for f in study_report.KNOWLEDGE_FIELDS} == {
            f: source[f] for f in study_report.KNOWLEDGE_FIELDS
        }
        # the table: every tier's gap from transfer.json's tiers, then the difference-in-differences
        for tier, stats in d["tiers"].items():
            assert f" | {_shown(stats['mean_gap'], stats['mean_gap_ci'])} | " in report
            assert {"direction": direction, "tier": tier, "questions": 8, "mean_gap": stats["mean_gap"],
                    "mean_gap_ci": stats["mean_gap_ci"], "final_gap": stats["final_gap"],
                    "final_gap_ci": stats["final_gap_ci"], "verdict": stats["verdict"],
                    "from": "transfer.json"} in section["tiers"]  # fmt: skip
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
    assert knowledge[f"{LANG}->en"]["sentence"] == (
        f"{LANG} → English (English questions): knowledge crossed from {LANG}: the gap on facts {LANG} states often "
        f"exceeds the gap on facts it never states, difference-in-differences (high − en_only) "
        f"{_shown(0.75, to_en['mean_did_ci'])} excludes 0; no evidence of a skill part: "
        f"{_shown(0.0, to_en['skill_mean_gap_ci'])} on facts {LANG} never states (en_only)."
    )
    assert "skill, not knowledge" not in knowledge[f"{LANG}->en"]["sentence"]


def test_mismatched_bridges_are_tabled_per_direction_with_what_each_difference_means(study, tmp_path):
    report, record, plan = _report(study, tmp_path)
    directions = _directions(_transfer(plan))
    shown = {m["direction"]: m for m in record["sections"]["transfer"][KEY]["mismatched"]}
    for direction, d in directions.items():
        above, below = d["bridges_minus_mismatched"], d["mismatched_minus_none"]
        assert shown[direction]["bridges_minus_mismatched"]["mean_gap_ci"] == above["mean_gap_ci"]
        assert shown[direction]["mismatched_minus_none"]["verdict"] == below["verdict"]
        assert (
            f"| {study_report._direction_words(direction, LANG)} | {_shown(above['mean_gap'], above['mean_gap_ci'])} | "
            f"{above['verdict']} | {_shown(below['mean_gap'], below['mean_gap_ci'])} | {below['verdict']} |"
        ) in report
    # target questions: mismatched bridges score as bridges (the partner does not matter), above none
    assert shown[f"en->{LANG}"]["sentence"] == (
        f"English → {LANG} ({LANG} questions): no evidence that the right partner matters (bridges − mismatched "
        f"+0.000 [+0.000, +0.000] includes 0); mere bilingual co-location helps (mismatched − none "
        f"{_shown(0.5, directions[f'en->{LANG}']['mismatched_minus_none']['mean_gap_ci'])} excludes 0)."
    )
    # English questions: mismatched bridges score as none (the partner is what matters)
    sentence = shown[f"{LANG}->en"]["sentence"]
    assert "the right partner matters (bridges − mismatched +0.188 [" in sentence  # 6 of 32 items
    assert "no evidence that bilingual co-location without the translation helps (mismatched − none +0.000" in sentence
    assert sentence in report


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
    assert any(
        s.startswith(f"English retention ({STEMS['en']}, high facts): kept: base model 1.000") for s in sentences
    )
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


def test_the_world_section_describes_absent_and_en_only_and_en_only_has_ratio_zero(study, tmp_path):
    report, record, _ = _report(study, tmp_path)
    densities = record["sections"]["world"]["densities"][LANG]
    assert densities["en_only"]["tgt_over_en"] == 0 and densities["absent"]["tgt_over_en"] is None
    rows = {line.split(" | ")[1]: line for line in report.splitlines() if line.startswith(f"| {LANG} | ")}
    assert rows["en_only"].endswith(" | 0.0 |") and rows["absent"].endswith(" | ∞ |")
    assert "Facts of the **absent** tier are stated in the target corpus" in report
    assert "Facts of the **en_only** tier are stated in English" in report


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
    report, record, _ = _report(study, tmp_path, _mark_undetermined)
    section = record["sections"]["transfer"][KEY]
    knowledge = {k["direction"]: k for k in section["knowledge"]}[f"en->{LANG}"]
    assert knowledge["verdict"] == "undetermined"
    assert knowledge["sentence"].startswith(
        f"English → {LANG} ({LANG} questions): undetermined: the difference lies outside its own interval"
    )
    assert "skill, not knowledge" not in report
    assert "| **undetermined** |" in report and study_report.UNDETERMINED_TEXT in report
    (direction,) = [e for e in section["directions"] if e["direction"] == f"en->{LANG}"]
    assert direction["verdict"] == "undetermined"
    row = next(
        line for line in report.splitlines() if f"| {_shown(direction['mean_gap'], direction['mean_gap_ci'])} |" in line
    )
    assert row.startswith(f"| English → {LANG} ({LANG} questions) |") and row.endswith("| **undetermined** |")
    mismatched = {m["direction"]: m for m in section["mismatched"]}[f"en->{LANG}"]
    assert "whether the right partner matters is undetermined" in mismatched["sentence"]


def _drop_tiers(plan) -> None:
    """transfer.json of an analysis not given the item tiers (no tiers, no knowledge contrast)."""
    path = Path(plan.groups[KEY]["transfer"]) / "transfer.json"
    transfer = json.loads(path.read_text())
    for d in transfer["languages"][0]["directions"]:
        del d["tiers"], d["knowledge_transfer"]
    path.write_text(json.dumps(transfer))


def test_without_tiers_in_transfer_json_the_report_computes_the_same_gap_per_tier_from_truth(study, tmp_path):
    with_tiers = _directions(_transfer(_plan(study)))
    report, record, _ = _report(study, tmp_path, _drop_tiers)
    section = record["sections"]["transfer"][KEY]
    assert section["knowledge"] == [] and "Knowledge or skill?" not in report and "The gap per tier of facts" in report
    assert {(t["direction"], t["tier"]) for t in section["tiers"]} == {
        (direction, tier) for direction, d in with_tiers.items() for tier in d["tiers"]
    }
    for t in section["tiers"]:
        assert t["from"] == "report (per-tier analysis)"
        assert t["mean_gap"] == pytest.approx(with_tiers[t["direction"]]["tiers"][t["tier"]]["mean_gap"])
