"""study_runner.py: the resumable runner (skip, rerun, resume or start afresh) and its behaviour under faults (locks on
steps and on the output folder, the step supervisor, kill -9, SIGTERM)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, python_step, toy_plan

import study_runner
from run_study import Plan, Step
from study_runner import StudyBusyError, StudyRunner

# --------------------------------------------------------------------------------------
# The runner: skip, rerun, resume or start afresh
# --------------------------------------------------------------------------------------


def _counting_plan(out: Path, commands: dict[str, str]) -> Plan:
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
    plan = _counting_plan(tmp_path, {"a": "1", "b": "2", "c": "3"})
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split() == ["a", "b", "c"]
    assert all((tmp_path / ".done" / f"{s}.json").is_file() for s in "abc")
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split() == ["a", "b", "c"], "finished steps must be skipped"
    changed = _counting_plan(tmp_path, {"a": "1", "b": "changed", "c": "3"})
    StudyRunner(changed, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split() == ["a", "b", "c", "b", "c"]
    (tmp_path / "c.txt").unlink()  # an output gone: the step is not done
    StudyRunner(changed, jobs=2, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text().split()[-1] == "c"
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings["steps"]) == {"a", "b", "c"}


def test_a_failing_step_stops_the_study_and_names_its_log(tmp_path):
    plan = _counting_plan(tmp_path, {"a": "1", "b": "2"})
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
    study_runner._prepare(tmp_path, step, "not run yet")  # first start: nothing to resume, the folder is cleaned
    assert not (tmp_path / "run").exists()
    (tmp_path / "run" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    command, note = study_runner._prepare(tmp_path, step, "it did not finish")  # same command started before: resume
    assert command[-2:] == ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-10")]
    assert note.startswith(f"cpt-x: resumes from {tmp_path / 'run' / 'checkpoint-10'}")
    step.command = ["python", "run_cpt.py", "--max_steps", "7"]  # another command: start afresh
    command, note = study_runner._prepare(tmp_path, step, "its command changed")
    assert command == step.command and not (tmp_path / "run").exists()
    assert note == f"cpt-x: starts afresh (its command changed); removed its earlier outputs {tmp_path / 'run'}"


def test_a_step_that_runs_alone_on_a_quiet_machine_gets_every_core_and_parallel_steps_share_them(tmp_path, monkeypatch):
    import os

    def step(name, deps):
        code = f"import os, pathlib; pathlib.Path({str(tmp_path / name)!r}).write_text(os.environ['OMP_NUM_THREADS'])"
        return python_step(name, code, [str(tmp_path / name)], deps=deps)

    # "first" runs alone; "left" and "right" can run together once it is done
    plan = toy_plan(tmp_path, [step("first", []), step("left", ["first"]), step("right", ["first"])])
    monkeypatch.setattr(study_runner, "_machine_is_quiet", lambda: True)
    StudyRunner(plan, jobs=2, force=False, budget_s=0).run()
    cores = os.cpu_count() or 1
    assert (tmp_path / "first").read_text() == str(cores)
    assert (tmp_path / "left").read_text() == (tmp_path / "right").read_text() == str(max(1, cores // 2))
    monkeypatch.setattr(study_runner, "_machine_is_quiet", lambda: False)  # shared machine: keep the share
    StudyRunner(plan, jobs=2, force=True, budget_s=0).run()
    assert (tmp_path / "first").read_text() == str(max(1, cores // 2))


def _resumable_plan(
    out: Path, texts: dict[str, str], deps: dict[str, list[str]], trains: set[str] = frozenset()
) -> Plan:
    """Steps that write ``<out>/<name>/out.txt`` and log each start (with the checkpoint it resumed from, if any)
    to ``<out>/ran.jsonl``. A training step also saves ``checkpoint-1``; a step fails once, after saving, while
    ``<out>/<name>.fail_once`` exists (an interrupted run)."""
    steps = []
    for name, text in texts.items():
        workdir = out / name
        code = (
            "import json, pathlib, sys\n"
            f"w, log, fail = pathlib.Path({str(workdir)!r}), {str(out / 'ran.jsonl')!r}, "
            f"pathlib.Path({str(out / (name + '.fail_once'))!r})\n"
            "resumed = sys.argv[sys.argv.index('--resume_from_checkpoint') + 1] "
            "if '--resume_from_checkpoint' in sys.argv else None\n"
            f"open(log, 'a').write(json.dumps({{'step': {name!r}, 'resumed_from': resumed}}) + '\\n')\n"
            "w.mkdir(parents=True, exist_ok=True)\n"
        )
        if name in trains:
            code += "(w / 'checkpoint-1').mkdir(exist_ok=True); (w / 'checkpoint-1' / 'trainer_state.json').write_text('{}')\n"
        code += f"if fail.exists(): fail.unlink(); sys.exit(1)\n(w / 'out.txt').write_text({text!r})\n"
        steps.append(
            python_step(
                name,
                code,
                [str(workdir / "out.txt")],
                workdir=str(workdir),
                deps=deps.get(name, []),
                trains=name in trains,
            )
        )
    return toy_plan(out, steps)


def _starts(out: Path) -> list[tuple[str, str | None]]:
    path = out / "ran.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(r["step"], r["resumed_from"]) for r in map(json.loads, lines)]


def _run(plan: Plan, force: bool = False) -> None:
    StudyRunner(plan, jobs=1, force=force, budget_s=0).run()


CHAIN = {"b": ["a"], "c": ["b"]}


def test_force_retrains_a_finished_training_step_from_scratch_and_says_it_removed_the_old_outputs(tmp_path, capsys):
    plan = _resumable_plan(tmp_path, {"a": "1", "b": "2", "c": "3"}, CHAIN, trains={"b"})
    _run(plan)
    (tmp_path / "b" / "old-model.bin").write_text("trained before --force")
    capsys.readouterr()
    _run(plan, force=True)
    assert _starts(tmp_path)[3:] == [("a", None), ("b", None), ("c", None)], "--force must not resume anything"
    assert not (tmp_path / "b" / "old-model.bin").exists()
    printed = capsys.readouterr().out
    assert f"b: starts afresh (--force); removed its earlier outputs {tmp_path / 'b'}" in printed


def test_a_training_step_whose_upstream_reran_starts_afresh_and_names_the_upstream_step(tmp_path, capsys):
    _run(_resumable_plan(tmp_path, {"a": "1", "b": "2", "c": "3"}, CHAIN, trains={"b"}))
    capsys.readouterr()
    _run(_resumable_plan(tmp_path, {"a": "changed", "b": "2", "c": "3"}, CHAIN, trains={"b"}))  # b's command unchanged
    assert _starts(tmp_path)[3:] == [("a", None), ("b", None), ("c", None)]
    printed = capsys.readouterr().out
    assert "b: starts afresh (upstream step a reruns: its command changed); removed its earlier outputs" in printed
    assert "c: starts afresh (upstream step a reruns: its command changed)" in printed


def test_a_step_finished_on_an_older_upstream_run_reruns_even_when_that_upstream_reran_in_an_earlier_invocation(
    tmp_path, capsys
):
    _run(_resumable_plan(tmp_path, {"a": "1", "b": "2", "c": "3"}, CHAIN, trains={"b"}))
    # an invocation that reran a and stopped before anything downstream of it started
    new_a = _resumable_plan(tmp_path, {"a": "changed"}, {})
    _run(new_a)
    capsys.readouterr()
    _run(_resumable_plan(tmp_path, {"a": "changed", "b": "2", "c": "3"}, CHAIN, trains={"b"}))
    assert _starts(tmp_path)[4:] == [("b", None), ("c", None)], "b's outputs came from the old run of a"
    printed = capsys.readouterr().out
    assert "b: starts afresh (upstream step a finished a new run since b ran)" in printed


def test_an_interrupted_training_step_resumes_only_when_its_command_and_upstream_runs_are_the_same(tmp_path):
    texts = {"a": "1", "b": "2", "c": "3"}
    (tmp_path / "b.fail_once").touch()
    with pytest.raises(RuntimeError, match="Step b failed"):
        _run(_resumable_plan(tmp_path, texts, CHAIN, trains={"b"}))
    _run(_resumable_plan(tmp_path, texts, CHAIN, trains={"b"}))  # the same command again: b continues
    assert _starts(tmp_path) == [("a", None), ("b", None), ("b", str(tmp_path / "b" / "checkpoint-1")), ("c", None)]
    # interrupted again, then its upstream reruns: the checkpoint was trained on the old a, so b starts afresh
    (tmp_path / "b.fail_once").touch()
    with pytest.raises(RuntimeError, match="Step b failed"):
        _run(_resumable_plan(tmp_path, {**texts, "b": "2'"}, CHAIN, trains={"b"}))
    _run(_resumable_plan(tmp_path, {**texts, "a": "changed", "b": "2'"}, CHAIN, trains={"b"}))
    assert _starts(tmp_path)[4:] == [("b", None), ("a", None), ("b", None), ("c", None)]


def test_after_an_interrupted_force_run_the_same_plan_without_force_reruns_every_step_not_yet_rerun(tmp_path):
    texts, deps = {"a": "1", "b": "2", "c": "3"}, {"b": ["a"]}  # c depends on nothing
    _run(_resumable_plan(tmp_path, texts, deps, trains={"b"}))
    (tmp_path / "b.fail_once").touch()
    with pytest.raises(RuntimeError, match="Step b failed"):
        _run(_resumable_plan(tmp_path, texts, deps, trains={"b"}), force=True)
    _run(_resumable_plan(tmp_path, texts, deps, trains={"b"}))
    starts = _starts(tmp_path)[3:]
    # b continues from the checkpoint of its forced start (not from one trained before --force); c reruns too
    assert starts[:2] == [("a", None), ("b", None)]
    assert sorted(starts[2:]) == [("b", str(tmp_path / "b" / "checkpoint-1")), ("c", None)]


def test_a_done_marker_that_does_not_record_its_upstream_runs_is_not_trusted_and_the_output_says_why(tmp_path, capsys):
    plan = _resumable_plan(tmp_path, {"a": "1", "b": "2"}, {"b": ["a"]})
    _run(plan)
    marker = tmp_path / ".done" / "b.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "upstream"}))
    capsys.readouterr()
    _run(plan)
    assert _starts(tmp_path)[2:] == [("b", None)]
    assert "b reruns: upstream step a finished a new run since b ran" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Faults: locks on steps and on the output folder, the step supervisor
# --------------------------------------------------------------------------------------


def _writer_step(out: Path, name: str) -> Step:
    code = (
        f"import pathlib; pathlib.Path({str(out / name)!r}).mkdir(); open({str(out / 'ran.log')!r}, 'a').write('ran')"
    )
    return python_step(name, code, [str(out / name)], workdir=str(out / name))


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _processes_mentioning(text: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process whose command line contains ``text``."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = (Path("/proc") / entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if text in cmdline and _alive(int(entry)):
            found[int(entry)] = (ppid, cmdline)
    return found


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.05)


def test_a_step_whose_process_still_runs_is_not_started_again_and_the_refusal_names_its_pid(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "partial.bin").write_text("written by the live process")
    live = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / ".running").mkdir()
        (tmp_path / ".running" / "a.pid").write_text(json.dumps({"pid": live.pid, "study_pid": 1, "started": "t"}))
        plan = toy_plan(tmp_path, [_writer_step(tmp_path, "a")])
        with pytest.raises(StudyBusyError, match=rf"still run in .*: a \(pid {live.pid}, started t by run_study.py"):
            StudyRunner(plan, jobs=1, force=True, budget_s=0).run()
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "a" / "partial.bin").exists() and not (tmp_path / "ran.log").exists(), "nothing may start"
    assert (tmp_path / ".running" / "a.pid").exists()


def test_the_pid_file_of_a_step_whose_process_is_gone_is_taken_over_and_the_log_says_so(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    (tmp_path / ".running").mkdir()
    pid_file = tmp_path / ".running" / "a.pid"
    pid_file.write_text(json.dumps({"pid": gone.pid, "study_pid": 1, "started": "t"}))
    StudyRunner(toy_plan(tmp_path, [_writer_step(tmp_path, "a")]), jobs=1, force=False, budget_s=0).run()
    assert (tmp_path / "ran.log").read_text() == "ran"
    assert f"a: took over the stale pid file {pid_file} (pid {gone.pid} no longer runs)" in capsys.readouterr().out
    assert not pid_file.exists(), "a finished step holds no lock"


def test_the_pid_file_of_a_step_whose_supervisor_is_a_zombie_is_taken_over(tmp_path, capsys):
    # After kill -9 of the study its step supervisors end as zombies until init reaps them (in some containers
    # never); a zombie writes nothing and must not lock the step.
    zombie = subprocess.Popen(["true"], start_new_session=True)
    try:
        _wait_until(
            lambda: (Path("/proc") / str(zombie.pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
            30,
            "it is a zombie",
        )
        (tmp_path / ".running").mkdir()
        (tmp_path / ".running" / "a.pid").write_text(json.dumps({"pid": zombie.pid, "study_pid": 1, "started": "t"}))
        plan = toy_plan(tmp_path, [_writer_step(tmp_path, "a")])
        StudyRunner(plan, jobs=1, force=False, budget_s=0).run()
    finally:
        zombie.wait()
    assert (tmp_path / "ran.log").read_text() == "ran"
    assert f"(pid {zombie.pid} no longer runs)" in capsys.readouterr().out


def test_processes_a_step_leaves_behind_in_their_own_session_are_stopped_when_it_ends(tmp_path):
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
        f"open({str(tmp_path / 'left.pid')!r}, 'w').write(str(p.pid))"
    )
    StudyRunner(toy_plan(tmp_path, [python_step("a", code, [])]), jobs=1, force=False, budget_s=0).run()
    left = int((tmp_path / "left.pid").read_text())
    assert not _alive(left)
    assert (
        "1 processes of the step still ran after its command ended; stopped them"
        in (tmp_path / "logs" / "a.log").read_text()
    )


def test_after_kill_9_of_the_study_no_process_of_its_steps_remains_also_accelerate_workers_in_their_own_sessions(
    tmp_path,
):
    pids = tmp_path / "pids"
    pids.mkdir()
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(
        "import os, pathlib, sys, time\npathlib.Path(sys.argv[1], str(os.getpid())).touch()\ntime.sleep(300)\n"
    )
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml"]
    escaping = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(sleeper)!r}, {str(pids)!r}], start_new_session=True); time.sleep(300)"  # fmt: skip
    steps = [
        Step(id="launch", kind="world", title="launch", command=[*accelerate, str(sleeper), str(pids)], outputs=[]),
        python_step("escape", escaping, []),
    ]
    (tmp_path / "plan.pickle").write_bytes(pickle.dumps(toy_plan(tmp_path / "study", steps)))
    driver = (
        f"import pickle, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import study_runner; "
        f"plan = pickle.loads(open({str(tmp_path / 'plan.pickle')!r}, 'rb').read()); "
        "study_runner.StudyRunner(plan, jobs=2, force=False, budget_s=0).run()"
    )
    study = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO_ROOT, start_new_session=True)
    try:
        # two accelerate (torch.distributed) workers and one grandchild, each in a session of its own
        _wait_until(lambda: len(list(pids.iterdir())) == 3, 180, "every process of both steps runs")
        step_pids = set(_processes_mentioning(str(tmp_path))) - {study.pid}
        assert len(step_pids) >= 6  # 2 supervisors, the launcher, its 2 workers, the escaping step and its child
        os.kill(study.pid, signal.SIGKILL)
        study.wait()
        _wait_until(lambda: not any(_alive(p) for p in step_pids), 30, "no process of the steps remains")
        assert not _processes_mentioning(str(tmp_path))
    finally:
        for pid in _processes_mentioning(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def test_a_second_study_on_the_same_output_folder_refuses_and_names_the_pid_of_the_first(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "run_study.py", "--preset", "micro", "--output_dir", str(out)]
    first = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / ".study.lock"
        _wait_until(lambda: lock.is_file() and lock.read_text() == str(first.pid), 60, "the first study holds the lock")
        second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"run_study.py: error: another run_study.py (pid {first.pid}) is running on {out} (it holds {lock}); "
            f"wait for it to end or stop it (kill {first.pid}), then run this command again."
        )
        assert first.poll() is None, "the refusal must not disturb the first study"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)


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
