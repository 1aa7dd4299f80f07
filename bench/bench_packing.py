#!/usr/bin/env python
"""Packing benchmark: real-token fraction and throughput of the bridge-aware packer at block 2048.

On a realistic length mix for one CPT language (English-Tibetan sentence pairs plus monolingual
articles, lengths below), it measures, for each of the three settings:

- the packer's real-token fraction (goals: >= 99% without bridges, >= 98% with (mismatched) bridges);
- packing throughput (documents/s, tokens/s), against two baselines measured in the same run:
  * next-fit concatenation (documents in stream order, a new window whenever the next one does not
    fit; the simplest packer that never splits a document), and
  * first-fit decreasing (offline, all documents sorted by length: a near-optimal fill that a
    streaming packer cannot do, shown as the ceiling);
- the full plan of the three settings (``plan_packing``) at paper scale per step: a budget of
  ``--steps`` steps of 256 windows of 2048 tokens (0.5M tokens per step).

Length mix (tokens of the study's byte-level BPE; Tibetan takes ~3x the tokens of English text
of the same content): English side lognormal, median 30; target side = English x lognormal
median 2.0; monolingual articles lognormal, median 400 tokens, sigma 1.2 (long tail cut into
2048-token segments, as run_cpt.py does; packing.py is the packer).

    python bench/bench_packing.py [--pairs 60000 --mono 6000 --steps 40]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packing import SETTINGS, PackingUnit, SettingDocuments, pack, pair_group_sizes, plan_packing, shuffled  # noqa: E402


def realistic_units(rng: random.Random, n_pairs: int, n_mono: int, block_size: int = 2048) -> list[PackingUnit]:
    units = []
    for _ in range(n_pairs):
        en = max(2, min(400, round(rng.lognormvariate(math.log(30), 0.6))))
        tgt = max(2, min(800, round(en * rng.lognormvariate(math.log(2.0), 0.3))))
        if en + tgt + 2 <= block_size:  # build_pairs drops pairs that cannot share a window
            units.append(PackingUnit(len(units), (1 + en, 1 + tgt), True))
    for _ in range(n_mono):
        tokens = max(5, min(60_000, round(rng.lognormvariate(math.log(400), 1.2))))
        piece = block_size - 1
        lengths = tuple(1 + min(piece, tokens - at) for at in range(0, tokens, piece))
        units.append(PackingUnit(len(units), lengths, False))
    return units


def next_fit(lengths, block_size):
    windows, free = 0, 0
    for length in lengths:
        if length > free:
            windows, free = windows + 1, block_size
        free -= length
    return windows


def first_fit_decreasing(lengths, block_size):
    import bisect

    frees: list[int] = []  # sorted free space of open windows (best fit = first fit on sorted)
    windows = 0
    for length in sorted(lengths, reverse=True):
        position = bisect.bisect_left(frees, length)
        if position == len(frees):
            windows += 1
            free = block_size - length
        else:
            free = frees.pop(position) - length
        if free:
            bisect.insort(frees, free)
    return windows


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60_000)
    parser.add_argument("--mono", type=int, default=6_000)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40, help="steps of 256 windows for the plan timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    units = realistic_units(random.Random(args.seed), args.pairs, args.mono, args.block_size)
    stream = shuffled(units, args.seed, 0)
    real = sum(sum(u.segment_lengths) for u in units)
    print(
        f"{len(units)} units ({args.pairs} pairs asked, {args.mono} articles), {real:,} tokens, block {args.block_size}"
    )
    print(
        f"{'setting':<18} {'packer fill':>11} {'next-fit':>9} {'FFD ceiling':>11} {'docs/s':>10} {'Mtok/s':>7} "
        f"{'time vs next-fit':>16}"
    )
    for setting in SETTINGS:
        windows, seconds = timed(pack, stream, args.block_size, setting)
        documents = SettingDocuments(setting, pair_group_sizes(stream))
        lengths = [document.length for unit in stream for document in documents(unit)]
        nf_windows, nf_seconds = timed(next_fit, lengths, args.block_size)
        ffd_windows = first_fit_decreasing(lengths, args.block_size)
        fill = real / (len(windows) * args.block_size)
        print(
            f"{setting:<18} {fill:>11.4%} {real / (nf_windows * args.block_size):>9.4%} "
            f"{real / (ffd_windows * args.block_size):>11.4%} {len(lengths) / seconds:>10,.0f} "
            f"{real / seconds / 1e6:>7.1f} {seconds / nf_seconds:>15.1f}x"
        )
        goal = 0.99 if setting == "no_bridges" else 0.98
        print(f"    goal >= {goal:.0%}: {'met' if fill >= goal else 'NOT MET'}")

    per_step = 256
    _, seconds = timed(
        lambda: plan_packing(
            units, block_size=args.block_size, windows_per_step=per_step, seed=args.seed, max_steps=args.steps
        )
    )
    plan = plan_packing(
        units, block_size=args.block_size, windows_per_step=per_step, seed=args.seed, max_steps=args.steps
    )
    planned_real = sum(sum(units[k[1]].segment_lengths) for k in plan.seen)
    print(
        f"plan, {len(plan.settings)} settings, {plan.steps} steps x {per_step} windows: {seconds:.2f} s "
        f"({seconds / plan.steps * 1500:.0f} s extrapolated to the paper's 1,500 steps); "
        f"real-token fraction after equalizing {planned_real / (plan.steps * per_step * args.block_size):.4%}; "
        "packer windows " + ", ".join(f"{name} {planned.packer_windows}" for name, planned in plan.settings.items())
    )


if __name__ == "__main__":
    main()
