"""run_cpt.py: its refusals, its data and audit (checked by an independent reader of every planned window),
the batch layout of each kernel, the isolation check, the Trainer reading each planned window once, resuming
only the same setting, and the default locations. The end-to-end runs are in tests/e2e/test_run_cpt.py."""

import copy
import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import build_pairs
import packing
import run_cpt
from study_common import InputError
from train_common import SEQUENCE_BOUNDARY_KEYS, check_flash_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EN_WORDS = "the people of tibet drink butter tea and eat tsampa in high valleys near lhasa at new year".split()
BO_SYLLABLES = "བོད་ རིགས་ ཀྱིས་ ཇ་ མར་ འཐུང་ རྩམ་ པ་ ཟ་ ལོ་ གསར་ ལྷ་ ས་ ཡུལ་ ལུང་".split()
FLASH_IMPLEMENTATIONS = ["flash_attention_2", "flash_attention_3", "flash_attention_4", "paged|flash_attention_2",
                         "kernels-community/flash-attn", "kernels-community/vllm-flash-attn3"]  # fmt: skip


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


def small_dataset(folder: Path, tokenizer_dir: Path, n_pairs: int = 12, n_mono: int = 12) -> Path:
    pairs, mono = folder / "pairs.jsonl", folder / "mono.txt"
    folder.mkdir(parents=True, exist_ok=True)
    pairs.write_text("".join(json.dumps({"en": f"Tea number {i} is hot.", "bo": BO_SYLLABLES[i % 15] * (1 + i % 4)},
                                        ensure_ascii=False) + "\n" for i in range(n_pairs)), encoding="utf-8")  # fmt: skip
    mono.write_text("".join("".join(BO_SYLLABLES[(i + j) % 15] for j in range(6)) + "\n" for i in range(n_mono)),
                    encoding="utf-8")  # fmt: skip
    build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs), "--tgt_column", "bo", "--mono_files", str(mono),
                      "--tokenizer_name", str(tokenizer_dir), "--block_size", "64",
                      "--output_dir", str(folder / "data")])  # fmt: skip
    return folder / "data"


def cpt_command(model_dir, data_dir, output_dir, *extra, setting="--bridges") -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_path", str(data_dir), setting, "--block_size", "64",
            "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--save_steps", "1", "--report_to", "none", "--use_cpu", "--seed", "0", *extra]  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------
# An independent checker of planned windows: it re-tokenizes the dataset itself and reads only the
# windows as the model receives them, each token named by its segment, so it shares no code with the packer.
# --------------------------------------------------------------------------------------


def check_windows(windows: list[dict], data_dir: Path, tokenizer_dir: Path, block_size: int, setting: str,
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
    for w, window in enumerate(windows):
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
    return {"windows": len(windows), "pairs": len(pair_windows), "co_located": co_located, "segments": segments,
            "mismatched_documents": len(partners)}  # fmt: skip


def planned(data_dir, tokenizer_dir, block_size=128, per_step=4, max_steps=6, seed=0):
    """The plan of every setting and the run's data, through run_cpt's and packing's own functions."""
    args = run_cpt.CPTArguments(lang="bo", model_name_or_path=str(tokenizer_dir), bridges=True,
                                dataset_path=str(data_dir), block_size=block_size)  # fmt: skip
    raw, folder, stats = run_cpt.load_cpt_dataset(args)
    data = run_cpt.CPTData(folder, stats, run_cpt.tokenize_dataset(raw, AutoTokenizer.from_pretrained(tokenizer_dir),
                                                                   args, seed=seed))  # fmt: skip
    plan = packing.plan_packing(data.units, block_size=block_size, windows_per_step=per_step, seed=seed,
                                max_steps=max_steps)  # fmt: skip
    return plan, data


def model_windows(windows, data, block_size: int, pad_id: int = 1) -> list[dict]:
    """Every planned window as the model receives it (packing.BridgePackingCollator), with ``doc_ids``: the segment
    of each token, ``<pass>:<doc_id>/<side>`` (side en/tgt of a pair, or the piece of a text), None for padding."""
    collator = packing.BridgePackingCollator(block_size, pad_id)
    doc_ids, first_sides = list(data.tokenized["doc_id"]), list(data.tokenized["first_side"])

    def name(segment) -> str:
        side = str(segment.part)
        if data.kinds[segment.key] == "pair":
            first = first_sides[segment.key]
            side = first if segment.part == 0 else {"en": "tgt", "tgt": "en"}[first]
        return f"{segment.data_pass}:{doc_ids[segment.key]}/{side}"

    records = []
    for window in windows:
        batch = collator([collator.window_features(window, data.segment_tokens)])
        owners = [name(s) for document in window for s in document for _ in data.segment_tokens(s)]
        records.append(
            {**{k: v[0].tolist() for k, v in batch.items()}, "doc_ids": owners + [None] * (block_size - len(owners))}
        )
    return records


# --------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------


def test_an_independent_check_of_every_settings_windows_agrees_and_catches_broken_guarantees(cpt_data,
                                                                                               tiny_model_dir):  # fmt: skip
    plan, data = planned(cpt_data, tiny_model_dir, block_size=160)
    windows = {setting: model_windows(p.windows, data, 160) for setting, p in plan.settings.items()}
    results = {setting: check_windows(windows[setting], cpt_data, tiny_model_dir, 160, setting) for setting in windows}
    assert list(results) == ["bridges", "no_bridges", "mismatched_bridges"]
    bridges, no_bridges, mismatched = results.values()
    assert bridges["pairs"] == no_bridges["pairs"] == mismatched["pairs"] > 0
    assert bridges["co_located"] == bridges["pairs"] and no_bridges["co_located"] == mismatched["co_located"] == 0
    assert mismatched["mismatched_documents"] == mismatched["pairs"]  # each first half with another's second half
    assert bridges["segments"] == no_bridges["segments"] == mismatched["segments"]  # the same segments, token for token
    assert bridges["windows"] == no_bridges["windows"] == mismatched["windows"] == plan.steps * 4

    # Broken guarantees are caught: a position that does not restart a document, bridged windows read as
    # no-bridges or mismatched ones and the other way round, a changed token.
    broken = copy.deepcopy(windows["no_bridges"])
    broken[0]["position_ids"][1] += 1
    with pytest.raises(AssertionError):
        check_windows(broken, cpt_data, tiny_model_dir, 160, "no_bridges")
    for setting, read_as in (("bridges", "no_bridges"), ("bridges", "mismatched_bridges"),
                             ("mismatched_bridges", "bridges"), ("mismatched_bridges", "no_bridges")):  # fmt: skip
        with pytest.raises(AssertionError):
            check_windows(windows[setting], cpt_data, tiny_model_dir, 160, read_as)
    broken = copy.deepcopy(windows["bridges"])
    broken[-1]["input_ids"][3] = (broken[-1]["input_ids"][3] + 1) % 50
    with pytest.raises(AssertionError):
        check_windows(broken, cpt_data, tiny_model_dir, 160, "bridges")


def test_pair_order_and_separator_are_the_same_in_both_settings(cpt_data, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw, _, _ = run_cpt.load_cpt_dataset(run_cpt.CPTArguments(lang="bo", model_name_or_path="x",
                                                              dataset_path=str(cpt_data)))  # fmt: skip
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
        with pytest.raises(InputError, match="exactly one of --bridges .*, --no_bridges .* and --mismatched_bridges"):
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
        (["--max_open_windows", "0"], "--max_open_windows must be at least 1, got 0"),
        (["--block_size", "3"], "--block_size must be at least 4, got 3"),
    ],
)
def test_argument_errors_say_what_to_do(cpt_data, tmp_path, extra, message):
    with pytest.raises(InputError, match=message):
        run_cpt.main(["--model_name_or_path", "unused", "--dataset_path", str(cpt_data), "--lang", "bo", "--bridges",
                      "--output_dir", str(tmp_path / "run"), *extra])  # fmt: skip


def test_dataset_errors_name_the_folder(tmp_path, tiny_model_dir):
    args = run_cpt.CPTArguments(lang="bo", model_name_or_path="x", dataset_path=str(tmp_path / "missing"))
    with pytest.raises(InputError, match="missing: no such dataset directory.*build_pairs.py"):
        run_cpt.load_cpt_dataset(args)
    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "plain"))
    args.dataset_path = str(tmp_path / "plain")
    with pytest.raises(InputError, match="not a build_pairs.py dataset .*missing columns"):
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


def test_the_run_checks_document_isolation_on_its_own_model_and_window(cpt_data, tiny_model_dir):
    plan, data = planned(cpt_data, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = run_cpt.check_plan_isolation(model, plan.settings["bridges"].windows, data, run_cpt.CPTCollator(128, 1))
    assert result["checked"] and result["holds"] and result["documents"] >= 2

    class LeakyCollator(run_cpt.CPTCollator):  # positions that never restart: one long sequence
        def __call__(self, features):
            batch = super().__call__(features)
            batch["position_ids"] = torch.arange(self.block_size).expand_as(batch["input_ids"]).clone()
            batch["position_ids"][:, 0] = 0
            return batch

    leaky = run_cpt.check_plan_isolation(model, plan.settings["bridges"].windows, data, LeakyCollator(128, 1))
    assert leaky["checked"] and not leaky["holds"]


def trainer_of_the_run(windows, data, tmp_path, tiny_model_dir, **arguments) -> Trainer:
    """A Trainer as run_cpt.main builds it: the planned windows (PackedWindows) and the run's collator."""
    collator = run_cpt.CPTCollator(128, 1)
    return Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, seed=0,
                                          **arguments),
                   train_dataset=run_cpt.PackedWindows(windows, data, collator), data_collator=collator)  # fmt: skip


def rows(batches) -> Counter:
    """The windows of some padded batches, as token rows."""
    return Counter(tuple(row) for batch in batches for row in batch["input_ids"].tolist())


@pytest.mark.parametrize(("remove_unused_columns", "workers"), [(True, 0), (False, 2)])
def test_one_epoch_of_the_trainers_dataloader_reads_each_planned_window_exactly_once(
    cpt_data, tiny_model_dir, tmp_path, remove_unused_columns, workers
):
    # 6 steps of 4 windows: 2 per micro-batch, 2 micro-batches per step. The features survive the Trainer's
    # column removal and are read in worker processes as well as in the training process.
    plan, data = planned(cpt_data, tiny_model_dir)
    windows = plan.settings["bridges"].windows
    trainer = trainer_of_the_run(windows, data, tmp_path, tiny_model_dir, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, remove_unused_columns=remove_unused_columns,
                                 dataloader_num_workers=workers)  # fmt: skip
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == plan.steps * 2 == 12
    assert all(sorted(batch) == ["input_ids", "labels", "position_ids"] for batch in batches)
    assert all(batch["input_ids"].shape == (2, 128) and (batch["labels"] != -100).any() for batch in batches)
    collator = trainer.data_collator
    assert rows(batches) == rows([collator([collator.window_features(w, data.segment_tokens) for w in windows])])


def test_two_processes_read_the_planned_windows_between_them_each_exactly_once(cpt_data, tiny_model_dir, tmp_path):
    # accelerate shards the Trainer's dataloader over processes; the plan is a whole number of global batches, so
    # no process pads its last batch with windows read elsewhere (even_batches), and none is left out.
    from accelerate.data_loader import prepare_data_loader

    plan, data = planned(cpt_data, tiny_model_dir)
    trainer = trainer_of_the_run(
        plan.settings["bridges"].windows, data, tmp_path, tiny_model_dir, per_device_train_batch_size=2
    )
    config = trainer.accelerator.dataloader_config
    trainer.accelerator.prepare = lambda dataloader: dataloader  # the DataLoader before accelerate shards it
    unsharded = trainer.get_train_dataloader()
    shards = [prepare_data_loader(unsharded, num_processes=2, process_index=rank, even_batches=config.even_batches,
                                  use_seedable_sampler=config.use_seedable_sampler) for rank in (0, 1)]  # fmt: skip
    read = [rows(shard) for shard in shards]
    assert sum(read[0].values()) == sum(read[1].values()) == plan.steps * 4 // 2
    assert read[0] + read[1] == rows(unsharded)


def test_a_mismatched_bridges_run_trains_the_same_documents_with_every_partner_wrong(tiny_model_dir, tmp_path):
    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    run = tmp_path / "run"
    run_cpt.main(cpt_command(tiny_model_dir, data, run, "--lang", "bo", "--save_strategy", "no",
                             setting="--mismatched_bridges"))  # fmt: skip
    audit = read_json(run / "packing_audit.json")
    assert audit["setting"] == "mismatched_bridges" and audit["guarantees_hold"] is True
    assert all(audit["equal_across_settings"].values()) and audit["plan"]["settings"] == list(packing.SETTINGS)
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
    # The run's plan (its geometry: 2 steps of 2 windows of 64), read by the independent checker.
    plan, tokenized = planned(data, tiny_model_dir, block_size=64, per_step=2, max_steps=2)
    checked = check_windows(model_windows(plan.settings["mismatched_bridges"].windows, tokenized, 64), data, tiny_model_dir, 64,
                            "mismatched_bridges")  # fmt: skip
    assert checked["co_located"] == 0 and checked["mismatched_documents"] == checked["pairs"] == pairs
    assert checked["windows"] == audit["windows"] == 4
    assert torch.load(run / "training_args.bin", weights_only=False).run_name == "cpt-bo-mismatched-bridges-seed0"
    card = (run / "README.md").read_text()
    assert "with MISMATCHED bridges" in card and "| setting | mismatched_bridges |" in card
    assert "| planned mismatched partners co-located | 100.0% |" in card
    # The checkpoint of a mismatched run is not resumed as a bridged one.
    with pytest.raises(ValueError, match=r"setting differs \('mismatched_bridges' in the checkpoint vs 'bridges'"):
        run_cpt.check_resume_setting(str(run), {**setting, "setting": "bridges"})


def test_command_line_error_names_the_missing_setting(cpt_data, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr("sys.argv", ["run_cpt.py", "--model_name_or_path", "unused", "--dataset_path", str(cpt_data),
                                     "--lang", "bo", "--output_dir", str(tmp_path / "run")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "run_cpt.py"), run_name="__main__")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "run_cpt.py: error: Give exactly one of --bridges" in error and "Traceback" not in error


# --------------------------------------------------------------------------------------
# 1. No run that measures nothing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["--bridges", "--no_bridges"])
def test_either_setting_refuses_a_dataset_without_pairs_naming_it_and_its_counts(tmp_path, tiny_model_dir, setting):
    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    no_pairs = tmp_path / "no_pairs"  # what build_pairs.py made before it refused inputs that keep nothing
    load_from_disk(str(data)).filter(lambda r: r["kind"] != "pair").save_to_disk(str(no_pairs))
    stats = json.loads((data / "build_stats.json").read_text())
    stats["kept"]["pair"], stats["dropped"]["pair"]["not_in_script"] = 0, 12
    (no_pairs / "build_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=rf"{no_pairs}: no parallel pair to train on .*build_stats\.json: pair read "
                                         r"12, kept 0, dropped \{'not_in_script': 12\}"):  # fmt: skip
        run_cpt.main(cpt_command(tiny_model_dir, no_pairs, tmp_path / "run", "--lang", "bo", setting=setting))
    assert not (tmp_path / "run").exists()


def test_pairs_dropped_for_a_smaller_block_size_are_logged_with_what_to_do_and_stated_in_the_card(tmp_path,
                                                                                                  tiny_model_dir,
                                                                                                  caplog):  # fmt: skip
    import logging

    data = small_dataset(tmp_path / "inputs", tiny_model_dir)  # built for windows of 64 tokens
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="run_cpt"):
        audit = run_cpt.main(cpt_command(tiny_model_dir, data, run, "--lang", "bo", "--block_size", "30",
                                         "--max_steps", "4", "--save_strategy", "no"))  # fmt: skip
    dropped = audit["dataset"]["units_dropped"]["by_reason"]["pair:pair_over_block_size"]
    assert 0 < dropped < 12 and audit["dataset"]["units_dropped"]["count"] == dropped
    note = (f"Dropped before packing, in every setting alike: {dropped} of 12 pair records (longer than --block_size "
            "30: pair_over_block_size). To train on them raise --block_size; for data that matches this window, "
            "rebuild it at this block size (build_pairs.py --block_size 30, which records the drop in "
            "build_stats.json).")  # fmt: skip
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0] == note
    assert audit["dataset"]["units_dropped"]["note"] == note
    assert f"| units dropped before packing | {note} |" in (run / "README.md").read_text()


def test_a_plan_that_sees_no_pair_refuses_to_train_and_its_audit_does_not_hold(tmp_path, tiny_model_dir):
    # Mono texts that each fill most of a 32-token window, and one pair: one window of one step
    # holds the first shuffled unit only, a mono text (seed 0), so no pair is in the plan.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 20:
        text += BO_SYLLABLES[len(text) % 15]
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "mono.txt").write_text((text + "\n") * 20, encoding="utf-8")
    (folder / "pairs.jsonl").write_text(json.dumps({"en": "Tea.", "bo": "ཇ།"}, ensure_ascii=False) + "\n")
    build_pairs.main(["--lang", "bo", "--pairs_files", str(folder / "pairs.jsonl"), "--tgt_column", "bo",
                      "--mono_files", str(folder / "mono.txt"), "--tokenizer_name", str(tiny_model_dir),
                      "--block_size", "32", "--output_dir", str(tmp_path / "data")])  # fmt: skip
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"could not be checked: co-location: no pair is in the planned windows"):
        run_cpt.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tmp_path / "data"),
                      "--lang", "bo", "--bridges", "--block_size", "32", "--output_dir", str(run), "--max_steps", "1",
                      "--per_device_train_batch_size", "1", "--report_to", "none", "--use_cpu", "--seed", "0"])  # fmt: skip
    audit = json.loads((run / "packing_audit.json").read_text())
    assert audit["pairs"]["total"] == 0 and audit["guarantees_hold"] is False
    assert any(item.startswith("co-location") for item in audit["unchecked"])
    assert not (run / "config.json").exists()  # nothing that looks like a trained run


def audits_of_a_real_plan(data_dir, tokenizer_dir):
    plan, data = planned(data_dir, tokenizer_dir, block_size=64, per_step=2, max_steps=2)
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))

    def audit(setting_plan):
        return packing.audit_windows(setting_plan, packing.BridgePackingCollator(64, 0), data.segment_tokens, data.units,
                                     unit_names=data.document_keys.__getitem__, vocab_size=vocab_size)  # fmt: skip

    return plan, data, {name: audit(setting_plan) for name, setting_plan in plan.settings.items()}, audit


HOLDS = {"holds": True, "attn_implementation": "sdpa", "layout": "padded", "compute_dtype": "float32", "device": "cpu",
         "max_logit_diff_packed_vs_alone": 0.0, "max_logit_diff_other_documents_changed": 0.0}  # fmt: skip


def run_audit(audits, setting, isolation=HOLDS) -> dict:
    """The audit of ``setting``'s run as run_cpt builds it: its own figures, the other settings' beside them."""
    others = {name: audit for name, audit in audits.items() if name != setting}
    return {**audits[setting], "setting": setting, "other_settings": others, "document_isolation": isolation}


def test_a_leaking_isolation_check_breaks_the_guarantees_and_an_unchecked_co_location_is_refused(tmp_path,
                                                                                                   tiny_model_dir):  # fmt: skip
    _, _, audits, _ = audits_of_a_real_plan(small_dataset(tmp_path, tiny_model_dir), tiny_model_dir)
    assert list(audits) == list(packing.SETTINGS)
    for setting in audits:  # every guarantee holds: the verdict is recorded and training goes ahead
        audit = {**run_audit(audits, setting), "plan": {"requested_steps": 2, "steps": 2, "steps_trimmed": 0}}
        run_cpt.enforce_guarantees(audit, None)
        assert audit["guarantees_hold"] is True and audit["unchecked"] == []
    leaks = {**HOLDS, "holds": False, "attn_implementation": "flash_attention_2", "layout": "flattened",
             "max_logit_diff_other_documents_changed": 0.5}  # fmt: skip
    audit = run_audit(audits, "bridges", leaks)
    with pytest.raises(RuntimeError, match="Packing audit failed: attention crosses documents with "
                                           "attn_implementation=flash_attention_2 .flattened layout"):  # fmt: skip
        run_cpt.enforce_guarantees(audit, None)
    assert audit["guarantees_hold"] is False and audit["unchecked"] == []
    # No pair in any setting's plan: co-location cannot be checked, and training is refused.
    no_pairs = {b: {**audits[b], "pairs": {**audits[b]["pairs"], "total": 0, "co_located": 0,
                                           "co_located_percent": None, "attending_each_other": 0}} for b in audits}  # fmt: skip
    _, not_checked = packing.plan_guarantees(no_pairs, "bridges")
    assert [item.split(":")[0] for item in not_checked] == ["co-location"] * 3
    audit = run_audit(no_pairs, "bridges")
    with pytest.raises(InputError, match="could not be checked: co-location.*Nothing was trained"):
        run_cpt.enforce_guarantees(audit, None)
    assert audit["guarantees_hold"] is False and audit["unchecked"] == not_checked


def test_mismatched_bridges_are_refused_when_the_derangement_or_the_packing_breaks(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):  # fmt: skip
    data = small_dataset(tmp_path, tiny_model_dir)
    plan, _, audits, audit = audits_of_a_real_plan(data, tiny_model_dir)
    mismatched = audits["mismatched_bridges"]
    assert mismatched["pairs"]["co_located_percent"] == 0.0 and mismatched["pairs"]["total"] > 0
    assert mismatched["mismatched_pairs"] == {
        "planned": mismatched["pairs"]["total"], "co_located": mismatched["pairs"]["total"], "co_located_percent": 100.0,
        "attending_each_other": mismatched["pairs"]["total"], "with_own_partner": 0, "same_language": 0,
        "each_half_once": True}  # fmt: skip
    # The packing breaks: a mismatched pair cut into two documents of its window no longer attends to itself.
    windows = [list(window) for window in plan.settings["mismatched_bridges"].windows]
    w, d = next((w, d) for w, window in enumerate(windows) for d, document in enumerate(window) if len(document) == 2)
    windows[w][d : d + 1] = [(windows[w][d][0],), (windows[w][d][1],)]
    cut = audit(packing.SettingPlan(windows, 0, plan.settings["mismatched_bridges"].partners))
    broken, _ = packing.plan_guarantees({**audits, "mismatched_bridges": cut}, "mismatched_bridges")
    assert broken == [f"the planned mismatched partners are not each one document of another pair's English and "
                      f"target halves in mismatched_bridges (this run): {cut['mismatched_pairs']}"]  # fmt: skip
    assert cut["mismatched_pairs"]["attending_each_other"] == mismatched["pairs"]["total"] - 1
    # The derangement breaks (each pair its own partner): the control is a bridged run, and it is refused,
    # here and in a run, before anything is trained.
    monkeypatch.setattr(packing, "mismatched_partners", lambda cycle: cycle)
    _, _, broken_audits, _ = audits_of_a_real_plan(data, tiny_model_dir)
    broken, _ = packing.plan_guarantees(broken_audits, "bridges")
    assert broken[0] == "100.0% of pairs co-located in mismatched_bridges, expected 0.0%"
    assert "with_own_partner': " + str(mismatched["pairs"]["total"]) in broken[1]
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"Packing audit failed: 100.0% of pairs co-located in mismatched_bridges "
                                           r"\(this run\), expected 0.0%"):  # fmt: skip
        run_cpt.main(cpt_command(tiny_model_dir, data, run, "--lang", "bo", setting="--mismatched_bridges"))
    assert json.loads((run / "packing_audit.json").read_text())["guarantees_hold"] is False
    assert not (run / "config.json").exists()


def test_mismatched_bridges_refuse_data_without_two_pairs_of_each_order_or_with_halves_too_long(tmp_path,
                                                                                                 tiny_model_dir):  # fmt: skip
    units = [packing.PackingUnit(0, (4, 4), True, "en"), packing.PackingUnit(1, (9,), False)]
    plan = packing.plan_packing(units, block_size=16, windows_per_step=1, seed=0, max_steps=2)
    assert list(plan.settings) == ["bridges", "no_bridges"]
    assert (
        plan.mismatched_unavailable == "only one of the pairs with en first: it has no other pair to be mismatched with"
    )
    two_orders = [*units, packing.PackingUnit(2, (4, 4), True, "en"), packing.PackingUnit(3, (4, 4), True, "tgt")]
    assert packing.mismatched_unavailable(two_orders, 16).startswith("only one of the pairs with tgt first")
    long_halves = [packing.PackingUnit(0, (9, 3), True), packing.PackingUnit(1, (3, 9), True)]
    assert packing.mismatched_unavailable(long_halves, 16) == (
        "the longest first half (9 tokens) and the longest second half (9) of the pairs would not fit one window "
        "of 16 tokens together")  # fmt: skip
    assert packing.mismatched_unavailable(long_halves, 18) is None
    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    one_pair = tmp_path / "one_pair"
    dataset = load_from_disk(str(data))
    first_pair = dataset["kind"].index("pair")
    dataset.filter(lambda r, i: r["kind"] != "pair" or i == first_pair, with_indices=True).save_to_disk(str(one_pair))
    with pytest.raises(InputError, match=rf"--mismatched_bridges cannot run on {one_pair}: only one of the pairs "
                                         r"with en first: .* add pairs"):  # fmt: skip
        run_cpt.main(cpt_command(tiny_model_dir, one_pair, tmp_path / "run", "--lang", "bo",
                                 setting="--mismatched_bridges"))  # fmt: skip
    assert not (tmp_path / "run").exists()
    # the other settings train on such data, and their audit says why the control was not planned
    audit = run_cpt.main(cpt_command(tiny_model_dir, one_pair, tmp_path / "bridged", "--lang", "bo"))
    assert audit["plan"]["settings"] == ["bridges", "no_bridges"]
    assert audit["plan"]["mismatched_bridges_unavailable"].startswith("only one of the pairs with en first")


def test_isolation_is_checked_on_a_window_built_from_the_plan_when_no_planned_window_holds_two(tmp_path,
                                                                                              tiny_model_dir):  # fmt: skip
    plan, data, _, _ = audits_of_a_real_plan(small_dataset(tmp_path, tiny_model_dir), tiny_model_dir)
    one_per_window = [[document] for window in plan.settings["bridges"].windows for document in window]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = run_cpt.check_plan_isolation(model, one_per_window, data, run_cpt.CPTCollator(64, 1))
    assert result["checked"] and result["holds"] and result["documents"] >= 3 and result["windows_in_batch"] == 2
    assert result["window"] == "a window built from the plan's shortest documents, and a planned window"

    class LeakyCollator(run_cpt.CPTCollator):  # positions that never restart: documents attend
        def __call__(self, features):
            batch = super().__call__(features)
            batch["position_ids"] = torch.arange(self.block_size).expand_as(batch["input_ids"]).clone()
            return batch

    leaky = run_cpt.check_plan_isolation(model, one_per_window, data, LeakyCollator(64, 1))
    assert leaky["checked"] and not leaky["holds"]


# --------------------------------------------------------------------------------------
# 2. Resume only what this run would train: the same base model, the same data by content
# --------------------------------------------------------------------------------------


def test_base_model_identity_hashes_weights_and_config_by_content(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "copy"  # noqa: F811  (a folder, not the module)
    shutil.copytree(tiny_model_dir, copy)
    identity = run_cpt.base_model_identity(str(tiny_model_dir))
    assert run_cpt.base_model_identity(str(copy)) == identity  # the same model elsewhere
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    changed = run_cpt.base_model_identity(str(copy))
    assert changed["base_model_weights_sha256"] == identity["base_model_weights_sha256"]
    assert changed["base_model_config_sha256"] != identity["base_model_config_sha256"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: a safetensors header (dtypes, shapes, offsets) would not see it
    weights.write_bytes(bytes(data))
    assert run_cpt.base_model_identity(str(copy))["base_model_weights_sha256"] != identity["base_model_weights_sha256"]


# --------------------------------------------------------------------------------------
# 3. --lang is the dataset's
# --------------------------------------------------------------------------------------


def test_lang_defaults_to_the_datasets_and_a_mismatch_or_no_language_is_refused(tmp_path, tiny_model_dir):
    import shutil

    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    with pytest.raises(InputError, match=r"--lang ko but the dataset is 'bo' \(\S*build_stats\.json\)"):
        run_cpt.main(cpt_command(tiny_model_dir, data, tmp_path / "ko", "--lang", "ko"))
    assert not (tmp_path / "ko").exists()
    no_stats = tmp_path / "no_stats"
    shutil.copytree(data, no_stats)
    (no_stats / "build_stats.json").unlink()
    with pytest.raises(InputError, match=r"no_stats/build_stats\.json: no such file or no 'lang' in it, and no --lang"):
        run_cpt.main(cpt_command(tiny_model_dir, no_stats, tmp_path / "unknown"))
    run = tmp_path / "default"
    run_cpt.main(cpt_command(tiny_model_dir, data, run, "--max_steps", "1"))
    assert json.loads((run / "config.json").read_text())["cpt_setting"]["lang"] == "bo"
    assert torch.load(run / "training_args.bin", weights_only=False).run_name == "cpt-bo-bridges-seed0"


def test_run_cpt_reads_the_default_base_model_and_dataset_and_says_what_to_run_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="No dataset: give --lang LANG to read build_pairs.py's default output"):
        run_cpt.parse_args(["--bridges"])
    with pytest.raises(InputError, match=r"runs/data-bo: no CPT dataset here \(the default --dataset_path for "
                                                r"--lang bo\). Run build_pairs.py --lang bo first"):  # fmt: skip
        run_cpt.parse_args(["--lang", "bo", "--bridges"])
    (tmp_path / "runs" / "data-bo").mkdir(parents=True)
    with pytest.raises(InputError, match=r"runs/pretrain: no base model here \(the default "
                                                r"--model_name_or_path\). Run run_pretrain.py first or pass"):  # fmt: skip
        run_cpt.parse_args(["--lang", "bo", "--bridges"])
    (tmp_path / "runs" / "pretrain").mkdir()
    cpt_args, _ = run_cpt.parse_args(["--lang", "bo", "--bridges"])
    assert (cpt_args.model_name_or_path, cpt_args.dataset_path) == ("runs/pretrain", "runs/data-bo")
    given, _ = run_cpt.parse_args(["--lang", "bo", "--bridges", "--model_name_or_path", "elsewhere",
                                   "--dataset_path", "data"])  # fmt: skip
    assert (given.model_name_or_path, given.dataset_path) == ("elsewhere", "data")


# --------------------------------------------------------------------------------------
# The run's collator gives each kernel its layout, and the isolation check runs on the run's own kernel and layout
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpt_plan(tmp_path_factory, tiny_model_dir):
    """A real plan of the three settings (windows of 64 tokens, 2 per step, 2 steps) and its data."""
    folder = small_dataset(tmp_path_factory.mktemp("cpt_layout"), tiny_model_dir)
    plan, data = planned(folder, tiny_model_dir, block_size=64, per_step=2, max_steps=2)
    return {"plan": plan, "data": data, "folder": folder}


def cpt_features(cpt_plan, setting="bridges", n_windows=3):
    collator = packing.BridgePackingCollator(64, 1)
    windows = cpt_plan["plan"].settings[setting].windows[:n_windows]
    return [collator.window_features(window, cpt_plan["data"].segment_tokens) for window in windows]


@pytest.mark.parametrize("setting", ["bridges", "no_bridges", "mismatched_bridges"])
@pytest.mark.parametrize("attn_implementation", [*FLASH_IMPLEMENTATIONS, "some-org/unknown-kernel"])
def test_the_cpt_collator_gives_flash_kernels_one_row_with_the_windows_of_the_padded_rows(
    cpt_plan, attn_implementation, setting
):
    features = cpt_features(cpt_plan, setting)
    padded = run_cpt.CPTCollator(64, 1, attn_implementation="sdpa")(features)
    flat = run_cpt.CPTCollator(64, 1, attn_implementation=attn_implementation)(features)
    assert set(padded) == {"input_ids", "position_ids", "labels"} and padded["input_ids"].shape == (3, 64)
    assert flat["input_ids"].shape == flat["position_ids"].shape == flat["labels"].shape == (1, 3 * 64)
    assert "attention_mask" not in flat and all(flat[key] is not None for key in SEQUENCE_BOUNDARY_KEYS)
    check_flash_batch(flat, attn_implementation)
    # the same windows, tokens, positions and labels, window after window
    for key in ("input_ids", "position_ids", "labels"):
        assert flat[key][0].tolist() == padded[key].reshape(-1).tolist()
    # sequences: every document of the plan, then each window's padding, at its offset in the row
    expected = []
    for w, feature in enumerate(features):
        starts = [i for i, p in enumerate(feature["position_ids"]) if p == 0]
        expected += [w * 64 + s for s in starts] + (
            [w * 64 + len(feature["input_ids"])] * (len(feature["input_ids"]) < 64)
        )
    assert flat["cu_seq_lens_q"].tolist() == expected + [3 * 64]
    assert ((flat["labels"][0] == -100) | (flat["position_ids"][0] != 0)).all()  # each sequence opens unpredicted


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "flex_attention"])
def test_the_cpt_collator_keeps_one_padded_row_per_window_for_kernels_that_mask_from_position_ids(
    cpt_plan, attn_implementation
):
    batch = run_cpt.CPTCollator(64, 1, attn_implementation=attn_implementation)(cpt_features(cpt_plan))
    assert set(batch) == {"input_ids", "position_ids", "labels"} and batch["input_ids"].shape == (3, 64)


def test_the_cpt_audit_counts_exactly_the_tokens_and_targets_that_every_layout_feeds(cpt_plan, tiny_model_dir):
    # The audit's multiset hashes count exactly the tokens and loss targets that the padded and the flattened
    # (flash) batches of all planned windows carry.
    import hashlib

    import numpy as np

    plan, data = cpt_plan["plan"], cpt_plan["data"]
    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert list(plan.settings) == ["bridges", "no_bridges", "mismatched_bridges"]

    def sha(tokens: torch.Tensor) -> str:
        return hashlib.sha256(np.bincount(tokens.numpy(), minlength=vocab).astype(np.int64).tobytes()).hexdigest()

    for setting_plan in plan.settings.values():
        audit = packing.audit_windows(setting_plan, packing.BridgePackingCollator(64, 1),
                                      data.segment_tokens, data.units, unit_names=data.document_keys.__getitem__,
                                      vocab_size=vocab)  # fmt: skip
        features = [packing.BridgePackingCollator(64, 1).window_features(w, data.segment_tokens)
                    for w in setting_plan.windows]  # fmt: skip
        for kernel in ("sdpa", "flash_attention_2"):
            batch = run_cpt.CPTCollator(64, 1, attn_implementation=kernel)(features)
            ids, labels = batch["input_ids"].reshape(-1, 64), batch["labels"].reshape(-1)
            real = torch.cat([ids[w, : len(feature["input_ids"])] for w, feature in enumerate(features)])
            targets = labels[labels != -100]
            assert audit["hashes"]["tokens_multiset_sha256"] == sha(real)
            assert audit["hashes"]["targets_multiset_sha256"] == sha(targets)
            assert audit["target_tokens"] == len(targets) and audit["real_tokens"] == len(real)


def test_one_flattened_cpt_row_gives_each_document_the_logits_of_the_padded_layout_with_sdpa(cpt_plan, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    features = cpt_features(cpt_plan)
    logits = {}
    for name, kernel in (("padded", "sdpa"), ("flattened", "flash_attention_2")):
        batch = run_cpt.CPTCollator(64, 1, attn_implementation=kernel)(features)
        batch.pop("labels")
        with torch.no_grad():
            out = model(**batch, use_cache=False).logits
        logits[name] = out.reshape(-1, out.shape[-1])
    assert logits["flattened"].shape == logits["padded"].shape == (3 * 64, model.config.vocab_size)
    assert (logits["flattened"] - logits["padded"]).abs().max() < 1e-5
    # per document: the last document of the first window, alone, gives the same logits
    positions = features[0]["position_ids"]
    start = max(i for i, p in enumerate(positions) if p == 0)
    alone = run_cpt.CPTCollator(64, 1)([{key: feature[start:] for key, feature in features[0].items()}])
    with torch.no_grad():
        alone_logits = model(input_ids=alone["input_ids"], position_ids=alone["position_ids"]).logits[0]
    end = len(positions)
    assert (logits["flattened"][start:end] - alone_logits[: end - start]).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kernel, holds", [("sdpa", True), ("eager", True), ("varlen_reference", True), ("causal_across_documents", False)]
)
def test_the_cpt_isolation_check_runs_two_windows_in_the_kernels_layout_and_refuses_a_leaking_kernel(
    cpt_plan, tiny_model_dir, kernel, holds
):
    # varlen_reference (a CPU stand-in for a flash varlen kernel, reading only cu_seq_lens) and
    # causal_across_documents (a kernel that ignores boundaries, as flash does with B rows) come from
    # tests/test_run_pretrain.py; both get the flattened layout, as every kernel outside sdpa/eager/flex does.
    import test_run_pretrain  # noqa: F401  (registers the two kernels)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = kernel
    collator = run_cpt.CPTCollator(64, 1, attn_implementation=kernel)
    plan = cpt_plan["plan"]
    result = run_cpt.check_plan_isolation(model, plan.settings["bridges"].windows, cpt_plan["data"], collator)
    assert result["windows_in_batch"] == 2 and result["documents"] >= 3
    assert result["layout"] == ("padded" if kernel in ("sdpa", "eager") else "flattened")
    assert result["holds"] is holds
    if holds:
        assert (
            result["max_logit_diff_other_documents_changed"] < 1e-6 and result["max_logit_diff_packed_vs_alone"] < 1e-5
        )
    else:
        assert result["max_logit_diff_other_documents_changed"] > 1e-3
        audit = run_audit(audits_of_a_real_plan(cpt_plan["folder"], tiny_model_dir)[2], "bridges", isolation=result)
        with pytest.raises(RuntimeError, match="attention crosses documents with attn_implementation=causal_across"):
            run_cpt.enforce_guarantees(audit, None)


def test_the_cpt_isolation_check_sees_a_leak_across_windows_of_one_document_each(cpt_plan, tiny_model_dir):
    # Windows of one document each: in one flattened row they are still two documents side by side.
    import test_run_pretrain  # noqa: F401

    one_per_window = [[document] for window in cpt_plan["plan"].settings["no_bridges"].windows for document in window]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = "causal_across_documents"
    collator = run_cpt.CPTCollator(64, 1, attn_implementation="causal_across_documents")
    result = run_cpt.check_plan_isolation(model, one_per_window, cpt_plan["data"], collator)
    assert result["windows_in_batch"] == 2 and result["holds"] is False


@pytest.mark.parametrize("kernel", ["flex_attention", "flash_attention_2", "kernels-community/flash-attn"])
def test_run_cpt_refuses_flex_and_flash_on_the_cpu_before_anything_is_written(cpt_plan, tiny_model_dir, tmp_path,
                                                                              kernel):  # fmt: skip
    folder = cpt_plan["folder"]
    before = sorted(p.name for p in folder.iterdir())
    run = tmp_path / "run"
    with pytest.raises(InputError, match=rf"--attn_implementation {kernel} does not train on the CPU.*Nothing was"):
        run_cpt.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(folder), "--lang", "bo",
                      "--bridges", "--block_size", "64", "--output_dir", str(run), "--max_steps", "1",
                      "--report_to", "none", "--use_cpu", "--attn_implementation", kernel])  # fmt: skip
    assert not run.exists() and sorted(p.name for p in folder.iterdir()) == before


def test_a_plan_trimmed_so_that_every_setting_fills_its_steps_is_reported_and_warned(tiny_model_dir, tmp_path,
                                                                                    caplog):  # fmt: skip
    # packing's test_plan_trims_steps_only_when_the_data_cannot_fill_them, through run_cpt.py (segments of
    # 1 + 6 and 1 + 8 tokens in 16-token windows): the audit reports the trim, the run warns and trains 2 steps.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def texts_of_exactly(words: list[str], n_tokens: int, count: int = 10) -> list[str]:
        found = []
        for first in words:
            for second in words:
                text = f"{first} {second}" if first.isascii() else first + second
                if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens and text not in found:
                    found.append(text)
        assert len(found) >= count
        return found[:count]

    english = texts_of_exactly("tea is hot the people drink butter eat tsampa in valleys".split(), 6)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"en": e, "bo": b}, ensure_ascii=False) + "\n"
                             for e, b in zip(english, texts_of_exactly(BO_SYLLABLES, 8))))  # fmt: skip
    build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs), "--tokenizer_name", str(tiny_model_dir),
                      "--block_size", "16", "--output_dir", str(tmp_path / "data")])  # fmt: skip
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="run_cpt"):
        run_cpt.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tmp_path / "data"),
                      "--bridges", "--block_size", "16", "--output_dir", str(run), "--max_steps", "3",
                      "--per_device_train_batch_size", "1", "--save_strategy", "no", "--report_to", "none",
                      "--use_cpu"])  # fmt: skip
    audit = read_json(run / "packing_audit.json")
    assert (audit["plan"]["requested_steps"], audit["plan"]["steps"], audit["plan"]["steps_trimmed"]) == (3, 2, 1)
    assert audit["cpt_setting"]["steps"] == 2 and audit["guarantees_hold"] is True
    assert "Trained steps trimmed from 3 to 2 so that the settings see the same documents." in caplog.text
    assert read_json(run / "trainer_state.json")["global_step"] == 2


def test_the_training_speed_bench_rotates_its_arms_so_each_runs_once_in_every_position():
    from bench.bench_cpt_train import ARMS, round_order

    rounds = [round_order(r) for r in range(len(ARMS))]
    assert all(sorted(order) == sorted(ARMS) for order in rounds)
    for position in range(len(ARMS)):
        assert Counter(order[position] for order in rounds) == Counter(ARMS)  # each arm first, middle and last once
    assert round_order(0) != round_order(1)  # two rounds (the default) already differ
    assert round_order(len(ARMS)) == round_order(0)
