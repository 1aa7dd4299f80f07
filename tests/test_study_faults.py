"""run_study.py under faults: kill -9 of the study (and of its steps), locks on steps and on the output folder."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, python_step, run_script, toy_plan

import run_study
from run_study import Step, StudyArguments, StudyBusyError, StudyRunner
from study_config import PRESETS


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
        f"import pickle, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import run_study; "
        f"plan = pickle.loads(open({str(tmp_path / 'plan.pickle')!r}, 'rb').read()); "
        "run_study.StudyRunner(plan, jobs=2, force=False, budget_s=0).run()"
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(run_dir: Path) -> dict[str, str]:
    """Hash of the final model and of every checkpoint's model."""
    found = {p.parent.name: _sha256(p) for p in run_dir.glob("checkpoint-*/model.safetensors")}
    return found | {"final": _sha256(run_dir / "model.safetensors")}


@pytest.mark.slow
def test_kill_9_of_the_study_and_its_cpt_step_then_the_same_command_gives_the_weights_of_an_uninterrupted_run(
    tmp_path,
):
    out = tmp_path / "study"
    restricted = dict(variants=["anchors"], anchor_settings=["bridges"], seeds=[0], jobs=1)
    command = [
        sys.executable, "run_study.py", "--preset", "micro", "--variants", "anchors", "--anchor_settings", "bridges",
        "--seeds", "0", "--jobs", "1", "--output_dir", str(out),
    ]  # fmt: skip
    plan = run_study.build_plan(
        StudyArguments(preset="micro", output_dir=str(out), **restricted), PRESETS["micro"], out
    )
    cpt = next(s for s in plan.steps if s.kind == "cpt")
    run_dir = Path(cpt.workdir)
    with open(tmp_path / "first.out", "w") as first_out:
        study = subprocess.Popen(command, cwd=REPO_ROOT, stdout=first_out, stderr=subprocess.STDOUT)
    _wait_until(
        lambda: (run_dir / "checkpoint-20" / "trainer_state.json").is_file() or study.poll() is not None,
        600,
        "the CPT step saved its first checkpoint",
    )
    supervisor = json.loads((out / ".running" / f"{cpt.id}.pid").read_text())["pid"]
    trainer = next(pid for pid, (ppid, _) in _processes_mentioning("run_cpt.py").items() if ppid == supervisor)
    os.kill(study.pid, signal.SIGKILL)
    os.kill(trainer, signal.SIGKILL)
    study.wait()
    assert not (run_dir / "model.safetensors").exists(), "the step was killed before it finished"
    _wait_until(lambda: not _processes_mentioning(str(out)), 30, "no process of the study remains")

    rerun = run_script(command, timeout=900)
    assert f"{cpt.id}: took over the stale pid file" in rerun.stdout
    assert f"{cpt.id}: resumes from {run_dir}/checkpoint-" in rerun.stdout
    assert "Report:" in rerun.stdout and (out / "report.md").is_file()
    for step in plan.steps:  # every step finished, with its outputs
        assert (out / ".done" / f"{step.id}.json").is_file(), step.id
        assert all(Path(p).exists() for p in step.outputs), step.id
    assert not list((out / ".running").iterdir())
    resumed = _weights(run_dir)
    assert set(resumed) == {"checkpoint-20", "checkpoint-40", "checkpoint-60", "final"}

    # The reference: the step's command run without interruption (into another folder: the folder is not an input
    # of the training; the same threads as the study gave it)
    reference = tmp_path / "reference"
    command = [sys.executable if c == "python" else c for c in cpt.command]
    command[command.index("--output_dir") + 1] = str(reference)
    env = StudyRunner(plan, jobs=1, force=False, budget_s=0)._env()
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=900)
    assert _weights(reference) == resumed
