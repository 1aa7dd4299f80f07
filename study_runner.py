"""Run a plan's steps in dependency order, ``jobs`` at a time, each as a supervised subprocess, resumable from the
records each step leaves (.started/, .done/, .running/ in the study's folder). How resuming and the fault handling
behave: docs/study.md. run_study.py plans the steps; this module takes its Plan and Step objects as they are."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psutil

from study_common import InputError, write_json_atomic
from study_config import REPO_DIR


def fmt_time(seconds: float) -> str:
    """H:MM:SS from an hour on, else M:SS."""
    seconds = int(round(seconds))
    hours = f"{seconds // 3600}:{seconds // 60 % 60:02d}" if seconds >= 3600 else f"{seconds // 60}"
    return f"{hours}:{seconds % 60:02d}"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------------------
# A step's records, which say whether it finished: the runner runs by them, the report states them
# --------------------------------------------------------------------------------------


def done_marker(out: Path, step_id: str) -> Path:
    return out / ".done" / f"{step_id}.json"


def started_record(out: Path, step) -> Path:
    return out / ".started" / f"{step.id}.json"


def read_record(path: Path) -> dict | None:
    """A JSON record the runner wrote, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_step_seconds(out: Path) -> dict[str, float]:
    """Seconds each finished step took, from its done-marker (a sweep's step ids have a folder)."""
    markers = sorted((out / ".done").rglob("*.json"))
    records = {m.relative_to(out / ".done").with_suffix("").as_posix(): read_record(m) for m in markers}
    return {step_id: record.get("seconds", 0.0) for step_id, record in records.items() if record}


def upstream_runs(out: Path, step) -> dict:
    """The finished run of each dependency (run id, finish stamp, command): a step records them when it starts and
    finishes, so a new run upstream is seen downstream even when the downstream command is unchanged."""
    markers = {dep: read_record(done_marker(out, dep)) for dep in step.deps}
    return {dep: m and {key: m.get(key) for key in ("run_id", "finished", "command")} for dep, m in markers.items()}


def upstream_changed(recorded: dict | None, current: dict) -> list[str]:
    """Dependencies whose finished run is not the one recorded (all of them when nothing was recorded)."""
    return [dep for dep, run in current.items() if (recorded or {}).get(dep) != run]


def why_not_done(out: Path, step) -> str | None:
    """None when the step is done: its done-marker holds the current command and the finished runs of its upstream
    steps, and its outputs exist. Otherwise why it must run."""
    marker = read_record(done_marker(out, step.id))
    if marker is None:
        if done_marker(out, step.id).exists():
            return "its done-marker is unreadable"
        return "it did not finish" if started_record(out, step).exists() else "no record of an earlier run"
    if marker.get("command") != step.command:
        return "its command changed"
    changed = upstream_changed(marker.get("upstream"), upstream_runs(out, step))
    if changed:
        return f"upstream step {', '.join(changed)} finished a new run since {step.id} ran"
    missing = [p for p in step.outputs if not Path(p).exists()]
    return f"outputs missing: {', '.join(missing)}" if missing else None


def unfinished_steps(plan) -> dict[str, str]:
    """The steps of a plan without a finished run, each with why (see why_not_done)."""
    state = Path(plan.state_dir or plan.out)
    return {step.id: why for step in plan.steps if (why := why_not_done(state, step)) is not None}


# --------------------------------------------------------------------------------------
# Starting a step: resume or start afresh; locks; the step supervisor
# --------------------------------------------------------------------------------------


def _last_checkpoint(workdir: str | None) -> str | None:
    if not workdir or not Path(workdir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(workdir).iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    found = [(n, p) for n, p in found if (p / "trainer_state.json").is_file()]  # a save that finished
    return str(max(found)[1]) if found else None


def _prepare(out: Path, step, reason: str) -> tuple[list[str], str | None]:
    """Resume or clean a step about to start (``reason``: why it runs); returns its command and a note for the logs.
    Only a training step interrupted on the same command and upstream runs resumes (docs/study.md)."""
    started = read_record(started_record(out, step))
    upstream = upstream_runs(out, step)
    if started is None:
        mismatch = None
    elif started.get("command") != step.command:
        mismatch = "its earlier start ran another command"
    elif changed := upstream_changed(started.get("upstream"), upstream):
        mismatch = f"upstream step {', '.join(changed)} finished a new run since its earlier start"
    else:
        mismatch = ""
    command, note = list(step.command), None
    checkpoint = _last_checkpoint(step.workdir) if step.trains and mismatch == "" else None
    if checkpoint:
        command += ["--resume_from_checkpoint", checkpoint]
        note = f"{step.id}: resumes from {checkpoint} (its earlier start ran the same command on the same upstream"
        note += " runs)"
    elif step.workdir and Path(step.workdir).exists():
        shutil.rmtree(step.workdir)
        interrupted = reason == "it did not finish" or reason.startswith("outputs missing")
        why = f"{reason}; {mismatch}" if mismatch and interrupted else reason  # why an interrupted step does not resume
        note = f"{step.id}: starts afresh ({why}); removed its earlier outputs {step.workdir}"
    # From here on the step's outputs are not those of a finished run.
    done_marker(out, step.id).unlink(missing_ok=True)
    write_json_atomic(started_record(out, step), {"command": step.command, "upstream": upstream, "started": utc_now()})
    return command, note


class StudyBusyError(InputError):
    """The study does not start: another process works on the same outputs (exit status 2, like a bad input)."""


def _pid_file(out: Path, step_id: str) -> Path:
    """The lock of a running step: the pid of its supervisor, which leads the step's process group."""
    return out / ".running" / f"{step_id}.pid"


def _process_group_alive(pgid) -> bool:
    """Whether a live process of the group remains (a zombie, e.g. a supervisor orphaned by kill -9 of the study that
    init never reaps, writes nothing and does not count)."""
    return isinstance(pgid, int) and any(_process_group(pid) == pgid for pid in _running(psutil.pids()))


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # ended meanwhile
        return None


def lock_output_dir(out: Path) -> int:
    """Hold an exclusive lock on the output folder while this process lives (the kernel drops it when it dies), or
    refuse naming the pid that holds it. Steps do not inherit it (Popen closes other file descriptors)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".study.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StudyBusyError(
            f"another run_study.py (pid {holder}) is running on {out} (it holds {path}); wait for it to end or "
            f"stop it (kill {holder}), then run this command again."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


#: How every step is started: ``python -c _SUPERVISOR <study pid> <command...>`` (see supervise_step).
_SUPERVISOR = (
    f"import sys; sys.path.insert(0, {str(REPO_DIR)!r}); import study_runner; sys.exit(study_runner.supervise_step())"
)
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_STOP_GRACE_S = 10.0


def supervise_step(argv: list[str] | None = None) -> int:
    """Run one step's command (argv: the study's pid, then the command) so that none of its processes outlives the
    study; return its exit status.

    It asks the kernel for SIGTERM when the study dies (Linux parent-death signal; elsewhere it polls) and becomes
    the reaper of the step's orphans. On SIGTERM or the study's death it stops every descendant of the step, also
    those in sessions of their own (``accelerate launch``'s torch.distributed workers), SIGKILL after a grace
    period; so it does with whatever the command leaves behind when it ends."""
    argv = sys.argv[1:] if argv is None else argv
    study_pid, command = int(argv[0]), argv[1:]
    stop_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != study_pid:  # the study died before its death could be signalled
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command, preexec_fn=_die_with_parent)  # a no-op off Linux (_prctl)
    while child.poll() is None and not stop_signals and os.getppid() == study_pid:
        time.sleep(0.2)
    if child.returncode is None:
        _stop_descendants()
        return 128 + (stop_signals[0] if stop_signals else signal.SIGTERM)
    leftovers = _stop_descendants()
    if leftovers:
        print(f"run_study.py: {leftovers} processes of the step still ran after its command ended; stopped them.")
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _running(pids) -> set[int]:
    """Those of ``pids`` whose process still runs (not a zombie)."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                found.add(pid)
    return found


def _stop_descendants(grace_s: float = _STOP_GRACE_S) -> int:
    """SIGTERM every descendant of this process, SIGKILL those still alive after ``grace_s``; return their count."""
    me, targets = os.getpid(), set()
    deadline = time.time() + grace_s
    while time.time() < deadline + 5:  # past that, only unkillable (uninterruptible) processes remain
        while True:  # reap ended children (orphans of the step are ours, as their subreaper)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        alive = _running(targets | {child.pid for child in psutil.Process(me).children(recursive=True)})
        if not alive:
            break
        late = time.time() > deadline
        for pid in alive if late else alive - targets:
            try:
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            except ProcessLookupError:
                pass
        targets |= alive
        time.sleep(0.1)
    return len(targets)


def _machine_is_quiet() -> bool:
    """Less than one core's worth of other work (1-minute load average) on the machine."""
    return os.getloadavg()[0] < 1.0


class StudyRunner:
    """Runs the steps of a plan, ``jobs`` at a time, in dependency order, with a progress display."""

    def __init__(self, plan, jobs: int, force: bool, budget_s: int):
        self.plan, self.jobs, self.force, self.budget_s = plan, max(1, jobs), force, budget_s
        self.out = Path(plan.out)
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
        if self.plan.preset.synthetic:  # synthetic studies never touch the network
            env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return env | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def _plan_reruns(self) -> dict[str, str]:
        """Why each step that must run runs. ``--force`` first forgets every finished and started step of the plan,
        so that an interrupted forced run, rerun without it, reruns every step it had not reached and resumes none
        from a checkpoint trained before --force."""
        if self.force:
            for step in self.plan.steps:
                done_marker(self.out, step.id).unlink(missing_ok=True)
                started_record(self.out, step).unlink(missing_ok=True)
            return {step.id: "--force" for step in self.plan.steps}
        reasons: dict[str, str] = {}
        root_cause: dict[str, str] = {}  # step -> the upstream step whose own change makes it rerun
        for step in self.plan.steps:  # dependencies come first
            stale = next((d for d in step.deps if d in reasons), None)
            if stale is not None:
                root = root_cause[step.id] = root_cause.get(stale, stale)
                reasons[step.id] = f"upstream step {root} reruns: {reasons[root]}"
            elif (why := why_not_done(self.out, step)) is not None:
                reasons[step.id] = why
                if why != "no record of an earlier run":
                    print(f"{step.id} reruns: {why}.")
        return reasons

    def run(self) -> dict[str, float]:
        """Run every step not done, each once its dependencies are, and write timings.json; returns the seconds of
        each step. A failed step stops the others and raises RuntimeError."""
        steps, start = self.plan.steps, time.time()
        self._refuse_steps_still_running()
        reasons = self._plan_reruns()
        done = {s.id for s in steps if s.id not in reasons}
        self.timings = {k: v for k, v in read_step_seconds(self.out).items() if k in done}
        if done:
            print(f"{len(done)}/{len(steps)} steps already done in {self.out} (skipped; --force reruns them).")
        pending = [s for s in steps if s.id not in done]
        if not pending:  # keep the record of the invocation that did the work
            return self.timings
        from tqdm.auto import tqdm

        self.logs.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(steps), initial=len(done), unit="step", desc="study", dynamic_ncols=True, disable=None)
        running: dict[str, tuple[subprocess.Popen, float, object]] = {}
        env, loads, sampled = self._env(), [], 0.0
        try:
            while pending or running:
                self._start_ready(pending, running, done, reasons, env, bar)
                for step_id in [key for key, (process, _, _) in running.items() if process.poll() is not None]:
                    step, seconds = self._finish(step_id, running, bar)
                    done.add(step_id)
                    bar.update(1)
                    budget = f" of a {fmt_time(self.budget_s)} budget" if self.budget_s else ""
                    bar.write(f"[{len(done):>2}/{len(steps)}] done   {step.title} in {seconds:.0f} s "
                              f"(elapsed {fmt_time(time.time() - start)}{budget})")  # fmt: skip
                time.sleep(0.2 if running else 0)
                if time.time() - sampled > 10:
                    loads.append(os.getloadavg()[0])  # 1-minute load, the study's own jobs included
                    sampled = time.time()
            bar.close()
        except BaseException as err:  # a failed step, Ctrl-C, a bug: no step keeps running without the study
            self._stop(running)
            if isinstance(err, KeyboardInterrupt):
                print("\nInterrupted. Finished steps are kept; run the same command again to resume (training steps "
                      "continue from their last checkpoint).")  # fmt: skip
            raise
        write_json_atomic(self.out / "timings.json", {
            "steps": self.timings, "wall_s_this_invocation": time.time() - start, "jobs": self.jobs,
            "cpu_count": os.cpu_count(), "load_average_samples": loads})  # fmt: skip
        return self.timings

    def _start_ready(self, pending: list, running: dict, done: set, reasons: dict, env: dict, bar) -> None:
        """Start the steps whose dependencies are done, up to ``jobs`` at a time."""
        for step in [s for s in pending if all(d in done for d in s.deps)]:
            if len(running) >= self.jobs:
                return
            # Nothing else can run meanwhile (e.g. pretraining) and nothing else loads the machine: every core. On a
            # shared machine more threads than free cores make torch slower, so the step keeps its share.
            ready = [p for p in pending if p is not step and all(d in done for d in p.deps)]
            every_core = not running and not ready and _machine_is_quiet()
            running[step.id] = self._start(step, reasons[step.id], env, bar, every_core)
            pending.remove(step)
            bar.write(f"[{len(done) + len(running):>2}/{len(self.plan.steps)}] start  {step.title}")

    def _start(self, step, reason: str, env: dict, bar, every_core: bool) -> tuple:
        """Start a step through the step supervisor; returns (process, start time, log)."""
        pid_file = _pid_file(self.out, step.id)
        stale = read_record(pid_file)  # its process is gone (_refuse_steps_still_running)
        if stale:
            pid_file.unlink()
            bar.write(f"        {step.id}: took over the stale pid file {pid_file} (pid {stale.get('pid')} no longer "
                      "runs)")  # fmt: skip
        command, note = _prepare(self.out, step, reason)
        if command[0] == "python":  # the same interpreter (and environment) as the study
            command = [sys.executable, *command[1:]]
        (self.logs / step.id).parent.mkdir(parents=True, exist_ok=True)  # a sweep's ids have a folder
        log = open(self.logs / f"{step.id}.log", "w", encoding="utf-8")  # noqa: SIM115
        if note:
            bar.write(f"        {note}")
            log.write(f"run_study.py: {note}\n")
        log.write("$ " + shlex.join(command) + "\n\n")
        log.flush()
        if every_core:
            env = env | {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "MKL_NUM_THREADS": str(os.cpu_count() or 1)}
        # In a session of its own: Ctrl-C reaches the study, which then stops its steps.
        process = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, str(os.getpid()), *command], cwd=REPO_DIR,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        record = {"pid": process.pid, "study_pid": os.getpid(), "started": utc_now(), "command": command}
        write_json_atomic(pid_file, record)
        return process, time.time(), log

    def _finish(self, step_id: str, running: dict, bar) -> tuple:
        """Record a step whose process ended: its done-marker when it succeeded and wrote its outputs; otherwise stop
        the other steps and raise with the end of its log."""
        process, started, log = running.pop(step_id)
        log.close()
        _pid_file(self.out, step_id).unlink(missing_ok=True)
        step, seconds = next(s for s in self.plan.steps if s.id == step_id), time.time() - started
        missing = [p for p in step.outputs if not Path(p).exists()]
        if process.returncode != 0 or missing:
            self._stop(running)
            bar.close()
            tail = (self.logs / f"{step_id}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
            reason = f"exit code {process.returncode}" if process.returncode else f"missing outputs {missing}"
            raise RuntimeError(f"Step {step_id} failed ({reason}) after {seconds:.0f} s. Its log: "
                               f"{self.logs / (step_id + '.log')}\n--- last lines ---\n{tail}")  # fmt: skip
        self.timings[step_id] = seconds
        upstream = (read_record(started_record(self.out, step)) or {}).get("upstream")  # the runs it started on
        write_json_atomic(done_marker(self.out, step_id), {"command": step.command, "upstream": upstream,
                          "run_id": uuid.uuid4().hex, "seconds": seconds, "finished": utc_now()})  # fmt: skip
        return step, seconds

    def _refuse_steps_still_running(self) -> None:
        """Refuse before anything starts when a process of a step of the plan still runs: two processes never write
        one step folder."""
        busy = []
        for step in self.plan.steps:
            record = read_record(_pid_file(self.out, step.id))
            if record and _process_group_alive(record.get("pid")):
                busy.append(f"{step.id} (pid {record['pid']}, started {record.get('started')} by run_study.py pid "
                            f"{record.get('study_pid')})")  # fmt: skip
        if busy:
            raise StudyBusyError(
                f"steps of this study still run in {self.out}: {'; '.join(busy)}. A step whose process is alive "
                "is not started again; wait for it to end or stop it (kill -- -PID), then run this command again."
            )

    def _stop(self, running: dict) -> None:
        for process, _, _ in running.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for step_id, (process, _, log) in running.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
            _pid_file(self.out, step_id).unlink(missing_ok=True)
        running.clear()
