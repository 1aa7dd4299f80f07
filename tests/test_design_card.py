"""The design card's commands, verbatim: each step writes where the next one reads by default.

    python run_pretrain.py ...                    -> runs/pretrain
    python build_pairs.py --lang bo ...           -> runs/data-bo (tokenizer from runs/pretrain)
    accelerate launch run_cpt.py --lang bo --bridges      -> runs/cpt-bo-bridges-seed42
    accelerate launch run_cpt.py --lang bo --no_bridges   -> runs/cpt-bo-no-bridges-seed42
    python run_transfer.py --with_bridges runs/cpt-bo-bridges-seed42 --without_bridges runs/cpt-bo-no-bridges-seed42 ...

The commands run in a folder holding a copy of the repository's scripts and configs (the user is in
the repository root; the copy keeps runs/ out of the checkout)."""

import json
import shutil
from pathlib import Path

import pytest
from cloze_samples import write_sample_questions
from conftest import REPO_ROOT, run_script

import run_cpt

ONE_THREAD = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
EN_SENTENCES = [
    "The people of the high valleys drink butter tea at new year.",
    "Barley flour is roasted and eaten with tea in the morning.",
    "A festival of lights is held in the old city every winter.",
    "Yaks carry salt across the mountain passes in summer.",
]
BO_SENTENCES = ["བོད་རིགས་ཀྱིས་ལོ་གསར་ལ་ཇ་འཐུང་།", "རྩམ་པ་ཟ་གི་ཡོད།", "ལྷ་སར་མེ་ཏོག་ཡོད།", "གཡག་གིས་ཚྭ་ཁུར་གྱི་ཡོད།"]


def copy_of_the_repository(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for script in REPO_ROOT.glob("*.py"):
        shutil.copy(script, folder / script.name)
    shutil.copytree(REPO_ROOT / "configs", folder / "configs")
    return folder


def test_run_cpt_reads_the_default_base_model_and_dataset_and_says_what_to_run_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="No dataset: give --lang LANG to read build_pairs.py's default output"):
        run_cpt.parse_args(["--bridges"])
    with pytest.raises(FileNotFoundError, match=r"runs/data-bo: no CPT dataset here \(the default --dataset_path for "
                                                r"--lang bo\). Run build_pairs.py --lang bo first"):  # fmt: skip
        run_cpt.parse_args(["--lang", "bo", "--bridges"])
    (tmp_path / "runs" / "data-bo").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"runs/pretrain: no base model here \(the default "
                                                r"--model_name_or_path\). Run run_pretrain.py first or pass"):  # fmt: skip
        run_cpt.parse_args(["--lang", "bo", "--bridges"])
    (tmp_path / "runs" / "pretrain").mkdir()
    cpt_args, _ = run_cpt.parse_args(["--lang", "bo", "--bridges"])
    assert (cpt_args.model_name_or_path, cpt_args.dataset_path) == ("runs/pretrain", "runs/data-bo")
    given, _ = run_cpt.parse_args(["--lang", "bo", "--bridges", "--model_name_or_path", "elsewhere",
                                   "--dataset_path", "data"])  # fmt: skip
    assert (given.model_name_or_path, given.dataset_path) == ("elsewhere", "data")


@pytest.mark.slow
def test_the_design_card_commands_run_verbatim_with_the_default_locations(tmp_path):
    repo = copy_of_the_repository(tmp_path / "repo")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "en.txt").write_text("".join(f"{s} Story {i}.\n" for i in range(12) for s in EN_SENTENCES))
    (inputs / "bo.txt").write_text("".join(s * (1 + i % 3) + "\n" for i in range(6) for s in BO_SENTENCES))
    (inputs / "pairs.jsonl").write_text(
        "".join(
            json.dumps({"en": en, "bo": bo}, ensure_ascii=False) + "\n" for en, bo in zip(EN_SENTENCES, BO_SENTENCES)
        )
        * 3,
        encoding="utf-8",
    )
    questions = write_sample_questions(inputs / "questions", langs=("en", "bo"))

    run_script(["python", "run_pretrain.py", "--config_name", "configs/tiny.json", "--train_tokenizer",
                "--vocab_size", "400", "--tokenizer_files", str(inputs / "en.txt"), str(inputs / "bo.txt"),
                "--train_file", str(inputs / "en.txt"), "--block_size", "64", "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--report_to", "none"], cwd=repo, env_extra=ONE_THREAD)  # fmt: skip
    assert (repo / "runs" / "pretrain" / "config.json").is_file()
    run_script(["python", "build_pairs.py", "--lang", "bo", "--pairs_files", str(inputs / "pairs.jsonl"),
                "--mono_files", str(inputs / "bo.txt")], cwd=repo, env_extra=ONE_THREAD)  # fmt: skip
    assert (repo / "runs" / "data-bo" / "build_stats.json").is_file()
    # As typed on the design card: no other flag (TrainingArguments' defaults: 3 epochs, 8 windows of 2048).
    for setting in ("--bridges", "--no_bridges"):
        run_script(["accelerate", "launch", "run_cpt.py", "--lang", "bo", setting], cwd=repo, env_extra=ONE_THREAD)
    audits = {}
    for name, co_located in (("cpt-bo-bridges-seed42", 100.0), ("cpt-bo-no-bridges-seed42", 0.0)):
        run = repo / "runs" / name
        audits[name] = json.loads((run / "packing_audit.json").read_text())
        assert audits[name]["guarantees_hold"] and audits[name]["pairs"]["co_located_percent"] == co_located
        assert audits[name]["cpt_setting"]["base_model"] == "runs/pretrain"
        assert audits[name]["cpt_setting"]["dataset"] == str((repo / "runs" / "data-bo").resolve())
        assert (run / "model.safetensors").is_file() and (run / "trainer_state.json").is_file()
    assert audits["cpt-bo-bridges-seed42"]["hashes"] == audits["cpt-bo-no-bridges-seed42"]["hashes"]
    assert not (repo / "trainer_output").exists()

    run_script(["python", "run_transfer.py", "--with_bridges", "runs/cpt-bo-bridges-seed42", "--without_bridges",
                "runs/cpt-bo-no-bridges-seed42", "--questions", *map(str, questions)], cwd=repo, env_extra=ONE_THREAD)  # fmt: skip
    assert sorted(p.name for p in (repo / "eval_output").iterdir() if p.name.startswith("transfer"))
