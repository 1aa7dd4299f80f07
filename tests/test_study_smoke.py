"""run_study.py --smoke: every step of a plan, exactly as the full run has it, with only the budgets cut."""

from __future__ import annotations

import pytest

import run_study
from run_study import PRESETS, SMOKE_BUDGETS, SMOKE_CPU_PRECISION, StudyArguments, build_plan, smoke_preset

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
    full = build_plan(args, PRESETS[preset_name], tmp_path / "full")
    smoke, cuts = smoke_preset(PRESETS[preset_name], on_gpu=on_gpu)
    return full, build_plan(args, smoke, tmp_path / "smoke"), cuts


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
        assert added <= {"--shuffle_buffer_size"}, f"{full_step.id}: smoke adds {added}"
        if added:
            assert "--streaming" in full_flags, "only a streamed pretraining gets a smaller shuffle buffer"
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
