"""run_study.py: the plans of every study, the paper plan's inputs and cost, sweeps as one plan, the report of a
recorded study. The runner and its faults: tests/test_study_runner.py."""

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO_ROOT

import run_study
import study_report
from run_study import Plan, StudyArguments, build_plan, build_sweep
from study_common import InputError, exit_on_input_error
from study_config import PRESETS, sweep_factors
from study_runner import StudyRunner

# --------------------------------------------------------------------------------------
# The plans
# --------------------------------------------------------------------------------------


def _plan(preset_name: str, out: Path, **overrides) -> Plan:
    args = StudyArguments(preset=preset_name, output_dir=str(out), **overrides)
    return build_plan(args, run_study.configure(args)[0], out)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_prints_every_command_of_every_preset_and_runs_nothing(preset, tmp_path, capsys):
    out = tmp_path / "study"
    assert run_study.main(["--preset", preset, "--dry_run", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = _plan(preset, out)
    assert len(plan.steps) > 10
    for step in plan.steps:
        assert shlex.join(step.command) in printed, step.id
    assert not out.exists(), "a dry run must not write anything"
    scripts = {c for step in plan.steps for c in step.command if c.endswith(".py")}
    assert {
        "run_pretrain.py",
        "build_pairs.py",
        "run_cpt.py",
        "run_eval.py",
        "run_transfer.py",
        "run_density.py",
    } <= scripts
    if PRESETS[preset].budget_s:
        assert "Time budget" in printed


def test_every_seed_trains_every_setting_on_one_dataset(tmp_path):
    plan = _plan("cpu", tmp_path)
    cpt = [s for s in plan.steps if s.kind == "cpt"]
    preset = PRESETS["cpu"]
    # native: every setting; anchors (where the study has them): the anchor settings
    runs_per_seed = len(preset.settings) + len(preset.anchor_settings) * ("anchors" in preset.variants)
    assert len(cpt) == len(preset.langs) * len(preset.seeds) * runs_per_seed
    assert len(preset.seeds) >= 3, "honest intervals across seeds need at least 3 seeds"
    cpt = [s for s in cpt if "-native-" in s.id]  # the variant that runs every setting
    setting_flags = {f"--{setting}" for setting in preset.settings}
    by_key = {}
    for step in cpt:
        (setting,) = setting_flags & set(step.command)
        without_setting = [c for c in step.command if c not in setting_flags and "bridges-s" not in c]  # name, dir
        by_key.setdefault(json.dumps(without_setting), set()).add(setting)
    # the settings of a seed differ in nothing but the setting flag and the run's name
    assert all(settings == setting_flags for settings in by_key.values())
    assert len(by_key) == len(preset.seeds)


def test_paper_plan_uses_the_paper_scale_and_questions(tmp_path):
    plan = _plan("paper", tmp_path, questions_dir="/data/paper-culture-cloze")
    commands = [shlex.join(s.command) for s in plan.steps]
    pretrain = next(c for c, s in zip(commands, plan.steps) if s.kind == "pretrain")
    assert pretrain.startswith("accelerate launch --config_file accelerate_configs/multi_gpu.yaml run_pretrain.py")
    assert "--config_name configs/qwen2.5-0.5b.json" in pretrain and "20231101.en" in pretrain
    cpt = [c for c, s in zip(commands, plan.steps) if s.kind == "cpt"]
    assert len(cpt) == 8 and all("--max_steps 1500" in c and "--block_size 2048" in c for c in cpt)
    for lang in ("ko", "zh", "bo", "mn"):
        assert any(f"/data/paper-culture-cloze/{lang}-culture-cloze_{lang}.json" in c for c in commands)


def test_synthetic_presets_run_offline_and_plain_python_by_default(tmp_path):
    for name in (name for name, preset in PRESETS.items() if preset.synthetic):
        plan = _plan(name, tmp_path)
        runner = StudyRunner(plan, jobs=2, force=False, budget_s=0)
        env = runner._env()
        assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
        assert all(s.command[0] == "python" for s in plan.steps)
    launched = _plan("micro", tmp_path, accelerate_config="accelerate_configs/cpu.yaml")
    trains = [s for s in launched.steps if s.trains]
    assert trains and all(
        s.command[:4] == ["accelerate", "launch", "--config_file", "accelerate_configs/cpu.yaml"] for s in trains
    )


def test_every_world_gives_transfer_its_tiers_and_only_a_world_with_checks_asks_probing_for_them(tmp_path):
    new = {"--mismatched_bridges", "--name_alignment"}
    plan = build_plan(StudyArguments(preset="micro"), PRESETS["micro"], tmp_path)
    assert not new & {c for s in plan.steps for c in s.command}
    assert not any("--item_tiers" in s.command for s in plan.steps if s.kind in ("eval", "base_eval"))
    transfers = [s for s in plan.steps if s.kind == "transfer"]
    assert transfers and all(_flag(s, "--item_tiers").endswith("item_tiers.json") for s in transfers)
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


def test_the_printed_plan_names_the_study_and_everything_that_changed_the_values_of_its_file(tmp_path, capsys):
    argv = ["--preset", "micro", "--dry_run", "--output_dir", str(tmp_path / "out")]
    description = PRESETS["micro"].description
    base = "Configuration: preset micro (configs/studies/micro.yaml)"
    for given, changes in (
        ([], ""),
        (["--set", "cpt.max_steps=30", "--seeds", "0"], ", --set cpt.max_steps=30, --seeds 0"),
        (["--sweep", "cpt.max_steps=20,40"], ", --sweep cpt.max_steps=20,40"),
    ):
        assert run_study.main([*argv, *given]) == 0
        assert capsys.readouterr().out.splitlines()[:2] == [f"Study 'micro': {description}", base + changes]


def test_a_named_study_and_a_path_inside_the_repository_are_found_from_any_folder(tmp_path, monkeypatch, capsys):
    for preset in ("micro", "configs/studies/micro.yaml"):
        monkeypatch.chdir(tmp_path)  # (the study moves to the repository root)
        assert run_study.main(["--preset", preset, "--dry_run", "--output_dir", str(tmp_path / "out")]) == 0
        assert "Configuration: preset micro (configs/studies/micro.yaml)" in capsys.readouterr().out


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


# --------------------------------------------------------------------------------------
# The paper plan: its inputs and what it costs, before anything runs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (["--preset", "micro", "--hub_org", "org"], "--hub_org applies to the paper study only"),
        (
            ["--preset", "paper", "--hub_org", "org", "--sweep", "cpt.max_steps=4,8"],
            "--hub_org does not go with --sweep",
        ),
        (["--preset", "paper", "--variants", "native"], "--variants applies to the synthetic studies only"),
        (["--preset", "micro", "--anchor_settings", "mismatched_bridges"], "anchor_settings must be a list of one of"),
    ],
)
def test_flags_that_do_not_apply_to_the_study_are_refused_before_anything_is_written(flags, refusal, tmp_path):
    with pytest.raises(InputError, match=refusal):
        run_study.main([*flags, "--dry_run", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_paper_questions_default_to_a_git_ignored_folder_of_the_repository(tmp_path):
    default = StudyArguments().questions_dir
    assert default == "data/paper-questions"
    assert not default.startswith(("/", "..")), "the default must lie inside the repository"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"{default}/ko-culture-cloze_ko.json"], cwd=REPO_ROOT, check=False
    )
    assert ignored.returncode == 0, f"{default} must be git-ignored (the questions are never committed)"
    plan = build_plan(StudyArguments(preset="paper"), PRESETS["paper"], tmp_path)
    questions = [q for group in plan.groups.values() for q in group["questions"]]
    assert questions and all(q.startswith(f"{default}/") for q in questions)


def test_missing_paper_questions_exit_2_naming_the_exact_command_that_fetches_them(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "questions"
    empty.mkdir()
    argv = ["--preset", "paper", "--langs", "ko", "--questions_dir", str(empty), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["run_study.py", *argv])
    with pytest.raises(SystemExit) as exited:
        exit_on_input_error(run_study.main)  # as `python run_study.py ...` runs it
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("run_study.py: error: the paper's questions are missing from")
    assert "ko-culture-cloze_en.json" in err and "ko-culture-cloze_ko.json" in err
    fetch = (
        "git clone --depth 1 https://github.com/luciusssss/cross-lingual-culture /tmp/clc && "
        f"mkdir -p {shlex.quote(str(empty))} && cp /tmp/clc/data/*-culture-cloze_*.json {shlex.quote(str(empty))}/"
    )
    assert fetch in err and "--questions_dir DIR" in err
    assert not (tmp_path / "out").exists(), "nothing is written before the inputs are there"


def test_the_fetch_command_for_the_default_folder_fills_the_folder_the_plan_reads(capsys, tmp_path):
    run_study.main(["--preset", "paper", "--dry_run", "--output_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    if (REPO_ROOT / "data" / "paper-questions" / "ko-culture-cloze_ko.json").is_file():
        pytest.skip("the questions are in data/paper-questions here: no note to print")
    assert (
        "git clone --depth 1 https://github.com/luciusssss/cross-lingual-culture /tmp/clc && mkdir -p "
        "data/paper-questions && cp /tmp/clc/data/*-culture-cloze_*.json data/paper-questions/" in printed
    )


def test_paper_plan_reads_mc2_without_invented_language_configs(tmp_path):
    plan = build_plan(StudyArguments(preset="paper"), PRESETS["paper"], tmp_path)
    mc2_steps = [s for s in plan.steps if s.kind in ("build", "density") and "pkupie/mc2_corpus" in s.command]
    assert {s.id for s in mc2_steps} == {"build-bo", "build-mn", "density-bo-bo", "density-mn-mn"}
    for step in mc2_steps:
        assert "--mono_dataset_config" not in step.command and "--corpus_dataset_config" not in step.command
        # each reads its language's own file of MC^2, never the other languages' documents
        lang = step.id.split("-")[1]
        files_flag = "--mono_data_files" if step.kind == "build" else "--corpus_data_files"
        at = step.command.index(files_flag)
        assert step.command[at + 1] == f"{lang}-crawl-only-release-20231127.jsonl"
    # a language's own MC^2 file given as files reaches build_pairs.py and run_density.py
    override = tmp_path / "paper_data.json"
    override.write_text('{"bo": {"mono_files": ["mc2/bo-crawl-only-release-20231127.jsonl"], "mono_dataset": null}}')
    plan = _plan("paper", tmp_path, langs=["bo"], paper_data=str(override))
    build = next(s for s in plan.steps if s.kind == "build")
    density = next(s for s in plan.steps if s.id == "density-bo-bo")
    assert "--mono_files" in build.command and "--mono_dataset" not in build.command
    assert "--mono_data_files" not in build.command
    assert "bo=mc2/bo-crawl-only-release-20231127.jsonl" in density.command
    assert "--corpus_dataset" not in density.command and "--corpus_streaming" not in density.command
    assert "mc2/bo-crawl-only-release-20231127.jsonl" in run_study._local_files(plan)


def _cost_line(printed: str, step_id: str) -> str:
    return next(line.strip() for line in printed.splitlines() if line.strip().startswith(f"{step_id}: "))


def test_paper_dry_run_prints_tokens_windows_and_an_estimate_of_gpu_hours_per_step(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_study.main(["--preset", "paper", "--dry_run", "--output_dir", out]) == 0
    printed = capsys.readouterr().out
    # CPT: 1,500 steps x (16 per device x 2 accumulation x 8 processes of multi_gpu.yaml) x 2048 tokens
    hours = 1500 * 256 * 2048 / 47_800 / 3600
    assert _cost_line(printed, "cpt-ko-bridges-s0") == (
        f"cpt-ko-bridges-s0: 1,500 steps x 256 windows (16x2x8) = 384,000 windows x 2048 tokens = "
        f"{1500 * 256 * 2048:,} tokens; {hours:.2f} GPU-hours, {hours / 8:.2f} wall hours on 8 GPUs"
    )
    assert f"= {20000 * 256 * 2048:,} tokens;" in _cost_line(printed, "pretrain")
    total = (20000 + 8 * 1500) * 256 * 2048
    assert _cost_line(printed, "all training steps") == (
        f"all training steps: {total:,} tokens; {total / 47_800 / 3600:.2f} GPU-hours"
    )
    assert "ESTIMATE at 47,800 tokens/s per GPU (measured by bench/gpu_fsdp_check.sh on one NVIDIA H200" in printed
    assert not (tmp_path / "out").exists()


def test_dry_run_cost_follows_the_throughput_flag_and_the_processes_of_the_accelerate_config(tmp_path, capsys):
    config = tmp_path / "four_gpus.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    argv = ["--preset", "paper", "--dry_run", "--output_dir", str(tmp_path / "out"), "--langs", "bo"]
    assert run_study.main([*argv, "--accelerate_config", str(config), "--tokens_per_second_per_gpu", "10000"]) == 0
    printed = capsys.readouterr().out
    tokens = 1500 * 16 * 2 * 4 * 2048
    assert _cost_line(printed, "cpt-bo-no_bridges-s0").endswith(
        f"x 128 windows (16x2x4) = 192,000 windows x 2048 tokens = {tokens:,} tokens; "
        f"{tokens / 10_000 / 3600:.2f} GPU-hours, {tokens / 10_000 / 3600 / 4:.2f} wall hours on 4 GPUs"
    )
    assert "given with --tokens_per_second_per_gpu" in printed
    # an accelerate config that is not there is refused: the cost is never printed with a guessed number of GPUs
    with pytest.raises(InputError, match="--accelerate_config .*missing.yaml: no such file"):
        run_study.main([*argv, "--accelerate_config", str(tmp_path / "missing.yaml")])
    # a synthetic preset prints tokens and windows, and GPU-hours only from a throughput it is given
    assert run_study.main(["--preset", "micro", "--dry_run", "--output_dir", str(tmp_path / "m")]) == 0
    micro = capsys.readouterr().out
    assert (
        _cost_line(micro, "pretrain")
        == "pretrain: 100 steps x 16 windows (16x1x1) = 1,600 windows x 64 tokens = 102,400 tokens"
    )
    assert "GPU-hours" not in micro


# --------------------------------------------------------------------------------------
# Sweeps: one plan whose cells share the steps they agree on
# --------------------------------------------------------------------------------------


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
        # a shared step is the same command in every cell that plans it
        shared = {s.id: s.command for s in cell.steps if s.id.startswith("shared/")}
        assert shared and shared.items() <= {s.id: s.command for s in plan.steps}.items()
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


# --------------------------------------------------------------------------------------
# The report of a recorded study (study_report.py FOLDER)
# --------------------------------------------------------------------------------------


def _recorded_micro_study(out: Path, monkeypatch, kinds: tuple[str, ...] = ()) -> None:
    """A micro study in ``out`` as run_study.py records it, having run only its steps of ``kinds``."""
    real_run = StudyRunner.run

    def run_some(self):
        self.plan = replace(self.plan, steps=[s for s in self.plan.steps if s.kind in kinds])
        return real_run(self)

    monkeypatch.setattr(StudyRunner, "run", run_some)
    assert run_study.main(["--preset", "micro", "--output_dir", str(out)]) == 0
    monkeypatch.undo()


def test_the_report_of_a_half_finished_study_names_the_steps_that_did_not_finish(tmp_path, monkeypatch, capsys):
    out = tmp_path / "micro"
    _recorded_micro_study(out, monkeypatch, kinds=("world",))
    capsys.readouterr()
    assert study_report.main([str(out)]) == 0
    printed = capsys.readouterr().out
    plan = study_report.read_plan(out)
    assert f"The study is NOT finished: {len(plan.steps) - 1} of {len(plan.steps)} steps did not finish." in printed
    status = json.loads((out / "report.json").read_text())["status"]
    assert status["complete"] is False and status["finished"] == 1
    assert [u["step"] for u in status["unfinished"]] == [s.id for s in plan.steps if s.kind != "world"]
    assert {u["why"] for u in status["unfinished"]} == {"no record of an earlier run"}
    report = (out / "report.md").read_text()
    assert (
        f"**UNFINISHED: {len(plan.steps) - 1} of {len(plan.steps)} steps of this study have no finished run.**"
        in report
    )
    assert "- `pretrain`: no record of an earlier run" in report and "- `world`" not in report
