"""run_pretrain.py end to end, as a user runs it: the command contract, exact resume, two CPU processes,
streaming, the Hub push, one-line errors, and the GPU FSDP check's CPU rehearsal."""

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
from conftest import MULTI_SCRIPT_SAMPLE, REPO_ROOT, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

ENGLISH_WORDS = (
    "the of and to in is was for on that with as by at from his her their city river king war people music "
    "school language culture festival food family history café naïve village harvest autumn winter bridge"
).split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small English corpus (with some Korean to filter out) and tokenizer files in two scripts."""
    folder = tmp_path_factory.mktemp("pretrain_corpus")
    rng = random.Random(0)
    lines = []
    for i in range(300):
        line = " ".join(rng.choice(ENGLISH_WORDS) for _ in range(rng.randint(5, 40))).capitalize() + "."
        if i % 7 == 0:
            line += " (서울)"
        lines.append("한국 사람들은 가을에." if i % 50 == 0 else line)
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "A.txt").write_text("\n".join(lines[:150]) + "\n", encoding="utf-8")
    (folder / "B.txt").write_text("\n".join(MULTI_SCRIPT_SAMPLE * 10) + "\n", encoding="utf-8")
    return folder


def contract_command(corpus_dir: Path, output_dir: Path) -> list[str]:
    return [
        sys.executable, "run_pretrain.py", "--config_name", "configs/tiny.json", "--train_tokenizer",
        "--vocab_size", "2000", "--tokenizer_files", str(corpus_dir / "A.txt"), str(corpus_dir / "B.txt"),
        "--train_file", str(corpus_dir / "corpus.txt"), "--block_size", "128", "--output_dir", str(output_dir),
        "--max_steps", "20", "--save_steps", "10", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--seed", "0",
    ]  # fmt: skip


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def contract_run(corpus_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("contract") / "OUT"
    run_script(contract_command(corpus_dir, output_dir), env_extra={"HF_DATASETS_CACHE": str(output_dir.parent)})
    return output_dir


def test_contract_command_leaves_a_loadable_model_tokenizer_stats_and_checkpoints(contract_run):
    model = AutoModelForCausalLM.from_pretrained(contract_run)
    tokenizer = AutoTokenizer.from_pretrained(contract_run)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token == "<|endoftext|>"
    assert (contract_run / "checkpoint-10").is_dir() and (contract_run / "checkpoint-20").is_dir()
    stats = json.loads((contract_run / "data_stats.json").read_text())
    assert stats["documents_in"] == 300 and stats["documents_dropped"]["empty_after_filter"] == 6
    assert stats["characters_removed_by_filter"] > 0 and stats["documents_out"] == 294
    assert stats["characters_in"] == (
        stats["characters_out"] + stats["characters_removed_by_filter"] + stats["characters_in_dropped_documents"]
    )
    assert stats["tokens_in_blocks"] == stats["blocks"] * 128 <= stats["tokens"]
    assert stats["document_attention"]["max_logit_diff_packed_vs_alone"] < 1e-4
    assert stats["document_attention"]["max_logit_diff_other_documents_changed"] < 1e-6
    assert stats["document_attention"]["layout"] == "padded" and stats["document_attention"]["windows_in_batch"] == 2
    assert stats["world_size"] == 1 and stats["distributed_type"] == "NO" and len(losses(contract_run)) == 20
    card = (contract_run / "README.md").read_text()
    assert "| optimizer steps | 20 |" in card and f"| tokens seen | {20 * 4 * 128} |" in card
    assert "latin (chars)" in card and "configs/tiny.json" in card


def test_resume_from_a_checkpoint_continues_with_identical_losses(contract_run, corpus_dir, tmp_path):
    # The run stops after its checkpoint at step 10 (a copy of the contract run's checkpoint-10
    # is all the new folder holds); resuming from it must reproduce steps 11-20 exactly.
    resumed = tmp_path / "OUT"
    shutil.copytree(contract_run / "checkpoint-10", resumed / "checkpoint-10")
    command = contract_command(corpus_dir, resumed) + ["--resume_from_checkpoint", str(resumed / "checkpoint-10")]
    run_script(command, env_extra={"HF_DATASETS_CACHE": str(tmp_path)})
    straight, continued = losses(contract_run), losses(resumed)
    assert sorted(continued) == list(range(1, 21))
    assert [continued[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]


def test_cpu_accelerate_config_trains_with_two_processes(corpus_dir, tmp_path):
    output_dir = tmp_path / "OUT"
    command = contract_command(corpus_dir, output_dir)[1:]
    command[command.index("--max_steps") + 1] = "4"
    command[command.index("--save_steps") + 1] = "4"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml"]
    run_script(accelerate + command, env_extra={"HF_DATASETS_CACHE": str(tmp_path)})
    stats = json.loads((output_dir / "data_stats.json").read_text())
    assert stats["world_size"] == 2 and stats["distributed_type"] == "MULTI_CPU"
    assert stats["tokens_per_step"] == 4 * 2 * 128
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # each of the 2 processes reads half of the windows, 4 per step: an epoch takes half the steps
    steps_per_epoch = math.ceil(math.ceil(stats["blocks"] / 2) / 4)
    assert state["log_history"][0]["epoch"] == pytest.approx(1 / steps_per_epoch)
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.vocab_size > 0


def test_a_streamed_dataset_trains_and_records_its_setting(corpus_dir, tiny_model_dir, tmp_path):
    # The stream's filtering and packing equal the whole corpus's: tests/test_run_pretrain.py
    # ::test_a_stream_is_filtered_and_packed_as_the_same_corpus_read_whole.
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    lines = (corpus_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    rows = [{"id": i, "content": line} for i, line in enumerate(lines)] + [{"id": -1, "content": "송편。"}]
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    output_dir = tmp_path / "OUT"
    run_script(
        [
            sys.executable,
            "run_pretrain.py",
            "--dataset_name",
            str(dataset_dir),
            "--streaming",
            "--text_column",
            "content",
            "--tokenizer_name",
            str(tiny_model_dir),
            "--filter_mode",
            "documents",
            "--block_size",
            "64",
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "3",
            "--save_steps",
            "3",
            "--per_device_train_batch_size",
            "2",
            "--logging_steps",
            "1",
            "--shuffle_buffer_size",
            "50",
        ],  # fmt: skip
        env_extra={"HF_DATASETS_CACHE": str(tmp_path)},
    )
    stats = json.loads((output_dir / "data_stats.json").read_text())
    assert stats["streaming"] is True and stats["source"] == f"{dataset_dir} (None, train)"
    assert (stats["text_column"], stats["filter_mode"]) == ("content", "documents")
    assert stats["document_attention"]["holds"] and stats["document_attention"]["layout"] == "padded"
    assert len(losses(output_dir)) == 3 and (output_dir / "model.safetensors").is_file()


def test_push_to_hub_uploads_the_model_and_a_card_with_the_setting(corpus_dir, tiny_model_dir, tmp_path, local_hub):
    output_dir = tmp_path / "OUT"
    run_script(
        [
            sys.executable,
            "run_pretrain.py",
            "--train_file",
            str(corpus_dir / "corpus.txt"),
            "--tokenizer_name",
            str(tiny_model_dir),
            "--block_size",
            "64",
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "2",
            "--save_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--push_to_hub",
            "--hub_model_id",
            "study/latin-base",
            "--hub_strategy",
            "all_checkpoints",
        ],  # fmt: skip
        env_extra={"HF_DATASETS_CACHE": str(tmp_path)},
    )
    files = local_hub.files("study/latin-base", "models")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    # every checkpoint of the learning curve, the last one too (the Trainer skips a push while one uploads)
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/model.safetensors"} <= set(files)
    card = (local_hub.root / "models" / "study/latin-base" / "README.md").read_text()
    assert "| optimizer steps | 2 |" in card and f"| data | {corpus_dir / 'corpus.txt'} |" in card
    assert "| script filter | latin (chars) |" in card


def test_command_line_errors_are_one_clear_line(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "run_pretrain.py", "--train_file", str(tmp_path / "missing.txt"), "--train_tokenizer",
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "run_pretrain.py: error: " in proc.stderr and "Traceback" not in proc.stderr
    # the training data is checked first, before a tokenizer is trained on it
    assert f"--train_file: {tmp_path / 'missing.txt'}: no such file. Check the path" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_fsdp_check_script_runs_end_to_end_in_its_cpu_rehearsal(tmp_path):
    # The lead runs bench/gpu_fsdp_check.sh once on a GPU; its CPU rehearsal (tiny model, fp32)
    # goes through the same corpus generation, launch with fsdp.yaml, and MFU report.
    run_script(
        ["bash", "bench/gpu_fsdp_check.sh"],
        env_extra={"GPU_CHECK_TINY": "1", "GPU_CHECK_STEPS": "7", "OUT": str(tmp_path / "report"),
                   "GPU_CHECK_WORK": str(tmp_path / "work")},
    )  # fmt: skip
    summary = json.loads((tmp_path / "report" / "gpu_fsdp_check_summary.json").read_text())
    assert summary["steady_tokens_per_second"] > 0 and 0 < summary["mfu"] < 1
    assert summary["flops_per_token"] == 6 * summary["parameters"] + 12 * 2 * 128 * 128
    assert summary["document_attention_check"]["max_logit_diff_packed_vs_alone"] < 1e-4
    assert summary["distributed_type"] == "NO"  # accelerate ignores FSDP without a GPU
    assert "RESULT tokens/s" in (tmp_path / "report" / "gpu_fsdp_check.log").read_text()
    assert not (tmp_path / "work" / "run").exists()  # the model folder is removed
