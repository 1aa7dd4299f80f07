"""run_study.py: when a step resumes and when it starts afresh (--force, changed commands, reruns upstream)."""

import json
import sys
from pathlib import Path

import pytest
from conftest import python_step, toy_plan

from run_study import Plan, Step, StudyRunner


def _toy_plan(out: Path, texts: dict[str, str], deps: dict[str, list[str]], trains: set[str] = frozenset()) -> Plan:
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
    plan = _toy_plan(tmp_path, {"a": "1", "b": "2", "c": "3"}, CHAIN, trains={"b"})
    _run(plan)
    (tmp_path / "b" / "old-model.bin").write_text("trained before --force")
    capsys.readouterr()
    _run(plan, force=True)
    assert _starts(tmp_path)[3:] == [("a", None), ("b", None), ("c", None)], "--force must not resume anything"
    assert not (tmp_path / "b" / "old-model.bin").exists()
    printed = capsys.readouterr().out
    assert f"b: starts afresh (--force); removed its earlier outputs {tmp_path / 'b'}" in printed


def test_a_training_step_whose_upstream_reran_starts_afresh_and_names_the_upstream_step(tmp_path, capsys):
    _run(_toy_plan(tmp_path, {"a": "1", "b": "2", "c": "3"}, CHAIN, trains={"b"}))
    capsys.readouterr()
    _run(_toy_plan(tmp_path, {"a": "changed", "b": "2", "c": "3"}, CHAIN, trains={"b"}))  # b's command unchanged
    assert _starts(tmp_path)[3:] == [("a", None), ("b", None), ("c", None)]
    printed = capsys.readouterr().out
    assert "b: starts afresh (upstream step a reruns: its command changed); removed its earlier outputs" in printed
    assert "c: starts afresh (upstream step a reruns: its command changed)" in printed


def test_a_step_finished_on_an_older_upstream_run_reruns_even_when_that_upstream_reran_in_an_earlier_invocation(
    tmp_path, capsys
):
    _run(_toy_plan(tmp_path, {"a": "1", "b": "2", "c": "3"}, CHAIN, trains={"b"}))
    # an invocation that reran a and stopped before anything downstream of it started
    new_a = _toy_plan(tmp_path, {"a": "changed"}, {})
    _run(new_a)
    capsys.readouterr()
    _run(_toy_plan(tmp_path, {"a": "changed", "b": "2", "c": "3"}, CHAIN, trains={"b"}))
    assert _starts(tmp_path)[4:] == [("b", None), ("c", None)], "b's outputs came from the old run of a"
    printed = capsys.readouterr().out
    assert "b: starts afresh (upstream step a finished a new run since b ran)" in printed


def test_an_interrupted_training_step_resumes_only_when_its_command_and_upstream_runs_are_the_same(tmp_path):
    texts = {"a": "1", "b": "2", "c": "3"}
    (tmp_path / "b.fail_once").touch()
    with pytest.raises(RuntimeError, match="Step b failed"):
        _run(_toy_plan(tmp_path, texts, CHAIN, trains={"b"}))
    _run(_toy_plan(tmp_path, texts, CHAIN, trains={"b"}))  # the same command again: b continues
    assert _starts(tmp_path) == [("a", None), ("b", None), ("b", str(tmp_path / "b" / "checkpoint-1")), ("c", None)]
    # interrupted again, then its upstream reruns: the checkpoint was trained on the old a, so b starts afresh
    (tmp_path / "b.fail_once").touch()
    with pytest.raises(RuntimeError, match="Step b failed"):
        _run(_toy_plan(tmp_path, {**texts, "b": "2'"}, CHAIN, trains={"b"}))
    _run(_toy_plan(tmp_path, {**texts, "a": "changed", "b": "2'"}, CHAIN, trains={"b"}))
    assert _starts(tmp_path)[4:] == [("b", None), ("a", None), ("b", None), ("c", None)]


def test_after_an_interrupted_force_run_the_same_plan_without_force_reruns_every_step_not_yet_rerun(tmp_path):
    texts, deps = {"a": "1", "b": "2", "c": "3"}, {"b": ["a"]}  # c depends on nothing
    _run(_toy_plan(tmp_path, texts, deps, trains={"b"}))
    (tmp_path / "b.fail_once").touch()
    with pytest.raises(RuntimeError, match="Step b failed"):
        _run(_toy_plan(tmp_path, texts, deps, trains={"b"}), force=True)
    _run(_toy_plan(tmp_path, texts, deps, trains={"b"}))
    starts = _starts(tmp_path)[3:]
    # b continues from the checkpoint of its forced start (not from one trained before --force); c reruns too
    assert starts[:2] == [("a", None), ("b", None)]
    assert sorted(starts[2:]) == [("b", str(tmp_path / "b" / "checkpoint-1")), ("c", None)]


CORPUS = [
    "the river runs past the old mill and the miller sells bread at the market",
    "a farmer walks to the market with apples and pears in a basket",
    "children play by the river while the baker bakes bread in the morning",
    "the market opens early and closes late when the harvest is good",
] * 30


@pytest.mark.slow
def test_force_retrains_a_real_pretraining_step_instead_of_resuming_its_final_checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    base = tmp_path / "base"
    command = [
        sys.executable, "run_pretrain.py", "--config_name", "configs/tiny.json",
        "--config_overrides", "hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2",
        "--train_tokenizer", "--vocab_size", "300", "--tokenizer_files", str(corpus), "--train_file", str(corpus),
        "--block_size", "32", "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--output_dir", str(base),
    ]  # fmt: skip
    step = Step(
        id="pretrain",
        kind="pretrain",
        title="pretrain",
        command=command,
        outputs=[str(base / "config.json")],
        workdir=str(base),
        trains=True,
    )
    plan = toy_plan(tmp_path / "study", [step])
    StudyRunner(plan, jobs=1, force=False, budget_s=0).run()
    (base / "checkpoint-4" / "before-force.txt").write_text("saved by the first run")
    StudyRunner(plan, jobs=1, force=True, budget_s=0).run()
    log = (tmp_path / "study" / "logs" / "pretrain.log").read_text(encoding="utf-8")
    assert "--resume_from_checkpoint" not in log and "removed its earlier outputs" in log
    assert not (base / "checkpoint-4" / "before-force.txt").exists(), "the final checkpoint must be trained anew"
    for n in (2, 4):
        state = json.loads((base / f"checkpoint-{n}" / "trainer_state.json").read_text())
        assert state["global_step"] == n
        assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, n + 1))


def test_a_done_marker_that_does_not_record_its_upstream_runs_is_not_trusted_and_the_output_says_why(tmp_path, capsys):
    plan = _toy_plan(tmp_path, {"a": "1", "b": "2"}, {"b": ["a"]})
    _run(plan)
    marker = tmp_path / ".done" / "b.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "upstream"}))
    capsys.readouterr()
    _run(plan)
    assert _starts(tmp_path)[2:] == [("b", None)]
    assert "b reruns: upstream step a finished a new run since b ran" in capsys.readouterr().out
