"""run_study.py --smoke: every step of a plan, exactly as the full run has it, with only the budgets cut."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

import run_study
from run_study import StudyArguments, build_plan
from study_config import PRESETS, SMOKE_BUDGETS, SMOKE_CPU_PRECISION, SMOKE_ONLY_FLAGS, smoke_preset

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
    return full, build_plan(replace(args, smoke=True), smoke, tmp_path / "smoke"), cuts


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
        budget_only = {f"--{flag}" for flag in SMOKE_ONLY_FLAGS}
        assert added <= {"--shuffle_buffer_size"} | budget_only, f"{full_step.id}: smoke adds {added}"
        if "--shuffle_buffer_size" in added:
            assert "--streaming" in full_flags, "only a streamed pretraining gets a smaller shuffle buffer"
        # every input of a build and every corpus of a density step is read only in part
        if full_step.kind == "build":
            assert smoke_flags["--max_records_per_input"] == [str(SMOKE_BUDGETS["build"]["max_records_per_input"])]
        if full_step.kind == "density":
            assert smoke_flags["--max_documents"] == [str(SMOKE_BUDGETS["density"]["max_documents"])]
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


def test_smoke_pushes_go_to_their_own_hub_repositories(tmp_path):
    full, smoke, _ = _plans("paper", tmp_path, on_gpu=False, hub_org="org", langs=["bo"])
    ids = {
        plan_name: sorted(
            value
            for step in plan.steps
            for flag, values in _split(step.command)[2].items()
            if flag in ("--hub_model_id", "--hub_dataset_id")
            for value in values
        )
        for plan_name, plan in (("full", full), ("smoke", smoke))
    }
    assert ids["full"] == ["org/paper-base", "org/paper-cpt-bo-bridges-s0", "org/paper-cpt-bo-no_bridges-s0",
                           "org/paper-data-bo"]  # fmt: skip
    assert ids["smoke"] == [name.replace("org/paper-", "org/paper-smoke-") for name in ids["full"]]
    for step in smoke.steps:
        flags = _split(step.command)[2]
        if step.trains:
            assert flags["--hub_strategy"] == ["all_checkpoints"] and "--push_to_hub" in flags, step.id
            assert "--hub_always_push" in flags, "no checkpoint push is skipped while another uploads"


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


# --------------------------------------------------------------------------------------
# The paper plan's smoke run against the Hub stand-in (online, no offline cache)
# --------------------------------------------------------------------------------------

KOREAN_WORDS = ["가을", "추석", "송편", "사람", "나라", "바다", "산", "강", "마을", "음식", "노래", "시장"]
TIBETAN_SYLLABLES = ["བོད", "རིགས", "ཀྱིས", "ལོ", "གསར", "ཁ", "ཟས", "སྣ", "ཚོགས", "བཟོ", "ཡོད", "ལྷ"]
ENGLISH_WORDS = ["valley", "river", "market", "barley", "festival", "song", "village", "mountain", "wool", "harvest"]


def _texts(words: list[str], count: int, length: int, joiner: str, end: str) -> list[str]:
    """``count`` distinct texts of ``length`` words each (permutations, so no two are equal)."""
    import itertools

    return [joiner.join(p) + end for p in itertools.islice(itertools.permutations(words, length), count)]


def _parquet(columns: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _wikipedia(lang: str, texts: list[str]) -> bytes:
    n = len(texts)
    return _parquet(
        {
            "id": [str(i) for i in range(n)],
            "url": [f"https://{lang}.wikipedia.org/wiki?curid={i}" for i in range(n)],
            "title": [f"{lang} {i}" for i in range(n)],
            "text": texts,
        }
    )


def _serve_paper_sources(hub, tmp_path) -> None:
    """Stand-ins of the paper's Hub sources in their real layouts: Wikipedia's parquet configs with the card's
    YAML, OPUS-100's `translation` dicts, MC²'s gated one-file-per-language JSON lines, Qwen's tokenizer."""
    import json

    from conftest import MULTI_SCRIPT_SAMPLE

    from run_pretrain import train_tokenizer

    english = [
        " ".join(_texts(ENGLISH_WORDS, 6, 6, " ", ".")[j % 6] for j in range(i % 5 + 4)).capitalize()
        + f" The {ENGLISH_WORDS[i % 10]} of this place is known for its {ENGLISH_WORDS[(i * 3) % 10]}."
        for i in range(80)
    ]
    korean = [" ".join(_texts(KOREAN_WORDS, 200, 5, " ", ".")[i : i + 3]) for i in range(0, 120, 3)]
    tibetan = _texts(TIBETAN_SYLLABLES, 60, 6, "་", "།")
    card = "---\nconfigs:\n" + "".join(
        f"- config_name: 20231101.{lang}\n  data_files:\n  - split: train\n    path: 20231101.{lang}/train-*\n"
        for lang in ("en", "ko")
    )
    hub.add_files(
        "wikimedia/wikipedia",
        {
            "README.md": card + "---\n# Wikipedia (stand-in)\n",
            "20231101.en/train-00000-of-00001.parquet": _wikipedia("en", english),
            "20231101.ko/train-00000-of-00001.parquet": _wikipedia("ko", korean),
        },
        repo_type="datasets",
    )
    ko_pairs = _texts(KOREAN_WORDS, 40, 4, " ", ".")
    opus_card = "---\nconfigs:\n- config_name: en-ko\n  data_files:\n" + "".join(
        f"  - split: {split}\n    path: en-ko/{split}-*\n" for split in ("test", "train", "validation")
    )
    translations = [{"en": f"Pair {i}: the autumn festival.", "ko": k} for i, k in enumerate(ko_pairs)]
    hub.add_files(
        "Helsinki-NLP/opus-100",
        {
            "README.md": opus_card + "---\n# OPUS-100 (stand-in)\n",
            "en-ko/train-00000-of-00001.parquet": _parquet({"translation": translations[:30]}),
            "en-ko/validation-00000-of-00001.parquet": _parquet({"translation": translations[30:35]}),
            "en-ko/test-00000-of-00001.parquet": _parquet({"translation": translations[35:]}),
        },
        repo_type="datasets",
    )
    hub.add_files(
        "pkupie/mc2_corpus",
        {
            "bo-crawl-only-release-20231127.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in tibetan[:30]),
            "mn-crawl-only-release-20231127.jsonl": json.dumps({"text": "ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ"}) + "\n",
        },
        repo_type="datasets",
    )
    hub.gate("pkupie/mc2_corpus")
    tokenizer = train_tokenizer(
        MULTI_SCRIPT_SAMPLE * 4 + english[:10] + korean[:10] + tibetan[:10], 600, show_progress=False
    )
    tokenizer_dir = tmp_path / "qwen-tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    hub.add_files("Qwen/Qwen2.5-0.5B", {p.name: p for p in tokenizer_dir.iterdir()})


@pytest.mark.slow
def test_paper_plan_smoke_run_reads_every_source_from_the_hub_finishes_every_step_and_pushes_what_probes_the_same(
    local_hub, paper_cloze_dir, tmp_path, monkeypatch
):
    import json

    from conftest import REPO_ROOT, run_script

    _serve_paper_sources(local_hub, tmp_path)
    questions = tmp_path / "questions"  # a few of the paper's questions per file
    questions.mkdir()
    for lang in ("ko", "bo"):
        for side in ("en", lang):
            name = f"{lang}-culture-cloze_{side}.json"
            items = json.loads((paper_cloze_dir / name).read_text(encoding="utf-8"))[:12]
            (questions / name).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    bo_pairs = tmp_path / "en-bo.jsonl"
    bo_pairs.write_text(
        "".join(
            json.dumps({"en": f"Pair {i}: butter tea in Lhasa.", "bo": t}, ensure_ascii=False) + "\n"
            for i, t in enumerate(_texts(TIBETAN_SYLLABLES, 90, 5, "་", "།")[60:])
        ),
        encoding="utf-8",
    )
    paper_data = tmp_path / "paper_data.json"
    paper_data.write_text(json.dumps({"bo": {"pairs_files": [str(bo_pairs)]}}), encoding="utf-8")
    out = tmp_path / "study"
    proc = run_script(
        [
            sys.executable, "run_study.py", "--preset", "paper", "--smoke", "--langs", "ko", "bo",
            "--questions_dir", str(questions), "--paper_data", str(paper_data), "--output_dir", str(out),
            "--python", sys.executable, "--hub_org", "smoke-org",
        ],
        cwd=REPO_ROOT,
        env_extra={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                   "TRANSFORMERS_OFFLINE": "0"},
        timeout=900,
    )  # fmt: skip
    assert "Smoke run: every step of the plan" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    done = {p.stem for p in (out / ".done").glob("*.json")}
    assert done == {s["id"] for s in plan["steps"]}, f"steps not finished: {set(s['id'] for s in plan['steps']) - done}"
    pretrain_stats = json.loads((out / "base" / "data_stats.json").read_text())
    assert pretrain_stats["source"] == "wikimedia/wikipedia (20231101.en, train)" and pretrain_stats["streaming"]
    assert pretrain_stats["tokenizer"] == {"kind": "loaded", "name": "Qwen/Qwen2.5-0.5B", "length": 600,
                                           "eos_token": "<|endoftext|>"}  # fmt: skip
    for lang in ("ko", "bo"):
        stats = json.loads((out / "data" / lang / "build_stats.json").read_text())
        assert stats["read"]["pair"] == stats["kept"]["pair"] == 30, "OPUS-100's train split / the bo pairs file"
        assert stats["read"]["mono"] == stats["kept"]["mono"] == {"ko": 40, "bo": 30}[lang], "Wikipedia ko / MC² bo"
        assert stats["read"]["replay"] == 80, "the English replay streamed from the Wikipedia stand-in"
        for setting in ("bridges", "no_bridges"):
            audit = json.loads((out / "cpt" / f"{lang}-{setting}-s0" / "packing_audit.json").read_text())
            assert audit["pairs"]["co_located_percent"] == (100.0 if setting == "bridges" else 0.0)
        assert (out / "transfer" / lang / "transfer.json").is_file()
        analysed = set()
        for corpus in ("enwiki", lang):
            density = json.loads((out / "density" / lang / corpus / "density.json").read_text())
            analysed |= {(r["questions"], r["source_corpus"]) for r in density["instance_analysis"]["results"]}
        # each direction of transfer is analysed on the corpus it transfers from
        assert analysed == {(f"{lang}-culture-cloze_{lang}", "enwiki"), (f"{lang}-culture-cloze_en", lang)}
    assert (out / "report.md").is_file()

    # Pushed: each CPT dataset with its card, the base model and every checkpoint of every run.
    for lang in ("ko", "bo"):
        files = local_hub.files(f"smoke-org/paper-smoke-data-{lang}", "datasets")
        assert "README.md" in files and any(f.endswith(".parquet") for f in files), files
    for name in ("base", "cpt-ko-bridges-s0", "cpt-ko-no_bridges-s0", "cpt-bo-bridges-s0", "cpt-bo-no_bridges-s0"):
        files = local_hub.files(f"smoke-org/paper-smoke-{name}")
        for folder in ("", "checkpoint-2/", "checkpoint-4/"):
            assert {f"{folder}config.json", f"{folder}model.safetensors"} <= set(files), (name, folder, files)
        assert "README.md" in files
    # A fresh probe of the pushed checkpoints, pulled from the Hub into an empty cache, scores as the local one.
    pulled = tmp_path / "pulled-eval"
    run_script(
        [
            sys.executable, "run_eval.py", "--model_name_or_path", "smoke-org/paper-smoke-cpt-ko-bridges-s0",
            "--questions", str(questions / "ko-culture-cloze_en.json"), str(questions / "ko-culture-cloze_ko.json"),
            "--batch_size", "16", "--dtype", "float32", "--output_dir", str(pulled),
        ],
        cwd=REPO_ROOT,
        env_extra={"HF_HOME": str(tmp_path / "hf_home_fresh"), "HF_HUB_OFFLINE": "0"},
    )  # fmt: skip
    local = json.loads((out / "cpt" / "ko-bridges-s0" / "eval" / "accuracy.json").read_text())
    remote = json.loads((pulled / "accuracy.json").read_text())
    assert [c["path"] for c in remote["checkpoints"]] == [
        f"smoke-org/paper-smoke-cpt-ko-bridges-s0/checkpoint-{step}" for step in (2, 4)
    ]
    assert [(c["step"], c["accuracy"]) for c in remote["checkpoints"]] == [
        (c["step"], c["accuracy"]) for c in local["checkpoints"]
    ]
    assert remote["cpt_setting"] == local["cpt_setting"], "the pushed checkpoints carry their CPT setting"
    assert local_hub.unhandled == [], f"the clients made calls the stand-in does not serve: {local_hub.unhandled}"
