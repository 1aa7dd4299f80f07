"""run_cpt.py end to end (slow): the command contract on a run_pretrain.py base, Hub in and out, exact resume,
two CPU processes, resuming only the same base model and data, and the design card's commands verbatim."""

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from cloze_samples import write_sample_questions
from conftest import REPO_ROOT, run_script
from datasets import load_from_disk
from test_run_cpt import (
    EN_WORDS,
    check_windows,
    cpt_command,
    cpt_data,  # noqa: F401  (a fixture)
    model_windows,
    planned,
    read_json,
    small_dataset,
    write_cpt_inputs,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import build_pairs
import run_cpt
from study_common import InputError

pytestmark = pytest.mark.slow

# One thread per process: on a shared 2-core machine two torch threads per process collapse under
# contention, and the tests measure behaviour, not speed.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def assert_audits_agree(audits: dict) -> None:
    """The settings' own audits: 100/0/0, each equal to what the others computed of it."""
    assert audits["bridges"]["pairs"]["co_located_percent"] == 100.0
    assert audits["no_bridges"]["pairs"]["co_located_percent"] == 0.0
    assert audits["bridges"]["pairs"]["attending_each_other"] == audits["bridges"]["pairs"]["total"] > 0
    for setting, audit in audits.items():
        assert audit["setting"] == audit["cpt_setting"]["setting"] == setting
        assert audit["guarantees_hold"] and all(audit["equal_across_settings"].values())
        for other in audits:
            if other != setting:
                assert audit["hashes"] == audits[other]["other_settings"][setting]["hashes"]
                assert audit["real_tokens"] == audits[other]["real_tokens"]
                assert audit["plan"]["units_seen"] == audits[other]["plan"]["units_seen"]
    for key in ("segments_multiset_sha256", "tokens_multiset_sha256", "targets_multiset_sha256",
                "documents_seen_sha256"):  # fmt: skip
        assert len({audit["hashes"][key] for audit in audits.values()}) == 1


def test_command_contract_on_a_run_pretrain_base(tmp_path):
    corpus = tmp_path / "english.txt"
    corpus.write_text("\n".join(f"Document {i}: " + " ".join(random.Random(i).choices(EN_WORDS, k=30))
                                for i in range(200)))  # fmt: skip
    pairs, mono = write_cpt_inputs(tmp_path / "inputs")
    base = tmp_path / "BASE"
    # The tokenizer learns the target script too (run_pretrain.py's advice); the model sees English only.
    run_script(["python", "run_pretrain.py", "--config_name", "configs/tiny.json", "--train_tokenizer",
                "--vocab_size", "400", "--tokenizer_files", str(corpus), str(mono), "--train_file", str(corpus),
                "--block_size", "128", "--output_dir", str(base), "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--report_to", "none"], env_extra=ONE_THREAD)  # fmt: skip
    data = tmp_path / "DATA"
    # The command contract of the issue, verbatim apart from paths.
    run_script(["python", "build_pairs.py", "--lang", "bo", "--pairs_files", str(pairs), "--en_column", "en",
                "--tgt_column", "bo", "--mono_files", str(mono), "--tokenizer_name", str(base), "--block_size", "128",
                "--output_dir", str(data)], env_extra=ONE_THREAD)  # fmt: skip
    audits = {}
    for name in ("bridges", "no_bridges"):
        bridges = name == "bridges"
        run = tmp_path / f"RUN-{name}"
        run_script(["python", "run_cpt.py", "--model_name_or_path", str(base), "--dataset_path", str(data),
                    "--lang", "bo", f"--{name}", "--block_size", "128",
                    "--output_dir", str(run), "--max_steps", "10", "--save_steps", "5",
                    "--per_device_train_batch_size", "4"], env_extra=ONE_THREAD)  # fmt: skip
        audits[name] = read_json(run / "packing_audit.json")
        assert (run / "checkpoint-5").is_dir() and (run / "checkpoint-10").is_dir()
        setting = read_json(run / "config.json")["cpt_setting"]
        assert setting["bridges"] is bridges and setting["setting"] == name
        assert setting["lang"] == "bo" and setting["block_size"] == 128
        assert read_json(run / "checkpoint-5" / "config.json")["cpt_setting"] == setting
        state = read_json(run / "trainer_state.json")
        assert state["global_step"] == 10
        assert audits[name]["cpt_setting"] == setting
        name = f"cpt-bo-{'bridges' if bridges else 'no-bridges'}-seed42"
        assert torch.load(run / "training_args.bin", weights_only=False).run_name == name
        card = (run / "README.md").read_text()
        assert f"| bridges | {bridges} |" in card and "| steps trained | 10 |" in card
    assert_audits_agree(audits)
    assert audits["bridges"]["world_size"] == 1 and audits["bridges"]["plan"]["steps"] == 10
    assert all(audit["document_isolation"]["holds"] for audit in audits.values())
    # The runs' plan (10 steps of 4 windows of 128, seed 42), read by the independent checker.
    plan, tokenized = planned(data, base, block_size=128, per_step=4, max_steps=10, seed=42)
    pad_id = AutoTokenizer.from_pretrained(base).pad_token_id
    checked = {name: check_windows(model_windows(plan.settings[name].windows, tokenized, 128, pad_id), data, base, 128,
                                   name) for name in audits}  # fmt: skip
    assert checked["bridges"]["segments"] == checked["no_bridges"]["segments"]
    assert checked["bridges"]["windows"] == checked["no_bridges"]["windows"] == audits["bridges"]["windows"] == 40
    assert checked["bridges"]["co_located"] == checked["bridges"]["pairs"] == audits["bridges"]["pairs"]["total"]
    assert checked["no_bridges"]["co_located"] == 0


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, tiny_model_dir):
    """A dataset and a run (every checkpoint) pushed to the stand-in Hub; then that run resumed from
    its middle checkpoint with the base model and the dataset read from a hand-made offline Hub cache."""
    from hub_server import LocalHub

    folder = tmp_path_factory.mktemp("hub_runs")
    # No --lang: the run takes the dataset's, from its (pushed) build_stats.json.
    common = ["--bridges", "--block_size", "128", "--max_steps", "4", "--save_steps", "2",
              "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "0", "--report_to", "none"]  # fmt: skip
    with LocalHub(folder / "hub") as hub:
        # The stand-in stores binary files through LFS, not Xet.
        online = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_local_test_token", "HF_HUB_DISABLE_TELEMETRY": "1",
                  "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
        pairs, mono = write_cpt_inputs(folder / "inputs")
        run_script(["python", "build_pairs.py", "--lang", "bo", "--pairs_files", str(pairs), "--tgt_column", "bo",
                    "--mono_files", str(mono), "--tokenizer_name", str(tiny_model_dir), "--block_size", "128",
                    "--output_dir", str(folder / "data"), "--push_to_hub", "--hub_dataset_id", "tester/cpt-bo"],
                   env_extra={**online, **ONE_THREAD})  # fmt: skip
        straight = folder / "cpt-bo-bridges"
        run_script(["python", "run_cpt.py", "--model_name_or_path", str(tiny_model_dir), "--dataset_path",
                    str(folder / "data"), "--output_dir", str(straight), *common, "--push_to_hub",
                    "--hub_strategy", "all_checkpoints"], env_extra={**online, **ONE_THREAD})  # fmt: skip
        pushed_dataset_files = hub.files("tester/cpt-bo", "datasets")
        pushed_files = hub.files("tester/cpt-bo-bridges")
        pushed_root = hub.root / "models" / "tester" / "cpt-bo-bridges"
        # A hand-made Hub cache of the pushed dataset and of the base model, read offline below.
        cache = folder / "hub_cache"
        for repo, source in (("datasets--tester--cpt-bo", hub.root / "datasets" / "tester" / "cpt-bo"),
                             ("models--tester--tiny-base", tiny_model_dir)):  # fmt: skip
            shutil.copytree(source, cache / repo / "snapshots" / ("a" * 40))
            (cache / repo / "refs").mkdir()
            (cache / repo / "refs" / "main").write_text("a" * 40)
    offline = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "ds_cache")}
    resumed = folder / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run_script(["python", "run_cpt.py", "--model_name_or_path", "tester/tiny-base", "--dataset_name", "tester/cpt-bo",
                "--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2"), *common],
               env_extra={**offline, **ONE_THREAD})  # fmt: skip
    return {"straight": straight, "resumed": resumed, "pushed_files": pushed_files, "pushed_root": pushed_root,
            "data": folder / "data", "pushed_dataset_files": pushed_dataset_files, "cache": cache}  # fmt: skip


def test_build_pairs_push_uploads_parquet_shards_stats_and_card(hub_runs):
    from datasets import load_dataset

    assert hub_runs["pushed_dataset_files"] == ["README.md", "build_stats.json", "data/train-00000-of-00001.parquet"]
    # The pushed card (the local one plus push_to_hub's metadata): tests/e2e/test_build_pairs.py.
    pushed = hub_runs["cache"] / "datasets--tester--cpt-bo" / "snapshots" / ("a" * 40)
    round_trip = load_dataset("parquet", data_files=str(pushed / "data" / "*.parquet"), split="train")
    assert round_trip["doc_id"] == load_from_disk(str(hub_runs["data"]))["doc_id"]


def test_push_to_hub_publishes_every_checkpoint_with_the_setting(hub_runs):
    files = hub_runs["pushed_files"]
    for step in (2, 4):
        assert f"checkpoint-{step}/model.safetensors" in files
        assert f"checkpoint-{step}/trainer_state.json" in files
    assert {"config.json", "model.safetensors", "packing_audit.json", "README.md"} <= set(files)
    root = hub_runs["pushed_root"]
    assert read_json(root / "config.json")["cpt_setting"]["bridges"] is True
    assert read_json(root / "checkpoint-2" / "config.json")["cpt_setting"]["bridges"] is True
    assert "| steps trained | 4 |" in (root / "README.md").read_text()  # our card, not the Trainer's


def test_dataset_and_model_from_an_offline_hub_cache_give_the_same_plan(hub_runs):
    local = read_json(hub_runs["straight"] / "packing_audit.json")
    cached = read_json(hub_runs["resumed"] / "packing_audit.json")
    assert cached["cpt_setting"]["dataset"] == "tester/cpt-bo"
    assert cached["cpt_setting"]["lang"] == local["cpt_setting"]["lang"] == "bo"  # from the pushed build_stats.json
    assert cached["hashes"] == local["hashes"] and cached["plan"] == local["plan"]


def test_resume_from_the_middle_gives_the_same_losses_as_a_straight_run(hub_runs):
    def losses(run):
        return {e["step"]: e["loss"] for e in read_json(run / "trainer_state.json")["log_history"] if "loss" in e}

    straight, resumed = losses(hub_runs["straight"]), losses(hub_runs["resumed"])
    assert sorted(straight) == [1, 2, 3, 4]
    assert {step: resumed[step] for step in (3, 4)} == {step: straight[step] for step in (3, 4)}


def test_two_cpu_processes_train_both_settings_on_the_same_plan(tmp_path, tiny_model_dir, cpt_data):  # noqa: F811
    config = REPO_ROOT / "accelerate_configs" / "cpu.yaml"
    audits = {}
    for setting in ("bridges", "no_bridges"):
        run = tmp_path / setting
        run_script(["accelerate", "launch", "--config_file", str(config), "run_cpt.py", "--model_name_or_path",
                    str(tiny_model_dir), "--dataset_path", str(cpt_data), "--lang", "bo",
                    f"--{setting}", "--block_size", "128", "--output_dir", str(run),
                    "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "3",
                    "--report_to", "none"], env_extra=ONE_THREAD)  # fmt: skip
        audits[setting] = read_json(run / "packing_audit.json")
        # The plan is one of 2 processes x 2 windows per step (which windows each process reads:
        # tests/test_run_cpt.py::test_two_processes_read_the_planned_windows_between_them_each_exactly_once).
        assert audits[setting]["world_size"] == 2 and audits[setting]["windows_per_step"] == 4
        assert read_json(run / "trainer_state.json")["global_step"] == 3
    assert_audits_agree(audits)


def test_resume_refuses_a_checkpoint_of_another_base_model_or_other_data_and_resumes_the_same(tmp_path,
                                                                                              tiny_model_dir):  # fmt: skip
    import shutil

    import torch

    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    first = tmp_path / "first"
    run_cpt.main(cpt_command(tiny_model_dir, data, first, "--lang", "bo"))
    setting = json.loads((first / "config.json").read_text())["cpt_setting"]
    assert setting["base_model_weights_sha256"] == run_cpt.base_model_identity(str(tiny_model_dir))[
        "base_model_weights_sha256"]  # fmt: skip
    assert len(setting["dataset_sha256"]) == 64

    def resume(base, data_dir, name):
        run = tmp_path / name
        shutil.copytree(first / "checkpoint-1", run / "checkpoint-1")
        run_cpt.main(cpt_command(base, data_dir, run, "--lang", "bo", "--resume_from_checkpoint", "latest"))
        return run

    # The base model retrained upstream: same config and tokenizer, other weights.
    retrained = tmp_path / "retrained"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(retrained)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(retrained)
    with pytest.raises(InputError, match=r"checkpoint-1 does not match this run: base model weights differ "
                                         r"\(sha256 [0-9a-f]{12}\.\. in the checkpoint vs [0-9a-f]{12}\.\. now\)"):  # fmt: skip
        resume(retrained, data, "other-base")
    # The dataset rebuilt with other text of the same shape: same records, kinds, ids and token counts.
    pairs = (tmp_path / "inputs" / "pairs.jsonl").read_text(encoding="utf-8")
    other_inputs = tmp_path / "other_inputs"
    other_inputs.mkdir()
    (other_inputs / "pairs.jsonl").write_text(pairs.replace("Tea number 0 is", "Tea number 9 is"), encoding="utf-8")
    shutil.copy(tmp_path / "inputs" / "mono.txt", other_inputs / "mono.txt")
    build_pairs.main(["--lang", "bo", "--pairs_files", str(other_inputs / "pairs.jsonl"), "--tgt_column", "bo",
                      "--mono_files", str(other_inputs / "mono.txt"), "--tokenizer_name", str(tiny_model_dir),
                      "--block_size", "64", "--output_dir", str(other_inputs / "data")])  # fmt: skip
    with pytest.raises(InputError, match=r"does not match this run: dataset content differs \(sha256 [0-9a-f]{12}"):
        resume(tiny_model_dir, other_inputs / "data", "other-data")
    # The same base and the same data (moved elsewhere): resumes, at the checkpoint's step.
    moved = tmp_path / "moved_data"
    shutil.copytree(data, moved)
    run = resume(tiny_model_dir, moved, "same")
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    resumed = json.loads((run / "packing_audit.json").read_text())["cpt_setting"]
    assert {k: v for k, v in resumed.items() if k not in run_cpt.LOCATION_KEYS} == {
        k: v for k, v in setting.items() if k not in run_cpt.LOCATION_KEYS
    }


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

    def in_pairs(commands) -> None:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda command: run_script(command, cwd=repo, env_extra=ONE_THREAD), commands))

    run_script(["python", "run_pretrain.py", "--config_name", "configs/tiny.json", "--train_tokenizer",
                "--vocab_size", "400", "--tokenizer_files", str(inputs / "en.txt"), str(inputs / "bo.txt"),
                "--train_file", str(inputs / "en.txt"), "--block_size", "64", "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--report_to", "none"], cwd=repo, env_extra=ONE_THREAD)  # fmt: skip
    assert (repo / "runs" / "pretrain" / "config.json").is_file()
    run_script(["python", "build_pairs.py", "--lang", "bo", "--pairs_files", str(inputs / "pairs.jsonl"),
                "--mono_files", str(inputs / "bo.txt")], cwd=repo, env_extra=ONE_THREAD)  # fmt: skip
    assert (repo / "runs" / "data-bo" / "build_stats.json").is_file()
    # As typed on the design card: no other flag (TrainingArguments' defaults: 3 epochs, 8 windows of 2048). The two
    # runs of a step run side by side, one core each, as a study runs them.
    in_pairs(
        ["accelerate", "launch", "run_cpt.py", "--lang", "bo", setting] for setting in ("--bridges", "--no_bridges")
    )
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

    runs = ("runs/cpt-bo-bridges-seed42", "runs/cpt-bo-no-bridges-seed42")
    in_pairs(
        ["python", "run_eval.py", "--model_name_or_path", run, "--questions", *map(str, questions)] for run in runs
    )
    assert all((repo / run / "eval" / "accuracy.json").is_file() for run in runs)
    run_script(["python", "run_transfer.py", "--with_bridges", "runs/cpt-bo-bridges-seed42", "--without_bridges",
                "runs/cpt-bo-no-bridges-seed42"], cwd=repo, env_extra=ONE_THREAD)  # fmt: skip
    assert (repo / "transfer_output" / "transfer.json").is_file() and (
        repo / "transfer_output" / "transfer.md"
    ).is_file()
