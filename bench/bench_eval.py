#!/usr/bin/env python
"""Benchmark: run_eval.py's batched cloze scoring vs the paper's unbatched loop, same model, same questions.

* baseline: ``tests/paper_reference.reference_scores``: the paper's probe written straight from its
  description, one filled sentence per forward pass, no padding (what the authors' script does);
* run_eval: ``run_eval.score_question_sets``: the options of each question as one prefix tree (the question
  text before the blank computed once, a tree-shaped causal mask), many questions per forward, the
  vocabulary projection once per tree node that predicts a token.

It also prints the work each path does (token positions through the transformer and through the vocabulary
projection): on a CPU both paths are bound by that arithmetic, so the work ratio is what batching and
sharing can give beyond removing per-forward overhead.

Model: configs/tiny.json (Qwen2, hidden 128, 2 layers) with random weights and a byte-level BPE tokenizer
trained on the questions (--vocab_size). Questions: the paper's 8 released files when
../shared/data/paper-culture-cloze exists, else generated ones in all five scripts.

For each --loss_dtypes entry it times the paper loop computed that way and run_eval with that
--loss_dtype, and prints items/s of each and the ratio:

* float32 (run_eval's default): batched prefix trees against the loop with float32 logits. Asserted: the
  same prediction for every item in float32 weights; in 16-bit weights it counts the items whose scores or
  predictions differ (batching and prefix sharing round differently);
* model: run_eval's paper loop (one sentence per forward, the loss in the logits' dtype) against the loop
  with the same loss. Asserted: bit-identical scores; it counts the items with an exact tie for the best.

``--min_ratio R`` exits non-zero when the float32 path is less than R times the loop's items/s.

    python bench/bench_eval.py                          # all released questions (a few minutes on 2 cores)
    python bench/bench_eval.py --max_items 400          # quicker look
    python bench/bench_eval.py --device cuda --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from paper_reference import reference_prediction, reference_scores  # noqa: E402

import cloze  # noqa: E402
import run_eval  # noqa: E402

PAPER_CLOZE_DIR = REPO_ROOT.parent / "shared" / "data" / "paper-culture-cloze"


def generated_question_files(directory: Path, n_items: int, seed: int = 0) -> list[Path]:
    """Parallel question files in the five scripts, from a small vocabulary of each (when ../shared is absent)."""
    from cloze_samples import SAMPLE_QUESTIONS

    rng = random.Random(seed)
    paths = []
    for lang, samples in SAMPLE_QUESTIONS.items():
        words = sorted(
            {w for it in samples for w in (it["question"].replace("_", " ") + " " + " ".join(it["options"])).split()}
        )
        items = []
        for _ in range(n_items):
            before, after = rng.sample(words, rng.randint(3, 12)), rng.sample(words, rng.randint(0, 6))
            options = [" ".join(rng.sample(words, rng.randint(1, 3))) for _ in range(4)]
            items.append(
                {"question": " ".join(before) + " ___ " + " ".join(after), "options": options, "answer": options[0]}
            )
        path = directory / f"generated-culture_{lang}.json"
        path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    return paths


def build_model(question_sets, vocab_size: int, output_dir: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    texts = [it["question"] for qs in question_sets for it in qs.items] + [
        o for qs in question_sets for it in qs.items for o in it["options"]
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "tiny.json")
    config.vocab_size = len(fast)
    config.eos_token_id = config.bos_token_id = fast.eos_token_id
    config.pad_token_id = fast.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(output_dir)
    fast.save_pretrained(output_dir)
    return output_dir


@torch.inference_mode()
def matmul_rate(model, device, sync, rows: int = 512, seconds: float = 2.0) -> float:
    """Multiply-accumulates per second of the model's vocabulary projection on ``rows`` hidden states."""
    head = model.get_output_embeddings()
    hidden = torch.randn(rows, head.in_features, device=device, dtype=head.weight.dtype)
    head(hidden)
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        head(hidden)
        calls += 1
    sync()
    return calls * rows * head.in_features * head.out_features / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_items", type=int, default=None, help="Use the first N items of each file.")
    parser.add_argument("--vocab_size", type=int, default=8000, help="Tokenizer vocabulary (configs/tiny.json: 8000).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument(
        "--loss_dtypes", nargs="+", default=["float32", "model"], choices=["float32", "model"], help="Paths to time."
    )
    parser.add_argument("--min_ratio", type=float, default=None, help="Fail when the float32 ratio is below this.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if PAPER_CLOZE_DIR.is_dir():
            sources, origin = [str(PAPER_CLOZE_DIR)], "the paper's 8 released files"
        else:
            sources = [str(p) for p in generated_question_files(Path(tmp), 300)]
            origin = "generated questions (../shared absent)"
        question_sets = cloze.load_question_sets(sources)
        if args.max_items:
            question_sets = [
                cloze.QuestionSet(qs.stem, qs.lang, qs.source, qs.items[: args.max_items], qs.quirks)
                for qs in question_sets
            ]
        model_dir = build_model(question_sets, args.vocab_size, Path(tmp) / "model")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        device = run_eval.resolve_device(args.device)
        model = run_eval.load_model(model_dir, args.dtype, device, "sdpa")
        n_items = sum(len(qs.items) for qs in question_sets)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"questions: {origin}, {n_items} items x 4 options; model: configs/tiny.json, {n_params / 1e6:.2f}M parameters, "
            f"vocab {len(tokenizer)}, {args.dtype} on {device}, {torch.get_num_threads()} threads"
        )

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        # Warm up both paths (first calls allocate and pick kernels).
        first = question_sets[0].items[0]
        reference_scores(model, tokenizer, first["question"], first["options"])
        run_eval.score_question_sets(model, tokenizer, [question_sets[0]], args.batch_size)

        ratios = {}
        for loss_dtype in args.loss_dtypes:
            sync()
            start = time.perf_counter()
            reference = [
                [
                    reference_scores(model, tokenizer, it["question"], it["options"], loss_dtype=loss_dtype)
                    for it in qs.items
                ]
                for qs in question_sets
            ]
            sync()
            reference_seconds = time.perf_counter() - start

            start = time.perf_counter()
            scored = run_eval.score_question_sets(
                model, tokenizer, question_sets, args.batch_size, loss_dtype=loss_dtype
            )
            sync()
            seconds = time.perf_counter() - start

            mismatches, differing, ties, max_diff = [], 0, 0, 0.0
            for qs, ref_set, got_set in zip(question_sets, reference, scored):
                for index, (ref, got, item) in enumerate(zip(ref_set, got_set, qs.items)):
                    max_diff = max(max_diff, float(np.max(np.abs(np.array(ref) - np.array(got)))))
                    differing += ref != got
                    ties += cloze.tie_credit(got, item["answer"])[0] > 1
                    if reference_prediction(ref) != run_eval.predict(got):
                        mismatches.append(f"{qs.stem} #{index}")
            path = "batched prefix trees" if loss_dtype == "float32" else "paper loop, loss in the logits' dtype"
            print(
                f"--loss_dtype {loss_dtype} ({path}): predictions identical on {n_items - len(mismatches)}/{n_items} "
                f"items, scores bit-identical on {n_items - differing}/{n_items}, max |score difference| "
                f"{max_diff:.2e}; {ties} items tie for the best score"
            )
            print(
                f"  paper loop (1 sentence per forward): {n_items / reference_seconds:8.1f} items/s "
                f"({reference_seconds:.1f} s)"
            )
            print(f"  run_eval (batch {args.batch_size}):  {n_items / seconds:8.1f} items/s ({seconds:.1f} s)")
            ratios[loss_dtype] = reference_seconds / seconds
            print(f"  ratio: {ratios[loss_dtype]:.1f}x")
            if loss_dtype == "model":
                assert not differing, f"--loss_dtype model differs from the paper loop on {differing} items"
            elif args.dtype == "float32":
                assert not mismatches, f"predictions differ on {mismatches[:20]}"
            elif mismatches:
                # In 16-bit weights, padding and batch shape move scores by ~1e-3: near-ties may flip.
                print(f"  {args.dtype}: predictions differ on {len(mismatches)} near-tied items: {mismatches[:10]}")
            if loss_dtype == "float32":
                reference_seconds_float32, batched_seconds = reference_seconds, seconds
        if "float32" not in ratios:
            return
        reference_seconds = reference_seconds_float32
        plan = run_eval.plan_scoring(tokenizer, question_sets)
        # The loop runs [start] + filled sentence for every option, duplicates included.
        loop_positions = sum(len(plan.sequences[seq]) for set_plan in plan.options for item in set_plan for seq in item)
        trees, _ = run_eval.build_prefix_trees(plan.sequences, plan.groups)
        nodes = sum(len(tree.tokens) for tree in trees)
        projected = sum(len(set(tree.parents[1:])) for tree in trees)
        print(
            f"work: transformer positions {loop_positions} (loop) vs {nodes} (run_eval, "
            f"{loop_positions / nodes:.2f}x fewer); vocabulary projections {loop_positions} vs {projected} "
            f"({loop_positions / projected:.2f}x fewer)"
        )
        # Multiply-accumulates of the weight matrices (attention scores are small at these lengths).
        c = model.config
        kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        per_position = c.num_hidden_layers * c.hidden_size * (2 * c.hidden_size + 2 * kv + 3 * c.intermediate_size)
        per_projection = c.hidden_size * c.vocab_size
        loop_macs = loop_positions * (per_position + per_projection)
        run_eval_macs = nodes * per_position + projected * per_projection
        print(
            f"arithmetic: loop {loop_macs / 1e9:.0f} GMAC at {loop_macs / reference_seconds / 1e9:.1f} GMAC/s, "
            f"run_eval {run_eval_macs / 1e9:.0f} GMAC at {run_eval_macs / batched_seconds / 1e9:.1f} GMAC/s"
        )
        peak = matmul_rate(model, device, sync)
        print(
            f"ceiling: this machine multiplies the projection's matrices at {peak / 1e9:.1f} GMAC/s; run_eval's "
            f"arithmetic alone at that rate, with no other cost, would be {reference_seconds * peak / run_eval_macs:.1f}x"
        )
        if args.min_ratio is not None and ratios["float32"] < args.min_ratio:
            sys.exit(
                f"bench_eval.py: error: float32 ratio {ratios['float32']:.1f}x is below --min_ratio {args.min_ratio}"
            )


if __name__ == "__main__":
    main()
