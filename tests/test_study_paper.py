"""run_study.py, paper preset: where its inputs come from, and what it costs, before anything runs."""

import shlex
import subprocess

import pytest
from conftest import REPO_ROOT

import run_study
from run_study import StudyArguments, build_plan
from study_config import PRESETS


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


def test_missing_paper_questions_exit_2_naming_the_exact_command_that_fetches_them(tmp_path, capsys):
    empty = tmp_path / "questions"
    empty.mkdir()
    code = run_study.main(
        ["--preset", "paper", "--langs", "ko", "--questions_dir", str(empty), "--output_dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("run_study.py: error: the paper's questions are missing from")
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
    plan = build_plan(
        StudyArguments(preset="paper", langs=["bo"], paper_data=str(override)), PRESETS["paper"], tmp_path
    )
    build = next(s for s in plan.steps if s.kind == "build")
    density = next(s for s in plan.steps if s.id == "density-bo-bo")
    assert "--mono_files" in build.command and "--mono_dataset" not in build.command
    assert "--mono_data_files" not in build.command
    assert "bo=mc2/bo-crawl-only-release-20231127.jsonl" in density.command
    assert "--corpus_dataset" not in density.command and "--corpus_streaming" not in density.command
    assert "mc2/bo-crawl-only-release-20231127.jsonl" in run_study._local_files(plan)


def _cost_line(printed: str, step_id: str) -> list[str]:
    return next(line.split() for line in printed.splitlines() if line.split()[:1] == [step_id])


def test_paper_dry_run_prints_tokens_windows_and_an_estimate_of_gpu_hours_per_step(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_study.main(["--preset", "paper", "--dry_run", "--output_dir", out]) == 0
    printed = capsys.readouterr().out
    # CPT: 1,500 steps x (16 per device x 2 accumulation x 8 processes of multi_gpu.yaml) x 2048 tokens
    cpt = _cost_line(printed, "cpt-ko-bridges-s0")
    assert cpt[1:3] == ["8", "1,500"] and cpt[3:5] == ["256", "(16x2x8)"] and cpt[5] == "2048"
    assert cpt[6:8] == ["384,000", f"{1500 * 256 * 2048:,}"]
    assert cpt[8:10] == [f"{1500 * 256 * 2048 / 47_800 / 3600:.2f}", f"{1500 * 256 * 2048 / 47_800 / 3600 / 8:.2f}"]
    pretrain = _cost_line(printed, "pretrain")
    assert pretrain[7] == f"{20000 * 256 * 2048:,}"
    assert "ESTIMATE at 47,800 tokens/s per GPU (measured by bench/gpu_fsdp_check.sh on one NVIDIA H200" in printed
    assert not (tmp_path / "out").exists()


def test_dry_run_cost_follows_the_throughput_flag_and_the_processes_of_the_accelerate_config(tmp_path, capsys):
    config = tmp_path / "four_gpus.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    argv = ["--preset", "paper", "--dry_run", "--output_dir", str(tmp_path / "out"), "--langs", "bo"]
    assert run_study.main([*argv, "--accelerate_config", str(config), "--tokens_per_second_per_gpu", "10000"]) == 0
    printed = capsys.readouterr().out
    cpt = _cost_line(printed, "cpt-bo-no_bridges-s0")
    tokens = 1500 * 16 * 2 * 4 * 2048
    assert cpt[1] == "4" and cpt[3:5] == ["128", "(16x2x4)"] and cpt[7] == f"{tokens:,}"
    assert cpt[8:10] == [f"{tokens / 10_000 / 3600:.2f}", f"{tokens / 10_000 / 3600 / 4:.2f}"]
    assert "given with --tokens_per_second_per_gpu" in printed
    # a synthetic preset prints tokens and windows, and GPU-hours only from a throughput it is given
    assert run_study.main(["--preset", "micro", "--dry_run", "--output_dir", str(tmp_path / "m")]) == 0
    micro = capsys.readouterr().out
    assert _cost_line(micro, "pretrain")[1:8] == ["1", "100", "16", "(16x1x1)", "64", "1,600", f"{100 * 16 * 64:,}"]
    assert "GPU-hours" not in micro
