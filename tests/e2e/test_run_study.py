"""run_study.py end to end (slow: minutes each): the micro study and its report, the decomposed micro study, kill -9
of a study and its CPT step, --force on a real pretraining, and the paper plan's smoke run against the Hub stand-in."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_script, toy_plan
from test_study_runner import _processes_mentioning, _wait_until

import run_study
from run_study import Step, StudyArguments
from study_runner import StudyRunner

pytestmark = pytest.mark.slow


def _formatted(value: float) -> str:
    return f"{value:+.3f}"


#: The micro study with the five parts of the decomposition (tiers absent and en_only, the mismatched-bridges
#: setting): both variants, so one run carries the report test and the decomposition test below. One seed keeps it
#: to four CPT runs (the runs of several seeds are pinned by tests/test_run_transfer.py and the sweep test).
MICRO_DECOMPOSED = ["--preset", "micro", "--set", "world.absent_places=4", "world.en_only_places=4",
                    "settings=[bridges,no_bridges,mismatched_bridges]", "seeds=[0]"]  # fmt: skip


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One decomposed micro study (minutes), read by both tests below; returns its folder and its run."""
    out = tmp_path_factory.mktemp("micro") / "micro-decomposed"
    proc = run_script([sys.executable, "run_study.py", *MICRO_DECOMPOSED, "--output_dir", str(out)], timeout=900)
    return out, proc


def test_micro_study_end_to_end_writes_a_complete_and_consistent_report(micro_study):
    out, proc = micro_study
    assert "Report:" in proc.stdout
    report_md = (out / "report.md").read_text(encoding="utf-8")
    report_html = (out / "report.html").read_text(encoding="utf-8")
    record = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report_html.startswith("<!DOCTYPE html>")
    # every figure the report shows exists and is a PNG
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md)
    assert sorted(images) == [
        "figures/bridge_diagnostic.png",
        "figures/mn-anchors_vs_control.png",
        "figures/mn-native-transfer_curves.png",
        "figures/mn-native-transfer_summary.png",
    ]
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert f'src="{image}"' in report_html
    sections = record["sections"]
    assert {"world", "questions", "transfer", "anchors", "diagnostic", "density", "packing",
            "manipulation_checks"} == set(sections)  # fmt: skip
    # transfer numbers: report.json names each group's transfer.json, and the report prints them (its transfer.md)
    for key, group in sections["transfer"].items():
        transfer = json.loads(Path(group["transfer_json"]).read_text(encoding="utf-8"))
        directions = [d for lang in transfer["languages"] for d in lang["directions"]]
        assert len(directions) == 2, key
        for source in directions:
            shown = f"{_formatted(source['mean_gap'])} [{_formatted(source['mean_gap_ci'][0])}, {_formatted(source['mean_gap_ci'][1])}]"
            (row,) = [line for line in report_md.splitlines() if f"| {shown} |" in line]
            assert row.endswith(f"| {source['verdict']} |"), row  # each gap shown once, with its verdict
    # density numbers: report.json = density.json, planted counts = truth.json
    truth = json.loads((out / "world" / "truth.json").read_text(encoding="utf-8"))
    for key, group in sections["density"].items():
        density = json.loads(Path(group["density_json"]).read_text(encoding="utf-8"))
        table = {(r["questions"], r["corpus"]): r for r in density["table"]}
        for row in group["rows"]:
            assert row["occurrences"] == table[(row["questions"], row["corpus"])]["occurrences"]
            if "planted_occurrences" in row:
                lang = key.split("/")[0]
                question_lang = row["questions"].rsplit("_", 1)[1]
                assert row["planted_occurrences"] == sum(q["counts"][question_lang] for q in truth["questions"][lang])
                assert f"| {row['occurrences']} |" in report_md
    # packing audits: one per run, guarantees as required, and what an audit could not check
    packing = sections["packing"]
    assert len(packing["runs"]) == 4 and packing["colocation_ok"] and packing["equal_hashes"]
    audits = {}
    for run in packing["runs"]:
        audit = audits[run["run"]] = json.loads((out / "cpt" / run["run"] / "packing_audit.json").read_text("utf-8"))
        assert run["pairs_co_located"] == audit["pairs"]["co_located"]
        assert audit["hashes"]["tokens_multiset_sha256"][:12] in report_md
        assert run["guarantees_hold"] == audit["guarantees_hold"] and run["unchecked"] == audit["unchecked"]
    assert packing["guarantees_hold"] == all(a["guarantees_hold"] for a in audits.values())
    assert packing["unchecked"] == {name: a["unchecked"] for name, a in audits.items() if a["unchecked"]}
    # per model and question file: the tie rate and both tie rules at the final checkpoint, mean over seeds
    # (accuracy.json)
    assert set(sections["questions"]) == {"mn/native", "mn/anchors"}
    for key, shown in sections["questions"].items():
        variant = key.split("/")[1]
        settings = ["bridges", "no_bridges", "mismatched_bridges"] if variant == "native" else ["no_bridges"]
        assert {(e["model"], e["questions"]) for e in shown["final"]} == {
            (model, stem) for model in ["base", *settings] for stem in ("mn-culture-cloze_en", "mn-culture-cloze_mn")
        }
        for entry in shown["final"]:
            if entry["model"] == "base":
                dirs = [out / "base_eval" / f"mn-{variant}"]
            else:
                dirs = [out / "cpt" / f"mn-{variant}-{entry['model']}-s0" / "eval"]
            finals = [json.loads((d / "accuracy.json").read_text())["checkpoints"][-1]["accuracy"] for d in dirs]
            finals = [f[entry["questions"]] for f in finals]
            assert entry["seeds"] == len(dirs)
            for shown_key, source_key in (("tie_rate", "tie_rate"), ("accuracy_first", "accuracy"),
                                          ("accuracy_fractional", "accuracy_fractional")):  # fmt: skip
                assert entry[shown_key] == pytest.approx(sum(f[source_key] for f in finals) / len(finals))
    # the transfer table names its tie rule; both rules are shown where they differ
    for group in sections["transfer"].values():
        transfer = json.loads(Path(group["transfer_json"]).read_text(encoding="utf-8"))
        assert transfer["tie_policy"] == "first"
        for entry in (d for lang in transfer["languages"] for d in lang["directions"]):
            assert set(entry["tie_policies"]) == {"first", "fractional"}
            if entry["tie_policies_differ"]:
                fractional = entry["tie_policies"]["fractional"]
                assert f"| fractional | {fractional['accuracy_with'][-1]:.3f} | " in report_md
    assert "Tie policy: first (McNemar: first-wins)." in report_md
    # anchors vs control: every tier, both directions, pooled and per setting
    comparisons = sections["anchors"]["mn"]["comparisons"]
    assert {(c["direction"], c["tier"], c["setting"]) for c in comparisons} == {
        (direction, tier, "no_bridges")
        for direction in ("en->mn", "mn->en")
        for tier in ("high", "low", "absent", "en_only")
    }
    for c in comparisons:
        assert (
            f"{_formatted(c['difference'])} [{_formatted(c['difference_ci'][0])}, {_formatted(c['difference_ci'][1])}]"
            in report_md
        )
    assert [len(v) for v in sections["diagnostic"].values()] == [3, 1]  # native: all 3 settings; anchors: without
    # a second invocation finds every step done and only rewrites the report
    again = run_script([sys.executable, "run_study.py", *MICRO_DECOMPOSED, "--output_dir", str(out)], timeout=300)
    assert "already done" in again.stdout and "start " not in again.stdout


def test_a_decomposed_micro_study_reports_knowledge_skill_mismatched_bridges_and_manipulation_checks(micro_study):
    """The five parts of the decomposition end to end on the micro study: tiers absent and en_only, the
    mismatched-bridges setting, the knowledge/skill split, bridges - mismatched and the manipulation checks."""
    out, _ = micro_study
    report_md = (out / "report.md").read_text(encoding="utf-8")
    sections = json.loads((out / "report.json").read_text(encoding="utf-8"))["sections"]
    # three settings trained on the same documents; the control's partners are all wrong
    audits = {
        setting: json.loads((out / "cpt" / f"mn-native-{setting}-s0" / "packing_audit.json").read_text())
        for setting in ("bridges", "no_bridges", "mismatched_bridges")
    }
    assert len({a["hashes"]["documents_seen_sha256"] for a in audits.values()}) == 1
    assert len({a["hashes"]["tokens_multiset_sha256"] for a in audits.values()}) == 1
    assert [a["pairs"]["co_located_percent"] for a in audits.values()] == [100.0, 0.0, 0.0]
    mismatched = audits["mismatched_bridges"]["mismatched_pairs"]
    assert mismatched["co_located_percent"] == 100.0 and mismatched["with_own_partner"] == 0
    # the transfer analysis: every tier, the knowledge contrast of each direction, bridges - mismatched
    transfer = json.loads((out / "transfer" / "mn-native" / "transfer.json").read_text(encoding="utf-8"))
    directions = {d["direction"]: d for lang in transfer["languages"] for d in lang["directions"]}
    assert set(directions) == {"en->mn", "mn->en"}
    assert directions["en->mn"]["knowledge_transfer"]["never_tier"] == "absent"
    assert directions["mn->en"]["knowledge_transfer"]["never_tier"] == "en_only"
    for d in directions.values():
        assert set(d["tiers"]) == {"high", "low", "absent", "en_only"}
        assert {"bridges_minus_mismatched", "mismatched_minus_none"} <= set(d)
        k = d["knowledge_transfer"]
        assert k["mean_did"] == pytest.approx(d["tiers"]["high"]["mean_gap"] - d["tiers"][k["never_tier"]]["mean_gap"])
    # the manipulation checks: before (base model) and at every checkpoint of every run
    for eval_dir in [out / "base_eval" / "mn-native", *(out / "cpt").glob("mn-native-*/eval")]:
        checks = json.loads((eval_dir / "manipulation_checks.json").read_text(encoding="utf-8"))["checkpoints"]
        steps = [c["step"] for c in json.loads((eval_dir / "accuracy.json").read_text())["checkpoints"]]
        assert [c["step"] for c in checks] == steps
        for entry in checks:
            assert set(entry["name_alignment"]) == set(entry["embedding_match"]) == {"en->mn", "mn->en"}
            assert set(entry["tier_accuracy"]["mn-culture-cloze_mn"]) == {"high", "low", "absent", "en_only"}
    # the report shows each part
    for heading in ("Knowledge or skill?", "#### Mismatched bridges", "## Manipulation checks"):
        assert heading in report_md, heading
    assert set(sections["manipulation_checks"]) == {"mn/native", "mn/anchors"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(run_dir: Path) -> dict[str, str]:
    """Hash of the final model and of every checkpoint's model."""
    found = {p.parent.name: _sha256(p) for p in run_dir.glob("checkpoint-*/model.safetensors")}
    return found | {"final": _sha256(run_dir / "model.safetensors")}


def test_kill_9_of_the_study_and_its_cpt_step_then_the_same_command_gives_the_weights_of_an_uninterrupted_run(
    tmp_path,
):
    out = tmp_path / "study"
    restricted = dict(variants=["anchors"], anchor_settings=["bridges"], seeds=[0], jobs=1)
    command = [
        sys.executable, "run_study.py", "--preset", "micro", "--variants", "anchors", "--anchor_settings", "bridges",
        "--seeds", "0", "--jobs", "1", "--output_dir", str(out),
    ]  # fmt: skip
    args = StudyArguments(preset="micro", output_dir=str(out), **restricted)
    plan = run_study.build_plan(args, run_study.configure(args)[0], out)
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


CORPUS = [
    "the river runs past the old mill and the miller sells bread at the market",
    "a farmer walks to the market with apples and pears in a basket",
    "children play by the river while the baker bakes bread in the morning",
    "the market opens early and closes late when the harvest is good",
] * 30


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
    # --jobs 2 (not part of the plan): the smoke steps are mostly interpreter start-up, so two at a time take ~2/3
    # of the wall time; the same steps run and push as with the paper's one at a time.
    proc = run_script(
        [
            sys.executable, "run_study.py", "--preset", "paper", "--smoke", "--langs", "ko", "bo",
            "--questions_dir", str(questions), "--paper_data", str(paper_data), "--output_dir", str(out),
            "--python", sys.executable, "--hub_org", "smoke-org", "--jobs", "2",
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
    # The pushed run, downloaded into an empty cache and probed, scores as the local one, on the same weights.
    pulled_run, pulled = tmp_path / "pulled-run", tmp_path / "pulled-eval"
    download = "import sys, huggingface_hub; huggingface_hub.snapshot_download(sys.argv[1], local_dir=sys.argv[2])"
    fresh = {"HF_HOME": str(tmp_path / "hf_home_fresh"), "HF_HUB_OFFLINE": "0"}
    run_script([sys.executable, "-c", download, "smoke-org/paper-smoke-cpt-ko-bridges-s0", str(pulled_run)],
               cwd=REPO_ROOT, env_extra=fresh)  # fmt: skip
    run_script(
        [
            sys.executable, "run_eval.py", "--model_name_or_path", str(pulled_run),
            "--questions", str(questions / "ko-culture-cloze_en.json"), str(questions / "ko-culture-cloze_ko.json"),
            "--batch_size", "16", "--dtype", "float32", "--output_dir", str(pulled),
        ],
        cwd=REPO_ROOT,
        env_extra=fresh,
    )  # fmt: skip
    local = json.loads((out / "cpt" / "ko-bridges-s0" / "eval" / "accuracy.json").read_text())
    remote = json.loads((pulled / "accuracy.json").read_text())
    assert [(c["step"], c["weights_sha256"], c["accuracy"]) for c in remote["checkpoints"]] == [
        (c["step"], c["weights_sha256"], c["accuracy"]) for c in local["checkpoints"]
    ]
    assert remote["cpt_setting"] == local["cpt_setting"], "the pushed checkpoints carry their CPT setting"
    assert local_hub.unhandled == [], f"the clients made calls the stand-in does not serve: {local_hub.unhandled}"
