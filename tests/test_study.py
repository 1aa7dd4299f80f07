"""run_study.py: the plans of every preset, the resumable runner, and the end-to-end micro study."""

import json
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import python_step, run_script, toy_plan

import run_study
import study_report
from run_study import Plan, Step, StudyArguments, StudyRunner, build_plan
from study_common import InputError
from study_config import PRESETS


def _plan(preset_name: str, out: Path, **overrides) -> Plan:
    args = StudyArguments(preset=preset_name, output_dir=str(out), **overrides)
    return build_plan(args, PRESETS[preset_name], out)


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


def test_every_seed_trains_both_settings_on_one_dataset(tmp_path):
    plan = _plan("cpu", tmp_path)
    cpt = [s for s in plan.steps if s.kind == "cpt"]
    preset = PRESETS["cpu"]
    runs_per_seed = 2 + len(preset.anchor_settings)  # native: both settings; anchors: the preset's
    assert len(cpt) == len(preset.langs) * len(preset.seeds) * runs_per_seed
    assert len(preset.seeds) >= 3, "honest intervals across seeds need at least 3 seeds"
    cpt = [s for s in cpt if "-native-" in s.id]  # the variant that runs both settings
    by_key = {}
    for step in cpt:
        flags = step.command
        setting = "--bridges" if "--bridges" in flags else "--no_bridges"
        assert ("--bridges" in flags) != ("--no_bridges" in flags)
        without_setting = [c for c in flags if c not in ("--bridges", "--no_bridges")]
        without_setting = [c for c in without_setting if "bridges-s" not in c]  # output dir and run name
        by_key.setdefault(json.dumps(without_setting), set()).add(setting)
    # the two settings of a seed differ in nothing but the setting flag and the run's name
    assert all(settings == {"--bridges", "--no_bridges"} for settings in by_key.values())
    assert len(by_key) == len(cpt) // 2


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


def _toy_plan(out: Path, commands: dict[str, str]) -> Plan:
    """Steps that each append a line to a file (a counter of how often they ran) and write their output."""
    steps = []
    previous = None
    for name, text in commands.items():
        target = out / f"{name}.txt"
        code = f"import pathlib; p = pathlib.Path({str(target)!r}); p.write_text({text!r}); "
        code += f"open({str(out / 'ran.log')!r}, 'a').write({name!r} + '\\n')"
        steps.append(python_step(name, code, [str(target)], deps=[previous] if previous else []))
        previous = name
    return toy_plan(out, steps)


def test_runner_skips_finished_steps_and_reruns_a_changed_step_and_what_depends_on_it(tmp_path):
    plan = _toy_plan(tmp_path, {"a": "1", "b": "2", "c": "3"})
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split() == ["a", "b", "c"]
    assert all((tmp_path / ".done" / f"{s}.json").is_file() for s in "abc")
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split() == ["a", "b", "c"], "finished steps must be skipped"
    changed = _toy_plan(tmp_path, {"a": "1", "b": "changed", "c": "3"})
    StudyRunner(changed, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split() == ["a", "b", "c", "b", "c"]
    (tmp_path / "c.txt").unlink()  # an output gone: the step is not done
    StudyRunner(changed, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split()[-1] == "c"
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings["steps"]) == {"a", "b", "c"}


def test_a_failing_step_stops_the_study_and_names_its_log(tmp_path):
    plan = _toy_plan(tmp_path, {"a": "1", "b": "2"})
    plan.steps[0].command = [sys.executable, "-c", "import sys; print('something broke'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"Step a failed \(exit code 3\).*logs/a.log(.|\n)*something broke"):
        StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    assert not (tmp_path / ".done" / "a.json").exists() and not (tmp_path / "b.txt").exists()


def test_an_interrupted_training_step_resumes_from_its_last_checkpoint(tmp_path):
    step = Step(
        id="cpt-x",
        kind="cpt",
        title="x",
        command=["python", "run_cpt.py"],
        outputs=[],
        workdir=str(tmp_path / "run"),
        trains=True,
    )
    for n in (5, 10):
        (tmp_path / "run" / f"checkpoint-{n}").mkdir(parents=True)
        (tmp_path / "run" / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoint-15").mkdir()  # no trainer_state: an unfinished save, not resumable
    run_study._prepare(tmp_path, step, "not run yet")  # first start: nothing to resume, the folder is cleaned
    assert not (tmp_path / "run").exists()
    (tmp_path / "run" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    command, note = run_study._prepare(tmp_path, step, "it did not finish")  # same command started before: resume
    assert command[-2:] == ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-10")]
    assert note.startswith(f"cpt-x: resumes from {tmp_path / 'run' / 'checkpoint-10'}")
    step.command = ["python", "run_cpt.py", "--max_steps", "7"]  # another command: start afresh
    command, note = run_study._prepare(tmp_path, step, "its command changed")
    assert command == step.command and not (tmp_path / "run").exists()
    assert note == f"cpt-x: starts afresh (its command changed); removed its earlier outputs {tmp_path / 'run'}"


def test_report_renders_markdown_and_html_from_the_same_blocks():
    doc = study_report.ReportDoc()
    doc.h(2, "Title")
    doc.p("A **bold** `code` [link](x.html) & <tag>")
    doc.table(["a", "b|c"], [[1, "x|y"]])
    doc.img("figures/f.png", "caption")
    markdown, page = doc.markdown(), doc.html("t")
    assert "## Title" in markdown and "| 1 | x\\|y |" in markdown and "![caption](figures/f.png)" in markdown
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page and '<a href="x.html">link</a>' in page
    assert "&lt;tag&gt;" in page and '<img src="figures/f.png"' in page


def _formatted(value: float) -> str:
    return f"{value:+.3f}"


@pytest.mark.slow
def test_micro_study_end_to_end_writes_a_complete_and_consistent_report(tmp_path):
    out = tmp_path / "micro"
    proc = run_script([sys.executable, "run_study.py", "--preset", "micro", "--output_dir", str(out)], timeout=900)
    assert "Report:" in proc.stdout
    report_md = (out / "report.md").read_text(encoding="utf-8")
    report_html = (out / "report.html").read_text(encoding="utf-8")
    record = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report_html.startswith("<!DOCTYPE html>")
    # every figure the report shows exists and is a PNG
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md)
    assert sorted(images) == [
        "figures/bridge_diagnostic.png",
        "figures/mn-anchors_vs_control.png",
        "figures/mn-native-transfer_curves.png",
        "figures/mn-native-transfer_summary.png",
    ]
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert f'src="{image}"' in report_html
    sections = record["sections"]
    assert {"world", "transfer", "anchors", "diagnostic", "density", "packing", "scale"} <= set(sections)
    # transfer numbers: report.json = transfer.json, and the report prints them
    for key, group in sections["transfer"].items():
        transfer = json.loads(Path(group["transfer_json"]).read_text(encoding="utf-8"))
        directions = {d["direction"]: d for lang in transfer["languages"] for d in lang["directions"]}
        assert len(group["directions"]) == 2, key
        for entry in group["directions"]:
            source = directions[entry["direction"]]
            assert entry["mean_gap"] == source["mean_gap"] and entry["mean_gap_ci"] == source["mean_gap_ci"]
            assert entry["verdict"] == source["verdict"]
            shown = f"{_formatted(source['mean_gap'])} [{_formatted(source['mean_gap_ci'][0])}, {_formatted(source['mean_gap_ci'][1])}]"
            assert shown in report_md, shown
            # the conclusion follows the interval
            if source["mean_gap_ci"][0] <= 0 <= source["mean_gap_ci"][1]:
                assert "includes 0: no evidence" in report_md
    # density numbers: report.json = density.json, planted counts = truth.json
    truth = json.loads((out / "world" / "truth.json").read_text(encoding="utf-8"))
    for key, group in sections["density"].items():
        density = json.loads(Path(group["density_json"]).read_text(encoding="utf-8"))
        table = {(r["questions"], r["corpus"]): r for r in density["table"]}
        for row in group["rows"]:
            assert row["occurrences"] == table[(row["questions"], row["corpus"])]["occurrences"]
            if "planted_occurrences" in row:
                lang = key.split("/")[0]
                question_lang = row["questions"].rsplit("_", 1)[1]
                assert row["planted_occurrences"] == sum(q["counts"][question_lang] for q in truth["questions"][lang])
                assert f"| {row['occurrences']} |" in report_md
    # packing audits: one per run, guarantees as required, and what an audit could not check
    packing = sections["packing"]
    assert len(packing["runs"]) == 6 and packing["colocation_ok"] and packing["equal_hashes"]
    audits = {}
    for run in packing["runs"]:
        audit = audits[run["run"]] = json.loads((out / "cpt" / run["run"] / "packing_audit.json").read_text("utf-8"))
        assert run["pairs_co_located"] == audit["pairs"]["co_located"]
        assert audit["hashes"]["tokens_multiset_sha256"][:12] in report_md
        assert run["guarantees_hold"] == audit["guarantees_hold"] and run["unchecked"] == audit["unchecked"]
    assert packing["guarantees_hold"] == all(a["guarantees_hold"] for a in audits.values())
    assert packing["unchecked"] == {name: a["unchecked"] for name, a in audits.items() if a["unchecked"]}
    # per question file: answer positions and "always option 0" (run_eval.py's position_bias), and per model the
    # tie rate and both tie rules at the final checkpoint, mean over seeds (accuracy.json)
    assert set(sections["questions"]) == {"mn/native", "mn/anchors"}
    for key, shown in sections["questions"].items():
        variant = key.split("/")[1]
        base = json.loads((out / "base_eval" / f"mn-{variant}" / "accuracy.json").read_text(encoding="utf-8"))
        assert set(shown["files"]) == {"mn-culture-cloze_en", "mn-culture-cloze_mn"}
        for stem, described in shown["files"].items():
            bias = base["questions"][stem]["position_bias"]
            assert described["answer_position_share"] == bias["answer_position_share"]
            assert described["always_first_accuracy"] == bias["always_first_accuracy"]
            shares = ", ".join(f"{k}: {v:.2f}" for k, v in bias["answer_position_share"].items())
            assert f"| {stem} | {base['questions'][stem]['items']} | {shares} | " in report_md
        settings = ["bridges", "no_bridges"] if variant == "native" else ["no_bridges"]
        assert {(e["model"], e["questions"]) for e in shown["final"]} == {
            (model, stem) for model in ["base", *settings] for stem in shown["files"]
        }
        for entry in shown["final"]:
            if entry["model"] == "base":
                dirs = [out / "base_eval" / f"mn-{variant}"]
            else:
                dirs = [out / "cpt" / f"mn-{variant}-{entry['model']}-s{seed}" / "eval" for seed in (0, 1)]
            finals = [json.loads((d / "accuracy.json").read_text())["checkpoints"][-1]["accuracy"] for d in dirs]
            finals = [f[entry["questions"]] for f in finals]
            assert entry["seeds"] == len(dirs)
            for shown_key, source_key in (("tie_rate", "tie_rate"), ("accuracy_first", "accuracy"),
                                          ("accuracy_fractional", "accuracy_fractional")):  # fmt: skip
                assert entry[shown_key] == pytest.approx(sum(f[source_key] for f in finals) / len(finals))
    # the transfer table names its tie rule; both rules are shown where they differ
    for group in sections["transfer"].values():
        for entry in group["directions"]:
            assert entry["tie_policy"] == "first" and set(entry["tie_policies"]) == {"first", "fractional"}
            if entry["tie_policies_differ"]:
                fractional = entry["tie_policies"]["fractional"]
                assert f"| fractional | {fractional['accuracy_with'][-1]:.3f} | " in report_md
    assert "Tie rule of the table above: **first** (the paper's)." in report_md
    # anchors vs control: both tiers, both directions, pooled and per setting
    comparisons = sections["anchors"]["mn"]["comparisons"]
    assert {(c["direction"], c["tier"], c["setting"]) for c in comparisons} == {
        (direction, tier, "no_bridges") for direction in ("en->mn", "mn->en") for tier in ("high", "low")
    }
    for c in comparisons:
        assert (
            f"{_formatted(c['difference'])} [{_formatted(c['difference_ci'][0])}, {_formatted(c['difference_ci'][1])}]"
            in report_md
        )
    assert [len(v) for v in sections["diagnostic"].values()] == [2, 1]  # native: both settings; anchors: without
    # a second invocation finds every step done and only rewrites the report
    again = run_script([sys.executable, "run_study.py", "--preset", "micro", "--output_dir", str(out)], timeout=300)
    assert "already done" in again.stdout and "start " not in again.stdout


def test_a_step_that_runs_alone_on_a_quiet_machine_gets_every_core_and_parallel_steps_share_them(tmp_path, monkeypatch):
    import os

    def step(name, deps):
        code = f"import os, pathlib; pathlib.Path({str(tmp_path / name)!r}).write_text(os.environ['OMP_NUM_THREADS'])"
        return python_step(name, code, [str(tmp_path / name)], deps=deps)

    # "first" runs alone; "left" and "right" can run together once it is done
    plan = toy_plan(tmp_path, [step("first", []), step("left", ["first"]), step("right", ["first"])])
    monkeypatch.setattr(run_study, "_machine_is_quiet", lambda: True)
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    cores = os.cpu_count() or 1
    assert (tmp_path / "first").read_text() == str(cores)
    assert (tmp_path / "left").read_text() == (tmp_path / "right").read_text() == str(max(1, cores // 2))
    monkeypatch.setattr(run_study, "_machine_is_quiet", lambda: False)  # shared machine: keep the share
    StudyRunner(plan, jobs=2, force=True, budget_s=0).run()
    assert (tmp_path / "first").read_text() == str(max(1, cores // 2))


def test_sigterm_stops_the_study_and_its_running_step_and_keeps_finished_steps(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from conftest import REPO_ROOT

    out = tmp_path / "study"
    proc = subprocess.Popen(
        [sys.executable, "run_study.py", "--preset", "micro", "--output_dir", str(out)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "logs" / "pretrain.log").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "logs" / "pretrain.log").exists(), "pretraining never started"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Interrupted" in output
    # no step of this study is left running
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert str(out) not in cmdline, cmdline
    assert (out / ".done" / "world.json").is_file() and not (out / ".done" / "pretrain.json").exists()


def _recorded_micro_study(out: Path, monkeypatch, kinds: tuple[str, ...] = ()) -> None:
    """A micro study in ``out`` as run_study.py records it, having run only its steps of ``kinds``."""
    real_run = StudyRunner.run

    def run_some(self):
        self.plan = replace(self.plan, steps=[s for s in self.plan.steps if s.kind in kinds])
        return real_run(self)

    monkeypatch.setattr(StudyRunner, "run", run_some)
    assert run_study.main(["--preset", "micro", "--output_dir", str(out)]) == 0
    monkeypatch.undo()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--preset", "cpu"], "--preset"),
        (["--seeds", "0"], "--seeds [0] (the study ran with [0, 1])"),
        (["--set", "cpt.max_steps=30"], "--set cpt.max_steps=30 (the study ran with cpt.max_steps=60)"),
        (["--sweep", "cpt.max_steps=30,60"], "--sweep"),
    ],
)
def test_report_only_refuses_flags_that_contradict_the_recorded_plan_and_leaves_it_as_it_was(
    flags, named, tmp_path, monkeypatch
):
    out = tmp_path / "micro"
    _recorded_micro_study(out, monkeypatch)
    before = {name: (out / name).read_bytes() for name in ("plan.json", "commands.sh", "report.md")}
    with pytest.raises(InputError, match="contradicts that record") as refused:
        run_study.main(["--report_only", "--output_dir", str(out), *flags])
    assert named in str(refused.value)
    assert {name: (out / name).read_bytes() for name in before} == before
    # flags that agree with the record are no contradiction
    assert run_study.main(["--report_only", "--output_dir", str(out), "--preset", "micro", "--seeds", "0", "1"]) == 0


def test_report_only_reports_the_recorded_study_not_the_one_the_default_flags_describe(tmp_path, monkeypatch):
    out = tmp_path / "micro"
    _recorded_micro_study(out, monkeypatch)
    plan_json, commands = (out / "plan.json").read_bytes(), (out / "commands.sh").read_bytes()
    (out / "report.md").unlink()
    assert run_study.main(["--report_only", "--output_dir", str(out)]) == 0  # no --preset: the default is cpu
    assert (out / "plan.json").read_bytes() == plan_json and (out / "commands.sh").read_bytes() == commands
    report = (out / "report.md").read_text()
    assert report.startswith("# Cross-lingual culture transfer study: preset `micro`")
    assert "Configuration: preset micro (configs/studies/micro.yaml)" in report


def test_the_report_of_a_half_finished_study_names_the_steps_that_did_not_finish(tmp_path, monkeypatch, capsys):
    out = tmp_path / "micro"
    _recorded_micro_study(out, monkeypatch, kinds=("world",))
    capsys.readouterr()
    assert run_study.main(["--report_only", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Study finished" not in printed and "Report rewritten." not in printed
    plan = study_report.read_plan(out)
    assert (
        f"The study is NOT finished: {len(plan.steps) - 1} of {len(plan.steps)} steps have no finished run" in printed
    )
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


@pytest.mark.slow
def test_a_decomposed_micro_study_reports_knowledge_skill_mismatched_bridges_and_manipulation_checks(tmp_path):
    """The five parts of the decomposition end to end on the micro study: tiers absent and en_only, the
    mismatched-bridges setting, the knowledge/skill split, bridges - mismatched and the manipulation checks."""
    out = tmp_path / "micro-decomposed"
    decomposed = ["--set", "world.absent_places=4", "world.en_only_places=4",
                  "settings=[bridges,no_bridges,mismatched_bridges]", "variants=[native]"]  # fmt: skip
    run_script(
        [sys.executable, "run_study.py", "--preset", "micro", *decomposed, "--output_dir", str(out)], timeout=900
    )
    report_md = (out / "report.md").read_text(encoding="utf-8")
    sections = json.loads((out / "report.json").read_text(encoding="utf-8"))["sections"]
    # three settings per seed, trained on the same documents; the control's partners are all wrong
    for seed in (0, 1):
        audits = {
            setting: json.loads((out / "cpt" / f"mn-native-{setting}-s{seed}" / "packing_audit.json").read_text())
            for setting in ("bridges", "no_bridges", "mismatched_bridges")
        }
        assert len({a["hashes"]["documents_seen_sha256"] for a in audits.values()}) == 1
        assert len({a["hashes"]["tokens_multiset_sha256"] for a in audits.values()}) == 1
        assert [a["pairs"]["co_located_percent"] for a in audits.values()] == [100.0, 0.0, 0.0]
        mismatched = audits["mismatched_bridges"]["mismatched_pairs"]
        assert mismatched["co_located_percent"] == 100.0 and mismatched["with_own_partner"] == 0
    # the transfer analysis: every tier, the knowledge contrast of each direction, bridges - mismatched
    transfer = json.loads((out / "transfer" / "mn-native" / "transfer.json").read_text(encoding="utf-8"))
    directions = {d["direction"]: d for lang in transfer["languages"] for d in lang["directions"]}
    assert set(directions) == {"en->mn", "mn->en"}
    assert directions["en->mn"]["knowledge_transfer"]["never_tier"] == "absent"
    assert directions["mn->en"]["knowledge_transfer"]["never_tier"] == "en_only"
    for d in directions.values():
        assert set(d["tiers"]) == {"high", "low", "absent", "en_only"}
        assert {"bridges_minus_mismatched", "mismatched_minus_none"} <= set(d)
        k = d["knowledge_transfer"]
        assert k["mean_did"] == pytest.approx(d["tiers"]["high"]["mean_gap"] - d["tiers"][k["never_tier"]]["mean_gap"])
    # the manipulation checks: before (base model) and at every checkpoint of every run
    for eval_dir in [out / "base_eval" / "mn-native", *(out / "cpt").glob("mn-native-*/eval")]:
        checks = json.loads((eval_dir / "manipulation_checks.json").read_text(encoding="utf-8"))["checkpoints"]
        steps = [c["step"] for c in json.loads((eval_dir / "accuracy.json").read_text())["checkpoints"]]
        assert [c["step"] for c in checks] == steps
        for entry in checks:
            assert set(entry["name_alignment"]) == set(entry["embedding_match"]) == {"en->mn", "mn->en"}
            assert set(entry["tier_accuracy"]["mn-culture-cloze_mn"]) == {"high", "low", "absent", "en_only"}
    # the report shows each part
    for heading in ("Knowledge or skill?", "#### Mismatched bridges", "## Manipulation checks"):
        assert heading in report_md, heading
    assert set(sections["manipulation_checks"]) == {"mn/native"}
