"""run_eval.py on every item of the paper's released question files (slow): the batched scores against the paper's
loop written out in tests/paper_reference.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from paper_reference import reference_prediction, reference_scores
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import cloze
import run_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_layer_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with one decoder layer (its forward, run ~24,000 times here, costs about half): what this test
    pins is every released sentence and its loss; the tree masks are pinned on two layers in test_run_eval.py."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers, config.layer_types = 1, config.layer_types[:1]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("one_layer_model")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _forward_once_per_input(model) -> None:
    """Memoise ``model``'s forward by its exact arguments (a forward is deterministic), each result handed out once:
    run_eval's loop (--loss_dtype model) and the paper's loop then run each sentence through the model once between
    them, and still compare everything else they do (the sentence's tokens, the loss on the logits)."""
    forward, memo = model.forward, {}

    def memoised(input_ids, **kwargs):
        key = (input_ids.cpu().numpy().tobytes(), tuple(input_ids.shape), tuple(sorted(kwargs.items())))
        if key in memo:
            return memo.pop(key)
        memo[key] = forward(input_ids=input_ids, **kwargs)
        return memo[key]

    model.forward = memoised


def _assert_same_ranking_up_to_float32_rounding(got: list[float], ref: list[float], where: str) -> None:
    """Every two options the loop's scores order by more than 1e-5 are ordered alike, and so the prediction is
    the loop's unless its two best are that close. (The loop's float32 mean can round two different sentences'
    losses to the same number, an exact tie that float32 log-probs averaged in float64 do not have: mn_en #201
    of the released files, options 2 and 3, with the tiny model.)"""
    for j in range(len(ref)):
        for k in range(len(ref)):
            if ref[j] < ref[k] - 1e-5:
                assert got[j] < got[k], (where, j, k, got, ref)
    best_two = sorted(ref)[:2]
    if len(best_two) < 2 or best_two[1] - best_two[0] > 1e-5:
        assert run_eval.predict(got) == reference_prediction(ref), (where, got, ref)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "loss_dtype"), [("float32", "float32"), ("bfloat16", "model")])
def test_every_released_item_scores_as_in_the_paper_loop(paper_cloze_dir, one_layer_model_dir, dtype, loss_dtype):
    """All 2,940 items of the 8 released files. float32: batched prefix trees within 1e-5 of the loop, same
    rankings up to float32 rounding. bfloat16 with --loss_dtype model: the paper's bfloat16 loss, bit-identical to
    the loop, ties and all."""
    device = torch.device(os.environ.get("RUN_EVAL_TEST_DEVICE", "cpu"))
    model = run_eval.load_model(one_layer_model_dir, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(one_layer_model_dir)
    sets = cloze.load_question_sets([str(paper_cloze_dir)])
    assert len(sets) == 8 and sum(len(qs.items) for qs in sets) == 2940
    if loss_dtype == "model":
        _forward_once_per_input(model)
    scored = run_eval.score_question_sets(model, tokenizer, sets, 64, loss_dtype=loss_dtype)
    ties_beyond_quirks = 0
    for qs, scores in zip(sets, scored):
        quirky = {i for indices in qs.quirks.values() for i in indices}
        for index, (item, got) in enumerate(zip(qs.items, scores)):
            ref = reference_scores(model, tokenizer, item["question"], item["options"], loss_dtype=loss_dtype)
            if loss_dtype == "model":
                assert got == ref, f"{qs.stem} #{index}"
                assert run_eval.predict(got) == reference_prediction(ref)
            else:
                np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{qs.stem} #{index}")
                _assert_same_ranking_up_to_float32_rounding(got, ref, f"{qs.stem} #{index}")
            ties_beyond_quirks += index not in quirky and cloze.tie_credit(got, item["answer"])[0] > 1
    if loss_dtype == "model":
        assert ties_beyond_quirks > 100  # a bfloat16 loss ties often (resolution 2^-6 near a loss of 3)
