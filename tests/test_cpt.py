"""run_cpt.py end to end: the command contract, an independent check of --dump_packing, Hub in and
out, exact resume, two CPU processes, and the errors a user can make."""

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_script
from datasets import load_from_disk
from transformers import AutoTokenizer

import build_pairs
import run_cpt

# One thread per process: on a shared 2-core machine two torch threads per process collapse under
# contention, and the tests measure behaviour, not speed.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

EN_WORDS = "the people of tibet drink butter tea and eat tsampa in high valleys near lhasa at new year".split()
BO_SYLLABLES = "བོད་ རིགས་ ཀྱིས་ ཇ་ མར་ འཐུང་ རྩམ་ པ་ ཟ་ ལོ་ གསར་ ལྷ་ ས་ ཡུལ་ ལུང་".split()


def write_cpt_inputs(folder: Path, n_pairs: int = 60, n_mono: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """Pairs of varied lengths (a few too long for a 128-token window) and mono texts (some longer)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs, mono = folder / "pairs.jsonl", folder / "mono.txt"
    with pairs.open("w", encoding="utf-8") as handle:
        for _ in range(n_pairs):
            en = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(3, 15))).capitalize() + "."
            bo = "".join(rng.choice(BO_SYLLABLES) for _ in range(rng.randint(3, 15))) + "།"
            handle.write(json.dumps({"en": en, "bo": bo}, ensure_ascii=False) + "\n")
    mono.write_text(
        "".join("".join(rng.choice(BO_SYLLABLES) for _ in range(rng.choice([5, 20, 60, 150]))) + "།\n"
                for _ in range(n_mono)),
        encoding="utf-8",
    )  # fmt: skip
    return pairs, mono


@pytest.fixture(scope="module")
def cpt_data(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("cpt_data")
    pairs, mono = write_cpt_inputs(folder)
    output = folder / "data"
    build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs), "--tgt_column", "bo", "--mono_files", str(mono),
                      "--tokenizer_name", str(tiny_model_dir), "--block_size", "128", "--output_dir", str(output)])  # fmt: skip
    return output


# --------------------------------------------------------------------------------------
# An independent checker of --dump_packing: it re-tokenizes the dataset itself and reads only
# the dump, so it shares no code with the packer.
# --------------------------------------------------------------------------------------


def check_dump(dump: Path, data_dir: Path, tokenizer_dir: Path, block_size: int, setting: str,
               first_side: str = "en", separator: str = "") -> dict:  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    records = {r["doc_id"]: r for r in load_from_disk(str(data_dir))}

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def expected(doc_id, part):
        record = records[doc_id]
        if record["kind"] == "pair":
            return [start] + encode(record[part]) + (separator_ids if part == first_side else [])
        ids, piece = encode(record["text"]), block_size - 1
        return [start] + ids[int(part) * piece : (int(part) + 1) * piece]

    occurrences, pair_windows, segments, partners = Counter(), {}, Counter(), Counter()
    lines = dump.read_text(encoding="utf-8").splitlines()
    for w, line in enumerate(lines):
        window = json.loads(line)
        ids, positions, labels, owners = (window[k] for k in ("input_ids", "position_ids", "labels", "doc_ids"))
        assert len(ids) == len(positions) == len(labels) == len(owners) == block_size, "window size"
        real = sum(owner is not None for owner in owners)
        assert all(owner is None for owner in owners[real:]), "padding only at the end"
        assert ids[real:] == [pad] * (block_size - real) and labels[real:] == [-100] * (block_size - real)
        assert positions[real:] == list(range(block_size - real)), "padding positions restart at 0"
        runs = []  # [segment id, start, end]
        for i in range(real):
            if i and owners[i] == owners[i - 1]:
                runs[-1][2] = i + 1
            else:
                runs.append([owners[i], i, i + 1])
        for r, (segment, a, b) in enumerate(runs):
            occurrences[segment] += 1
            data_pass, name = segment.split(":", 1)
            doc_id, part = name.rsplit("/", 1)
            assert ids[a:b] == expected(doc_id, part), f"tokens of {segment}"
            segments[(doc_id, part, tuple(ids[a:b]))] += 1
            assert labels[a] == -100 and labels[a + 1 : b] == ids[a + 1 : b], f"labels of {segment}"
            is_pair = records[doc_id]["kind"] == "pair"
            if is_pair:
                pair_windows.setdefault((data_pass, doc_id), {})[part] = w
            if setting != "no_bridges" and is_pair and part != first_side:
                previous = runs[r - 1][0] if r else ""
                partner = previous.rsplit("/", 1)[0]
                assert previous.endswith(f"/{first_side}") and records[partner.split(":", 1)[1]]["kind"] == "pair"
                if setting == "bridges":
                    assert partner == f"{data_pass}:{doc_id}", "bridged pair split"
                else:  # mismatched: the first half of another pair of the same pass
                    assert partner != f"{data_pass}:{doc_id}" and partner.split(":")[0] == data_pass, "own partner"
                    partners[partner] += 1
                assert positions[a:b] == list(range(positions[a - 1] + 1, positions[a - 1] + 1 + b - a)), (
                    "the second half of a pair document must continue its document's positions"
                )
            else:
                assert positions[a:b] == list(range(b - a)), f"{segment} must start its own document"
    assert all(count == 1 for count in occurrences.values()), "a segment appears twice in one pass"
    for halves in pair_windows.values():
        assert set(halves) == {"en", "tgt"}, "a pair lost a half"
    co_located = sum(1 for halves in pair_windows.values() if halves["en"] == halves["tgt"])
    assert all(count == 1 for count in partners.values()), "a first half with two second halves"
    return {"windows": len(lines), "pairs": len(pair_windows), "co_located": co_located, "segments": segments,
            "mismatched_documents": len(partners)}  # fmt: skip


def plan_and_dump(data_dir, tokenizer_dir, folder, block_size=128, per_step=4, max_steps=6):
    """Plan and dump every planned setting in this process, through run_cpt's own functions."""
    args = run_cpt.CPTArguments(lang="bo", model_name_or_path=str(tokenizer_dir), bridges=True,
                                dataset_path=str(data_dir), block_size=block_size)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw, _ = run_cpt.load_cpt_dataset(args)
    tokenized = run_cpt.tokenize_dataset(raw, tokenizer, args, seed=0)
    store = run_cpt.SegmentStore(tokenized)
    units = run_cpt.packing_units(tokenized, store)
    plan = run_cpt.plan_packing(units, block_size=block_size, windows_per_step=per_step, seed=0,
                                              max_steps=max_steps)  # fmt: skip
    names = run_cpt.segment_namer(tokenized["kind"], tokenized["doc_id"], tokenized["first_side"])
    dumps = {}
    for setting, planned in plan.settings.items():
        collator = run_cpt.BridgePackingCollator(block_size, tokenizer.pad_token_id)
        dumps[setting] = Path(folder) / f"{setting}.jsonl"
        run_cpt.write_dump(dumps[setting], planned.windows, store, collator, names)
    return plan, dumps, store


# --------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------


def test_independent_check_of_every_dump_agrees_and_catches_broken_guarantees(cpt_data, tiny_model_dir, tmp_path):
    plan, dumps, _ = plan_and_dump(cpt_data, tiny_model_dir, tmp_path, block_size=160)
    results = {setting: check_dump(dumps[setting], cpt_data, tiny_model_dir, 160, setting) for setting in dumps}
    assert list(results) == ["bridges", "no_bridges", "mismatched_bridges"]
    bridges, no_bridges, mismatched = results.values()
    assert bridges["pairs"] == no_bridges["pairs"] == mismatched["pairs"] > 0
    assert bridges["co_located"] == bridges["pairs"] and no_bridges["co_located"] == mismatched["co_located"] == 0
    assert mismatched["mismatched_documents"] == mismatched["pairs"]  # each first half with another's second half
    assert bridges["segments"] == no_bridges["segments"] == mismatched["segments"]  # the same segments, token for token
    assert bridges["windows"] == no_bridges["windows"] == mismatched["windows"] == plan.steps * 4

    # Broken guarantees are caught: a position that does not restart a document, a bridged dump
    # read as a no-bridges or a mismatched one and the other way round, a changed token.
    lines = [json.loads(line) for line in dumps["no_bridges"].read_text().splitlines()]
    broken = dumps["no_bridges"].with_name("broken.jsonl")
    lines[0]["position_ids"][1] += 1  # a position that no longer restarts a document correctly
    broken.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(AssertionError):
        check_dump(broken, cpt_data, tiny_model_dir, 160, "no_bridges")
    # A bridges dump read as no-bridges fails (its second halves continue the first's positions).
    for dump, read_as in (("bridges", "no_bridges"), ("bridges", "mismatched_bridges"),
                          ("mismatched_bridges", "bridges"), ("mismatched_bridges", "no_bridges")):  # fmt: skip
        with pytest.raises(AssertionError):
            check_dump(dumps[dump], cpt_data, tiny_model_dir, 160, read_as)
    # A token changed anywhere is caught.
    lines = [json.loads(line) for line in dumps["bridges"].read_text().splitlines()]
    lines[-1]["input_ids"][3] = (lines[-1]["input_ids"][3] + 1) % 50
    broken.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(AssertionError):
        check_dump(broken, cpt_data, tiny_model_dir, 160, "bridges")


def test_pair_order_and_separator_are_the_same_in_both_settings(cpt_data, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw, _ = run_cpt.load_cpt_dataset(
        run_cpt.CPTArguments(lang="bo", model_name_or_path="x", dataset_path=str(cpt_data))
    )
    pair = next(r for r in raw if r["kind"] == "pair")
    batch = {k: [pair[k]] for k in raw.column_names}
    start = tokenizer.eos_token_id
    en, bo, sep = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (pair["en"], pair["tgt"], " = "))
    tgt_first = run_cpt.tokenize_units(batch, tokenizer, start, 128, "tgt_first", sep, seed=0)
    assert tgt_first["segments"][0] == [[start] + bo + sep, [start] + en] and tgt_first["first_side"] == ["tgt"]
    sides = Counter(run_cpt.pair_first_side(i, "random", seed=3) for i in range(200))
    assert 70 < sides["en"] < 130
    assert [run_cpt.pair_first_side(i, "random", 3) for i in range(20)] == [
        run_cpt.pair_first_side(i, "random", 3) for i in range(20)
    ]


def test_exactly_one_of_the_three_settings_must_be_given_explicitly(cpt_data, tmp_path):
    base = ["--model_name_or_path", "unused", "--dataset_path", str(cpt_data), "--lang", "bo", "--output_dir",
            str(tmp_path / "run")]  # fmt: skip
    for flags in ([], ["--bridges", "--no_bridges"], ["--bridges", "--mismatched_bridges"],
                  ["--no_bridges", "--mismatched_bridges"], ["--bridges", "--no_bridges", "--mismatched_bridges"]):  # fmt: skip
        with pytest.raises(ValueError, match="exactly one of --bridges .*, --no_bridges .* and --mismatched_bridges"):
            run_cpt.main(base + flags)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset_name", "org/data"], "only one of --dataset_path"),
        (["--pair_order", "sideways"], "--pair_order must be en_first, tgt_first or random"),
        (["--auto_find_batch_size"], "--auto_find_batch_size changes the batch size"),
        (["--ignore_data_skip"], "--ignore_data_skip would re-train windows"),
        (["--use_cache", "true"], "--use_cache makes training forwards build a KV cache"),
    ],
)
def test_argument_errors_say_what_to_do(cpt_data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_cpt.main(["--model_name_or_path", "unused", "--dataset_path", str(cpt_data), "--lang", "bo", "--bridges",
                      "--output_dir", str(tmp_path / "run"), *extra])  # fmt: skip


def test_dataset_errors_name_the_folder(tmp_path, tiny_model_dir):
    args = run_cpt.CPTArguments(lang="bo", model_name_or_path="x", dataset_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing: no such dataset directory.*build_pairs.py"):
        run_cpt.load_cpt_dataset(args)
    from datasets import Dataset

    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "plain"))
    args.dataset_path = str(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a build_pairs.py dataset .*missing columns"):
        run_cpt.load_cpt_dataset(args)


def test_resume_refuses_a_checkpoint_of_another_setting(tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    setting = {"lang": "bo", "bridges": True, "steps": 10, "dataset": "/data/cpt-bo", "base_model": "/base",
               "dataset_sha256": "ab" * 32, "documents_seen_sha256": "ab" * 32}  # fmt: skip
    (checkpoint / "config.json").write_text(json.dumps({"cpt_setting": setting}))
    run_cpt.check_resume_setting(str(checkpoint), setting)
    moved = {**setting, "dataset": "org/cpt-bo", "base_model": "org/base"}  # the same data and base elsewhere
    run_cpt.check_resume_setting(str(checkpoint), moved)
    with pytest.raises(ValueError, match=r"documents seen differ \(sha256 abababababab\.\. in the checkpoint vs "
                                         r"cdcdcdcdcdcd\.\. now\)"):  # fmt: skip
        run_cpt.check_resume_setting(str(checkpoint), {**setting, "documents_seen_sha256": "cd" * 32})
    with pytest.raises(ValueError, match=r"does not match this run: bridges differs \(True in the checkpoint vs False"):
        run_cpt.check_resume_setting(str(checkpoint), {**setting, "bridges": False})
    # A checkpoint made before the base model was identified is refused, not assumed to match.
    with pytest.raises(ValueError, match=r"base_model_weights_sha256 differs \(None in the checkpoint"):
        run_cpt.check_resume_setting(str(checkpoint), {**setting, "base_model_weights_sha256": "ef" * 32})


def test_an_output_dir_holding_a_checkpoint_needs_resume_from_checkpoint(cpt_data, tmp_path):
    # The convention of run_pretrain.py too (train_common.resume_checkpoint): never a silent resume.
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"already holds .*checkpoint-3\. Pass --resume_from_checkpoint"):
        run_cpt.main(["--model_name_or_path", "unused", "--dataset_path", str(cpt_data), "--lang", "bo", "--bridges",
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3"]


def test_the_run_checks_document_isolation_on_its_own_model_and_window(cpt_data, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    plan, _, store = plan_and_dump(cpt_data, tiny_model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    collator = run_cpt.BridgePackingCollator(128, 1)
    result = run_cpt.check_plan_isolation(model, plan.bridges.windows, store, collator)
    assert result["checked"] and result["holds"] and result["documents"] >= 2

    class LeakyCollator(run_cpt.BridgePackingCollator):  # positions that never restart: one long sequence
        def __call__(self, features):
            batch = super().__call__(features)
            batch["position_ids"] = torch.arange(self.block_size).expand_as(batch["input_ids"]).clone()
            batch["position_ids"][:, 0] = 0
            return batch

    leaky = run_cpt.check_plan_isolation(model, plan.bridges.windows, store, LeakyCollator(128, 1))
    assert leaky["checked"] and not leaky["holds"]


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_packed_windows_survive_the_trainers_column_removal(cpt_data, tiny_model_dir, tmp_path, remove_unused_columns):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    plan, _, store = plan_and_dump(cpt_data, tiny_model_dir, tmp_path)
    collator = run_cpt.BridgePackingCollator(128, 1)
    dataset = run_cpt.PackedWindows(plan.bridges.windows, store, collator)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=TrainingArguments(
            output_dir=str(tmp_path / "t"),
            per_device_train_batch_size=4,
            report_to="none",
            remove_unused_columns=remove_unused_columns,
            use_cpu=True,
        ),  # fmt: skip
        train_dataset=dataset,
        data_collator=collator,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]
    assert batch["input_ids"].shape == (4, 128)
    assert (batch["labels"] != -100).any()


def test_a_mismatched_bridges_run_trains_the_same_documents_with_every_partner_wrong(tiny_model_dir, tmp_path):
    from test_cpt_refusals import cpt_command, small_dataset

    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    run = tmp_path / "run"
    run_cpt.main(cpt_command(tiny_model_dir, data, run, "--lang", "bo", "--dump_packing", str(run / "windows.jsonl"),
                             "--save_strategy", "no", setting="--mismatched_bridges"))  # fmt: skip
    audit = read_json(run / "packing_audit.json")
    assert audit["setting"] == "mismatched_bridges" and audit["guarantees_hold"] is True
    assert all(audit["equal_across_settings"].values()) and audit["plan"]["settings"] == list(run_cpt.SETTINGS)
    pairs = audit["pairs"]["total"]
    assert pairs > 0 and audit["pairs"]["co_located_percent"] == 0.0  # no pair meets its own partner
    assert audit["mismatched_pairs"] == {"planned": pairs, "co_located": pairs, "co_located_percent": 100.0,
                                         "attending_each_other": pairs, "with_own_partner": 0, "same_language": 0,
                                         "each_half_once": True}  # fmt: skip
    others = audit["other_settings"]
    assert (others["bridges"]["pairs"]["co_located_percent"], others["no_bridges"]["pairs"]["co_located_percent"]) == (
        100.0, 0.0)  # fmt: skip
    assert others["bridges"]["hashes"] == others["no_bridges"]["hashes"] == audit["hashes"]
    assert others["bridges"]["windows"] == audit["windows"] and others["bridges"]["real_tokens"] == audit["real_tokens"]
    setting = read_json(run / "config.json")["cpt_setting"]
    assert setting == audit["cpt_setting"] and (setting["setting"], setting["bridges"]) == ("mismatched_bridges", False)
    dumped = check_dump(run / "windows.jsonl", data, tiny_model_dir, 64, "mismatched_bridges")
    assert dumped["co_located"] == 0 and dumped["mismatched_documents"] == dumped["pairs"] == pairs
    assert torch.load(run / "training_args.bin", weights_only=False).run_name == "cpt-bo-mismatched-bridges-seed0"
    card = (run / "README.md").read_text()
    assert "with MISMATCHED bridges" in card and "| setting | mismatched_bridges |" in card
    assert "| planned mismatched partners co-located | 100.0% |" in card
    # The checkpoint of a mismatched run is not resumed as a bridged one.
    with pytest.raises(ValueError, match=r"setting differs \('mismatched_bridges' in the checkpoint vs 'bridges'"):
        run_cpt.check_resume_setting(str(run), {**setting, "setting": "bridges"})


# --------------------------------------------------------------------------------------
# Slow: real commands
# --------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def assert_audits_agree(audits: dict) -> None:
    """The settings' own audits: 100/0/0, each equal to what the others computed of it."""
    assert audits["bridges"]["pairs"]["co_located_percent"] == 100.0
    assert audits["no_bridges"]["pairs"]["co_located_percent"] == 0.0
    assert audits["bridges"]["pairs"]["attending_each_other"] == audits["bridges"]["pairs"]["total"] > 0
    for setting, audit in audits.items():
        assert audit["setting"] == audit["cpt_setting"]["setting"] == setting
        assert audit["guarantees_hold"] and all(audit["equal_across_settings"].values())
        assert audit["windows_trained"]["each_planned_window_once"] is True
        for other in audits:
            if other != setting:
                assert audit["hashes"] == audits[other]["other_settings"][setting]["hashes"]
                assert audit["real_tokens"] == audits[other]["real_tokens"]
                assert audit["plan"]["units_seen"] == audits[other]["plan"]["units_seen"]
    for key in ("segments_multiset_sha256", "tokens_multiset_sha256", "targets_multiset_sha256",
                "documents_seen_sha256"):  # fmt: skip
        assert len({audit["hashes"][key] for audit in audits.values()}) == 1


@pytest.mark.slow
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
    audits, dumps = {}, {}
    for name in ("bridges", "no_bridges"):
        bridges = name == "bridges"
        run = tmp_path / f"RUN-{name}"
        run_script(["python", "run_cpt.py", "--model_name_or_path", str(base), "--dataset_path", str(data),
                    "--lang", "bo", f"--{name}", "--block_size", "128",
                    "--output_dir", str(run), "--max_steps", "10", "--save_steps", "5",
                    "--per_device_train_batch_size", "4", "--dump_packing", str(run / "windows.jsonl")], env_extra=ONE_THREAD)  # fmt: skip
        audits[name] = read_json(run / "packing_audit.json")
        dumps[name] = check_dump(run / "windows.jsonl", data, base, 128, name)
        assert (run / "checkpoint-5").is_dir() and (run / "checkpoint-10").is_dir()
        setting = read_json(run / "config.json")["cpt_setting"]
        assert setting["bridges"] is bridges and setting["setting"] == name
        assert setting["lang"] == "bo" and setting["block_size"] == 128
        assert read_json(run / "checkpoint-5" / "config.json")["cpt_setting"] == setting
        state = read_json(run / "trainer_state.json")
        assert state["global_step"] == 10
        assert state["stateful_callbacks"]["CPTSettingCallback"]["args"]["cpt_setting"] == setting
        name = f"cpt-bo-{'bridges' if bridges else 'no-bridges'}-seed42"
        assert torch.load(run / "training_args.bin", weights_only=False).run_name == name
        card = (run / "README.md").read_text()
        assert f"| bridges | {bridges} |" in card and "| steps trained | 10 |" in card
    assert_audits_agree(audits)
    assert audits["bridges"]["world_size"] == 1 and audits["bridges"]["plan"]["steps"] == 10
    assert all(audit["document_isolation"]["holds"] for audit in audits.values())
    assert dumps["bridges"]["segments"] == dumps["no_bridges"]["segments"]
    assert dumps["bridges"]["windows"] == dumps["no_bridges"]["windows"] == 40
    assert dumps["bridges"]["co_located"] == dumps["bridges"]["pairs"] == audits["bridges"]["pairs"]["total"]
    assert dumps["no_bridges"]["co_located"] == 0


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


@pytest.mark.slow
def test_build_pairs_push_uploads_parquet_shards_stats_and_card(hub_runs):
    from datasets import load_dataset

    assert hub_runs["pushed_dataset_files"] == ["README.md", "build_stats.json", "data/train-00000-of-00001.parquet"]
    pushed = hub_runs["cache"] / "datasets--tester--cpt-bo" / "snapshots" / ("a" * 40)
    assert (pushed / "README.md").read_text() == (hub_runs["data"] / "README.md").read_text()
    round_trip = load_dataset("parquet", data_files=str(pushed / "data" / "*.parquet"), split="train")
    assert round_trip["doc_id"] == load_from_disk(str(hub_runs["data"]))["doc_id"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_dataset_and_model_from_an_offline_hub_cache_give_the_same_plan(hub_runs):
    local = read_json(hub_runs["straight"] / "packing_audit.json")
    cached = read_json(hub_runs["resumed"] / "packing_audit.json")
    assert cached["cpt_setting"]["dataset"] == "tester/cpt-bo"
    assert cached["cpt_setting"]["lang"] == local["cpt_setting"]["lang"] == "bo"  # from the pushed build_stats.json
    assert cached["hashes"] == local["hashes"] and cached["plan"] == local["plan"]


@pytest.mark.slow
def test_resume_from_the_middle_gives_the_same_losses_as_a_straight_run(hub_runs):
    def losses(run):
        return {e["step"]: e["loss"] for e in read_json(run / "trainer_state.json")["log_history"] if "loss" in e}

    straight, resumed = losses(hub_runs["straight"]), losses(hub_runs["resumed"])
    assert sorted(straight) == [1, 2, 3, 4]
    assert {step: resumed[step] for step in (3, 4)} == {step: straight[step] for step in (3, 4)}
    audit = read_json(hub_runs["resumed"] / "packing_audit.json")["windows_trained"]
    assert audit["resumed_at_step"] == 2 and audit["windows_read"] == audit["expected_windows"] == 8
    assert audit["each_planned_window_once"] is True


@pytest.mark.slow
def test_two_cpu_processes_train_both_settings_on_the_same_plan(tmp_path, tiny_model_dir, cpt_data):
    config = REPO_ROOT / "accelerate_configs" / "cpu.yaml"
    audits = {}
    for setting in ("bridges", "no_bridges"):
        run = tmp_path / setting
        run_script(["accelerate", "launch", "--config_file", str(config), "run_cpt.py", "--model_name_or_path",
                    str(tiny_model_dir), "--dataset_path", str(cpt_data), "--lang", "bo",
                    f"--{setting}", "--block_size", "128", "--output_dir", str(run),
                    "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "3",
                    "--dump_packing", str(run / "windows.jsonl"), "--report_to", "none"],
                   env_extra=ONE_THREAD)  # fmt: skip
        audits[setting] = read_json(run / "packing_audit.json")
        assert audits[setting]["world_size"] == 2 and audits[setting]["windows_per_step"] == 4
        # Both processes together read every planned window exactly once.
        assert audits[setting]["windows_trained"]["windows_read"] == 12
        result = check_dump(run / "windows.jsonl", cpt_data, tiny_model_dir, 128, setting)
        assert result["co_located"] == (result["pairs"] if setting == "bridges" else 0)
        assert read_json(run / "trainer_state.json")["global_step"] == 3
    assert_audits_agree(audits)


def test_command_line_error_names_the_missing_setting(cpt_data, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr("sys.argv", ["run_cpt.py", "--model_name_or_path", "unused", "--dataset_path", str(cpt_data),
                                     "--lang", "bo", "--output_dir", str(tmp_path / "run")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "run_cpt.py"), run_name="__main__")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "run_cpt.py: error: Give exactly one of --bridges" in error and "Traceback" not in error
