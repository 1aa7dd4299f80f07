"""study_config.py: study files, --set and --sweep checked against each step script's flags, the registered plans of
the studies, and --smoke (every step of a plan, exactly as the full run has it, with only the budgets cut)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

import run_study
from run_study import StudyArguments, build_plan
from study_common import InputError
from study_config import (
    PRESETS,
    SMOKE_BUDGETS,
    SMOKE_CPU_PRECISION,
    SMOKE_ONLY_FLAGS,
    script_flags,
    smoke_preset,
    sweep_factors,
    with_flags,
)


def test_a_set_typo_is_refused_naming_close_valid_keys(tmp_path):
    argv = ["--preset", "micro", "--dry_run", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(InputError, match=r"unknown key 'cpt.max_stps': run_cpt.py has no flag --max_stps. Did you mean "
                                         r"max_steps.*The keys of cpt are run_cpt.py's flags.*learning_rate"):  # fmt: skip
        run_study.main([*argv, "--set", "cpt.max_stps=40"])
    with pytest.raises(InputError, match=r"unknown key 'world.pair_mentons'.*Did you mean pair_mentions"):
        run_study.main([*argv, "--set", "world.pair_mentons=30"])
    with pytest.raises(InputError, match=r"unknown key 'seed'. Did you mean seeds\? A study's keys: description"):
        run_study.main([*argv, "--set", "seed=3"])
    with pytest.raises(InputError, match=r"unknown key 'wrld'. Did you mean world"):
        run_study.main([*argv, "--sweep", "wrld.places=8,12"])
    with pytest.raises(InputError, match=r"cpt.output_dir: the plan sets run_cpt.py --output_dir itself"):
        run_study.main([*argv, "--set", "cpt.output_dir=elsewhere"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("cpt.max_steps=4.5", r"cpt.max_steps must be int \(run_cpt.py --max_steps\), not 4.5"),
        ("world.pair_mentions=many", r"world.pair_mentions must be int \(synthetic_world.py --pair_mentions\)"),
        ("eval.batch_size=true", r"eval.batch_size must be int"),
        ("cpt.lr_scheduler_type=cosin", r"cpt.lr_scheduler_type must be one of linear, cosine"),
        ("seeds=[0,one]", r"seeds must be a list of int, not \[0, 'one'\]"),
        ("jobs=two", r"jobs must be int, not 'two'"),
        ("world={places: 8, pairs: lots}", r"world.pairs must be int"),
    ],
)
def test_a_wrongly_typed_value_is_refused_naming_the_type_the_key_takes(assignment, expected, tmp_path):
    with pytest.raises(InputError, match=expected):
        run_study.main(["--preset", "micro", "--dry_run", "--set", assignment])


def test_values_are_read_as_yaml_and_reach_the_commands(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--preset", "micro", "--dry_run", "--output_dir", str(out), "--set", "cpt.learning_rate=1e-4",
            "--set", "seeds=[3,4]", "--set", "pretrain.config_overrides=hidden_size=16,num_attention_heads=2"]  # fmt: skip
    assert run_study.main(argv) == 0
    printed = capsys.readouterr().out
    assert "--learning_rate 0.0001" in printed and "--seed 3" in printed and "--seed 4" in printed
    assert "--config_overrides hidden_size=16,num_attention_heads=2" in printed
    assert "Configuration: preset micro (configs/studies/micro.yaml), --set cpt.learning_rate=1e-4" in printed


def test_a_study_file_given_by_path_is_read_like_a_preset_and_checked_alike(tmp_path, capsys, monkeypatch):
    text = (REPO_ROOT / "configs" / "studies" / "micro.yaml").read_text()
    study = tmp_path / "mine.yaml"
    study.write_text(text.replace("seeds: [0, 1]", "seeds: [5]"))
    assert run_study.main(["--preset", str(study), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "Output: study_runs/mine" in printed and "-bridges-s5" in printed and "-bridges-s0" not in printed
    as_json = tmp_path / "mine.json"  # JSON is YAML too
    as_json.write_text(json.dumps(yaml.safe_load(text.replace("seeds: [0, 1]", "seeds: [6]"))))
    monkeypatch.chdir(tmp_path)  # a relative path, from where the user is
    assert run_study.main(["--preset", "mine.json", "--dry_run", "--sweep", "cpt.max_steps=20,40"]) == 0
    printed = capsys.readouterr().out
    assert f"Configuration: preset mine ({as_json}), --sweep" in printed and "-bridges-s6" in printed
    study.write_text(text.replace("  pair_mentions: 2", "  pair_mention: 2"))
    with pytest.raises(InputError, match=rf"{study}: unknown key 'world.pair_mention'.*Did you mean pair_mentions"):
        run_study.main(["--preset", str(study), "--dry_run"])
    study.write_text(text.replace("settings: [bridges, no_bridges]", "settings: [bridges]"))
    with pytest.raises(InputError, match="settings must hold bridges and no_bridges"):
        run_study.main(["--preset", str(study), "--dry_run"])


def test_a_sweep_refuses_a_key_it_cannot_sweep_or_that_set_also_gives():
    with pytest.raises(InputError, match=r"jobs cannot be swept \(it changes how the study runs"):
        sweep_factors(["jobs=1,2"], [])
    with pytest.raises(InputError, match=r"cpt.max_steps is also given by --set"):
        sweep_factors(["cpt.max_steps=20,40"], ["cpt.max_steps=30"])
    with pytest.raises(InputError, match=r"cpt.max_steps must be int"):
        sweep_factors(["cpt.max_steps=20,forty"], [])


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_study_file_passes_the_checks_of_its_keys_against_the_scripts_flags(name):
    preset, _ = run_study.configure(StudyArguments(preset=name))
    assert preset == PRESETS[name]
    assert {"world", "pretrain", "build", "cpt", "eval", "density"} <= set(vars(preset))


def test_every_flag_a_plan_passes_is_a_flag_of_its_script(tmp_path):
    section = {"base_eval": "eval"}  # the others are named like their step kind
    decomposed = replace(
        PRESETS["micro"],
        settings=["bridges", "no_bridges", "mismatched_bridges"],
        world={**PRESETS["micro"].world, "absent_places": 4, "en_only_places": 4},
    )
    plans = [build_plan(StudyArguments(preset=name), PRESETS[name], tmp_path) for name in PRESETS]
    plans.append(build_plan(StudyArguments(preset="micro"), decomposed, tmp_path))
    for step in (s for plan in plans for s in plan.steps):
        known = script_flags(section.get(step.kind, step.kind))
        unknown = [c for c in step.command if c.startswith("--") and c[2:] not in known]
        launcher = {"--config_file"} if step.command[0] == "accelerate" else set()
        assert set(unknown) <= launcher, (step.id, unknown)


#: Digests of each study's steps (id, command, outputs, dependencies) as the presets planned them in code, before
#: they became files (cpu: as it became the dose-response sweep's largest-gap cell). A finished study stays done
#: only while its commands do not change: a change of a study's plan that is meant must update its digest here,
#: knowing every finished run of that study reruns.
PLANNED_IN_CODE = {"cpu": "f16e5ae84fdd3efe", "micro": "e00ed7ec3c84aed3", "gpu-small": "c3434e8447ca40b6",
                   "paper": "5a9d623ee04d4d75"}  # fmt: skip


#: Digests of the steps of the pre-registered studies (docs/dose-response-preregistration.md), as registered: a change
#: of such a plan is a change of the design, recorded in its pre-registration's "Changes after the start" first.
PREREGISTERED = {"dose-response": "c2140a4cd5321c60"}


def _plan_digest(name: str) -> str:
    plan = build_plan(StudyArguments(preset=name), PRESETS[name], Path("study_runs") / name)
    rows = [[s.id, s.command, s.outputs, s.deps] for s in plan.steps]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(PLANNED_IN_CODE))
def test_every_study_file_plans_exactly_the_steps_its_preset_planned_in_code(name):
    assert _plan_digest(name) == PLANNED_IN_CODE[name]


@pytest.mark.parametrize("name", list(PREREGISTERED))
def test_a_preregistered_study_plans_exactly_the_steps_it_was_registered_with(name):
    assert _plan_digest(name) == PREREGISTERED[name]


def test_the_dose_response_study_has_256_facts_in_four_tiers_and_each_setting_once_per_seed(tmp_path):
    dose = PRESETS["dose-response"]
    world = dose.world
    # 16 high/low places and 8 absent and 8 en_only ones, 8 relations each: 256 facts, 64 per tier
    assert world["relations"] * (world["places"] + world["absent_places"] + world["en_only_places"]) == 256
    assert world["relations"] * world["absent_places"] == world["relations"] * world["en_only_places"] == 64
    assert (dose.langs, dose.variants, dose.seeds) == (["mn"], ["native"], [0, 1, 2])
    plan = build_plan(StudyArguments(preset="dose-response"), dose, tmp_path)
    settings = ("--bridges", "--no_bridges", "--mismatched_bridges")
    cpt = [[flag for flag in settings if flag in s.command] for s in plan.steps if s.kind == "cpt"]
    assert sorted(cpt) == sorted([[flag] for flag in settings] * 3), "each setting once per seed"
    (transfer,) = [s for s in plan.steps if s.kind == "transfer"]
    at = transfer.command.index("--mismatched_bridges")
    assert transfer.command[at + 1 : at + 4] == [r.eval_dir for r in plan.runs if r.setting == "mismatched_bridges"]
    assert transfer.command[transfer.command.index("--item_tiers") + 1].endswith("mn/native/item_tiers.json")


def test_the_cpu_study_is_the_dose_response_cell_at_30_mentions_and_2400_steps():
    cpu, dose = PRESETS["cpu"], PRESETS["dose-response"]
    for section in ("pretrain", "build", "eval", "transfer", "density"):
        assert getattr(cpu, section) == getattr(dose, section), f"{section}: the sweep cell's model and budgets"
    assert cpu.world == {**dose.world, "pair_mentions": 30}
    assert cpu.cpt == {**dose.cpt, "max_steps": 2400}
    assert (cpu.langs, cpu.variants, cpu.seeds, cpu.settings) == (dose.langs, dose.variants, dose.seeds, dose.settings)


# --------------------------------------------------------------------------------------
# --smoke
# --------------------------------------------------------------------------------------


#: The only flags a smoke command may change (values, never presence, except the streamed shuffle buffer).
BUDGET_FLAGS = {f"--{key}" for budgets in (SMOKE_BUDGETS, SMOKE_CPU_PRECISION) for b in budgets.values() for key in b}


def _split(command: list[str]) -> tuple[list[str], str, dict[str, list[str]]]:
    """(launcher, script, flag -> values) of a step's command."""
    at = next(i for i, part in enumerate(command) if part.endswith(".py"))
    flags: dict[str, list[str]] = {}
    current = None
    for part in command[at + 1 :]:
        if part.startswith("--"):
            current = part
            assert current not in flags, f"flag {current} given twice in {command}"
            flags[current] = []
        else:
            flags[current].append(part)
    return command[:at], command[at], flags


def _plans(preset_name: str, tmp_path, on_gpu: bool, **arguments):
    args = StudyArguments(preset=preset_name, **arguments)
    full = build_plan(args, with_flags(PRESETS[preset_name], args), tmp_path / "full")
    smoke, cuts = smoke_preset(PRESETS[preset_name], on_gpu=on_gpu)
    return full, build_plan(replace(args, smoke=True), with_flags(smoke, args), tmp_path / "smoke"), cuts


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("preset_name", list(PRESETS))
def test_smoke_plan_has_the_full_plans_steps_scripts_and_data_and_differs_only_in_budget_flags(
    preset_name, on_gpu, tmp_path
):
    full, smoke, cuts = _plans(preset_name, tmp_path, on_gpu)
    assert [s.id for s in smoke.steps] == [s.id for s in full.steps]
    assert [(s.kind, s.deps, s.trains) for s in smoke.steps] == [(s.kind, s.deps, s.trains) for s in full.steps]
    assert [r.name for r in smoke.runs] == [r.name for r in full.runs]
    differing: set[str] = set()
    for full_step, smoke_step in zip(full.steps, smoke.steps):
        full_launcher, full_script, full_flags = _split(full_step.command)
        smoke_launcher, smoke_script, smoke_flags = _split(smoke_step.command)
        assert smoke_script == full_script, full_step.id
        if full_launcher != smoke_launcher:  # without a GPU, accelerate launch becomes plain python
            assert not on_gpu and full_step.trains and full_launcher[:2] == ["accelerate", "launch"], full_step.id
            assert smoke_launcher == ["python"]
        added = set(smoke_flags) - set(full_flags)
        budget_only = {f"--{flag}" for flag in SMOKE_ONLY_FLAGS}
        assert added <= {"--shuffle_buffer_size"} | budget_only, f"{full_step.id}: smoke adds {added}"
        if "--shuffle_buffer_size" in added:
            assert "--streaming" in full_flags, "only a streamed pretraining gets a smaller shuffle buffer"
        # every input of a build and every corpus of a density step is read only in part
        if full_step.kind == "build":
            assert smoke_flags["--max_records_per_input"] == [str(SMOKE_BUDGETS["build"]["max_records_per_input"])]
        if full_step.kind == "density":
            assert smoke_flags["--max_documents"] == [str(SMOKE_BUDGETS["density"]["max_documents"])]
        for flag, full_values in full_flags.items():
            smoke_values = smoke_flags.get(flag)
            if flag not in BUDGET_FLAGS:
                # Same data sources, columns, tokenizer, settings; paths differ only by the output folder.
                normalised = [v.replace(str(tmp_path / "full"), str(tmp_path / "smoke")) for v in full_values]
                assert smoke_values == normalised, f"{full_step.id}: {flag} {full_values} -> {smoke_values}"
            elif smoke_values != full_values:
                differing.add(flag)
        if full_step.kind in ("pretrain", "cpt"):
            assert smoke_flags["--max_steps"] != full_flags["--max_steps"] or full_flags["--max_steps"] == ["4"]
            assert int(smoke_flags["--save_steps"][0]) < int(smoke_flags["--max_steps"][0]), (
                "a smoke run saves a checkpoint before its last, so every checkpoint-reading step reads several"
            )
    assert differing, "a smoke plan cuts some budget"
    assert all(any(line.split(": ", 1)[1].startswith(flag + " ") for line in cuts) for flag in differing), (
        "the printed list of cuts names every budget flag that differs"
    )


def test_paper_smoke_plan_reads_the_same_hub_datasets_and_columns_as_the_full_plan(tmp_path):
    full, smoke, _ = _plans("paper", tmp_path, on_gpu=False)
    sources = {
        "--dataset_name", "--dataset_config_name", "--tokenizer_name", "--mono_dataset", "--mono_dataset_config",
        "--mono_data_files", "--pairs_dataset", "--pairs_dataset_config", "--en_column", "--tgt_column",
        "--replay_dataset", "--replay_dataset_config", "--corpus_dataset", "--corpus_dataset_config",
        "--corpus_data_files", "--corpus_streaming", "--streaming", "--questions", "--eval_questions",
    }  # fmt: skip
    assert not sources & BUDGET_FLAGS
    for full_step, smoke_step in zip(full.steps, smoke.steps):
        full_flags, smoke_flags = _split(full_step.command)[2], _split(smoke_step.command)[2]
        moved = str(tmp_path / "full"), str(tmp_path / "smoke")  # the step before's output, in the smoke folder
        assert {f: v for f, v in smoke_flags.items() if f in sources} == {
            f: [value.replace(*moved) for value in v] for f, v in full_flags.items() if f in sources
        }
    pretrain = _split(next(s for s in smoke.steps if s.kind == "pretrain").command)[2]
    assert pretrain["--dataset_name"] == ["wikimedia/wikipedia"] and "--streaming" in pretrain
    assert pretrain["--config_name"] == ["configs/tiny.json"] and pretrain["--block_size"] == ["128"]
    assert "--bf16" not in pretrain, "no bf16 without a GPU"


def test_smoke_pushes_go_to_their_own_hub_repositories(tmp_path):
    full, smoke, _ = _plans("paper", tmp_path, on_gpu=False, hub_org="org", langs=["bo"])
    ids = {
        plan_name: sorted(
            value
            for step in plan.steps
            for flag, values in _split(step.command)[2].items()
            if flag in ("--hub_model_id", "--hub_dataset_id")
            for value in values
        )
        for plan_name, plan in (("full", full), ("smoke", smoke))
    }
    assert ids["full"] == ["org/paper-base", "org/paper-cpt-bo-bridges-s0", "org/paper-cpt-bo-no_bridges-s0",
                           "org/paper-data-bo"]  # fmt: skip
    assert ids["smoke"] == [name.replace("org/paper-", "org/paper-smoke-") for name in ids["full"]]
    for step in smoke.steps:
        flags = _split(step.command)[2]
        if step.trains:
            assert flags["--hub_strategy"] == ["all_checkpoints"] and "--push_to_hub" in flags, step.id
            assert "--hub_always_push" in flags, "no checkpoint push is skipped while another uploads"


def test_smoke_outputs_go_to_their_own_folder_and_the_printed_plan_names_the_cuts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_study, "_cuda_available", lambda: False)
    code = run_study.main(["--preset", "micro", "--smoke", "--dry_run"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Output: study_runs/micro-smoke" in printed
    assert "Smoke run: every step of the plan, only these budgets cut:" in printed
    assert "pretrain: --max_steps 100 -> 4" in printed and "cpt: --max_steps 60 -> 4" in printed
    assert "--output_dir study_runs/micro-smoke/base" in printed
    assert "--output_dir study_runs/micro/" not in printed, "nothing of a smoke run lands in the full run's folder"
    assert "`python run_study.py --preset micro --smoke`" in printed
