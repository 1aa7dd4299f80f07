"""run_cpt.py refuses runs that would measure nothing or reuse stale training: a dataset without
pairs, a guarantee that could not be checked, a checkpoint of another base model or other data, a
--lang that is not the dataset's."""

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

import build_pairs
import run_cpt

BO_SYLLABLES = "བོད་ རིགས་ ཀྱིས་ ཇ་ མར་ འཐུང་ རྩམ་ པ་ ཟ་ ལོ་ གསར་ ལྷ་ ས་ ཡུལ་ ལུང་".split()


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
    args = run_cpt.CPTArguments(lang="bo", model_name_or_path=str(tokenizer_dir), bridges=True,
                                dataset_path=str(data_dir), block_size=64)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw, _ = run_cpt.load_cpt_dataset(args)
    tokenized = run_cpt.tokenize_dataset(raw, tokenizer, args, seed=0)
    store = run_cpt.SegmentStore(tokenized)
    units = run_cpt.packing_units(tokenized, store)
    plan = run_cpt.plan_packing(units, block_size=64, windows_per_step=2, seed=0, max_steps=2)
    pair_rows = {u.key for u in units if u.is_pair}

    def audit(planned):
        return run_cpt.audit_windows(planned.windows, store, run_cpt.BridgePackingCollator(64, 0), pair_rows,
                                     tokenized["doc_id"], len(tokenizer), planned.partners, tokenized["first_side"])  # fmt: skip

    return plan, store, {name: audit(planned) for name, planned in plan.settings.items()}, audit


def judged(audits, setting, equal=None, isolation=None):
    """judge_guarantees of ``setting``'s run, the other settings' audits beside it."""
    isolation = isolation or {"holds": True}
    others = {name: audit for name, audit in audits.items() if name != setting}
    return run_cpt.judge_guarantees(audits[setting], others, equal or {}, isolation, setting, 64)


def test_a_leaking_isolation_check_breaks_the_guarantees_and_an_unchecked_co_location_is_refused(tmp_path,
                                                                                                   tiny_model_dir):  # fmt: skip
    _, _, audits, _ = audits_of_a_real_plan(small_dataset(tmp_path, tiny_model_dir), tiny_model_dir)
    equal = {"tokens_multiset": True}
    holds = {"holds": True, "attn_implementation": "sdpa", "layout": "padded", "compute_dtype": "float32",
             "device": "cpu", "max_logit_diff_packed_vs_alone": 0.0, "max_logit_diff_other_documents_changed": 0.0}  # fmt: skip
    assert list(audits) == list(run_cpt.SETTINGS)
    assert all(judged(audits, setting, equal, holds) == ([], []) for setting in audits)
    leaks = {**holds, "holds": False, "attn_implementation": "flash_attention_2", "layout": "flattened",
             "max_logit_diff_other_documents_changed": 0.5}  # fmt: skip
    broken, _ = judged(audits, "bridges", equal, leaks)
    assert broken and "attention crosses documents with attn_implementation=flash_attention_2" in broken[0]
    # No pair in any setting's plan: co-location cannot be checked, and training is refused.
    no_pairs = {b: {**audits[b], "pairs": {**audits[b]["pairs"], "total": 0, "co_located": 0,
                                           "co_located_percent": None, "attending_each_other": 0}} for b in audits}  # fmt: skip
    _, not_checked = judged(no_pairs, "bridges", equal, holds)
    assert [item.split(":")[0] for item in not_checked] == ["co-location"] * 3
    with pytest.raises(ValueError, match="could not be checked: co-location.*Nothing was trained"):
        run_cpt.refuse_unchecked_guarantees(not_checked)
    run_cpt.refuse_unchecked_guarantees([])


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
    windows = [list(window) for window in plan.mismatched_bridges.windows]
    w, d = next((w, d) for w, window in enumerate(windows) for d, document in enumerate(window) if len(document) == 2)
    windows[w][d : d + 1] = [(windows[w][d][0],), (windows[w][d][1],)]
    cut = audit(run_cpt.SettingPlan(windows, 0, plan.mismatched_bridges.partners))
    broken, _ = judged({**audits, "mismatched_bridges": cut}, "mismatched_bridges")
    assert broken == [f"the planned mismatched partners are not each one document of another pair's English and "
                      f"target halves in mismatched_bridges (this run): {cut['mismatched_pairs']}"]  # fmt: skip
    assert cut["mismatched_pairs"]["attending_each_other"] == mismatched["pairs"]["total"] - 1
    # The derangement breaks (each pair its own partner): the control is a bridged run, and it is refused,
    # here and in a run, before anything is trained.
    monkeypatch.setattr(run_cpt, "mismatched_partners", lambda cycle: cycle)
    _, _, broken_audits, _ = audits_of_a_real_plan(data, tiny_model_dir)
    broken, _ = judged(broken_audits, "bridges")
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
    units = [run_cpt.PackingUnit(0, (4, 4), True, "en"), run_cpt.PackingUnit(1, (9,), False)]
    plan = run_cpt.plan_packing(units, block_size=16, windows_per_step=1, seed=0, max_steps=2)
    assert list(plan.settings) == ["bridges", "no_bridges"] and plan.mismatched_bridges is None
    assert (
        plan.mismatched_unavailable == "only one of the pairs with en first: it has no other pair to be mismatched with"
    )
    two_orders = [*units, run_cpt.PackingUnit(2, (4, 4), True, "en"), run_cpt.PackingUnit(3, (4, 4), True, "tgt")]
    assert run_cpt.mismatched_unavailable(two_orders, 16).startswith("only one of the pairs with tgt first")
    long_halves = [run_cpt.PackingUnit(0, (9, 3), True), run_cpt.PackingUnit(1, (3, 9), True)]
    assert run_cpt.mismatched_unavailable(long_halves, 16) == (
        "the longest first half (9 tokens) and the longest second half (9) of the pairs would not fit one window "
        "of 16 tokens together")  # fmt: skip
    assert run_cpt.mismatched_unavailable(long_halves, 18) is None
    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    one_pair = tmp_path / "one_pair"
    dataset = load_from_disk(str(data))
    first_pair = dataset["kind"].index("pair")
    dataset.filter(lambda r, i: r["kind"] != "pair" or i == first_pair, with_indices=True).save_to_disk(str(one_pair))
    with pytest.raises(ValueError, match=rf"--mismatched_bridges cannot run on {one_pair}: only one of the pairs "
                                         r"with en first: .* add pairs"):  # fmt: skip
        run_cpt.main(cpt_command(tiny_model_dir, one_pair, tmp_path / "run", "--lang", "bo",
                                 setting="--mismatched_bridges"))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_isolation_is_checked_on_a_window_built_from_the_plan_when_no_planned_window_holds_two(tmp_path,
                                                                                              tiny_model_dir):  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM

    plan, store, _, _ = audits_of_a_real_plan(small_dataset(tmp_path, tiny_model_dir), tiny_model_dir)
    one_per_window = [[document] for window in plan.bridges.windows for document in window]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    collator = run_cpt.BridgePackingCollator(64, 1)
    result = run_cpt.check_plan_isolation(model, one_per_window, store, collator)
    assert result["checked"] and result["holds"] and result["documents"] >= 3 and result["windows_in_batch"] == 2
    assert result["window"] == "a window built from the plan's shortest documents, and a planned window"

    class LeakyCollator(run_cpt.BridgePackingCollator):  # positions that never restart: documents attend
        def __call__(self, features):
            batch = super().__call__(features)
            batch["position_ids"] = torch.arange(self.block_size).expand_as(batch["input_ids"]).clone()
            return batch

    leaky = run_cpt.check_plan_isolation(model, one_per_window, store, LeakyCollator(64, 1))
    assert leaky["checked"] and not leaky["holds"]


def test_dataloader_workers_are_refused_because_window_reads_could_not_be_counted(tmp_path):
    with pytest.raises(ValueError, match="--dataloader_num_workers .* each planned window is read exactly once"):
        run_cpt.parse_args(["--model_name_or_path", "x", "--dataset_path", str(tmp_path), "--lang", "bo", "--bridges",
                            "--output_dir", str(tmp_path / "run"), "--dataloader_num_workers", "2"])  # fmt: skip


# --------------------------------------------------------------------------------------
# 2. Resume only what this run would train: the same base model, the same data by content
# --------------------------------------------------------------------------------------


def test_base_model_identity_hashes_weights_and_config_by_content(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "copy"
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


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_base_model_or_other_data_and_resumes_the_same(tmp_path,
                                                                                              tiny_model_dir):  # fmt: skip
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

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
    with pytest.raises(ValueError, match=r"checkpoint-1 does not match this run: base model weights differ "
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
    with pytest.raises(ValueError, match=r"does not match this run: dataset content differs \(sha256 [0-9a-f]{12}"):
        resume(tiny_model_dir, other_inputs / "data", "other-data")
    # The same base and the same data (moved elsewhere): resumes, at the checkpoint's step.
    moved = tmp_path / "moved_data"
    shutil.copytree(data, moved)
    run = resume(tiny_model_dir, moved, "same")
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    audit = json.loads((run / "packing_audit.json").read_text())
    assert audit["windows_trained"]["resumed_at_step"] == 1 and audit["windows_trained"]["each_planned_window_once"]


# --------------------------------------------------------------------------------------
# 3. --lang is the dataset's
# --------------------------------------------------------------------------------------


def test_lang_defaults_to_the_datasets_and_a_mismatch_or_no_language_is_refused(tmp_path, tiny_model_dir):
    import shutil

    import torch

    data = small_dataset(tmp_path / "inputs", tiny_model_dir)
    with pytest.raises(ValueError, match=r"--lang ko but the dataset is 'bo' \(\S*build_stats\.json\)"):
        run_cpt.main(cpt_command(tiny_model_dir, data, tmp_path / "ko", "--lang", "ko"))
    assert not (tmp_path / "ko").exists()
    no_stats = tmp_path / "no_stats"
    shutil.copytree(data, no_stats)
    (no_stats / "build_stats.json").unlink()
    with pytest.raises(ValueError, match=r"no_stats/build_stats\.json: no such file or no 'lang' in it, and no --lang"):
        run_cpt.main(cpt_command(tiny_model_dir, no_stats, tmp_path / "unknown"))
    run = tmp_path / "default"
    run_cpt.main(cpt_command(tiny_model_dir, data, run, "--max_steps", "1"))
    assert json.loads((run / "config.json").read_text())["cpt_setting"]["lang"] == "bo"
    assert torch.load(run / "training_args.bin", weights_only=False).run_name == "cpt-bo-bridges-seed0"
