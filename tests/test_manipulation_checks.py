"""run_eval.py's manipulation checks (manipulation_checks.json): name alignment outside the bridge, the
nearest-neighbour match of names in the input embeddings, and cloze accuracy per fact tier."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cloze_samples import write_sample_questions
from eval_helpers import write_item_tiers, write_name_alignment
from scipy.stats import binom
from transformers import AddedToken, AutoTokenizer

import run_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIERS = ["high", "low", "absent", "en_only", "high", "absent"]  # the 6 items of the sample questions


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_model_dir):
    """A random-init tiny model probed with every check (as the study probes a base model): the output folder."""
    root = tmp_path_factory.mktemp("checks")
    questions = write_sample_questions(root / "questions", langs=("en", "ko"))
    alignment = write_name_alignment(root / "name_alignment.json")
    tiers = write_item_tiers(root / "item_tiers.json", "sample-culture", TIERS)
    out = root / "out"
    run_eval.main(
        ["--model_name_or_path", str(tiny_model_dir), "--questions", *map(str, questions), "--output_dir", str(out),
         "--name_alignment", str(alignment), "--item_tiers", str(tiers)]
    )  # fmt: skip
    return out


def test_manipulation_checks_json_has_the_agreed_fields(probed):
    result = json.loads((probed / "manipulation_checks.json").read_text())
    (entry,) = result["checkpoints"]
    assert set(entry) == {"step", "path", "weights_sha256", "name_alignment", "embedding_match", "tier_accuracy"}
    assert entry["step"] == 0
    for check in ("name_alignment", "embedding_match"):
        assert set(entry[check]) == {"en->ko", "ko->en"}
        for stats in entry[check].values():
            assert set(stats) == {"accuracy", "n", "chance"} and stats["n"] == 48
    assert entry["name_alignment"]["en->ko"]["chance"] == 0.25
    assert entry["embedding_match"]["ko->en"]["chance"] == 1 / 48
    assert set(entry["tier_accuracy"]) == {"sample-culture_en", "sample-culture_ko"}
    assert set(entry["tier_accuracy"]["sample-culture_en"]) == {"high", "low", "absent", "en_only"}
    assert result["item_tiers"]["items_per_tier"] == {"high": 2, "low": 1, "absent": 2, "en_only": 1}
    assert result["name_alignment"]["name_leading_space"] == {"en": True, "target": True}
    accuracy = json.loads((probed / "accuracy.json").read_text())
    assert entry["weights_sha256"] == accuracy["checkpoints"][0]["weights_sha256"]


def test_name_alignment_of_a_random_model_is_at_chance_though_the_answer_is_always_the_first_option(probed):
    (entry,) = json.loads((probed / "manipulation_checks.json").read_text())["checkpoints"]
    hits = sum(round(s["accuracy"] * s["n"]) for s in entry["name_alignment"].values())
    n = sum(s["n"] for s in entry["name_alignment"].values())
    # 96 items, each answer at option 0: ties (or a constant score) would give 1.0 under first-wins.
    assert binom.ppf(1e-4, n, 0.25) <= hits <= binom.ppf(1 - 1e-4, n, 0.25), hits
    assert entry["embedding_match"]["en->ko"]["accuracy"] < 0.25  # a random model's names do not match either


def test_tier_accuracy_equals_the_accuracy_counted_from_predictions(probed):
    (entry,) = json.loads((probed / "manipulation_checks.json").read_text())["checkpoints"]
    rows = [json.loads(line) for line in (probed / "predictions.jsonl").read_text().splitlines()]
    for stem in ("sample-culture_en", "sample-culture_ko"):
        for tier in set(TIERS):
            correct = [r["correct"] for r in rows if r["questions"] == stem and TIERS[r["index"]] == tier]
            assert entry["tier_accuracy"][stem][tier] == sum(correct) / len(correct), (stem, tier)


def test_name_alignment_scores_each_option_after_its_context_as_a_bridged_pair_with_the_run_separator(
    tmp_path, tiny_model_dir
):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["cpt_setting"] = {"lang": "ko", "bridges": True, "seed": 0, "pair_separator": " ||"}
    (run / "config.json").write_text(json.dumps(config))
    alignment = write_name_alignment(tmp_path / "name_alignment.json", n_entities=12, seed=3)
    run_eval.main(["--model_name_or_path", str(run), "--name_alignment", str(alignment), "--output_dir", str(tmp_path)])
    (entry,) = json.loads((tmp_path / "manipulation_checks.json").read_text())["checkpoints"]
    assert "tier_accuracy" not in entry
    # Straight from the definition: [start] + context + separator + [start] + filled frame, one forward per option,
    # the mean loss of the frame's tokens; the lowest wins.
    model = run_eval.load_model(run, "float32", torch.device("cpu"), "eager")
    tokenizer = AutoTokenizer.from_pretrained(run)
    start, separator = tokenizer.eos_token_id, tokenizer(" ||", add_special_tokens=False)["input_ids"]
    hits = {"en->ko": [], "ko->en": []}
    with torch.inference_mode():
        for item in json.loads(alignment.read_text())["items"]:
            context = [start] + tokenizer(item["context"], add_special_tokens=False)["input_ids"] + separator + [start]
            losses = []
            for option in item["options"]:
                frame = tokenizer(item["frame"].replace("____", option), add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + frame])
                logits = model(input_ids=ids).logits[0].float()
                losses.append(
                    float(torch.nn.functional.cross_entropy(logits[len(context) - 1 : -1], ids[0, len(context) :]))
                )
            hits[item["direction"]].append(item["options"][int(np.argmin(losses))] == item["answer"])
    for direction, direct in hits.items():
        assert entry["name_alignment"][direction]["accuracy"] == pytest.approx(np.mean(direct)), direction


def test_embedding_match_is_one_when_each_target_name_has_its_english_name_embedding(tmp_path, tiny_model_dir):
    alignment = run_eval.read_name_alignment(str(write_name_alignment(tmp_path / "name_alignment.json")))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = run_eval.load_model(tiny_model_dir, "float32", torch.device("cpu"), "sdpa")
    before = run_eval.embedding_match(model, tokenizer, alignment)
    # Each target name (as written mid-sentence) becomes one token whose embedding is set to the mean embedding of
    # its entity's English name, then (a derangement) of the next entity's English name.
    en, target = alignment["forms"]["en"], alignment["forms"]["target"]
    tokenizer.add_tokens([AddedToken(name, normalized=False) for name in target])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = model.get_input_embeddings().weight
    results = []
    for shift in (0, 1):
        with torch.no_grad():
            for k, name in enumerate(target):
                (token,) = tokenizer(name, add_special_tokens=False)["input_ids"]
                table[token] = table[tokenizer(en[(k + shift) % len(en)], add_special_tokens=False)["input_ids"]].mean(
                    0
                )
        results.append(run_eval.embedding_match(model, tokenizer, alignment))
    assert results[0] == {d: {"accuracy": 1.0, "n": 48, "chance": 1 / 48} for d in ("en->ko", "ko->en")}
    assert all(results[1][d]["accuracy"] == 0.0 and before[d]["accuracy"] < 0.25 for d in before)


def _edited(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["items"][5].update(answer="Nowhere"),
            "item 5 (entity 'place-2', ko->en): the answer 'Nowhere' is",
        ),
        (
            lambda d: d["items"][2].update(frame="no blank"),
            "item 2 (entity 'place-1', en->ko): the frame needs exactly",
        ),
        (
            lambda d: d["items"][0].update(direction="en->zh"),
            "item 0 (entity 'place-0', en->zh): needs a direction among",
        ),
    ],
)
def test_a_name_alignment_item_that_cannot_be_scored_is_refused_naming_it(tmp_path, edit, message):
    path = _edited(write_name_alignment(tmp_path / "name_alignment.json", n_entities=4), edit)
    with pytest.raises(run_eval.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_eval.read_name_alignment(str(path))


def test_item_tiers_of_other_questions_or_missing_items_are_refused(tmp_path):
    import cloze

    sets = cloze.load_question_sets([str(p) for p in write_sample_questions(tmp_path / "q", langs=("en", "ko"))])
    with pytest.raises(run_eval.InputError, match="parallel_group 'ko-culture-cloze' is none of"):
        run_eval.read_item_tiers(str(write_item_tiers(tmp_path / "a.json", "ko-culture-cloze", TIERS)), sets)
    with pytest.raises(run_eval.InputError, match=r"no tier for question items \[5\]"):
        run_eval.read_item_tiers(str(write_item_tiers(tmp_path / "b.json", "sample-culture", TIERS[:5])), sets)
