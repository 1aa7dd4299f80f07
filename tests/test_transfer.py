"""run_transfer.py: gap statistics, seeds, alignment, outputs and plots; runs probed first with run_eval.py."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from cloze_samples import write_sample_questions
from eval_helpers import make_run_dir, write_eval_output

import run_eval
import run_transfer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def analyse(tmp_path, with_sets, without_sets, steps=(10, 20, 30), n_bootstrap=500, seeds=None, lang="ko", **kwargs):
    """Write one eval output per run, each a dict stem -> correctness, and run the transfer analysis on them."""
    runs = []
    for bridges, sets in ((True, with_sets), (False, without_sets)):
        for k, correct in enumerate(sets):
            seed = seeds[k] if seeds else None
            setting = {"lang": lang, "bridges": bridges, "seed": seed}
            name = f"{lang}-{'with' if bridges else 'without'}-{k}"
            run_steps = kwargs.get("run_steps", {}).get(name, list(steps))
            tied = kwargs.get("tied", {}).get(name)
            eval_dir = write_eval_output(tmp_path / name, correct, run_steps, setting, tied)
            setting_flag = "bridges" if bridges else "no_bridges"
            runs.append(
                run_transfer._resolve_run(
                    str(eval_dir), setting_flag, run_eval.EvalArguments(), run_transfer.TransferArguments(), []
                )
            )
    transfer = run_transfer.TransferArguments(
        n_bootstrap=n_bootstrap,
        bootstrap_seed=kwargs.get("bootstrap_seed", 0),
        tie_policy=kwargs.get("tie_policy", "first"),
    )
    return run_transfer.transfer_analysis(runs, transfer)


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
    d = analyse(tmp_path, with_sets, without_sets, steps=(5, 6), seeds=[2, 0, 1], n_bootstrap=2000)["languages"][0][
        "directions"
    ][0]
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
    eval_dir = write_eval_output(tmp_path / "r", data, [1, 2], {"lang": "ko", "bridges": True, "seed": 0})
    with pytest.raises(ValueError, match="given as --without_bridges but its cpt_setting says bridges=True"):
        run_transfer._resolve_run(
            str(eval_dir), "no_bridges", run_eval.EvalArguments(), run_transfer.TransferArguments(), []
        )


def test_unequal_seed_counts_are_an_error_naming_the_runs(tmp_path):
    data = both(np.random.default_rng(4), 2, 10)
    with pytest.raises(
        ValueError, match=r"2 run\(s\) with bridges \(ko-with-0, ko-with-1\) but 1 without \(ko-without-0\)"
    ):
        analyse(tmp_path, [data, data], [data], steps=(1, 2))


@pytest.mark.slow
def test_transfer_command_probes_eight_random_weight_run_folders_and_gives_the_known_ko_verdict(
    tmp_path, tiny_model_dir
):
    """Eight run folders (ko and zh, with and without bridges, two seeds) of tiny models with random weights (no
    training), probed and compared in one command. The ko runs of a seed share their weights in both settings,
    so every ko gap is exactly 0 and the verdict is known: no evidence; the zh runs all differ."""
    questions = write_sample_questions(tmp_path / "questions", langs=("en", "ko", "zh"))
    runs = []
    for lang in ("ko", "zh"):
        for bridges in (True, False):
            for seed in (0, 1):
                setting = {"lang": lang, "bridges": bridges, "seed": seed}
                name = f"{lang}-{'with' if bridges else 'without'}-s{seed}"
                weights = 1 + seed if lang == "ko" else 10 + 2 * seed + bridges
                runs.append(make_run_dir(tiny_model_dir, tmp_path / name, (2, 4), 6, setting, seed=weights))
    pairs = tmp_path / "heldout_pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"en": f"The year {k} was good.", "tgt": f"{k}년은 좋았다."}, ensure_ascii=False) + "\n"
            for k in range(4)
        )
    )
    out = tmp_path / "transfer"
    args = ["--runs", *map(str, runs), "--questions", *map(str, questions), "--output_dir", str(out)]
    run_transfer.main([*args, "--n_bootstrap", "300", "--diagnostic_pairs", str(pairs)])

    # Every run was probed in its own eval folder, on its language's questions and the English ones only.
    ko_eval = json.loads((tmp_path / "ko-with-s0" / "eval" / "accuracy.json").read_text())
    assert sorted(ko_eval["questions"]) == ["sample-culture_en", "sample-culture_ko"]
    assert ko_eval["cpt_setting"] == {"lang": "ko", "bridges": True, "seed": 0}

    result = json.loads((out / "transfer.json").read_text())
    assert [language["lang"] for language in result["languages"]] == ["ko", "zh"]
    for language in result["languages"]:
        assert language["steps"] == [2, 4, 6]
        assert [d["direction"] for d in language["directions"]] == [
            f"en->{language['lang']}",
            f"{language['lang']}->en",
        ]
        for d in language["directions"]:
            assert d["n_seed_pairs"] == 2 and len(d["per_seed"]) == 2
            assert len(d["gap"]) == len(d["gap_ci"]) == 3
            assert d["gap_ci"][-1][0] <= d["final_gap"] <= d["gap_ci"][-1][1]
    for d in result["languages"][0]["directions"]:  # ko: the same weights in both settings
        assert d["gap"] == [0.0] * 3 and d["mean_gap_ci"] == [0.0, 0.0] and d["verdict"] == "no evidence"
        assert [m["p_value"] for m in d["mcnemar_final"]] == [1.0, 1.0]

    def correct(run_name: str, stem: str, step: int) -> np.ndarray:
        rows = [
            json.loads(line) for line in (tmp_path / run_name / "eval" / "predictions.jsonl").read_text().splitlines()
        ]
        chosen = sorted((r for r in rows if r["step"] == step and r["questions"] == stem), key=lambda r: r["index"])
        assert [r["index"] for r in chosen] == list(range(6))
        return np.array([r["correct"] for r in chosen])

    # zh, by hand from predictions.jsonl: the McNemar p-value of the first seed pair at the final step, the
    # mean gap over steps and seeds, and the verdict the rule gives for the interval reported.
    from scipy.stats import binomtest

    en_to_zh = result["languages"][1]["directions"][0]
    w, o = correct("zh-with-s0", "sample-culture_zh", 6), correct("zh-without-s0", "sample-culture_zh", 6)
    b, c = int(np.sum(w & ~o)), int(np.sum(~w & o))
    expected = binomtest(b, b + c).pvalue if b + c else 1.0
    assert en_to_zh["mcnemar_final"][0]["p_value"] == pytest.approx(expected)
    assert en_to_zh["per_seed"][0]["final_gap"] == pytest.approx((w.sum() - o.sum()) / 6)
    gaps = [
        correct(f"zh-with-s{seed}", "sample-culture_zh", step).mean()
        - correct(f"zh-without-s{seed}", "sample-culture_zh", step).mean()
        for seed in (0, 1)
        for step in (2, 4, 6)
    ]
    assert en_to_zh["mean_gap"] == pytest.approx(np.mean(gaps))
    low, high = en_to_zh["mean_gap_ci"]
    assert en_to_zh["verdict"] == ("transfer" if low > 0 else "reverse" if high < 0 else "no evidence")

    # The bridge diagnostic of every run, per checkpoint in its eval folder, the last one in transfer.json.
    diagnostic = json.loads((tmp_path / "zh-without-s1" / "eval" / "bridge_diagnostic.json").read_text())
    assert [e["step"] for e in diagnostic["checkpoints"]] == [2, 4, 6]
    assert len(result["languages"][1]["bridge_diagnostic"]) == 4
    assert {d["step"] for language in result["languages"] for d in language["bridge_diagnostic"]} == {6}
    markdown = (out / "transfer.md").read_text()
    assert "| ko | en->ko |" in markdown and "| zh | zh->en |" in markdown and "overstates significance" in markdown
    assert "## Bridge diagnostic" in markdown
    for png in ("transfer_curves.png", "transfer_summary.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # The same analysis from the eval output folders alone (no probing), by explicit setting flags.
    again = tmp_path / "again"
    ko = {b: [str(tmp_path / f"ko-{b}-s{s}" / "eval") for s in (0, 1)] for b in ("with", "without")}
    run_transfer.main(
        [
            "--with_bridges",
            *ko["with"],
            "--without_bridges",
            *ko["without"],
            "--output_dir",
            str(again),
            "--n_bootstrap",
            "300",
        ]
    )
    assert json.loads((again / "transfer.json").read_text())["languages"][0] == result["languages"][0] | {
        "with_bridges": ko["with"],
        "without_bridges": ko["without"],
    }


def test_a_run_whose_language_has_no_questions_is_refused_naming_run_lang_and_languages(tmp_path, tiny_model_dir):
    questions = write_sample_questions(tmp_path / "questions", langs=("en", "ko"))
    setting = {"lang": "mn", "bridges": True, "seed": 0}
    run = make_run_dir(tiny_model_dir, tmp_path / "mn-run", (), 1, setting)
    with pytest.raises(ValueError) as err:
        run_transfer.main(
            ["--runs", str(run), "--questions", *map(str, questions), "--output_dir", str(tmp_path / "o")]
        )
    message = str(err.value)
    assert str(run) in message and "lang is 'mn'" in message and "question languages: en, ko" in message
    assert not (run / "eval").exists()  # nothing probed


def test_a_run_of_unknown_language_is_refused_when_questions_hold_several_target_languages(tmp_path, tiny_model_dir):
    questions = write_sample_questions(tmp_path / "questions", langs=("en", "ko", "zh"))
    run = make_run_dir(tiny_model_dir, tmp_path / "run", (), 1, {"bridges": True, "seed": 0})
    with pytest.raises(ValueError, match=r"records no cpt_setting lang.*several target languages \(ko, zh\)"):
        run_transfer.main(
            ["--runs", str(run), "--questions", *map(str, questions), "--output_dir", str(tmp_path / "o")]
        )
    assert not (run / "eval").exists()


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
    assert (d_first["tie_policy"], d_frac["tie_policy"]) == ("first", "fractional")
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
    assert re.search(r"\| ko \| en->ko \| first \| 1\.000 \| 0\.500 \| \+0\.500 " + ci + r" \| transfer \|", markdown)
    assert re.search(
        r"\| ko \| en->ko \| fractional \| 0\.500 \| 0\.500 \| \+0\.000 " + ci + r" \| no evidence", markdown
    )
    # English questions have no ties: one rule, not repeated.
    assert not first["languages"][0]["directions"][1]["tie_policies_differ"]
    assert "ko->en |" not in markdown.split("## Both tie rules")[1].split("## Per seed pair")[0]
