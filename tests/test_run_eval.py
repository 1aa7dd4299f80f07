"""run_eval.py: the paper's scoring batched as prefix trees, checkpoints and the reuse of their results, outputs, the
bridge diagnostic and the manipulation checks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from cloze_samples import SAMPLE_QUESTIONS, SAMPLE_SCRIPTS, write_sample_questions
from eval_helpers import make_run_dir, write_item_tiers, write_name_alignment, write_questions
from paper_reference import reference_prediction, reference_scores
from scipy.stats import binom
from transformers import AddedToken, AutoTokenizer

import cloze
import run_cpt
import run_eval
from study_common import script_letter_fraction

PREDICTION_KEYS = {
    "questions",
    "lang",
    "index",
    "step",
    "checkpoint",
    "scores",
    "prediction",
    "answer",
    "correct",
    "tied_best",
    "credit_fractional",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # RUN_EVAL_TEST_DEVICE=cuda runs the parity tests on a GPU (bench/gpu_eval_check.sh).
    device = torch.device(os.environ.get("RUN_EVAL_TEST_DEVICE", "cpu"))
    model = run_eval.load_model(tiny_model_dir, "float32", device, "sdpa")
    return model, tokenizer


@pytest.fixture
def sample_dir(tmp_path):
    write_sample_questions(tmp_path / "questions")
    return tmp_path / "questions"


# ---------------------------------------------------------------------------- scoring


def test_samples_cover_every_script_of_the_study():
    for lang, script in SAMPLE_SCRIPTS.items():
        text = " ".join(item["question"] + " ".join(item["options"]) for item in SAMPLE_QUESTIONS[lang])
        assert script_letter_fraction(text, script) > 0.8, lang


def test_batched_scores_equal_the_paper_loop_in_every_script_and_any_batch_size(tiny, sample_dir):
    model, tokenizer = tiny
    sets = cloze.load_question_sets([str(sample_dir)])
    assert {qs.lang for qs in sets} == set(SAMPLE_SCRIPTS)
    reference = [[reference_scores(model, tokenizer, it["question"], it["options"]) for it in qs.items] for qs in sets]
    for batch_size in (1, 3, 5, 64):
        batched = run_eval.score_question_sets(model, tokenizer, sets, batch_size)
        for qs, ref_set, got_set in zip(sets, reference, batched):
            for index, (ref, got) in enumerate(zip(ref_set, got_set)):
                np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{qs.stem} #{index} {batch_size}")
                assert np.argsort(got, kind="stable").tolist() == np.argsort(ref, kind="stable").tolist()
                assert run_eval.predict(got) == reference_prediction(ref)


def test_options_of_an_item_run_as_one_prefix_tree_with_the_question_text_once(tiny, sample_dir):
    _, tokenizer = tiny
    sets = cloze.load_question_sets([str(sample_dir)])
    plan = run_eval.plan_scoring(tokenizer, sets)
    trees, located = run_eval.build_prefix_trees(plan.sequences, plan.groups)
    english = [qs.lang for qs in sets].index("en")
    item = plan.options[english][0]  # "The Korean people celebrate ___ in autumn."
    prefix = len(
        [run_eval.document_start_id(tokenizer)]
        + tokenizer("The Korean people celebrate", add_special_tokens=False)["input_ids"]
    )
    (tree_index,) = {located[seq][0] for seq in item}
    paths = [located[seq][1] for seq in item]
    for path, seq in zip(paths, item):
        assert [trees[tree_index].tokens[node] for node in path] == plan.sequences[seq]
        assert path[:prefix].tolist() == paths[0][:prefix].tolist()  # the question text: the same nodes
    assert len(trees[tree_index].tokens) == len(set(np.concatenate(paths).tolist()))
    assert len(trees[tree_index].tokens) < sum(len(plan.sequences[seq]) for seq in item)
    # An item whose blank opens the question shares only the start token.
    opening = [located[seq] for seq in plan.options[english][1]]
    assert len({t for t, _ in opening}) == 1 and len({path[1] for _, path in opening}) == len(opening)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tree_masks_give_each_sequence_its_log_probs_alone(tiny_model_dir, attn_implementation):
    model = run_eval.load_model(tiny_model_dir, "float32", torch.device("cpu"), attn_implementation)
    rng = np.random.default_rng(0)
    stem = rng.integers(5, 200, size=12).tolist()
    sequences = [[1] + stem[:n] + rng.integers(5, 200, size=m).tolist() for n, m in [(12, 3), (12, 0), (4, 6), (0, 5)]]
    sequences += [[1] + stem, [1], [2] + stem[:3]]  # a duplicate of the second, a start token alone, another root
    with torch.inference_mode():  # each sequence alone, straight through the model
        alone = [
            torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1], -1)
            .gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            .numpy()
            for ids in sequences
        ]
    for groups in (None, [list(range(len(sequences)))], [[0, 1, 2], [3, 4, 5, 6]]):
        together = run_eval.token_logprobs(model, sequences, groups, batch_size=3)
        for ids, expected, got in zip(sequences, alone, together):
            assert got.shape == (len(ids) - 1,)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    trees, _ = run_eval.build_prefix_trees(sequences, [list(range(len(sequences)))])
    assert [tree.tokens[0] for tree in trees] == [1, 2]  # one tree per first token
    assert len(trees[0].tokens) == 1 + 12 + 3 + 6 + 5


def test_identical_sentences_tie_exactly_and_the_first_option_wins(tiny, tmp_path):
    model, tokenizer = tiny
    path = write_questions(
        tmp_path / "t_en.json",
        [
            {
                "question": "There is no blank in this question.",
                "options": ["Seoul", "Busan", "Daegu"],
                "answer": "Busan",
            },
            {"question": "The ___ is here.", "options": ["river", "lake", "river", "sea"], "answer": "river"},
        ],
    )
    sets = cloze.load_question_sets([str(path)])
    for batch_size in (1, 2, 64):
        no_blank, duplicates = run_eval.score_question_sets(model, tokenizer, sets, batch_size)[0]
        assert no_blank[0] == no_blank[1] == no_blank[2] and run_eval.predict(no_blank) == 0
        assert duplicates[0] == duplicates[2]
        assert run_eval.predict(duplicates) != 2  # the later copy never wins
    assert sets[0].items[1]["answer"] == [0, 2]


def test_predict_takes_the_lowest_score_and_the_first_of_ties():
    assert run_eval.predict([2.0, 1.0, 1.0, 3.0]) == 1
    assert run_eval.predict([1.0, 1.0]) == 0
    assert run_eval.predict([5.0, 4.0, 3.0]) == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_scores_stay_close_to_float32(tiny_model_dir, sample_dir, dtype):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sets = cloze.load_question_sets([str(sample_dir / "sample-culture_en.json")])
    full = run_eval.load_model(tiny_model_dir, "float32", torch.device("cpu"), "sdpa")
    half = run_eval.load_model(tiny_model_dir, dtype, torch.device("cpu"), "sdpa")
    assert next(half.parameters()).dtype == getattr(torch, dtype)
    a = np.array(run_eval.score_question_sets(full, tokenizer, sets, 8)[0])
    b = np.array(run_eval.score_question_sets(half, tokenizer, sets, 8)[0])
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.1


# ---------------------------------------------------------------------------- checkpoints and outputs


def test_a_run_folder_gives_its_checkpoints_in_step_order_and_its_final_model_once(tmp_path, tiny_model_dir):
    run = make_run_dir(tiny_model_dir, tmp_path / "run", checkpoint_steps=(10, 2), final_step=10)
    # The final model of a run whose last step is a checkpoint's (max_steps a multiple of save_steps) is that
    # checkpoint: probed once.
    assert [c.key for c in run_eval.find_checkpoints(str(run)).checkpoints] == [
        (2, str((run / "checkpoint-2").resolve())),
        (10, str((run / "checkpoint-10").resolve())),
    ]
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    assert [c.key for c in run_eval.find_checkpoints(str(run)).checkpoints][-1] == (12, str(run.resolve()))
    # A plain model folder is one checkpoint at step 0.
    assert [c.key for c in run_eval.find_checkpoints(str(tiny_model_dir)).checkpoints] == [
        (0, str(tiny_model_dir.resolve()))
    ]


def test_a_checkpoint_without_a_model_or_a_final_model_without_its_step_is_refused_naming_it(tmp_path, tiny_model_dir):
    run = make_run_dir(tiny_model_dir, tmp_path / "run", checkpoint_steps=(2,), final_step=4)
    (run / "checkpoint-3").mkdir()  # being written, or emptied by hand
    with pytest.raises(run_eval.InputError, match=re.escape(f"{(run / 'checkpoint-3').resolve()}: not a saved model")):
        run_eval.find_checkpoints(str(run))
    (run / "checkpoint-3").rmdir()
    (run / "trainer_state.json").unlink()
    with pytest.raises(run_eval.InputError, match="the final model has no trainer_state.json, so its step is unknown"):
        run_eval.find_checkpoints(str(run))


def test_probing_a_run_writes_every_output_and_reuses_finished_checkpoints(
    tmp_path, tiny_model_dir, sample_dir, caplog
):
    caplog.set_level(logging.INFO, logger="run_eval")
    setting = {"lang": "ko", "bridges": True, "seed": 0}
    run = make_run_dir(tiny_model_dir, tmp_path / "run", checkpoint_steps=(1, 2), final_step=3, cpt_setting=setting)
    out = tmp_path / "out"
    questions = [str(sample_dir / "sample-culture_en.json"), str(sample_dir / "sample-culture_ko.json")]
    argv = ["--model_name_or_path", str(run), "--questions", *questions, "--output_dir", str(out), "--batch_size", "7"]
    run_eval.main(argv)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 12 and all(set(row) == PREDICTION_KEYS for row in rows)
    assert [row["step"] for row in rows[::12]] == [1, 2, 3]
    assert rows[0]["checkpoint"] == str((run / "checkpoint-1").resolve()) and rows[-1]["checkpoint"] == str(
        run.resolve()
    )
    assert {row["lang"] for row in rows} == {"en", "ko"}
    assert all(row["correct"] == (row["prediction"] in row["answer"]) for row in rows)
    assert all(row["prediction"] == run_eval.predict(row["scores"]) for row in rows)
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert [entry["step"] for entry in accuracy["checkpoints"]] == [1, 2, 3]
    assert set(accuracy["checkpoints"][0]) == {"step", "path", "weights_sha256", "accuracy"}
    entry = accuracy["checkpoints"][0]["accuracy"]["sample-culture_ko"]
    ko_rows = [r for r in rows if r["step"] == 1 and r["questions"] == "sample-culture_ko"]
    fractional = sum(r["credit_fractional"] for r in ko_rows)
    assert entry == {
        "lang": "ko",
        "correct": sum(r["correct"] for r in ko_rows),
        "total": 6,
        "accuracy": entry["correct"] / 6,
        "ties": sum(r["tied_best"] > 1 for r in ko_rows),
        "tie_rate": entry["ties"] / 6,
        "correct_fractional": fractional,
        "accuracy_fractional": fractional / 6,
        "ties_advantage": (entry["correct"] - fractional) / 6,
    }
    assert accuracy["cpt_setting"] == setting and accuracy["scoring"] == "mean_token_loss"
    assert accuracy["loss_dtype"] == "float32"
    before = (out / "predictions.jsonl").read_text()

    # Second run: everything is reused, nothing is recomputed, outputs are unchanged.
    caplog.clear()
    run_eval.main(argv)
    assert "0 checkpoint(s) to score, 3 reused" in caplog.text
    assert (out / "predictions.jsonl").read_text() == before
    # A new checkpoint appears: only it is scored.
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")
    caplog.clear()
    run_eval.main(argv)
    assert "1 checkpoint(s) to score, 3 reused" in caplog.text
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4 * 12
    # Scores of a copied checkpoint are those of the original.
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_step = {s: [r["scores"] for r in rows if r["step"] == s] for s in (2, 4)}
    np.testing.assert_allclose(by_step[4], by_step[2], atol=1e-6)
    # Another loss precision in the same directory: refused rather than mixed.
    with pytest.raises(run_eval.InputError, match=r"different loss_dtype \('float32', now 'model'\)"):
        run_eval.main([*argv, "--loss_dtype", "model"])
    # A checkpoint whose predictions lines are incomplete is scored again.
    kept = (out / "predictions.jsonl").read_text().splitlines()[:-1]  # the last item of step 4
    (out / "predictions.jsonl").write_text("\n".join(kept) + "\n")
    caplog.clear()
    run_eval.main(argv)
    assert "1 checkpoint(s) to score, 3 reused" in caplog.text


@pytest.mark.parametrize("new_seed", [0, 1])  # the same cpt_setting (another learning rate, say) or another seed
def test_a_run_retrained_in_place_is_probed_again_and_its_earlier_checkpoints_dropped(
    tmp_path, tiny_model_dir, sample_dir, caplog, new_seed
):
    caplog.set_level(logging.INFO, logger="run_eval")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"en": f"Tea {i} is hot.", "tgt": f"차 {i} 뜨겁다."}) + "\n" for i in range(3)))
    alignment = write_name_alignment(tmp_path / "name_alignment.json", n_entities=8)
    run, out, fresh = tmp_path / "run", tmp_path / "out", tmp_path / "fresh"
    argv = ["--model_name_or_path", str(run), "--questions", str(sample_dir / "sample-culture_en.json"),
            "--diagnostic_pairs", str(pairs), "--name_alignment", str(alignment), "--output_dir", str(out)]  # fmt: skip
    outputs = ("predictions.jsonl", "bridge_diagnostic.json", "manipulation_checks.json")
    make_run_dir(tiny_model_dir, run, checkpoint_steps=(1, 2), final_step=3, cpt_setting={"lang": "ko", "seed": 0})
    run_eval.main(argv)
    first = {name: (out / name).read_text() for name in outputs}
    # Deleted and retrained (other weights; checkpoints at other steps but checkpoint-2's path): all probed again.
    shutil.rmtree(run)
    make_run_dir(tiny_model_dir, run, (2, 4), 5, cpt_setting={"lang": "ko", "seed": new_seed}, seed=1)
    caplog.clear()
    run_eval.main(argv)
    assert "3 checkpoint(s) to score, 0 reused" in caplog.text
    assert caplog.text.count("the run was trained again since (other weights or cpt_setting): all probed again") == 3
    # ... exactly as probing the new run into an empty folder: nothing of the old model is left.
    run_eval.main([*argv[:-1], str(fresh)])
    for name in outputs:
        assert (out / name).read_text() == (fresh / name).read_text() != first[name], name
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["cpt_setting"]["seed"] == new_seed and [e["step"] for e in accuracy["checkpoints"]] == [2, 4, 5]
    hashes = [c.weights_sha256 for c in run_eval.find_checkpoints(str(run)).checkpoints]
    assert [e["weights_sha256"] for e in accuracy["checkpoints"]] == hashes and len(set(hashes)) == 3
    caplog.clear()
    run_eval.main(argv)  # unchanged weights: everything reused
    assert "0 checkpoint(s) to score, 3 reused" in caplog.text and "trained again" not in caplog.text


def test_an_output_folder_made_from_other_inputs_is_refused_before_anything_is_probed(
    tmp_path, tiny_model_dir, sample_dir, caplog
):
    caplog.set_level(logging.INFO, logger="run_eval")
    pairs = [tmp_path / "pairs0.jsonl", tmp_path / "pairs1.jsonl"]
    for k, path in enumerate(pairs):
        path.write_text(
            "".join(json.dumps({"en": f"Tea {i} is hot.", "tgt": f"차 {i + k} 뜨겁다."}) + "\n" for i in range(3))
        )
    run, out = make_run_dir(tiny_model_dir, tmp_path / "run", checkpoint_steps=(1,), final_step=2), tmp_path / "out"
    argv = ["--model_name_or_path", str(run), "--questions", str(sample_dir / "sample-culture_en.json"),
            "--output_dir", str(out), "--diagnostic_pairs"]  # fmt: skip
    run_eval.main([*argv, str(pairs[0])])
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-3")  # a new checkpoint: work for the probing
    before = {path.name: path.read_text() for path in out.iterdir()}
    with pytest.raises(run_eval.InputError, match=r"already holds results made with a different pairs_sha256 \("):
        run_eval.main([*argv, str(pairs[1])])
    assert {path.name: path.read_text() for path in out.iterdir()} == before
    caplog.clear()
    run_eval.main([*argv, str(pairs[1]), "--overwrite_output_dir"])
    assert "3 checkpoint(s) to score, 0 reused" in caplog.text
    result = json.loads((out / "bridge_diagnostic.json").read_text())
    assert result["pairs_file"] == str(pairs[1]) and len(result["checkpoints"]) == 3


def test_the_weights_hash_of_a_model_is_the_one_its_cpt_runs_record_for_their_base(tiny_model_dir):
    (checkpoint,) = run_eval.find_checkpoints(str(tiny_model_dir)).checkpoints
    identity = run_cpt.base_model_identity(str(tiny_model_dir))
    assert checkpoint.weights_sha256 == identity["base_model_weights_sha256"]


def test_a_model_without_a_tokenizer_is_refused_before_anything_is_written(
    tmp_path, tiny_model_dir, sample_dir, capsys
):
    model = tmp_path / "bare" / "model"
    model.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model / name)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(model), "--questions", str(sample_dir), "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_eval.exit_on_input_error(lambda: run_eval.main(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{model}: no tokenizer files (tokenizer.json, " in error and "save it with the model" in error
    assert not out.exists()


# ---------------------------------------------------------------------------- bridge diagnostic


def test_bridge_diagnostic_equals_a_direct_computation(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    pairs = [
        (SAMPLE_QUESTIONS["en"][i]["question"], SAMPLE_QUESTIONS[lang][i]["question"])
        for i, lang in enumerate(["ko", "zh", "bo", "mn", "ko"])
    ]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"en": en, "tgt": tgt}, ensure_ascii=False) + "\n" for en, tgt in pairs))
    out = tmp_path / "out"
    run_eval.main(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--diagnostic_pairs",
            str(pairs_file),
            "--output_dir",
            str(out),
            "--batch_size",
            "2",
        ]
    )
    result = json.loads((out / "bridge_diagnostic.json").read_text())
    (entry,) = result["checkpoints"]
    assert set(entry) == {"step", "path", "weights_sha256", "alone", "after_own_context", "after_mismatched_context",
                          "context_sides", "scored_sides", "pairs"}  # fmt: skip
    assert entry["step"] == 0 and entry["pairs"] == 5
    # A model without a cpt_setting: run_cpt's default order, English first, the target side scored.
    assert result["pair_order"] == "en_first"
    assert (entry["context_sides"], entry["scored_sides"]) == ({"en": 5, "tgt": 0}, {"en": 0, "tgt": 5})

    for separator, expected in (
        ("", entry),
        (" ||", run_eval.bridge_diagnostic_losses(model, tokenizer, pairs, 3, " ||")),
    ):
        direct = _direct_bridge_losses(model, tokenizer, pairs, separator)
        for key, value in direct.items():
            assert expected[key] == pytest.approx(value, abs=1e-5), (separator, key)


def _direct_bridge_losses(model, tokenizer, pairs, separator: str, first_sides=None) -> dict:
    """One forward per context, straight from the definition: loss summed over the second side's tokens of all
    pairs; pair i's first side is ``first_sides[i]`` ("en" or "tgt"; English first by default)."""
    start, n = tokenizer.eos_token_id, len(pairs)
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    totals = {"alone": 0.0, "after_own_context": 0.0, "after_mismatched_context": 0.0}
    count = 0
    with torch.inference_mode():
        for i in range(n):
            context_side = 0 if (first_sides or ["en"] * n)[i] == "en" else 1
            tgt_ids = tokenizer(pairs[i][1 - context_side], add_special_tokens=False)["input_ids"]
            own = tokenizer(pairs[i][context_side], add_special_tokens=False)["input_ids"]
            other = tokenizer(pairs[(i + 1) % n][context_side], add_special_tokens=False)["input_ids"]
            contexts = {
                "alone": [start],
                "after_own_context": [start] + own + sep + [start],
                "after_mismatched_context": [start] + other + sep + [start],
            }
            for key, context in contexts.items():
                ids = torch.tensor([context + tgt_ids])
                logits = model(input_ids=ids, use_cache=False).logits[0].float()
                loss = torch.nn.functional.cross_entropy(
                    logits[len(context) - 1 : -1], ids[0, len(context) :], reduction="sum"
                )
                totals[key] += float(loss)
            count += len(tgt_ids)
    return {key: total / count for key, total in totals.items()}


def test_bridge_diagnostic_needs_two_pairs_with_both_sides(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"en": "a", "tgt": "b"}) + "\n")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        run_eval.read_pairs(str(one))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"en": "a", "tgt": "b"}) + "\n" + json.dumps({"en": "a"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: no 'tgt' column")):
        run_eval.read_pairs(str(bad))


# ---------------------------------------------------------------------------- the paper's files, end to end


def test_loss_dtype_model_in_bfloat16_is_bit_identical_to_the_paper_loop_in_every_script(tiny_model_dir, sample_dir):
    device = torch.device(os.environ.get("RUN_EVAL_TEST_DEVICE", "cpu"))
    model = run_eval.load_model(tiny_model_dir, "bfloat16", device, "sdpa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sets = cloze.load_question_sets([str(sample_dir)])
    scored = run_eval.score_question_sets(model, tokenizer, sets, 8, loss_dtype="model")
    batched = run_eval.score_question_sets(model, tokenizer, sets, 8)
    differs = 0
    for qs, scores, batched_scores in zip(sets, scored, batched):
        for item, got, other in zip(qs.items, scores, batched_scores):
            ref = reference_scores(model, tokenizer, item["question"], item["options"], loss_dtype="model")
            assert got == ref
            # Scores are bfloat16 numbers, as the paper's loss is on current transformers.
            assert all(float(torch.tensor(x, dtype=torch.bfloat16)) == x for x in got)
            differs += got != other
    assert differs > 0  # the float32 loss of the batched path is another number


# ---------------------------------------------------------------------------- ties and position bias


def test_probing_records_ties_fractional_credit_and_position_bias_and_warns_on_many_ties(
    tmp_path, tiny_model_dir, caplog
):
    caplog.set_level(logging.INFO, logger="run_eval")
    path = write_questions(
        tmp_path / "q" / "t_en.json",
        [
            # No blank: all three options give the same sentence, a 3-way tie; the answer is not first.
            {
                "question": "There is no blank in this question.",
                "options": ["Seoul", "Busan", "Daegu"],
                "answer": "Busan",
            },
            # Duplicate options: the two copies of the answer tie whenever they are best.
            {"question": "The ___ is here.", "options": ["river", "lake", "river", "sea"], "answer": "river"},
            {"question": "A ___ b.", "options": ["x", "yy"], "answer": "yy"},
            {"question": "The ___ is big.", "options": ["sky", "sea"], "answer": "nothing"},
        ],
    )
    out = tmp_path / "out"
    run_eval.main(["--model_name_or_path", str(tiny_model_dir), "--questions", str(path), "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    no_blank, duplicates, plain, absent = rows
    assert (no_blank["tied_best"], no_blank["prediction"], no_blank["correct"]) == (3, 0, False)
    assert no_blank["credit_fractional"] == pytest.approx(1 / 3)
    assert duplicates["scores"][0] == duplicates["scores"][2]
    river_best = duplicates["scores"][0] == min(duplicates["scores"])
    assert duplicates["tied_best"] == (2 if river_best else 1)
    assert duplicates["credit_fractional"] == float(duplicates["correct"]) == float(river_best)
    assert plain["tied_best"] == 1 and plain["credit_fractional"] == float(plain["correct"])
    assert absent["answer"] == [] and absent["credit_fractional"] == 0.0 and absent["correct"] is False
    accuracy = json.loads((out / "accuracy.json").read_text())
    entry = accuracy["checkpoints"][0]["accuracy"]["t_en"]
    credits = [r["credit_fractional"] for r in rows]
    assert entry["ties"] == 1 + river_best and entry["tie_rate"] == entry["ties"] / 4
    assert entry["accuracy_fractional"] == pytest.approx(sum(credits) / 4)
    assert entry["ties_advantage"] == pytest.approx(entry["accuracy"] - sum(credits) / 4)
    assert accuracy["questions"]["t_en"]["position_bias"] == {
        "answer_position_counts": {"0": 1, "1": 2, "none": 1},
        "answer_position_share": {"0": 0.25, "1": 0.5, "none": 0.25},
        "always_first_accuracy": 0.25,
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"t_en: {entry['ties']} of 4 items" in w and "tie for the best score" in w for w in warnings)


@pytest.mark.parametrize(("pair_order", "seed"), [("tgt_first", 0), ("random", 3)])
def test_bridge_diagnostic_follows_the_pair_order_of_the_run_and_records_it(
    tmp_path, tiny_model_dir, tiny, pair_order, seed
):
    model, tokenizer = tiny
    pairs = [
        (SAMPLE_QUESTIONS["en"][i]["question"], SAMPLE_QUESTIONS[lang][i]["question"])
        for i, lang in enumerate(["ko", "zh", "bo", "mn", "ko", "zh"])
    ]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"en": en, "tgt": tgt}, ensure_ascii=False) + "\n" for en, tgt in pairs))
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["cpt_setting"] = {"lang": "ko", "bridges": True, "seed": seed, "pair_order": pair_order}
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    run_eval.main(["--model_name_or_path", str(run), "--diagnostic_pairs", str(pairs_file), "--output_dir", str(out)])
    result = json.loads((out / "bridge_diagnostic.json").read_text())
    # Pair i's first side as run_cpt.py drew it when it trained on pairs laid out as the diagnostic lays them.
    first_sides = [run_cpt.pair_first_side(i, pair_order, seed) for i in range(len(pairs))]
    assert set(first_sides) == ({"tgt"} if pair_order == "tgt_first" else {"en", "tgt"})  # this seed mixes both
    assert (result["pair_order"], result["pair_order_seed"]) == (pair_order, seed)
    (entry,) = result["checkpoints"]
    assert entry["context_sides"] == {side: first_sides.count(side) for side in ("en", "tgt")}
    assert entry["scored_sides"] == {"en": first_sides.count("tgt"), "tgt": first_sides.count("en")}
    direct = _direct_bridge_losses(model, tokenizer, pairs, "", first_sides)
    for key, value in direct.items():
        assert entry[key] == pytest.approx(value, abs=1e-5), key


# ---------------------------------------------------------------------------- manipulation checks

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
    ("edit", "error"),
    [
        (lambda d: d["items"][2].update(frame="no blank"), "AttributeError"),
        (lambda d: d["items"][0].update(direction="en->zh"), "KeyError: 'en->zh'"),
        (lambda d: d.pop("entities"), "KeyError: 'entities'"),
    ],
)
def test_a_file_that_is_not_a_name_alignment_of_a_world_is_refused_naming_it(tmp_path, edit, error):
    path = _edited(write_name_alignment(tmp_path / "name_alignment.json", n_entities=4), edit)
    with pytest.raises(run_eval.InputError, match=re.escape(f"--name_alignment {path}: not a name_alignment.json")):
        run_eval.read_name_alignment(str(path))
    with pytest.raises(run_eval.InputError, match=re.escape(error)):
        run_eval.read_name_alignment(str(path))


def test_item_tiers_of_other_questions_or_missing_items_are_refused(tmp_path):
    sets = cloze.load_question_sets([str(p) for p in write_sample_questions(tmp_path / "q", langs=("en", "ko"))])
    with pytest.raises(run_eval.InputError, match="parallel_group 'ko-culture-cloze' is none of"):
        run_eval.read_item_tiers(str(write_item_tiers(tmp_path / "a.json", "ko-culture-cloze", TIERS)), sets)
    with pytest.raises(run_eval.InputError, match=r"b.json: 5 items, but sample-culture_en has 6"):
        run_eval.read_item_tiers(str(write_item_tiers(tmp_path / "b.json", "sample-culture", TIERS[:5])), sets)


def test_the_outputs_go_beside_the_model_by_default(tmp_path):
    run = tmp_path / "runs" / "cpt-bo-bridges-seed42"
    assert run_eval.parse_arguments(["--model_name_or_path", str(run), "--questions", "q.json"]).output_dir == str(
        run / "eval"
    )
    given = ["--model_name_or_path", str(run), "--questions", "q.json", "--output_dir", str(tmp_path / "o")]
    assert run_eval.parse_arguments(given).output_dir == str(tmp_path / "o")
