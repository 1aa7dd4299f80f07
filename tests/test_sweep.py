"""run_study.py's studies as data: the study files, --set (checked against each step script's flags), --sweep (one
plan whose cells share the steps they agree on), and the effective configuration in plan.json and the reports."""

import hashlib
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, run_script

import run_study
import study_report
from run_study import StudyArguments, StudyRunner, build_plan, build_sweep
from study_common import InputError
from study_config import PRESETS, script_flags, sweep_factors


def _sweep(tmp_path: Path, *sweeps: str, preset: str = "micro", **arguments):
    args = StudyArguments(preset=preset, sweep=list(sweeps), **arguments)
    return build_sweep(args, tmp_path / "sweep", sweep_factors(args.sweep, args.set or []))


def _flag(step, flag: str) -> str:
    return step.command[step.command.index(flag) + 1]


def test_a_sweep_over_a_cpt_key_shares_the_world_pretraining_and_datasets_and_gives_each_cell_its_own_cpt(tmp_path):
    plan = _sweep(tmp_path, "cpt.max_steps=20,40")
    assert list(plan.cells) == ["cpt.max_steps=20", "cpt.max_steps=40"]
    by_kind = {kind: [s for s in plan.steps if s.kind == kind] for kind in ("world", "pretrain", "build", "cpt")}
    assert len(by_kind["world"]) == len(by_kind["pretrain"]) == 1
    assert by_kind["world"][0].id.startswith("shared/world-") and by_kind["pretrain"][0].id.startswith("shared/base-")
    assert all(s.id.startswith("shared/") for s in by_kind["build"]) and len(by_kind["build"]) == 2  # native, anchors
    single = build_plan(StudyArguments(preset="micro"), PRESETS["micro"], tmp_path / "single")
    single_cpt = [s for s in single.steps if s.kind == "cpt"]
    for name, max_steps in (("cpt.max_steps=20", "20"), ("cpt.max_steps=40", "40")):
        cell = plan.cells[name]
        cpt = [s for s in cell.steps if s.kind == "cpt"]
        assert [s.id for s in cpt] == [f"{name}/{s.id}" for s in single_cpt]
        assert all(_flag(s, "--max_steps") == max_steps for s in cpt)
        assert all(_flag(s, "--output_dir").startswith(str(tmp_path / "sweep" / name / "cpt")) for s in cpt)
        # each cell trains on the shared base model and datasets
        assert {_flag(s, "--model_name_or_path") for s in cpt} == {by_kind["pretrain"][0].workdir}
        assert {d for s in cpt for d in s.deps} == {s.id for s in by_kind["build"]}
        assert {s.id for s in cell.steps if s.id.startswith("shared/")} <= {s.id for s in plan.steps}
    # one plan: every cell's own steps plus the shared ones, each once
    own = sum(len([s for s in cell.steps if not s.id.startswith("shared/")]) for cell in plan.cells.values())
    assert len(plan.steps) == own + len({s.id for s in plan.steps if s.id.startswith("shared/")})
    assert len({s.id for s in plan.steps}) == len(plan.steps)


def test_a_sweep_over_a_world_key_gives_each_cell_its_own_world_and_pretraining(tmp_path):
    plan = _sweep(tmp_path, "world.pair_mentions=2,3", "cpt.max_steps=20,40")
    assert len(plan.cells) == 4
    worlds = [s for s in plan.steps if s.kind == "world"]
    assert len(worlds) == 2 and len([s for s in plan.steps if s.kind == "pretrain"]) == 2
    assert sorted(_flag(s, "--pair_mentions") for s in worlds) == ["2", "3"]
    for name, cell in plan.cells.items():
        world = next(s for s in cell.steps if s.kind == "world")
        assert _flag(world, "--pair_mentions") == str(cell.config["cell"]["world.pair_mentions"]), name


def _runnable(plan):
    """The sweep's steps as python steps that write their outputs and log their id, each command holding the real
    command (so that the same real command is the same toy command)."""
    out = Path(plan.out)
    for step in plan.steps:
        code = (
            f"# {shlex.join(step.command)}\nimport pathlib\n"
            f"for p in {step.outputs!r}: pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True); "
            "pathlib.Path(p).write_text('x')\n"
            f"open({str(out / 'ran.log')!r}, 'a').write({step.id!r} + '\\n')\n"
        )
        step.command = [sys.executable, "-c", code]
    return plan


def test_a_sweep_runs_its_shared_steps_once_and_a_grown_sweep_reuses_them(tmp_path):
    plan = _runnable(_sweep(tmp_path, "cpt.max_steps=20,40"))
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    ran = (tmp_path / "sweep" / "ran.log").read_text().split()
    assert sorted(ran) == sorted(s.id for s in plan.steps), "every step once, shared ones too"
    assert (tmp_path / "sweep" / ".done" / "cpt.max_steps=20" / "cpt-mn-native-bridges-s0.json").is_file()
    assert (tmp_path / "sweep" / "logs" / "shared").is_dir()
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "sweep" / "ran.log").read_text().split() == ran, "a finished sweep is done"
    grown = _runnable(_sweep(tmp_path, "cpt.max_steps=20,40,80"))
    StudyRunner(grown, jobs=2, force=False, budget_s=0).run()
    again = (tmp_path / "sweep" / "ran.log").read_text().split()[len(ran) :]
    assert again and all(step_id.startswith("cpt.max_steps=80/") for step_id in again)
    assert sorted(again) == sorted(s.id for s in grown.cells["cpt.max_steps=80"].steps if not s.id.startswith("shared"))


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


def test_a_sweep_refuses_a_key_it_cannot_sweep_or_that_set_also_gives(tmp_path):
    with pytest.raises(InputError, match=r"jobs cannot be swept \(it changes how the study runs"):
        _sweep(tmp_path, "jobs=1,2")
    with pytest.raises(InputError, match=r"cpt.max_steps is also given by --set"):
        _sweep(tmp_path, "cpt.max_steps=20,40", set=["cpt.max_steps=30"])
    with pytest.raises(InputError, match=r"cpt.max_steps must be int"):
        _sweep(tmp_path, "cpt.max_steps=20,forty")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_study_file_passes_the_checks_of_its_keys_against_the_scripts_flags(name):
    preset, _ = run_study.configure(StudyArguments(preset=name))
    assert preset == PRESETS[name]
    assert {"world", "pretrain", "build", "cpt", "eval", "density"} <= set(vars(preset))


def test_the_effective_configuration_is_in_plan_json_and_at_the_top_of_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(StudyRunner, "run", lambda self: {})  # record the plan, run nothing
    out = tmp_path / "study"
    argv = ["--preset", "micro", "--output_dir", str(out), "--set", "world.pair_mentions=3", "--seeds", "0", "1", "2"]
    assert run_study.main(argv) == 0
    record = json.loads((out / "plan.json").read_text())
    config = record["configuration"]
    assert config["preset"] == "micro" and config["file"] == "configs/studies/micro.yaml"
    assert config["set"] == ["world.pair_mentions=3"] and config["flags"] == {"seeds": [0, 1, 2]}
    assert record["preset"]["world"]["pair_mentions"] == 3 and record["preset"]["seeds"] == [0, 1, 2]
    assert record["preset"]["cpt"] == PRESETS["micro"].cpt
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith(  # right under the title
        "Configuration: preset micro (configs/studies/micro.yaml), --set world.pair_mentions=3, --seeds 0 1 2."
    )
    shown = json.loads((out / "report.json").read_text())["configuration"]
    assert shown["values"] == record["preset"] and shown["set"] == ["world.pair_mentions=3"]


def test_dry_run_of_a_sweep_prints_its_cells_and_the_steps_they_share(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        run_study.main(["--preset", "micro", "--dry_run", "--output_dir", str(out), "--sweep", "cpt.max_steps=20,40"])
        == 0
    )
    printed = capsys.readouterr().out
    plan = _sweep(tmp_path, "cpt.max_steps=20,40")
    planned = sum(len(cell.steps) for cell in plan.cells.values())
    assert f"Sweep: 2 cells, {planned} steps planned, {len(plan.steps)} to run (shared once):" in printed
    assert "  cpt.max_steps=20: 20 steps (6 shared)" in printed and "  cpt.max_steps=40: 20 steps (6 shared)" in printed
    assert printed.count("python synthetic_world.py") == 1 and printed.count("python run_pretrain.py") == 1
    assert not out.exists()


def test_the_cpu_and_micro_plans_pass_no_new_flag_unless_their_configuration_asks(tmp_path):
    new = {"--mismatched_bridges", "--item_tiers", "--name_alignment"}
    for name in ("cpu", "micro"):
        plan = build_plan(StudyArguments(preset=name), PRESETS[name], tmp_path)
        assert not new & {c for s in plan.steps for c in s.command}, name
    preset = replace(
        PRESETS["micro"],
        settings=["bridges", "no_bridges", "mismatched_bridges"],
        world={**PRESETS["micro"].world, "absent_places": 4, "en_only_places": 4},
    )
    plan = build_plan(StudyArguments(preset="micro"), preset, tmp_path)
    mismatched = [s for s in plan.steps if s.kind == "cpt" and "--mismatched_bridges" in s.command]
    assert len(mismatched) == 2 and all("--bridges" not in s.command and "--no_bridges" not in s.command
                                        for s in mismatched)  # fmt: skip
    transfer = next(s for s in plan.steps if s.kind == "transfer")
    at = transfer.command.index("--mismatched_bridges")
    assert transfer.command[at + 1 : at + 3] == [r.eval_dir for r in plan.runs if r.setting == "mismatched_bridges"]
    world = Path(plan.dirs["world"]) / "mn" / "native"
    assert _flag(transfer, "--item_tiers") == str(world / "item_tiers.json")
    for step in (s for s in plan.steps if s.kind in ("eval", "base_eval") and "-native-" in s.workdir + s.id):
        assert _flag(step, "--name_alignment") == str(world / "name_alignment.json")
        assert _flag(step, "--item_tiers") == str(world / "item_tiers.json")
        assert str(Path(step.workdir) / "manipulation_checks.json") in step.outputs


@pytest.mark.slow
def test_a_micro_sweep_end_to_end_shares_one_world_and_pretraining_and_writes_the_sweep_report(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "run_study.py", "--preset", "micro", "--variants", "native", "--output_dir", str(out),
               "--set", "pretrain.max_steps=40", "--sweep", "cpt.max_steps=20,40"]  # fmt: skip
    proc = run_script(command, timeout=900)
    assert "Study finished" in proc.stdout and (out / "sweep_report.md").is_file()
    record = json.loads((out / "sweep_report.json").read_text())
    assert record["status"]["complete"] and set(record["cells"]) == {"cpt.max_steps=20", "cpt.max_steps=40"}
    steps = json.loads((out / "plan.json").read_text())["steps"]
    for kind in ("world", "pretrain"):  # one of each, run once, for both cells
        (step,) = [s for s in steps if s["kind"] == kind]
        assert (out / "logs" / f"{step['id']}.log").is_file()
        assert all(step["id"] in {s.id for s in cell.steps} for cell in study_report.read_plan(out).cells.values())
    for name, cell in record["cells"].items():
        assert (out / name / "report.md").is_file()
        transfer = json.loads((out / name / "transfer" / "mn-native" / "transfer.json").read_text())
        directions = transfer["languages"][0]["directions"]
        shown = {(g["direction"], g["measure"]): g for g in cell["gaps"]}
        for d in directions:
            assert shown[(d["direction"], "all questions")]["mean_gap_ci"] == d["mean_gap_ci"]
        assert cell["own_steps_s"] > 0 and cell["shared_steps_s"] > 0
        assert {c["setting"] for c in cell["checks"]} == {"bridges", "no_bridges"}
    report = (out / "sweep_report.md").read_text()
    assert "![" in report and (out / "figures" / "dose_response.png").read_bytes()[:4] == b"\x89PNG"
    again = run_script([*command, "--report_only"], timeout=300)
    assert "Report rewritten." in again.stdout
    assert study_report.main([str(out / "cpt.max_steps=20")]) == 0


#: Digests of each study's steps (id, command, outputs, dependencies) as the presets planned them in code, before
#: they became files. A finished study stays done only while its commands do not change: a change of a study's
#: plan that is meant must update its digest here, knowing every finished run of that study reruns.
PLANNED_IN_CODE = {"cpu": "9ace942dd4000593", "micro": "b90c8d0cf8664bf1", "gpu-small": "3e949b97ffd887a8",
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


def test_the_dose_response_study_is_the_cpu_study_with_only_the_preregistered_changes(tmp_path):
    cpu, dose = PRESETS["cpu"], PRESETS["dose-response"]
    for section in ("pretrain", "build", "cpt", "eval", "transfer", "density"):
        assert getattr(dose, section) == getattr(cpu, section), f"{section}: the cpu study's model and budgets"
    world = dose.world
    changed = {key for key in cpu.world.keys() | world.keys() if cpu.world.get(key) != world.get(key)}
    assert changed == {"relations", "absent_places", "en_only_places", "mono_filler_documents", "pairs"}
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
    assert _flag(transfer, "--item_tiers").endswith("mn/native/item_tiers.json")


def test_the_first_line_names_what_changed_the_values_of_the_study_file(tmp_path, capsys):
    argv = ["--preset", "micro", "--dry_run", "--output_dir", str(tmp_path / "out")]
    description = PRESETS["micro"].description
    assert run_study.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"Study preset 'micro': {description}"
    assert run_study.main([*argv, "--set", "cpt.max_steps=30", "--seeds", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"Study 'micro' with --set cpt.max_steps=30, --seeds 0: {description}"
    assert run_study.main([*argv, "--sweep", "cpt.max_steps=20,40"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"Study 'micro' with --sweep cpt.max_steps=20,40: {description}"


def test_a_named_study_and_a_path_inside_the_repository_are_found_from_any_folder(tmp_path, monkeypatch, capsys):
    for preset in ("micro", "configs/studies/micro.yaml"):
        monkeypatch.chdir(tmp_path)  # (the study moves to the repository root)
        assert run_study.main(["--preset", preset, "--dry_run", "--output_dir", str(tmp_path / "out")]) == 0
        assert "Configuration: preset micro (configs/studies/micro.yaml)" in capsys.readouterr().out


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_the_sweep_report_shows_each_cells_gaps_knowledge_contrast_and_manipulation_checks(tmp_path):
    args = StudyArguments(preset="micro", sweep=["cpt.max_steps=20,40"], variants=["native"])
    factors = sweep_factors(args.sweep, [])
    plan = build_sweep(args, tmp_path / "sweep", factors)
    plan.config = run_study.configuration(args, ["--variants", "native", "--sweep", "cpt.max_steps=20,40"], factors)
    for n, cell in enumerate(plan.cells.values()):
        cell.config = {**plan.config, **cell.config}
        gap = {"mean_gap": 0.1 * n, "mean_gap_ci": [0.1 * n - 0.05, 0.1 * n + 0.05], "verdict": "v"}
        direction = {
            "direction": "en->mn", **gap,
            "tiers": {"high": {**gap, "mean_gap": 0.2 + n}, "absent": {**gap, "mean_gap": 0.05}},
            "knowledge_transfer": {"often_tier": "high", "never_tier": "absent", "mean_did": 0.15 + n,
                                   "mean_did_ci": [0.1, 0.2 + n], "verdict": "knowledge"},
            "bridges_minus_mismatched": {**gap, "mean_gap": 0.07},
        }  # fmt: skip
        _write(
            Path(cell.groups["mn/native"]["transfer"]) / "transfer.json", {"languages": [{"directions": [direction]}]}
        )
        for run in cell.runs:
            audit = {
                "pairs": {"co_located_percent": 100.0 if run.setting == "bridges" else 0.0},
                "guarantees_hold": True,
            }
            _write(Path(run.dir) / "packing_audit.json", audit)
            checks = {
                "step": 2,
                "name_alignment": {"en->mn": {"accuracy": 0.5 + 0.25 * run.seed, "n": 8, "chance": 0.25}},
                "tier_accuracy": {"mn-culture-cloze_mn": {"absent": 0.25 * run.seed}},
            }
            _write(
                Path(run.eval_dir) / "manipulation_checks.json",
                {"checkpoints": [{"step": 1}, checks], "item_tiers": {"items_per_tier": {"absent": 4}}},
            )
    written = study_report.write_sweep_report(plan)  # (the cells' own reports need real transfer.json)
    assert written["md"] == tmp_path / "sweep" / "sweep_report.md" and len(written["unfinished"]) == len(plan.steps)
    report = written["md"].read_text()
    record = json.loads(written["json"].read_text())
    assert "**UNFINISHED:" in report and record["status"]["complete"] is False
    gaps = {(name, g["measure"]): g for name, cell in record["cells"].items() for g in cell["gaps"]}
    assert gaps[("cpt.max_steps=40", "knowledge (high − absent)")]["mean_gap"] == 1.15
    assert gaps[("cpt.max_steps=40", "knowledge (high − absent)")]["mean_gap_ci"] == [0.1, 1.2]
    assert gaps[("cpt.max_steps=20", "tier high")]["mean_gap"] == 0.2
    assert gaps[("cpt.max_steps=20", "bridges − mismatched")]["mean_gap"] == 0.07
    assert "| cpt.max_steps=40 | mn/native | en->mn | knowledge (high − absent) | +1.150 [+0.100, +1.200] |" in report
    checks = {(name, c["setting"]): c for name, cell in record["cells"].items() for c in cell["checks"]}
    assert checks[("cpt.max_steps=20", "bridges")]["co_located_percent"] == "100.0"
    assert checks[("cpt.max_steps=20", "no_bridges")]["co_located_percent"] == "0.0"
    assert checks[("cpt.max_steps=20", "bridges")]["manipulation_checks"] == (
        "name alignment en->mn 0.625; target learning mn-culture-cloze_mn, absent facts 0.125"
    )  # the final checkpoint's, mean of seeds 0 and 1
    assert (tmp_path / "sweep" / "figures" / "dose_response.png").read_bytes()[:4] == b"\x89PNG"


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
