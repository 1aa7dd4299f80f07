"""run_transfer.py's decomposition of the gap (--item_tiers: per tier, and knowledge transfer as a
difference-in-differences, KNOWLEDGE_CONTRASTS) and its third setting (--mismatched_bridges), on planted
fixtures whose answers are known."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_transfer_refusals import write_run

import run_transfer
from study_common import InputError

GROUP = "ko-culture-cloze"
STEMS = (f"{GROUP}_ko", f"{GROUP}_en")
SIZES = {"high": 40, "low": 40, "absent": 40, "en_only": 40}
#: The tier of each question index: the tiers interleaved, so that an item's tier is read, not its position.
TIER_OF = np.random.default_rng(7).permutation([t for t, n in SIZES.items() for _ in range(n)])


def write_item_tiers(path, tier_of=TIER_OF, group=GROUP):
    """An item_tiers.json as synthetic_world.py writes it (contract C1)."""
    meaning = {
        "high": "often in both",
        "low": "rare in English",
        "absent": "never in English",
        "en_only": "never in ko",
    }
    items = [
        {"index": k, "tier": str(t), "counts": {"en": 0 if t == "absent" else 24, "ko": 0}}
        for k, t in enumerate(tier_of)
    ]
    path.write_text(json.dumps({"parallel_group": group, "tiers": meaning, "items": items}))
    return path


def planted(base: int, gained: dict[str, list[int]]) -> tuple[dict, dict]:
    """(with, without) correctness per stem (3 steps x items): without bridges right on the first ``base`` items
    of every tier; with bridges right on those and on the next ``gained[tier][step]`` items of the tier."""
    without, with_ = np.zeros((3, len(TIER_OF)), bool), np.zeros((3, len(TIER_OF)), bool)
    for tier in SIZES:
        indices = np.flatnonzero(TIER_OF == tier)
        without[:, indices[:base]] = True
        for step, extra in enumerate(gained[tier]):
            with_[step, indices[: base + extra]] = True
    return {stem: with_ for stem in STEMS}, {stem: without for stem in STEMS}


def run_pairs(tmp_path, plans: list[tuple[int, dict]]) -> tuple[list, list]:
    """One seed pair of eval folders per (base, gained) plan."""
    with_dirs, without_dirs = [], []
    for seed, (base, gained) in enumerate(plans):
        with_correct, without_correct = planted(base, gained)
        with_dirs.append(write_run(tmp_path / f"with-s{seed}", "bridges", seed, with_correct))
        without_dirs.append(write_run(tmp_path / f"without-s{seed}", "no_bridges", seed, without_correct))
    return with_dirs, without_dirs


def transfer(tmp_path, with_dirs, without_dirs, *flags) -> dict:
    args = ["--with_bridges", *map(str, with_dirs), "--without_bridges", *map(str, without_dirs)]
    return run_transfer.main([*args, "--output_dir", str(tmp_path / "out"), "--n_bootstrap", "1000", *flags])


def skill_and_knowledge(skill: int, knowledge: list[int]) -> dict[str, list[int]]:
    """Items gained per tier and step: ``skill`` in every tier, ``knowledge`` more in the tier stated often."""
    return {tier: [skill + (k if tier == "high" else 0) for k in knowledge] for tier in SIZES}


def test_knowledge_transfer_recovers_a_planted_difference_in_differences(tmp_path):
    # Both seeds: bridges gain 8 of 40 items (0.2) in every tier (skill); on facts stated often in the source
    # corpus they gain 20 (seed 0) or 28 (seed 1) more from the second step on (knowledge: 0.6 on average).
    plans = [(4, skill_and_knowledge(8, [0, 20, 20])), (4, skill_and_knowledge(8, [0, 28, 28]))]
    tiers_file = write_item_tiers(tmp_path / "item_tiers.json")
    result = transfer(tmp_path, *run_pairs(tmp_path, plans), "--item_tiers", str(tiers_file))
    en_to_ko, ko_to_en = result["languages"][0]["directions"]
    assert (en_to_ko["direction"], ko_to_en["direction"]) == ("en->ko", "ko->en")
    for d, never in ((en_to_ko, "absent"), (ko_to_en, "en_only")):
        assert d["tiers"]["high"]["gap"] == pytest.approx([0.2, 0.8, 0.8])
        assert d["tiers"]["high"]["n_questions"] == 40 and d["tiers"]["low"]["n_questions"] == 40
        for tier in ("low", "absent", "en_only"):
            assert d["tiers"][tier]["gap"] == pytest.approx([0.2] * 3)
        k = d["knowledge_transfer"]
        assert (k["often_tier"], k["never_tier"]) == ("high", never)
        assert k["mean_did"] == pytest.approx(0.4) and k["final_did"] == pytest.approx(0.6)
        assert 0 < k["mean_did_ci"][0] < 0.4 < k["mean_did_ci"][1]
        assert k["final_did_ci"][0] < 0.6 < k["final_did_ci"][1]
        assert k["verdict"] == "transfer"
        assert k["skill_mean_gap"] == pytest.approx(0.2) and k["skill_verdict"] == "transfer"
        assert k["skill_mean_gap_ci"] == d["tiers"][never]["mean_gap_ci"]
        assert "knowledge carried from the" in k["meaning"] and f"({never})" in k["meaning"]
        assert "skill" in k["meaning"]
    assert "from the English corpus" in en_to_ko["knowledge_transfer"]["meaning"]
    assert "from the ko corpus" in ko_to_en["knowledge_transfer"]["meaning"]
    # The overall gap is unchanged by the decomposition: the mean over all items.
    assert en_to_ko["gap"] == pytest.approx([0.2, 0.2 + 0.6 * 40 / 160, 0.2 + 0.6 * 40 / 160])
    markdown = (tmp_path / "out" / "transfer.md").read_text()
    row = re.search(r"\| ko \| en->ko \| (.*) \|\n", markdown.split("## Knowledge or skill")[1]).group(1).split(" | ")
    assert [cell[:6] for cell in row[:6]] == ["+0.200", "+0.200", "+0.600", "+0.200", "+0.400", "+0.600"]
    assert row[6] == "transfer" and row[7].startswith("+0.200 [")  # tiers absent, en_only, high, low; DiD; skill


def test_a_gap_equal_on_every_tier_is_skill_not_knowledge(tmp_path):
    plans = [(10, skill_and_knowledge(8, [0, 0, 0])), (12, skill_and_knowledge(12, [0, 0, 0]))]
    tiers_file = write_item_tiers(tmp_path / "item_tiers.json")
    result = transfer(tmp_path, *run_pairs(tmp_path, plans), "--item_tiers", str(tiers_file))
    for d in result["languages"][0]["directions"]:
        k = d["knowledge_transfer"]
        assert k["mean_did"] == pytest.approx(0.0) and k["final_did"] == pytest.approx(0.0)
        assert k["mean_did_ci"][0] < 0 < k["mean_did_ci"][1] and k["verdict"] == "no evidence"
        assert k["skill_mean_gap"] == pytest.approx(0.25) and k["skill_verdict"] == "transfer"


def test_the_knowledge_bootstrap_draws_the_same_seed_pairs_for_both_tiers(tmp_path):
    # Seed 0: bridges change nothing; seed 1: they gain every item of every tier. The gap per tier swings from
    # 0 to 1 with the seed, but equally on both tiers: with one seed draw for both, the difference is 0 in every
    # resample; drawing seeds apart per tier would give an interval as wide as the tiers'.
    plans = [(0, skill_and_knowledge(0, [0, 0, 0])), (0, skill_and_knowledge(40, [0, 0, 0]))]
    tiers_file = write_item_tiers(tmp_path / "item_tiers.json")
    result = transfer(tmp_path, *run_pairs(tmp_path, plans), "--item_tiers", str(tiers_file))
    d = result["languages"][0]["directions"][0]
    assert d["tiers"]["absent"]["mean_gap_ci"] == [0.0, 1.0] and d["tiers"]["high"]["mean_gap_ci"] == [0.0, 1.0]
    assert d["knowledge_transfer"]["mean_did_ci"] == [0.0, 0.0] == d["knowledge_transfer"]["final_did_ci"]


def test_knowledge_contrasts_pair_each_direction_with_the_tier_its_source_never_states():
    assert run_transfer.KNOWLEDGE_CONTRASTS["en->X"]["often_tier"] == "high"
    assert run_transfer.KNOWLEDGE_CONTRASTS["en->X"]["never_tier"] == "absent"
    assert run_transfer.KNOWLEDGE_CONTRASTS["X->en"]["often_tier"] == "high"
    assert run_transfer.KNOWLEDGE_CONTRASTS["X->en"]["never_tier"] == "en_only"


def test_item_tiers_that_do_not_fit_the_questions_are_refused(tmp_path):
    pairs = run_pairs(tmp_path, [(10, skill_and_knowledge(8, [0, 0, 0]))])
    short = write_item_tiers(tmp_path / "short.json", TIER_OF[:-1])
    with pytest.raises(InputError, match=rf"short.json: 159 items, but {GROUP}_ko has 160"):
        transfer(tmp_path, *pairs, "--item_tiers", str(short))
    other = write_item_tiers(tmp_path / "other.json", group="zh-culture-cloze")
    with pytest.raises(InputError, match=rf"other.json: no analysed question group is theirs \({GROUP}\)"):
        transfer(tmp_path, *pairs, "--item_tiers", str(other))
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps({"parallel_group": GROUP, "tiers": {"high": ""}, "items": [{"index": 1, "tier": "high"}]})
    )
    with pytest.raises(InputError, match=r"broken.json: the item indices are not 0..0, each once"):
        transfer(tmp_path, *pairs, "--item_tiers", str(broken))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# Mismatched bridges
# --------------------------------------------------------------------------------------


def right_on_first(k: int, n: int = 50) -> dict:
    correct = np.zeros((3, n), bool)
    correct[:, :k] = True
    return {"c_ko": correct, "c_en": correct}


def three_settings(tmp_path, right: dict[str, list[int]], seeds=(0, 1)) -> dict[str, list]:
    """Eval folders per setting and seed, right on the first right[setting][k] of 50 items."""
    return {
        setting: [write_run(tmp_path / f"{setting}-s{s}", setting, s, right_on_first(n)) for s, n in zip(seeds, counts)]
        for setting, counts in right.items()
    }


def test_mismatched_bridges_give_both_comparisons_per_direction(tmp_path):
    # bridges 30 and 30 of 50, mismatched 20 and 25, none 10 and 10: bridges - mismatched 0.2 and 0.1 (mean
    # 0.15), mismatched - none 0.2 and 0.3 (mean 0.25).
    dirs = three_settings(tmp_path, {"bridges": [30, 30], "no_bridges": [10, 10], "mismatched_bridges": [20, 25]})
    result = transfer(
        tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", *map(str, dirs["mismatched_bridges"])
    )
    language = result["languages"][0]
    assert language["mismatched_bridges"] == [str(d) for d in dirs["mismatched_bridges"]]
    assert language["run_names"][1] == ["bridges-s1", "no_bridges-s1", "mismatched_bridges-s1"]
    for d in language["directions"]:
        assert d["mean_gap"] == pytest.approx(0.4)  # bridges - none, as without a third setting
        above, below = d["bridges_minus_mismatched"], d["mismatched_minus_none"]
        assert above["gap"] == pytest.approx([0.15] * 3) and below["gap"] == pytest.approx([0.25] * 3)
        assert [s["mean_gap"] for s in above["per_seed"]] == pytest.approx([0.2, 0.1])
        assert [(s["with_run"], s["without_run"]) for s in below["per_seed"]] == [
            ("mismatched_bridges-s0", "no_bridges-s0"),
            ("mismatched_bridges-s1", "no_bridges-s1"),
        ]
        assert above["mcnemar_final"][0]["only_with_correct"] == 10 and above["verdict"] == "transfer"
        assert below["verdict"] == "transfer"
    markdown = (tmp_path / "out" / "transfer.md").read_text()
    assert re.search(
        r"\| ko \| en->ko \| \+0\.150 \[[-+.\d, ]+\] \| transfer \| \+0\.250 \[[-+.\d, ]+\] \| transfer \|", markdown
    )


def test_a_mismatched_run_given_as_without_bridges_is_refused_and_the_reverse_too(tmp_path):
    dirs = three_settings(tmp_path, {"bridges": [30], "no_bridges": [10], "mismatched_bridges": [20]}, seeds=(0,))
    with pytest.raises(
        InputError,
        match=r"given as --without_bridges but its cpt_setting says bridges=False, setting 'mismatched_bridges'",
    ):
        transfer(tmp_path, dirs["bridges"], dirs["mismatched_bridges"])
    with pytest.raises(
        InputError, match=r"given as --mismatched_bridges but its cpt_setting says .*setting 'no_bridges'"
    ):
        transfer(tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", str(dirs["no_bridges"][0]))
    # A run that records only bridges=False (no setting) cannot be vouched for as mismatched.
    legacy = tmp_path / "legacy"
    write_run(legacy, "no_bridges", 0, right_on_first(20))
    accuracy = json.loads((legacy / "accuracy.json").read_text())
    del accuracy["cpt_setting"]["setting"]
    (legacy / "accuracy.json").write_text(json.dumps(accuracy))
    with pytest.raises(InputError, match=r"given as --mismatched_bridges but .*setting 'no_bridges'"):
        transfer(tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", str(legacy))


def test_mismatched_runs_are_paired_by_seed_and_compared_like_the_others(tmp_path):
    dirs = three_settings(tmp_path, {"bridges": [30, 30], "no_bridges": [10, 10]})
    mismatched = [write_run(tmp_path / f"m-s{s}", "mismatched_bridges", s, right_on_first(20)) for s in (0, 2)]
    with pytest.raises(
        InputError,
        match=r"seed 1: bridges-s1, no_bridges-s1 has no --mismatched_bridges run; seed 2: m-s2 has no "
        r"--with_bridges run and no --without_bridges run",
    ):
        transfer(tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", *map(str, mismatched))
    other_base = write_run(
        tmp_path / "m-s1", "mismatched_bridges", 1, right_on_first(20), base_model_weights_sha256="b" * 64
    )
    with pytest.raises(InputError, match=r"differ in base_model_weights_sha256: 'w{64}' vs 'b{64}'"):
        transfer(
            tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", str(mismatched[0]), str(other_base)
        )
