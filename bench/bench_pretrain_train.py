#!/usr/bin/env python
"""Training speed of run_pretrain.py against a plain Trainer on the same pre-chunked blocks.

Both train the same tiny model (configs/tiny.json, same seed) on the same token windows with
the same batch size and optimizer; only the pipeline differs:

* run_pretrain: its own main() (packed windows, the collator with position ids that restart
  at every document, labels -100 at document starts, i.e. per-document causal attention);
* baseline: a plain ``Trainer`` on a Dataset of the same windows with ``labels = input_ids``,
  ``default_data_collator`` and ordinary causal attention (what run_clm does).

Both are timed by the same callback (steady steps/s after 5 warm-up steps). Also timed:
run_pretrain with ``--no_document_attention``, to separate the cost of the per-document mask
from the rest. The three run in turn, ``--rounds`` times with the order rotated, and the
medians are compared (the best runs too). ``--threads`` (default 1) fixes torch's CPU threads:
on a machine shared with other jobs one thread per run gives far steadier timings than two.
Goal: run_pretrain / baseline >= 0.95.

    python bench/bench_pretrain_train.py                        # the row of docs/benchmarks.md; ~12 minutes on 2 cores
    python bench/bench_pretrain_train.py --steps 15 --rounds 2  # quick
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator  # noqa: E402

import run_pretrain  # noqa: E402

WORDS = (
    "the of and to in is was for on that with as by at from his her their city river king war people music "
    "school language culture festival food family history village harvest autumn winter bridge mountain"
).split()


def common_arguments(args, output_dir: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--max_steps", str(args.steps), "--per_device_train_batch_size",
        str(args.batch_size), "--learning_rate", "3e-4", "--save_strategy", "no", "--logging_steps", "10",
        "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--log_level", "error",
    ]  # fmt: skip


def run_pretrain_steps_per_second(args, work: Path, name: str, extra: list[str]) -> float:
    output_dir = work / name
    run_pretrain.main(
        [
            "--config_name",
            str(REPO / "configs/tiny.json"),
            "--tokenizer_name",
            str(work / "tokenizer"),
            "--train_file",
            str(work / "corpus.txt"),
            "--block_size",
            str(args.block_size),
            "--cache_dir",
            str(work / "cache"),
            *common_arguments(args, output_dir),
            *extra,
        ]  # fmt: skip
    )
    return json.loads((output_dir / "throughput.json").read_text())["steady_steps_per_second"]


def baseline_steps_per_second(args, work: Path, blocks_dir: Path, vocab_size: int) -> float:
    """A plain Trainer on the pre-chunked windows (labels = input_ids, ordinary causal attention)."""
    blocks = load_from_disk(str(blocks_dir)).select_columns(["input_ids"])
    blocks = blocks.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    parser_args = run_pretrain.HfArgumentParser(TrainingArguments)
    (training_args,) = parser_args.parse_args_into_dataclasses(args=common_arguments(args, work / "baseline"))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(REPO / "configs/tiny.json", vocab_size=vocab_size, use_cache=False)
    run_pretrain.set_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    tokens_per_step = args.batch_size * args.block_size
    timer = run_pretrain.ThroughputCallback(tokens_per_step)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks,
        data_collator=default_data_collator,
        callbacks=[timer],
    )
    trainer.train()
    return timer.summary()["steady_steps_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per timed run (default 30).")
    parser.add_argument("--rounds", type=int, default=7, help="Runs of each variant, in rotated order (default 7).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every run (default 1).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_pretrain_train.") as tmp:
        work = Path(tmp)
        rng = random.Random(0)
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 300))).capitalize() + "." for _ in range(6000)
        ]
        (work / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = run_pretrain.train_tokenizer(lines[:2000], 8000, show_progress=False)
        tokenizer.save_pretrained(work / "tokenizer")

        # The same windows for the baseline: run_pretrain's own packing, saved once.
        raw = run_pretrain.read_train_documents(
            run_pretrain.DataArguments(train_file=str(work / "corpus.txt"), cache_dir=str(work / "cache")), False
        )
        data_args = run_pretrain.DataArguments(block_size=args.block_size)
        blocks, stats = run_pretrain.prepare_dataset(raw, tokenizer, tokenizer.eos_token_id, data_args)
        blocks.save_to_disk(str(work / "blocks"))
        print(f"{stats['blocks']} windows of {args.block_size} tokens; {args.steps} steps of {args.batch_size}")

        variants = {
            "run_pretrain": lambda r: run_pretrain_steps_per_second(args, work, f"pretrain{r}", []),
            "baseline": lambda r: baseline_steps_per_second(args, work, work / "blocks", len(tokenizer)),
            "run_pretrain_no_document_attention": lambda r: run_pretrain_steps_per_second(
                args, work, f"nodoc{r}", ["--no_document_attention"]
            ),
        }
        results = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                results[name].append(variants[name](r))
            print({name: [round(v, 3) for v in values] for name, values in results.items()})

    median = {name: statistics.median(values) for name, values in results.items()}
    best = {name: max(values) for name, values in results.items()}
    print(f"torch threads {args.threads}; steps/s (median of {args.rounds}, best):")
    for name in names:
        print(f"  {name:36s} {median[name]:.3f}  {best[name]:.3f}")
    for name in ("run_pretrain", "run_pretrain_no_document_attention"):
        print(
            f"ratio {name} / baseline: {median[name] / median['baseline']:.3f} (medians), "
            f"{best[name] / best['baseline']:.3f} (best)  (goal >= 0.95)"
        )


if __name__ == "__main__":
    main()
