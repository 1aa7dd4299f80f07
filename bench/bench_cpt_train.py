#!/usr/bin/env python
"""Training speed of run_cpt.py against a plain Trainer on pre-chunked blocks of the same tokens.

Both arms train the same tiny Qwen2 model (configs/tiny.json, vocabulary of a tokenizer trained
here) for the same number of steps, batch and block size, in separate processes, alternating:

- run_cpt: ``python run_cpt.py ... --bridges`` (packed windows, position ids restarting per
  document, document-isolated attention, labels masked at segment starts);
- plain:   this script with ``--arm plain``: the same documents' tokens, ``[start] + tokens``
  concatenated and cut into ``block_size`` blocks (run_clm's ``group_texts``), the Trainer with
  ``default_data_collator`` (one causal mask over the whole block).

It prints each arm's ``train_steps_per_second`` (the Trainer's own measure of the training loop)
and the ratio run_cpt / plain (goal >= 0.95), plus run_cpt's start-up (planning + audit) seconds.

    python bench/bench_cpt_train.py [--steps 30 --block_size 512 --batch 8 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

EN = "the people of the high valleys drink butter tea and eat tsampa at the new year festival".split()
BO = "བོད་ རིགས་ ཀྱིས་ ཇ་ མར་ འཐུང་ རྩམ་ པ་ ཟ་ ལོ་ གསར་ ལྷ་ ས་ ཡུལ་ ལུང་".split()


def make_inputs(folder: Path, n_pairs: int, n_mono: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    pairs, mono = folder / "pairs.jsonl", folder / "mono.txt"
    with pairs.open("w", encoding="utf-8") as handle:
        for _ in range(n_pairs):
            en = " ".join(rng.choice(EN) for _ in range(rng.randint(5, 30)))
            bo = "".join(rng.choice(BO) for _ in range(rng.randint(5, 40)))
            handle.write(json.dumps({"en": en, "bo": bo}, ensure_ascii=False) + "\n")
    mono.write_text("".join("".join(rng.choice(BO) for _ in range(rng.randint(20, 600))) + "\n" for _ in range(n_mono)))
    return pairs, mono


def make_base(folder: Path, texts: list[str]) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from run_pretrain import train_tokenizer

    tokenizer = train_tokenizer(texts, 2000, show_progress=False)
    config = AutoConfig.from_pretrained(str(REPO_ROOT / "configs" / "tiny.json"))
    config.vocab_size = len(tokenizer)
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plain_arm(args) -> None:
    """A plain Trainer on pre-chunked blocks of the dataset's tokens (run_clm style)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    start = tokenizer.eos_token_id
    records = datasets.load_from_disk(args.data)
    stream: list[int] = []
    for record in records:
        for text in [record["en"], record["tgt"]] if record["kind"] == "pair" else [record["text"]]:
            stream += [start] + tokenizer(text, add_special_tokens=False)["input_ids"]
    n_blocks = len(stream) // args.block_size
    blocks = [stream[i * args.block_size : (i + 1) * args.block_size] for i in range(n_blocks)]
    needed = args.steps * args.batch
    if n_blocks < needed:
        raise SystemExit(f"only {n_blocks} blocks for {needed} needed; raise --pairs/--mono")
    train = datasets.Dataset.from_dict({"input_ids": blocks[:needed], "labels": blocks[:needed]})
    model = AutoModelForCausalLM.from_pretrained(args.base)
    model.config.use_cache = False
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        save_strategy="no", logging_steps=args.steps, report_to="none", seed=0, use_cpu=True,
    )  # fmt: skip
    result = Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator).train()
    Path(args.output_dir, "train_results.json").write_text(json.dumps(result.metrics))


def run_arm(arm: str, base: Path, data: Path, folder: Path, args) -> tuple[float, float]:
    output = folder / f"{arm}-{time.monotonic_ns()}"
    common = ["--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch)]
    if arm == "run_cpt":
        command = [sys.executable, str(REPO_ROOT / "run_cpt.py"), "--model_name_or_path", str(base),
                   "--dataset_path", str(data), "--lang", "bo", "--bridges", "--block_size", str(args.block_size),
                   "--output_dir", str(output), "--save_strategy", "no", "--logging_steps", str(args.steps),
                   "--report_to", "none", "--use_cpu", *common]  # fmt: skip
    else:
        command = [sys.executable, __file__, "--arm", "plain", "--base", str(base), "--data", str(data),
                   "--output_dir", str(output), "--block_size", str(args.block_size), "--steps", str(args.steps),
                   "--batch", str(args.batch)]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - started
    metrics = json.loads((output / "train_results.json").read_text())
    return float(metrics["train_steps_per_second"]), wall - float(metrics["train_runtime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=["both", "plain"], default="both")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--mono", type=int, default=600)
    parser.add_argument("--base")
    parser.add_argument("--data")
    parser.add_argument("--output_dir")
    args = parser.parse_args()
    if args.arm == "plain":
        return plain_arm(args)

    import build_pairs

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pairs, mono = make_inputs(folder, args.pairs, args.mono)
        texts = mono.read_text().splitlines() + [json.loads(line)["en"] for line in pairs.read_text().splitlines()]
        base = make_base(folder / "base", texts[:2000])
        data = folder / "data"
        build_pairs.main(["--lang", "bo", "--pairs_files", str(pairs), "--tgt_column", "bo", "--mono_files", str(mono),
                          "--tokenizer_name", str(base), "--block_size", str(args.block_size),
                          "--output_dir", str(data)])  # fmt: skip
        speeds = {"run_cpt": [], "plain": []}
        startup = []
        for _ in range(args.repeats):
            for arm in ("plain", "run_cpt"):
                steps_per_second, outside_loop = run_arm(arm, base, data, folder, args)
                speeds[arm].append(steps_per_second)
                if arm == "run_cpt":
                    startup.append(outside_loop)
                print(f"  {arm:<8} {steps_per_second:.3f} steps/s", flush=True)
    cpt, plain = statistics.median(speeds["run_cpt"]), statistics.median(speeds["plain"])
    print(
        f"block {args.block_size}, batch {args.batch}, {args.steps} steps, configs/tiny.json model, "
        f"{args.repeats} alternating repeats (median)"
    )
    print(
        f"run_cpt {cpt:.3f} steps/s, plain Trainer on pre-chunked blocks {plain:.3f} steps/s: "
        f"ratio {cpt / plain:.3f} (goal >= 0.95)"
    )
    print(
        f"run_cpt time outside the training loop (imports, tokenizing, plan, audit, saving): "
        f"{statistics.median(startup):.1f} s"
    )


if __name__ == "__main__":
    main()
