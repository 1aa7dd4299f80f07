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

``--timed_run FLAGS...`` runs run_pretrain.py with FLAGS and the same timing callback, and writes
OUT/throughput.json (per-step times, steady tokens/s, peak GPU memory, attended keys per token for the MFU):
bench/gpu_train_bench.sh launches it under accelerate in place of run_pretrain.py.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.compute  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import run_pretrain  # noqa: E402

WORDS = (
    "the of and to in is was for on that with as by at from his her their city river king war people music "
    "school language culture festival food family history village harvest autumn winter bridge mountain"
).split()


class ThroughputCallback(TrainerCallback):
    """Records the wall time at the end of every optimizer step. The steady rate leaves out the first
    ``warmup_steps`` steps (allocator, kernel choice, caches); on a GPU each step end waits for the device,
    so the times are those of the GPU work."""

    def __init__(self, warmup_steps: int = 5):
        self.warmup_steps = warmup_steps
        self.step_end_times: list[tuple[int, float]] = []
        self.attended_keys_per_token = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.step_end_times = [(state.global_step, time.perf_counter())]
        dataset = getattr(train_dataloader, "dataset", None)
        if isinstance(dataset, Dataset) and "position_ids" in dataset.column_names:
            self.attended_keys_per_token = attended_keys_per_token(dataset)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.step_end_times.append((state.global_step, time.perf_counter()))

    def summary(self, tokens_per_step: int) -> dict:
        times = self.step_end_times
        summary = {"tokens_per_step": tokens_per_step, "steps_timed": len(times) - 1, "warmup_steps": 0}
        summary["attended_keys_per_token"] = self.attended_keys_per_token
        if len(times) < 2:
            return summary
        first = min(self.warmup_steps, len(times) - 2)
        (step0, t0), (step1, t1) = times[first], times[-1]
        summary.update(
            warmup_steps=first,
            step_seconds=[round(b[1] - a[1], 6) for a, b in zip(times, times[1:])],
            steady_steps_per_second=(step1 - step0) / (t1 - t0),
            steady_tokens_per_second=(step1 - step0) * tokens_per_step / (t1 - t0),
        )
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            summary["device"] = torch.cuda.get_device_name()
            summary["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return summary


def attended_keys_per_token(blocks: Dataset) -> float:
    """Mean number of keys a token attends to under causal attention inside its document (its position + 1),
    which its attention FLOPs scale with; (block_size + 1) / 2 when the windows have no position ids."""
    positions = pyarrow.compute.list_flatten(blocks.data.column("position_ids"))
    return (pyarrow.compute.sum(positions).as_py() + len(positions)) / max(1, len(positions))


def timed_run(argv: list[str]) -> dict:
    """run_pretrain.main(argv) with the timing callback; the main process writes OUT/throughput.json."""
    timer = ThroughputCallback()
    run_pretrain.main(argv, callbacks=[timer])
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    output_dir = Path(run_pretrain.parse_arguments(argv)[2].output_dir)
    setting = json.loads((output_dir / "data_stats.json").read_text())
    summary = timer.summary(setting["tokens_per_step"])
    if summary["attended_keys_per_token"] is None:  # no document attention: one causal window
        summary["attended_keys_per_token"] = (setting["block_size"] + 1) / 2
    run_pretrain.write_json_atomic(output_dir / "throughput.json", summary)
    return summary


def common_arguments(args, output_dir: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--max_steps", str(args.steps), "--per_device_train_batch_size",
        str(args.batch_size), "--learning_rate", "3e-4", "--save_strategy", "no", "--logging_steps", "10",
        "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--log_level", "error",
    ]  # fmt: skip


def run_pretrain_steps_per_second(args, work: Path, name: str, extra: list[str]) -> float:
    output_dir = work / name
    return timed_run(
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
    )["steady_steps_per_second"]


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
    timer = ThroughputCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks,
        data_collator=default_data_collator,
        callbacks=[timer],
    )
    trainer.train()
    return timer.summary(args.batch_size * args.block_size)["steady_steps_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per timed run (default 30).")
    parser.add_argument("--rounds", type=int, default=7, help="Runs of each variant, in rotated order (default 7).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every run (default 1).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument(
        "--timed_run", nargs=argparse.REMAINDER, help="Run run_pretrain.py with the flags that follow, timed."
    )
    args = parser.parse_args()
    if args.timed_run is not None:
        run_pretrain.exit_on_input_error(lambda: timed_run(args.timed_run))
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
