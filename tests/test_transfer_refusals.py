"""run_transfer.py refuses what it cannot compare: runs that differ in base model, data, training or probing,
runs that cannot be paired by seed, too few bootstrap resamples, and stale probing folders; and it writes no
output before everything that can fail has run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cloze_samples import write_sample_questions
from eval_helpers import make_run_dir, write_eval_output

import run_transfer
from study_common import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: What a run_cpt.py run records besides lang, setting and seed (the runs of a study share all of it).
RECORDED = {
    "base_model_weights_sha256": "w" * 64,
    "base_model_config_sha256": "c" * 64,
    "dataset_sha256": "d" * 64,
    "steps": 30,
    "windows_per_step": 4,
    "block_size": 64,
    "pair_order": "en_first",
    "pair_separator": "",
}
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


def write_run(directory, setting="bridges", seed=0, correct=None, lang="ko", checkpoints=(10, 20, 30), **changes):
    """An eval output folder of a run_cpt.py run (recording every compared field) probed by run_eval.py;
    ``changes`` replaces recorded fields (cpt_setting or probing header)."""
    rng = np.random.default_rng(seed)
    correct = correct or {
        f"c_{lang}": rng.random((len(checkpoints), 20)) < 0.5,
        "c_en": rng.random((len(checkpoints), 20)) < 0.5,
    }
    cpt_setting = {"lang": lang, "setting": setting, "bridges": setting == "bridges", "seed": seed, **RECORDED}
    cpt_setting["documents_seen_sha256"] = f"documents-of-seed-{seed}"
    header = {"loss_dtype": "float32"}
    for key, value in changes.items():
        (header if key in run_transfer.PROBING_FIELDS else cpt_setting)[key] = value
    eval_dir = write_eval_output(directory, correct, list(checkpoints), cpt_setting)
    accuracy = json.loads((eval_dir / "accuracy.json").read_text())
    (eval_dir / "accuracy.json").write_text(json.dumps(accuracy | header))
    return eval_dir


def transfer(tmp_path, with_dirs, without_dirs, *flags) -> dict:
    out = tmp_path / "out"
    args = ["--with_bridges", *map(str, with_dirs), "--without_bridges", *map(str, without_dirs)]
    return run_transfer.main([*args, "--output_dir", str(out), "--n_bootstrap", "200", *flags])


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


def test_several_runs_that_record_no_seed_are_refused_not_paired_in_argument_order(tmp_path):
    with_dirs = [write_run(tmp_path / f"with{s}", "bridges", s) for s in (0, 1)]
    without_dirs = [write_run(tmp_path / f"without{s}", "no_bridges", s) for s in (0, 1)]
    for directory in with_dirs + without_dirs:
        accuracy = json.loads((directory / "accuracy.json").read_text())
        accuracy["cpt_setting"]["seed"] = None
        (directory / "accuracy.json").write_text(json.dumps(accuracy))
    with pytest.raises(InputError, match=r"record no seed: give one run per setting"):
        transfer(tmp_path, with_dirs, without_dirs)
    result = transfer(tmp_path, with_dirs[:1], without_dirs[:1])  # one run per setting: unambiguous
    assert result["languages"][0]["run_names"] == [["with0", "without0"]]


# --------------------------------------------------------------------------------------
# Intervals worth a verdict; outputs only when complete
# --------------------------------------------------------------------------------------


def test_fewer_bootstrap_resamples_than_the_floor_are_refused_before_anything_is_written(tmp_path):
    assert run_transfer.min_bootstrap(0.95) == 200 and run_transfer.min_bootstrap(0.99) == 1000
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
        run_transfer.transfer_analysis([], run_transfer.TransferArguments(n_bootstrap=999, confidence=0.99))


def test_an_estimate_outside_its_own_interval_gets_no_verdict():
    rng = np.random.default_rng(5)
    with_correct, without_correct = rng.random((1, 3, 40)) < 0.5, rng.random((1, 3, 40)) < 0.5
    stats = run_transfer.analyse_direction(with_correct, without_correct, 1, 0, 0.95)  # one resample
    low, high = stats["mean_gap_ci"]
    assert low == high != stats["mean_gap"]
    assert stats["verdict"] == "undetermined"
    assert run_transfer.verdict((0.042, 0.042), -0.021) == "undetermined"
    assert run_transfer.verdict((0.01, 0.2), 0.1) == "transfer"


def test_a_failure_while_plotting_leaves_no_output_behind(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(run_transfer, "_summary_figure", broken)
    with_dirs, without_dirs = [write_run(tmp_path / "with", "bridges")], [write_run(tmp_path / "without", "no_bridges")]
    with pytest.raises(RuntimeError, match="plotting failed"):
        transfer(tmp_path, with_dirs, without_dirs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_stale_probing_folder_is_refused_naming_eval_dir_name(tmp_path, tiny_model_dir):
    questions = write_sample_questions(tmp_path / "questions", langs=("en", "ko"))
    run = make_run_dir(tiny_model_dir, tmp_path / "run", (), 1, {"lang": "ko", "bridges": True, "seed": 0})
    stems = {"sample-culture_en": np.zeros((1, 6), bool), "sample-culture_ko": np.zeros((1, 6), bool)}
    write_eval_output(run / "probe", stems, [1], {"lang": "ko", "bridges": True, "seed": 0})  # mean_token_loss
    args = ["--runs", str(run), "--questions", *map(str, questions), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(InputError) as err:
        run_transfer.main([*args, "--eval_dir_name", "probe", "--scoring", "option_logprob"])
    message = str(err.value)
    assert "scoring ('mean_token_loss', now 'option_logprob')" in message
    assert "--eval_dir_name (now 'probe')" in message and "--output_dir" not in message


def test_help_explains_every_new_flag(capsys):
    with pytest.raises(SystemExit) as exit_status:
        run_transfer.main(["--help"])
    assert exit_status.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--mismatched_bridges", "--item_tiers", "--allow_differences", "200 for 95%"):
        assert flag in shown
