"""The paper's cloze probe written straight from its description: one filled sentence per forward pass.

This is the oracle that run_eval.py's batched scoring is checked against (tests/test_run_eval.py) and timed
against (bench/bench_eval.py). It deliberately does nothing clever: no batching, no padding, no sharing.

For the record, the released loop (src/main.py of luciusssss/cross-lingual-culture) also differs from this
oracle, and from run_eval's defaults, in ways the project keeps as they are: it prepends the hard-coded id
151643 (Qwen's <|endoftext|>) where this oracle prepends the tokenizer's own end-of-text id; it tokenizes
with the default add_special_tokens=True (a no-op for Qwen2 tokenizers, which add nothing); and it keys
scores by option text, so duplicate options collapse into one entry and the first copy wins.
"""

from __future__ import annotations

import re

import torch

from study_common import document_start_id


def _filled(question: str, option: str) -> str:
    # As the authors' script does: every run of underscores becomes a mask, the mask becomes the option.
    return re.sub(r"_+", "<mask>", question).replace("<mask>", option)


@torch.inference_mode()
def reference_scores(model, tokenizer, question: str, options: list[str], loss_dtype: str = "float32") -> list[float]:
    """One score per option (lower is better), each from its own forward pass of ``[start] + sentence``.

    ``loss_dtype="float32"`` upcasts the logits before the loss; ``"model"`` keeps them in the dtype the model
    returns, as the released loop does on current transformers (bfloat16 weights: a bfloat16 loss)."""
    if loss_dtype not in ("float32", "model"):
        raise ValueError(loss_dtype)
    scores = []
    device = next(model.parameters()).device
    for option in options:
        encoded = tokenizer(_filled(question, option), add_special_tokens=False)
        input_ids = torch.tensor([[document_start_id(tokenizer)] + encoded["input_ids"]], device=device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
        if loss_dtype == "float32":
            logits = logits.float()
        scores.append(float(torch.nn.CrossEntropyLoss(reduction="mean")(logits, input_ids[0, 1:])))
    return scores


def reference_prediction(scores: list[float]) -> int:
    """Stable sort by score, as the authors' script ranks options: the first of the lowest wins."""
    return sorted(range(len(scores)), key=lambda k: scores[k])[0]
