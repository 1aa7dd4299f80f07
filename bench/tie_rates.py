#!/usr/bin/env python
"""Tie rates and accuracy under both tie rules, per question file, for one or more models.

For each model folder and each precision (``--precisions``, weights dtype : run_eval --loss_dtype), it scores
the questions as run_eval.py does and prints one Markdown row per question file: items, the share of items
whose best score is tied exactly, accuracy under the paper's rule (the first tied option wins), accuracy with
ties broken uniformly at random (fractional credit), the difference (what ties give the first-wins rule), and
the accuracy of always answering option 0 (a property of the file: where its answers sit).

    python bench/tie_rates.py MODEL_DIR [MODEL_DIR ...]            # the released files, float32 and bf16/model
    python bench/tie_rates.py MODEL_DIR --questions Q_DIR --precisions bfloat16:model
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import cloze  # noqa: E402
import run_eval  # noqa: E402

PAPER_CLOZE_DIR = REPO_ROOT.parent / "shared" / "data" / "paper-culture-cloze"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="Model folders (config.json and tokenizer inside).")
    parser.add_argument("--questions", nargs="+", default=[str(PAPER_CLOZE_DIR)], help="As run_eval --questions.")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32:float32", "bfloat16:model"],
        help="DTYPE:LOSS_DTYPE pairs (run_eval --dtype and --loss_dtype).",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hints = typing.get_type_hints(run_eval.EvalArguments)  # the choices run_eval.py accepts
    precisions = []
    for entry in args.precisions:
        dtype, _, loss_dtype = entry.partition(":")
        if dtype not in typing.get_args(hints["dtype"]) or loss_dtype not in typing.get_args(hints["loss_dtype"]):
            parser.error(f"--precisions entry {entry!r}: expected DTYPE:LOSS_DTYPE, e.g. bfloat16:model")
        precisions.append((dtype, loss_dtype))

    question_sets = cloze.load_question_sets(args.questions)
    device = run_eval.resolve_device(args.device)
    print(
        "| model | dtype | loss dtype | questions | items | tie rate | accuracy (first wins) | "
        "accuracy (ties at random) | ties advantage | always option 0 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_dir in args.models:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for dtype, loss_dtype in precisions:
            model = run_eval.load_model(Path(model_dir), dtype, device, "sdpa")
            scores = run_eval.score_question_sets(
                model, tokenizer, question_sets, args.batch_size, loss_dtype=loss_dtype
            )
            for qs, set_scores in zip(question_sets, scores):
                _, acc = run_eval.item_accounting(qs, set_scores)
                always_first = cloze.position_bias(qs.items)["always_first_accuracy"]
                print(
                    f"| {model_dir} | {dtype} | {loss_dtype} | {qs.stem} | {acc['total']} | {acc['tie_rate']:.3f} | "
                    f"{acc['accuracy']:.3f} | {acc['accuracy_fractional']:.3f} | {acc['ties_advantage']:+.3f} | "
                    f"{always_first:.3f} |",
                    flush=True,
                )
            del model


if __name__ == "__main__":
    main()
