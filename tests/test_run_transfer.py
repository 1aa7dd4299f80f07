"""run_transfer.py: the gap statistics (paired bootstrap, McNemar, verdicts), seeds and steps, the refusals of
what it cannot compare, the decomposition of the gap per tier of facts and the mismatched-bridges setting, on eval
outputs whose answers are planted."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from eval_helpers import write_eval_output, write_run

import run_transfer
from study_common import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def analyse(tmp_path, with_sets, without_sets, steps=(10, 20, 30), n_bootstrap=500, seeds=None, lang="ko", **kwargs):
    """Write one eval output per run, each a dict stem -> correctness, and run the transfer analysis on them."""
    given = {"bridges": [], "no_bridges": []}
    for setting, sets in (("bridges", with_sets), ("no_bridges", without_sets)):
        for k, correct in enumerate(sets):
            cpt_setting = {
                "lang": lang,
                "setting": setting,
                "bridges": setting == "bridges",
                "seed": seeds[k] if seeds else None,
            }
            name = f"{lang}-{'with' if setting == 'bridges' else 'without'}-{k}"
            run_steps = kwargs.get("run_steps", {}).get(name, list(steps))
            tied = kwargs.get("tied", {}).get(name)
            given[setting].append(str(write_eval_output(tmp_path / name, correct, run_steps, cpt_setting, tied)))
    transfer = run_transfer.TransferArguments(
        with_bridges=given["bridges"],
        without_bridges=given["no_bridges"],
        n_bootstrap=n_bootstrap,
        bootstrap_seed=kwargs.get("bootstrap_seed", 0),
        tie_policy=kwargs.get("tie_policy", "first"),
    )
    return run_transfer.transfer_analysis(run_transfer.read_runs(transfer), transfer)


def both(rng, n_steps, n_items, p=0.5):
    return {"c_ko": rng.random((n_steps, n_items)) < p, "c_en": rng.random((n_steps, n_items)) < p}


def test_identical_settings_give_a_zero_gap_and_no_evidence(tmp_path):
    data = both(np.random.default_rng(0), 3, 80)
    result = analyse(tmp_path, [data], [data])
    (language,) = result["languages"]
    assert [d["direction"] for d in language["directions"]] == ["en->ko", "ko->en"]
    for d in language["directions"]:
        assert d["gap"] == [0.0, 0.0, 0.0] and d["gap_ci"] == [[0.0, 0.0]] * 3
        assert d["mean_gap"] == 0.0 and d["mean_gap_ci"] == [0.0, 0.0]
        assert d["verdict"] == "no evidence"
        assert d["mcnemar_final"] == [{"only_with_correct": 0, "only_without_correct": 0, "p_value": 1.0}]
        assert d["accuracy_with"] == d["accuracy_without"]
    assert "one run pair the intervals cover question sampling only" in run_transfer.transfer_markdown(result)


def test_always_right_against_always_wrong_gives_a_gap_of_one_and_its_sign(tmp_path):
    right = {"c_ko": np.ones((3, 50), bool), "c_en": np.zeros((3, 50), bool)}
    wrong = {"c_ko": np.zeros((3, 50), bool), "c_en": np.ones((3, 50), bool)}
    en_to_ko, ko_to_en = analyse(tmp_path, [right], [wrong])["languages"][0]["directions"]
    assert en_to_ko["gap"] == [1.0] * 3 and en_to_ko["mean_gap_ci"] == [1.0, 1.0] and en_to_ko["verdict"] == "transfer"
    assert (
        ko_to_en["gap"] == [-1.0] * 3 and ko_to_en["mean_gap_ci"] == [-1.0, -1.0] and ko_to_en["verdict"] == "reverse"
    )
    assert en_to_ko["mcnemar_final"][0]["p_value"] == pytest.approx(2 * 0.5**50)


def test_mcnemar_at_the_final_step_is_the_exact_binomial_test_on_discordant_items(tmp_path):
    # Final step: 7 items right only with bridges, 2 right only without, 11 concordant.
    with_final = np.array([1] * 7 + [0] * 2 + [1] * 5 + [0] * 6, bool)
    without_final = np.array([0] * 7 + [1] * 2 + [1] * 5 + [0] * 6, bool)
    earlier = np.zeros((1, 20), bool)
    with_run = {"c_ko": np.vstack([earlier, with_final]), "c_en": np.vstack([earlier, with_final])}
    without_run = {"c_ko": np.vstack([earlier, without_final]), "c_en": np.vstack([earlier, without_final])}
    d = analyse(tmp_path, [with_run], [without_run], steps=(1, 2))["languages"][0]["directions"][0]
    hand = 2 * sum(math.comb(9, k) for k in range(3)) / 2**9  # two-sided: 2 * P(X <= 2), X ~ Bin(9, 1/2)
    assert hand == pytest.approx(92 / 512)
    assert d["mcnemar_final"] == [{"only_with_correct": 7, "only_without_correct": 2, "p_value": pytest.approx(hand)}]
    assert d["final_gap"] == pytest.approx(5 / 20)


def test_several_seeds_report_per_seed_gaps_and_intervals_that_cover_seed_variation(tmp_path):
    n = 200
    zeros = np.zeros((2, n), bool)

    def right_on_first(k):
        m = np.zeros((2, n), bool)
        m[:, :k] = True
        return m

    # Seeds 0, 1, 2 give gaps 0.0, 0.3, 0.6; runs are listed out of seed order to check pairing by seed.
    with_sets = [{"c_ko": right_on_first(k), "c_en": zeros} for k in (120, 0, 60)]
    without_sets = [{"c_ko": zeros, "c_en": zeros} for _ in range(3)]
    result = analyse(tmp_path, with_sets, without_sets, steps=(5, 6), seeds=[2, 0, 1], n_bootstrap=2000)
    d = result["languages"][0]["directions"][0]
    assert "one run pair" not in run_transfer.transfer_markdown(result)  # the intervals cover seeds
    assert d["n_seed_pairs"] == 3 and d["ci_covers"] == "questions and seeds"
    assert [s["seeds"] for s in d["per_seed"]] == [[0, 0], [1, 1], [2, 2]]
    assert [s["mean_gap"] for s in d["per_seed"]] == pytest.approx([0.0, 0.3, 0.6])
    assert d["mean_gap"] == pytest.approx(0.3)
    low, high = d["mean_gap_ci"]
    widest_single = max(hi - lo for lo, hi in (s["mean_gap_ci_questions_only"] for s in d["per_seed"]))
    assert low < 0.3 < high
    assert high - low > 2.5 * widest_single  # seed-to-seed variation dominates the interval


def test_steps_missing_from_a_run_are_left_out_and_no_common_step_is_an_error(tmp_path):
    data = both(np.random.default_rng(1), 3, 30)
    result = analyse(tmp_path / "a", [data], [data], run_steps={"ko-without-0": [10, 20, 40]})
    language = result["languages"][0]
    assert language["steps"] == [10, 20]
    assert language["steps_left_out"] == {"ko-with-0": [30], "ko-without-0": [40]}
    with pytest.raises(
        ValueError, match=r"share no checkpoint step \(ko-with-0: \[10, 20, 30\]; ko-without-0: \[40, 50, 60\]\)"
    ):
        analyse(tmp_path / "b", [data], [data], run_steps={"ko-without-0": [40, 50, 60]})


def test_bootstrap_is_reproducible_from_its_seed(tmp_path):
    rng = np.random.default_rng(2)
    a, b = both(rng, 3, 60), both(rng, 3, 60)
    first = analyse(tmp_path / "1", [a], [b])
    assert analyse(tmp_path / "2", [a], [b])["languages"][0]["directions"] == first["languages"][0]["directions"]
    other = analyse(tmp_path / "3", [a], [b], bootstrap_seed=1)
    assert (
        other["languages"][0]["directions"][0]["mean_gap_ci"] != first["languages"][0]["directions"][0]["mean_gap_ci"]
    )


def test_a_run_given_under_the_wrong_setting_is_an_error(tmp_path):
    data = both(np.random.default_rng(3), 2, 10)
    recorded = {"lang": "ko", "setting": "bridges", "bridges": True, "seed": 0}
    eval_dir = write_eval_output(tmp_path / "r", data, [1, 2], recorded)
    with pytest.raises(ValueError, match="given as --without_bridges but its cpt_setting says bridges=True"):
        run_transfer.read_run(str(eval_dir), "no_bridges")


def test_runs_that_record_no_seed_pair_only_one_to_one(tmp_path):
    data = both(np.random.default_rng(4), 2, 10)
    with pytest.raises(ValueError, match=r"ko: --with_bridges runs ko-with-0, ko-with-1 all record no seed"):
        analyse(tmp_path, [data, data], [data], steps=(1, 2))


def test_tie_policy_fractional_credits_ties_one_over_k_and_the_report_shows_both_rules(tmp_path):
    # With bridges every item ties between the answer and another option; without, half the items are right.
    n = 40
    half = np.zeros((3, n), bool)
    half[:, : n // 2] = True
    with_run = {"c_ko": np.zeros((3, n), bool), "c_en": half}
    without_run = {"c_ko": half, "c_en": half}
    ties = {"ko-with-0": {"c_ko": np.ones((3, n), bool)}}
    first = analyse(tmp_path / "first", [with_run], [without_run], tied=ties)
    fractional = analyse(tmp_path / "fractional", [with_run], [without_run], tied=ties, tie_policy="fractional")
    d_first, d_frac = first["languages"][0]["directions"][0], fractional["languages"][0]["directions"][0]
    assert (first["tie_policy"], fractional["tie_policy"]) == ("first", "fractional")
    # First wins: 1.0 against 0.5, a gap of +0.5 everywhere; random tie-breaking: 0.5 against 0.5, no gap.
    assert d_first["accuracy_with"] == [1.0] * 3 and d_first["gap"] == [0.5] * 3 and d_first["verdict"] == "transfer"
    assert d_frac["accuracy_with"] == [0.5] * 3 and d_frac["gap"] == [0.0] * 3 and d_frac["verdict"] == "no evidence"
    assert d_first["mean_gap_ci"][0] > 0 and d_frac["mean_gap_ci"][0] < 0 < d_frac["mean_gap_ci"][1]
    # Both analyses report both rules; the McNemar test counts first-wins correctness in both.
    assert d_first["tie_policies"] == d_frac["tie_policies"] and d_first["tie_policies_differ"]
    assert d_frac["tie_policies"]["first"]["verdict"] == "transfer"
    assert (
        d_frac["mcnemar_final"]
        == d_first["mcnemar_final"]
        == [{"only_with_correct": n // 2, "only_without_correct": 0, "p_value": pytest.approx(2 * 0.5 ** (n // 2))}]
    )
    markdown = run_transfer.transfer_markdown(fractional)
    assert "Tie policy: fractional" in markdown and "## Both tie rules" in markdown
    ci = r"\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]"
    to_ko = r"\| English → ko \(ko questions\) \| "
    assert re.search(to_ko + r"first \| 1\.000 \| 0\.500 \| \+0\.500 \| \+0\.500 " + ci + r" \| transfer \|", markdown)
    assert re.search(
        to_ko + r"fractional \| 0\.500 \| 0\.500 \| \+0\.000 \| \+0\.000 " + ci + r" \| no evidence", markdown
    )
    # English questions have no ties: one rule, not repeated.
    assert not first["languages"][0]["directions"][1]["tie_policies_differ"]
    assert "ko → English" not in markdown.split("## Both tie rules")[1].split("## Per seed pair")[0]


# --------------------------------------------------------------------------------------
# Refusals: comparable runs only, every run once, intervals worth a verdict
# --------------------------------------------------------------------------------------


#: A value other than RECORDED's (and than write_eval_output's probing header) for every compared field.
OTHER = {
    **{key: "x" * 64 for key in ("base_model_weights_sha256", "base_model_config_sha256", "dataset_sha256")},
    "steps": 60,
    "windows_per_step": 8,
    "block_size": 128,
    "pair_order": "random",
    "pair_separator": "\n",
    "scoring": "option_logprob",
    "dtype": "bfloat16",
    "loss_dtype": "model",
}


def transfer(tmp_path, with_dirs, without_dirs, *flags, n_bootstrap=200) -> dict:
    args = ["--with_bridges", *map(str, with_dirs), "--without_bridges", *map(str, without_dirs)]
    return run_transfer.main([*args, "--output_dir", str(tmp_path / "out"), "--n_bootstrap", str(n_bootstrap), *flags])


# --------------------------------------------------------------------------------------
# Comparable runs only
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", run_transfer.SHARED_BY_ALL_RUNS)
def test_runs_differing_in_a_shared_field_are_refused_naming_the_field_and_both_values(tmp_path, key):
    assert set(OTHER) == set(run_transfer.SHARED_BY_ALL_RUNS)
    with_dirs = [write_run(tmp_path / f"with{s}", "bridges", s) for s in (0, 1)]
    without_dirs = [write_run(tmp_path / f"without{s}", "no_bridges", s) for s in (0, 1)]
    same = json.loads((without_dirs[1] / "accuracy.json").read_text())
    value = (same if key in run_transfer.PROBING_FIELDS else same["cpt_setting"])[key]
    write_run(tmp_path / "without1", "no_bridges", 1, **{key: OTHER[key]})  # seed 1 without bridges differs
    with pytest.raises(InputError, match=rf"differ in {key}: {value!r} vs {OTHER[key]!r}".replace("\\", "\\\\")):
        transfer(tmp_path, with_dirs, without_dirs)
    assert not (tmp_path / "out").exists()


def test_the_runs_of_one_seed_must_have_seen_the_same_documents_but_seeds_differ(tmp_path):
    with_dirs = [write_run(tmp_path / f"with{s}", "bridges", s) for s in (0, 1)]
    without_dirs = [write_run(tmp_path / f"without{s}", "no_bridges", s) for s in (0, 1)]
    result = transfer(tmp_path, with_dirs, without_dirs)  # seeds 0 and 1 saw different documents: fine
    assert result["languages"][0]["comparability"] == {
        "checked": [*run_transfer.SHARED_BY_ALL_RUNS, "documents_seen_sha256"],
        "not_recorded": [],
        "allowed_differences": {},
    }
    write_run(tmp_path / "without1", "no_bridges", 1, documents_seen_sha256="other documents")
    with pytest.raises(
        InputError, match=r"differ in documents_seen_sha256 \(seed 1: the runs of a seed must share it\)"
    ):
        transfer(tmp_path / "again", with_dirs, without_dirs)


def test_allow_differences_compares_deliberately_and_records_the_difference_in_the_outputs(tmp_path):
    with_dirs = [write_run(tmp_path / "with", "bridges", 0, dtype="bfloat16")]
    without_dirs = [write_run(tmp_path / "without", "no_bridges", 0)]
    with pytest.raises(InputError, match="--allow_differences dtype"):
        transfer(tmp_path, with_dirs, without_dirs)
    result = transfer(tmp_path, with_dirs, without_dirs, "--allow_differences", "dtype")
    assert result["allow_differences"] == ["dtype"]
    comparability = result["languages"][0]["comparability"]
    assert comparability["allowed_differences"] == {"dtype": {"with": "bfloat16", "without": "float32"}}
    assert "dtype" not in comparability["checked"] and "scoring" in comparability["checked"]
    assert json.loads((tmp_path / "out" / "transfer.json").read_text())["allow_differences"] == ["dtype"]
    markdown = (tmp_path / "out" / "transfer.md").read_text()
    assert "They differ in dtype, compared deliberately (--allow_differences)**: with: bfloat16, without: float32" in (
        markdown
    )
    with pytest.raises(InputError, match="--allow_differences seed: not a compared field"):
        transfer(tmp_path, with_dirs, without_dirs, "--allow_differences", "seed")


def test_a_field_recorded_by_one_run_and_not_the_other_is_a_difference(tmp_path):
    with_dirs = [write_run(tmp_path / "with", "bridges", 0)]
    without_dirs = [write_run(tmp_path / "without", "no_bridges", 0, dataset_sha256=None)]
    with pytest.raises(InputError, match=r"differ in dataset_sha256: 'd{64}' vs None"):
        transfer(tmp_path, with_dirs, without_dirs)


# --------------------------------------------------------------------------------------
# Every run exactly once, paired by seed
# --------------------------------------------------------------------------------------


def test_two_runs_of_one_setting_with_the_same_seed_are_refused(tmp_path):
    with_dirs = [write_run(tmp_path / f"with{s}", "bridges", s) for s in (0, 1)]
    without_dirs = [write_run(tmp_path / f"without{k}", "no_bridges", 0) for k in (0, 1)]
    with pytest.raises(InputError, match=r"--without_bridges runs without0, without1 all record seed 0"):
        transfer(tmp_path, with_dirs, without_dirs)


def test_a_run_given_twice_is_refused_not_counted_twice(tmp_path):
    with_dir, without_dir = write_run(tmp_path / "with", "bridges", 0), write_run(tmp_path / "without", "no_bridges", 0)
    with pytest.raises(InputError, match=r"with is given 3 times \(--with_bridges, --with_bridges, --with_bridges\)"):
        transfer(tmp_path, [with_dir] * 3, [without_dir] * 3)


def test_runs_whose_seeds_differ_are_refused_naming_each_unpaired_run(tmp_path):
    with_dirs = [write_run(tmp_path / f"with{s}", "bridges", s) for s in (0, 1)]
    without_dirs = [write_run(tmp_path / f"without{s}", "no_bridges", s) for s in (0, 2)]
    with pytest.raises(
        InputError,
        match=r"seed 1: with1 has no --without_bridges run; seed 2: without2 has no --with_bridges run",
    ):
        transfer(tmp_path, with_dirs, without_dirs)


def test_a_language_with_runs_of_one_setting_only_or_a_seed_only_some_record_is_refused(tmp_path):
    ko = [write_run(tmp_path / f"ko-{setting}", setting) for setting in ("bridges", "no_bridges")]
    zh = write_run(tmp_path / "zh-with", "bridges", lang="zh")
    with pytest.raises(
        InputError, match=r"zh: runs without a partner of the same seed \(seed 0: zh-with has no --without"
    ):
        transfer(tmp_path, [ko[0], zh], [ko[1]])
    accuracy = json.loads((ko[0] / "accuracy.json").read_text())
    accuracy["cpt_setting"]["seed"] = None
    (ko[0] / "accuracy.json").write_text(json.dumps(accuracy))
    with pytest.raises(
        InputError,
        match=r"no seed: ko-bridges has no --without_bridges run; seed 0: ko-no_bridges has no --with_bridges",
    ):
        transfer(tmp_path, [ko[0]], [ko[1]])
    assert not (tmp_path / "out").exists()


def test_several_runs_that_record_no_seed_are_refused_not_paired_in_argument_order(tmp_path):
    with_dirs = [write_run(tmp_path / f"with{s}", "bridges", s) for s in (0, 1)]
    without_dirs = [write_run(tmp_path / f"without{s}", "no_bridges", s) for s in (0, 1)]
    for directory in with_dirs + without_dirs:
        accuracy = json.loads((directory / "accuracy.json").read_text())
        accuracy["cpt_setting"]["seed"] = None
        (directory / "accuracy.json").write_text(json.dumps(accuracy))
    with pytest.raises(InputError, match=r"--with_bridges runs with0, with1 all record no seed; give one run per seed"):
        transfer(tmp_path, with_dirs, without_dirs)
    result = transfer(tmp_path, with_dirs[:1], without_dirs[:1])  # one run per setting: unambiguous
    assert result["languages"][0]["run_names"] == [["with0", "without0"]]


# --------------------------------------------------------------------------------------
# Intervals worth a verdict; outputs only when complete
# --------------------------------------------------------------------------------------


def test_fewer_bootstrap_resamples_than_the_floor_are_refused_before_anything_is_written(tmp_path):
    with_dirs, without_dirs = [write_run(tmp_path / "with", "bridges")], [write_run(tmp_path / "without", "no_bridges")]
    out = tmp_path / "out"
    for n in ("1", "199"):
        with pytest.raises(InputError, match=rf"--n_bootstrap {n}: a 95% percentile interval needs at least 200"):
            run_transfer.main(
                ["--with_bridges", str(with_dirs[0]), "--without_bridges", str(without_dirs[0]), "--n_bootstrap", n,
                 "--output_dir", str(out)]
            )  # fmt: skip
    assert not out.exists()
    with pytest.raises(InputError, match="needs at least 1000"):
        run_transfer.TransferArguments(with_bridges=[], without_bridges=[], n_bootstrap=999, confidence=0.99)
    run_transfer.TransferArguments(with_bridges=[], without_bridges=[], n_bootstrap=1000, confidence=0.99)  # the floor


def test_an_estimate_outside_its_own_interval_gets_no_verdict():
    rng = np.random.default_rng(5)
    with_correct, without_correct = rng.random((1, 3, 40)) < 0.5, rng.random((1, 3, 40)) < 0.5
    stats = run_transfer.analyse_direction(with_correct, without_correct, 1, 0, 0.95)  # one resample
    low, high = stats["mean_gap_ci"]
    assert low == high != stats["mean_gap"]
    assert stats["verdict"] == "undetermined"
    assert run_transfer.verdict((0.042, 0.042), -0.021) == "undetermined"
    assert run_transfer.verdict((0.01, 0.2), 0.1) == "transfer"


def test_a_run_folder_is_read_from_its_eval_folder_and_one_without_probing_output_is_refused(tmp_path, capsys):
    with_run, without_run = tmp_path / "with-run", tmp_path / "without-run"
    write_run(with_run / "eval", "bridges")  # where run_eval.py writes a run folder's probing by default
    without_run.mkdir()
    with pytest.raises(InputError) as err:
        transfer(tmp_path, [with_run], [without_run])
    assert str(err.value) == (
        f"{without_run}: no probing output (accuracy.json) here or in {without_run / 'eval'}. Probe the run first: "
        f"python run_eval.py --model_name_or_path {without_run} --questions QUESTIONS (writes {without_run / 'eval'})."
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:  # probing flags are run_eval.py's, not taken here
        transfer(tmp_path, [with_run], [without_run], "--questions", "q.json")
    assert exit_info.value.code == 2 and "--questions q.json (probing is run_eval.py's step" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # nothing to compare the runs with bridges to
        run_transfer.main(["--with_bridges", str(with_run), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "required: --without_bridges" in capsys.readouterr().err
    write_run(without_run / "eval", "no_bridges")
    result = transfer(tmp_path, [with_run], [without_run])
    assert result["languages"][0]["with_bridges"] == [str(with_run / "eval")]
    assert result["languages"][0]["without_bridges"] == [str(without_run / "eval")]


def test_a_run_whose_language_has_no_questions_is_refused_naming_its_language(tmp_path):
    rng = np.random.default_rng(6)
    ko = {"c_ko": rng.random((3, 20)) < 0.5, "c_en": rng.random((3, 20)) < 0.5}
    mn = [write_run(tmp_path / f"mn-{s}", s, correct=ko, lang="mn") for s in ("bridges", "no_bridges")]
    with pytest.raises(
        InputError, match=r"mn: no question set in mn with a parallel English set among \['c_ko', 'c_en'\]"
    ):
        transfer(tmp_path, *([d] for d in mn))
    several = {**ko, "c_zh": rng.random((3, 20)) < 0.5}
    unknown = [write_run(tmp_path / f"unknown-{s}", s, correct=several, lang=None) for s in ("bridges", "no_bridges")]
    with pytest.raises(InputError, match=r"no cpt_setting lang and the questions hold languages \['ko', 'zh'\]"):
        transfer(tmp_path, *([d] for d in unknown))
    assert not (tmp_path / "out").exists()


def test_a_failure_while_plotting_leaves_no_output_behind(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(run_transfer, "_summary_figure", broken)
    with_dirs, without_dirs = [write_run(tmp_path / "with", "bridges")], [write_run(tmp_path / "without", "no_bridges")]
    with pytest.raises(RuntimeError, match="plotting failed"):
        transfer(tmp_path, with_dirs, without_dirs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------
# Knowledge or skill (--item_tiers), and mismatched bridges
# --------------------------------------------------------------------------------------


GROUP = "ko-culture-cloze"
STEMS = (f"{GROUP}_ko", f"{GROUP}_en")
SIZES = {"high": 40, "low": 40, "absent": 40, "en_only": 40}
#: The tier of each question index: the tiers interleaved, so that an item's tier is read, not its position.
TIER_OF = np.random.default_rng(7).permutation([t for t, n in SIZES.items() for _ in range(n)])


def write_tier_file(path, tier_of=TIER_OF, group=GROUP):
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


def skill_and_knowledge(skill: int, knowledge: list[int]) -> dict[str, list[int]]:
    """Items gained per tier and step: ``skill`` in every tier, ``knowledge`` more in the tier stated often."""
    return {tier: [skill + (k if tier == "high" else 0) for k in knowledge] for tier in SIZES}


def test_knowledge_transfer_recovers_a_planted_difference_in_differences(tmp_path):
    # Both seeds: bridges gain 8 of 40 items (0.2) in every tier (skill); on facts stated often in the source
    # corpus they gain 20 (seed 0) or 28 (seed 1) more from the second step on (knowledge: 0.6 on average).
    plans = [(4, skill_and_knowledge(8, [0, 20, 20])), (4, skill_and_knowledge(8, [0, 28, 28]))]
    tiers_file = write_tier_file(tmp_path / "item_tiers.json")
    result = transfer(tmp_path, *run_pairs(tmp_path, plans), "--item_tiers", str(tiers_file), n_bootstrap=1000)
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
    table = markdown.split("## Knowledge or skill")[1].split("**ko → English")[0]  # English -> ko: per tier, then DiD
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| tier ") or "**knowledge**" in line]
    assert [(row[0], row[4][:6], row[5][:6]) for row in rows] == [
        ("| tier high (the source states it often)", "+0.600", "+0.800"),
        ("| tier low", "+0.200", "+0.200"),
        ("| tier absent (the source never states it: skill)", "+0.200", "+0.200"),
        ("| tier en_only", "+0.200", "+0.200"),
        ("| **knowledge**: gap high − gap absent", "+0.400", "+0.600"),
    ]
    assert rows[-1][6] == "transfer |"
    assert f"- {run_transfer.knowledge_sentence('ko', en_to_ko)}" in markdown
    assert "English → ko (ko questions): knowledge crossed from English" in markdown


def test_a_gap_equal_on_every_tier_is_skill_not_knowledge(tmp_path):
    plans = [(10, skill_and_knowledge(8, [0, 0, 0])), (12, skill_and_knowledge(12, [0, 0, 0]))]
    tiers_file = write_tier_file(tmp_path / "item_tiers.json")
    result = transfer(tmp_path, *run_pairs(tmp_path, plans), "--item_tiers", str(tiers_file), n_bootstrap=1000)
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
    tiers_file = write_tier_file(tmp_path / "item_tiers.json")
    result = transfer(tmp_path, *run_pairs(tmp_path, plans), "--item_tiers", str(tiers_file), n_bootstrap=1000)
    d = result["languages"][0]["directions"][0]
    assert d["tiers"]["absent"]["mean_gap_ci"] == [0.0, 1.0] and d["tiers"]["high"]["mean_gap_ci"] == [0.0, 1.0]
    assert d["knowledge_transfer"]["mean_did_ci"] == [0.0, 0.0] == d["knowledge_transfer"]["final_did_ci"]


def test_item_tiers_that_do_not_fit_the_questions_are_refused(tmp_path):
    pairs = run_pairs(tmp_path, [(10, skill_and_knowledge(8, [0, 0, 0]))])
    short = write_tier_file(tmp_path / "short.json", TIER_OF[:-1])
    with pytest.raises(InputError, match=rf"short.json: 159 items, but {GROUP}_ko has 160"):
        transfer(tmp_path, *pairs, "--item_tiers", str(short), n_bootstrap=1000)
    other = write_tier_file(tmp_path / "other.json", group="zh-culture-cloze")
    with pytest.raises(InputError, match=rf"other.json: no analysed question group is theirs \({GROUP}\)"):
        transfer(tmp_path, *pairs, "--item_tiers", str(other), n_bootstrap=1000)
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps({"parallel_group": GROUP, "tiers": {"high": ""}, "items": [{"index": 1, "tier": "high"}]})
    )
    with pytest.raises(InputError, match=r"broken.json: the item indices are not 0..0, each once"):
        transfer(tmp_path, *pairs, "--item_tiers", str(broken), n_bootstrap=1000)
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
        r"\| English → ko \(ko questions\) \| \+0\.150 \[[-+.\d, ]+\] \| transfer \| \+0\.250 \[[-+.\d, ]+\] \| "
        r"transfer \|",
        markdown,
    )
    assert "English → ko (ko questions): the right partner matters (bridges − mismatched +0.150 [" in markdown


def test_a_mismatched_run_given_as_without_bridges_is_refused_and_the_reverse_too(tmp_path):
    dirs = three_settings(tmp_path, {"bridges": [30], "no_bridges": [10], "mismatched_bridges": [20]}, seeds=(0,))
    with pytest.raises(
        InputError,
        match=r"given as --without_bridges but its cpt_setting says bridges=False, setting 'mismatched_bridges'",
    ):
        transfer(tmp_path, dirs["bridges"], dirs["mismatched_bridges"], n_bootstrap=1000)
    with pytest.raises(
        InputError, match=r"given as --mismatched_bridges but its cpt_setting says .*setting 'no_bridges'"
    ):
        transfer(
            tmp_path,
            dirs["bridges"],
            dirs["no_bridges"],
            "--mismatched_bridges",
            str(dirs["no_bridges"][0]),
            n_bootstrap=1000,
        )
    # A run that records no setting (a model trained elsewhere) cannot be vouched for as mismatched.
    elsewhere = tmp_path / "elsewhere"
    write_run(elsewhere, "no_bridges", 0, right_on_first(20))
    accuracy = json.loads((elsewhere / "accuracy.json").read_text())
    del accuracy["cpt_setting"]["setting"]
    (elsewhere / "accuracy.json").write_text(json.dumps(accuracy))
    with pytest.raises(InputError, match=r"given as --mismatched_bridges but .*setting None"):
        transfer(
            tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", str(elsewhere), n_bootstrap=1000
        )


def test_mismatched_runs_are_paired_by_seed_and_compared_like_the_others(tmp_path):
    dirs = three_settings(tmp_path, {"bridges": [30, 30], "no_bridges": [10, 10]})
    mismatched = [write_run(tmp_path / f"m-s{s}", "mismatched_bridges", s, right_on_first(20)) for s in (0, 2)]
    with pytest.raises(
        InputError,
        match=r"seed 1: bridges-s1, no_bridges-s1 has no --mismatched_bridges run; seed 2: m-s2 has no "
        r"--with_bridges run and no --without_bridges run",
    ):
        transfer(
            tmp_path,
            dirs["bridges"],
            dirs["no_bridges"],
            "--mismatched_bridges",
            *map(str, mismatched),
            n_bootstrap=1000,
        )
    other_base = write_run(
        tmp_path / "m-s1", "mismatched_bridges", 1, right_on_first(20), base_model_weights_sha256="b" * 64
    )
    with pytest.raises(InputError, match=r"differ in base_model_weights_sha256: 'w{64}' vs 'b{64}'"):
        transfer(
            tmp_path, dirs["bridges"], dirs["no_bridges"], "--mismatched_bridges", str(mismatched[0]), str(other_base)
        )
