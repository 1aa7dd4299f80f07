#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8", "tqdm"]
# ///
"""The with-minus-without transfer analysis of CPT runs: does training with bridges carry knowledge across?

Step 3b of the study. Input: the probing output (run_eval.py's ``accuracy.json`` + ``predictions.jsonl``) of
runs trained with and without bridges, given as ``--with_bridges A.. --without_bridges B..`` (several =
several seeds) or as ``--runs R..`` grouped by the ``cpt_setting`` {lang, bridges, seed} each run records.
A run directory without probing output is probed first into ``RUN/<--eval_dir_name>`` when ``--questions``
is given: every flag this script does not know is one of run_eval.py's probing flags (``--questions``,
``--scoring``, ``--dtype``, ``--diagnostic_pairs``, ...) and is passed on to it.

Per language and direction (en->X: X questions; X->en: English questions), with the runs aligned on the
checkpoint steps they share and paired by seed:

* the accuracy curves of both settings and the gap per step, each with a percentile bootstrap CI (questions
  resampled, and seed pairs too when there are several: a hierarchical bootstrap);
* the mean gap over the curve with its CI, which gives the verdict: ``transfer`` (> 0), ``reverse`` (< 0),
  ``no evidence`` (covers 0);
* an exact McNemar test per seed pair at the final checkpoint (on first-wins correctness);
* both tie rules (``--tie_policy`` picks the main numbers; cloze.tie_credit), and the last bridge
  diagnostic of each run where it has one.

Outputs in ``--output_dir``: ``transfer.json``, ``transfer.md``, ``transfer_curves.png`` (Figure 3 style)
and ``transfer_summary.png`` (Figure 1 style).

Needs cloze.py and study_common.py beside it (and run_eval.py, with torch, to probe runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from cloze import TIE_POLICIES, QuestionSet, load_question_sets, read_predictions
from study_common import exit_on_input_error, setup_logging, write_json_atomic, write_text_atomic

logger = logging.getLogger("run_transfer")


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


@dataclass
class TransferArguments:
    with_bridges: list[str] | None = field(
        default=None,
        metadata={
            "help": "Runs trained WITH bridges: run directories (probed first into RUN/<eval_dir_name> when "
            "--questions is given) or eval output directories (holding accuracy.json). Several = several seeds."
        },
    )
    without_bridges: list[str] | None = field(
        default=None, metadata={"help": "Runs trained WITHOUT bridges, as for --with_bridges."}
    )
    runs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Alternative to --with_bridges/--without_bridges: any number of runs (or their eval outputs), "
            "grouped by the cpt_setting {lang, bridges, seed} recorded in each run's config.json (copied into "
            "accuracy.json). One result row per language."
        },
    )
    output_dir: str = field(
        default="eval_output",
        metadata={"help": "Where transfer.json, transfer.md, transfer_curves.png and transfer_summary.png go."},
    )
    eval_dir_name: str = field(
        default="eval", metadata={"help": "Sub-folder of a run directory where its probing output is written."}
    )
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for every confidence interval."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap (results are reproducible)."})
    tie_policy: Literal["first", "fractional"] = field(
        default="first",
        metadata={
            "help": "Credit of an item whose best score is tied: first (the paper's rule: the first tied option is "
            "the prediction, right or wrong) or fractional (the expected credit of breaking the tie uniformly at "
            "random: 1/k per answer among the k tied options). The report shows both when they differ; the McNemar "
            "test always uses first-wins correctness (it needs right/wrong items)."
        },
    )
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})


# --------------------------------------------------------------------------------------
# The runs: their per-item results, probed first where needed
# --------------------------------------------------------------------------------------


@dataclass
class RunResults:
    """The probing results of one CPT run, as read from its eval output directory."""

    name: str
    eval_dir: Path
    bridges: bool
    lang: str | None
    seed: int | None
    steps: list[int]
    questions: dict  # stem -> describe() of the question set
    correct: dict[str, np.ndarray]  # stem -> bool array (steps x items), first-wins correctness
    fractional: dict[str, np.ndarray]  # stem -> float array (steps x items), random tie-breaking credit


def _resolve_run(
    path: str, bridges: bool | None, args, transfer: TransferArguments, question_sets: list[QuestionSet]
) -> RunResults:
    """The results of one run given as an eval output folder or a run directory (probed first into
    RUN/<eval_dir_name> with run_eval's ``args`` when there are ``question_sets``); ``bridges`` is the setting
    it was given under (None: --runs, read from its cpt_setting), checked against the one it records."""
    source = Path(path)
    if (source / "accuracy.json").is_file():
        eval_dir = source
    elif source.is_dir():
        eval_dir = source / transfer.eval_dir_name
        if question_sets:
            _probe(source, eval_dir, args, question_sets)
        elif not (eval_dir / "accuracy.json").is_file():
            raise FileNotFoundError(
                f"{source}: no accuracy.json here or in {eval_dir}; pass --questions to probe the run."
            )
    else:
        raise FileNotFoundError(f"{path}: neither an eval output directory (accuracy.json) nor a run directory.")
    accuracy, by_stem = read_predictions(eval_dir)
    _, fractional_by_stem = read_predictions(eval_dir, tie_policy="fractional")
    setting = accuracy.get("cpt_setting") or {}
    recorded = setting.get("bridges")
    if bridges is None:
        if recorded is None:
            raise ValueError(f"{path}: its cpt_setting records no 'bridges'; use --with_bridges/--without_bridges.")
        bridges = bool(recorded)
    elif recorded is not None and bool(recorded) != bridges:
        flag = "--with_bridges" if bridges else "--without_bridges"
        raise ValueError(f"{path} was given as {flag} but its cpt_setting says bridges={recorded}.")
    steps = sorted({e["step"] for e in accuracy["checkpoints"]})

    def cube(per_stem: dict, kind) -> dict[str, np.ndarray]:  # read_predictions checked every step's items
        return {
            stem: np.stack([per_step[s] for s in steps]) if steps else np.zeros((0, 0), kind)
            for stem, per_step in per_stem.items()
        }

    correct, fractional = cube(by_stem, bool), cube(fractional_by_stem, np.float64)
    lang = setting.get("lang")
    if lang is None:
        targets = sorted({q["lang"] for q in accuracy["questions"].values() if q["lang"] != "en"})
        if len(targets) != 1:
            raise ValueError(
                f"{path}: no cpt_setting lang and the questions hold languages {targets}; cannot tell its language."
            )
        lang = targets[0]
    # Name a run after the model it probed (the run folder or Hub repo), else after the folder given.
    name = setting.get("run_name") or Path(accuracy.get("model_name_or_path") or source).name
    return RunResults(
        name, eval_dir, bridges, lang, setting.get("seed"), steps, accuracy["questions"], correct, fractional
    )


def _probe(run_dir: Path, eval_dir: Path, args, question_sets: list[QuestionSet]) -> None:
    """Probe a run with run_eval.py (imported here: only probing needs torch) on its language's questions."""
    import run_eval

    setting = run_eval.read_cpt_setting(str(run_dir), run_eval.find_checkpoints(str(run_dir))[0])
    relevant = _questions_for_language(question_sets, (setting or {}).get("lang"), str(run_dir))
    run_eval.evaluate_model(args, relevant, str(run_dir), eval_dir)
    if args.diagnostic_pairs:
        run_eval.run_bridge_diagnostic(args, str(run_dir), eval_dir)


def _questions_for_language(question_sets: list[QuestionSet], lang: str | None, run: str) -> list[QuestionSet]:
    """The question sets a run of language ``lang`` is probed on: its language's sets and their parallel
    English sets (a ko run needs ko-culture-cloze_ko and _en, not the Tibetan files).

    Probing a run on questions of other languages measures nothing about it, so no match is an error, and so
    is an unknown language when the questions hold several target languages (which one would be a guess)."""
    available = sorted({qs.lang for qs in question_sets})
    targets = sorted({qs.lang for qs in question_sets if qs.lang != "en"})
    if not lang:
        if len(targets) > 1:
            raise ValueError(
                f"{run}: its config.json records no cpt_setting lang, and the questions hold several target "
                f"languages ({', '.join(targets)}): cannot tell which to probe it on. Pass only the --questions of "
                "its language (and their English parallels), or probe it with --model_name_or_path."
            )
        return question_sets
    bases = {qs.base for qs in question_sets if qs.lang == lang}
    relevant = [qs for qs in question_sets if qs.base in bases and qs.lang in (lang, "en")]
    if not relevant:
        raise ValueError(
            f"{run}: its cpt_setting lang is {lang!r}, but no question set is in {lang!r} (question languages: "
            f"{', '.join(available)}; sets: {', '.join(qs.stem for qs in question_sets)}). Pass --questions in "
            f"{lang!r} (files named '<name>_{lang}', or --question_langs STEM={lang}) with their English parallels."
        )
    return relevant


def _pair_seeds(
    with_runs: list[RunResults], without_runs: list[RunResults], lang: str
) -> list[tuple[RunResults, RunResults]]:
    if len(with_runs) != len(without_runs):
        raise ValueError(
            f"{lang}: {len(with_runs)} run(s) with bridges ({', '.join(r.name for r in with_runs)}) but "
            f"{len(without_runs)} without ({', '.join(r.name for r in without_runs)}); give one per seed in each setting."
        )
    seeds_with = [r.seed for r in with_runs]
    seeds_without = [r.seed for r in without_runs]
    if None not in seeds_with and None not in seeds_without and sorted(seeds_with) == sorted(seeds_without):
        by_seed = {r.seed: r for r in without_runs}
        return [(r, by_seed[r.seed]) for r in sorted(with_runs, key=lambda r: r.seed)]
    return list(zip(with_runs, without_runs))  # in the order given


# --------------------------------------------------------------------------------------
# The statistics: paired bootstrap, exact McNemar, verdict
# --------------------------------------------------------------------------------------


def _percentile_ci(samples: np.ndarray, confidence: float) -> np.ndarray:
    """Percentile interval along axis 0: shape (2, ...)."""
    alpha = (1 - confidence) / 2
    return np.quantile(samples, [alpha, 1 - alpha], axis=0)


def mcnemar_exact(with_correct: np.ndarray, without_correct: np.ndarray) -> dict:
    """Exact (binomial) McNemar test on the discordant pairs of two paired correctness vectors."""
    from scipy.stats import binomtest

    only_with = int(np.sum(with_correct & ~without_correct))
    only_without = int(np.sum(~with_correct & without_correct))
    discordant = only_with + only_without
    p_value = binomtest(only_with, discordant, 0.5).pvalue if discordant else 1.0
    return {"only_with_correct": only_with, "only_without_correct": only_without, "p_value": float(p_value)}


def verdict(ci: tuple[float, float]) -> str:
    if ci[0] > 0:
        return "transfer"
    if ci[1] < 0:
        return "reverse"
    return "no evidence"


def analyse_direction(
    with_correct: np.ndarray,
    without_correct: np.ndarray,
    n_bootstrap: int,
    seed: int,
    confidence: float,
    mcnemar_with: np.ndarray | None = None,
    mcnemar_without: np.ndarray | None = None,
) -> dict:
    """Gap statistics of one direction. Inputs are per-item credits (seeds x steps x questions), seed pairs
    aligned: bool correctness, or fractional credit (floats in [0, 1]); the McNemar test needs right/wrong
    items, so with fractional credit the bool correctness it runs on is given as ``mcnemar_with/_without``.

    Bootstrap: each resample draws the questions with replacement (the same draw for every run, as the
    comparison is paired) and, when there are several seed pairs, the seed pairs with replacement too
    (hierarchical), so the intervals cover both question sampling and seed-to-seed variation.
    """
    n_seeds, n_steps, n_questions = with_correct.shape
    if mcnemar_with is None or mcnemar_without is None:
        if with_correct.dtype != bool or without_correct.dtype != bool:
            raise ValueError("The McNemar test needs bool correctness: pass mcnemar_with/mcnemar_without.")
        mcnemar_with, mcnemar_without = with_correct, without_correct
    rng = np.random.default_rng(seed)
    question_weights = rng.multinomial(n_questions, np.full(n_questions, 1 / n_questions), size=n_bootstrap)
    if n_seeds > 1:
        seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_bootstrap)
    else:
        seed_weights = np.ones((n_bootstrap, 1), dtype=np.int64)
    w = with_correct.astype(np.float64)
    o = without_correct.astype(np.float64)

    def resampled(values: np.ndarray) -> np.ndarray:
        """(bootstrap x steps) mean over resampled seeds and questions; values: seeds x steps x questions."""
        per_seed = np.einsum("bq,stq->bst", question_weights, values) / n_questions
        return np.einsum("bs,bst->bt", seed_weights, per_seed) / n_seeds

    acc_with, acc_without = w.mean(axis=(0, 2)), o.mean(axis=(0, 2))
    gap = acc_with - acc_without
    boot_with, boot_without = resampled(w), resampled(o)
    boot_gap = boot_with - boot_without
    gap_ci = _percentile_ci(boot_gap, confidence)
    mean_gap_ci = _percentile_ci(boot_gap.mean(axis=1), confidence)
    per_seed_gaps = (w - o).mean(axis=2)  # seeds x steps
    per_seed_boot = np.einsum("bq,stq->bst", question_weights, w - o) / n_questions
    per_seed_mean_ci = _percentile_ci(per_seed_boot.mean(axis=2), confidence)  # 2 x seeds
    result = {
        "n_questions": n_questions,
        "n_seed_pairs": n_seeds,
        "accuracy_with": acc_with.tolist(),
        "accuracy_with_ci": _percentile_ci(boot_with, confidence).T.tolist(),
        "accuracy_without": acc_without.tolist(),
        "accuracy_without_ci": _percentile_ci(boot_without, confidence).T.tolist(),
        "gap": gap.tolist(),
        "gap_ci": gap_ci.T.tolist(),
        "mean_gap": float(gap.mean()),
        "mean_gap_ci": mean_gap_ci.tolist(),
        "final_gap": float(gap[-1]),
        "final_gap_ci": gap_ci[:, -1].tolist(),
        "mcnemar_final": [mcnemar_exact(mcnemar_with[s, -1], mcnemar_without[s, -1]) for s in range(n_seeds)],
        "per_seed": [
            {
                "gap": per_seed_gaps[s].tolist(),
                "mean_gap": float(per_seed_gaps[s].mean()),
                "mean_gap_ci_questions_only": per_seed_mean_ci[:, s].tolist(),
                "final_gap": float(per_seed_gaps[s, -1]),
                "accuracy_with": w[s].mean(axis=1).tolist(),
                "accuracy_without": o[s].mean(axis=1).tolist(),
            }
            for s in range(n_seeds)
        ],
        "ci_covers": "questions and seeds" if n_seeds > 1 else "questions only (one run pair)",
    }
    result["verdict"] = verdict(tuple(result["mean_gap_ci"]))
    return result


def _policy_summary(stats: dict) -> dict:
    keys = ("accuracy_with", "accuracy_without", "gap", "mean_gap", "mean_gap_ci", "final_gap", "verdict")
    return {key: stats[key] for key in keys}


def transfer_analysis(runs: list[RunResults], transfer: TransferArguments) -> dict:
    """Group runs by language, align steps and seeds, and analyse both directions of each language under both
    tie policies; the direction's main numbers are those of ``transfer.tie_policy``."""
    if transfer.tie_policy not in TIE_POLICIES:
        raise ValueError(f"--tie_policy must be one of {', '.join(TIE_POLICIES)}, got {transfer.tie_policy!r}.")
    by_lang = defaultdict(lambda: {True: [], False: []})
    for run in runs:
        by_lang[run.lang][run.bridges].append(run)
    return {
        "n_bootstrap": transfer.n_bootstrap,
        "bootstrap_seed": transfer.bootstrap_seed,
        "confidence": transfer.confidence,
        "tie_policy": transfer.tie_policy,
        "languages": [
            _analyse_language(lang, by_lang[lang][True], by_lang[lang][False], transfer) for lang in sorted(by_lang)
        ],
    }


def _analyse_language(
    lang: str, with_runs: list[RunResults], without_runs: list[RunResults], transfer: TransferArguments
) -> dict:
    """One language: its seed pairs aligned on the steps they share, probed on the same questions, and each
    direction (en->lang: lang questions, lang->en: English questions) of each parallel group analysed."""
    if not with_runs or not without_runs:
        have = ", ".join(r.name for r in with_runs + without_runs)
        raise ValueError(
            f"{lang}: runs of both settings are needed (have only {'with' if with_runs else 'without'}: {have})."
        )
    pairs = _pair_seeds(with_runs, without_runs, lang)
    group = [r for pair in pairs for r in pair]
    common = sorted(set.intersection(*(set(r.steps) for r in group)))
    if not common:
        listing = "; ".join(f"{r.name}: {r.steps}" for r in group)
        raise ValueError(f"{lang}: the runs share no checkpoint step ({listing}); they cannot be compared.")
    dropped = {r.name: sorted(set(r.steps) - set(common)) for r in group if set(r.steps) != set(common)}
    if dropped:
        logger.warning("%s: steps not present in every run are left out: %s", lang, dropped)
    reference = group[0].questions
    for run in group[1:]:
        for stem, meta in reference.items():
            if stem in run.questions and run.questions[stem]["sha256"] != meta["sha256"]:
                raise ValueError(f"{lang}: {group[0].name} and {run.name} were probed on different {stem} questions.")
    shared = [stem for stem in reference if all(stem in r.questions for r in group)]
    groups = defaultdict(dict)
    for stem in shared:
        groups[reference[stem]["parallel_group"]][reference[stem]["lang"]] = stem
    directions = [
        _analyse_questions(direction, stems[question_lang], question_lang, base, reference, pairs, common, transfer)
        for base, stems in sorted(groups.items())
        for question_lang, direction in ((lang, f"en->{lang}"), ("en", f"{lang}->en"))
        if question_lang in stems and lang in stems
    ]
    if not directions:
        raise ValueError(f"{lang}: no question set in {lang} with a parallel English set among {shared}.")
    return {
        "lang": lang,
        "steps": common,
        "with_bridges": [str(p[0].eval_dir) for p in pairs],
        "without_bridges": [str(p[1].eval_dir) for p in pairs],
        "run_names": [[p[0].name, p[1].name] for p in pairs],
        "steps_left_out": dropped,
        "directions": directions,
        "bridge_diagnostic": _final_diagnostics(group),
    }


def _analyse_questions(
    direction: str,
    stem: str,
    question_lang: str,
    base: str,
    reference: dict,
    pairs: list[tuple[RunResults, RunResults]],
    common: list[int],
    transfer: TransferArguments,
) -> dict:
    """One direction: the gap statistics of question set ``stem`` under both tie policies."""

    def credit(side: int, policy: str) -> np.ndarray:
        """seeds x common steps x questions, for the with (0) or without (1) side of each seed pair."""
        return np.stack(
            [
                (pair[side].correct if policy == "first" else pair[side].fractional)[stem][
                    [pair[side].steps.index(s) for s in common]
                ]
                for pair in pairs
            ]
        )

    first_wins = (credit(0, "first"), credit(1, "first"))
    by_policy = {
        policy: analyse_direction(
            credit(0, policy),
            credit(1, policy),
            transfer.n_bootstrap,
            transfer.bootstrap_seed,
            transfer.confidence,
            *first_wins,
        )
        for policy in TIE_POLICIES
    }
    stats = by_policy[transfer.tie_policy]
    for k, entry in enumerate(stats["per_seed"]):
        entry["with_run"], entry["without_run"] = pairs[k][0].name, pairs[k][1].name
        entry["seeds"] = [pairs[k][0].seed, pairs[k][1].seed]
    return {
        "direction": direction,
        "questions": stem,
        "question_lang": question_lang,
        "parallel_group": base,
        "chance_accuracy": reference[stem].get("chance_accuracy"),
        "always_first_accuracy": (reference[stem].get("position_bias") or {}).get("always_first_accuracy"),
        **stats,
        "tie_policy": transfer.tie_policy,
        "mcnemar_on": "first-wins correctness (the paper's rule), whatever the tie policy",
        "tie_policies": {policy: _policy_summary(st) for policy, st in by_policy.items()},
        "tie_policies_differ": _policy_summary(by_policy["first"]) != _policy_summary(by_policy["fractional"]),
    }


def _final_diagnostics(runs: list[RunResults]) -> list[dict]:
    """The bridge diagnostic of each run's last checkpoint, where the run has one (bridge_diagnostic.json)."""
    found = []
    for run in runs:
        path = run.eval_dir / "bridge_diagnostic.json"
        if path.is_file():
            entries = json.loads(path.read_text(encoding="utf-8"))["checkpoints"]
            if entries:
                found.append({"run": run.name, "bridges": run.bridges, "seed": run.seed, **entries[-1]})
    return found


# --------------------------------------------------------------------------------------
# Outputs: transfer.md and the figures
# --------------------------------------------------------------------------------------


def _fmt_ci(value: float, ci) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


TIE_POLICY_TEXT = {
    "first": "first (an exact tie for the best score goes to the first tied option, the paper's rule).",
    "fractional": "fractional (an exact tie among k options gives 1/k per answer among them: random tie-breaking).",
}


def transfer_markdown(result: dict) -> str:
    pct = round(result["confidence"] * 100)
    lines = [
        "# Cross-lingual transfer: with minus without bridges",
        "",
        f"Gap = accuracy with bridges minus without. Intervals: {pct}% percentile bootstrap "
        f"({result['n_bootstrap']} resamples, seed {result['bootstrap_seed']}) over questions, and over seed "
        "pairs where a setting has several seeds. Verdict from the interval of the mean gap over the curve: "
        "'transfer' (> 0), 'reverse' (< 0), 'no evidence' (covers 0). en->X = X questions (English knowledge "
        "reaching X); X->en = English questions.",
        "",
        f"Tie policy: {TIE_POLICY_TEXT[result.get('tie_policy', 'first')]} The McNemar test always counts "
        "first-wins correctness (it needs right/wrong items).",
        "",
        "| language | direction | questions | seeds | final step | acc. with | acc. without | final gap [CI] | "
        "mean gap over curve [CI] | McNemar p (final) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for language in result["languages"]:
        for d in language["directions"]:
            p_values = ", ".join(f"{m['p_value']:.3g}" for m in d["mcnemar_final"])
            lines.append(
                f"| {language['lang']} | {d['direction']} | {d['questions']} | {d['n_seed_pairs']} | {language['steps'][-1]} | "
                f"{d['accuracy_with'][-1]:.3f} | {d['accuracy_without'][-1]:.3f} | {_fmt_ci(d['final_gap'], d['final_gap_ci'])} | "
                f"{_fmt_ci(d['mean_gap'], d['mean_gap_ci'])} | {p_values} | {d['verdict']} |"
            )
    differ = [(lang, d) for lang in result["languages"] for d in lang["directions"] if d.get("tie_policies_differ")]
    if differ:
        lines += [
            "",
            "## Both tie rules",
            "",
            "Items whose best score is tied exactly: 'first' credits the first tied option (the paper's rule, "
            "which favours answers placed first), 'fractional' gives each of the k tied options 1/k.",
            "",
            "| language | direction | tie rule | acc. with (final) | acc. without (final) | mean gap [CI] | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for language, d in differ:
            for policy, p in d["tie_policies"].items():
                lines.append(
                    f"| {language['lang']} | {d['direction']} | {policy} | {p['accuracy_with'][-1]:.3f} | "
                    f"{p['accuracy_without'][-1]:.3f} | {_fmt_ci(p['mean_gap'], p['mean_gap_ci'])} | {p['verdict']} |"
                )
    lines += [
        "",
        "## Per seed pair",
        "",
        "| language | direction | with run | without run | mean gap [CI, questions only] | final gap |",
        "|---|---|---|---|---|---|",
    ]
    for language in result["languages"]:
        for d in language["directions"]:
            for s in d["per_seed"]:
                lines.append(
                    f"| {language['lang']} | {d['direction']} | {s['with_run']} | {s['without_run']} | "
                    f"{_fmt_ci(s['mean_gap'], s['mean_gap_ci_questions_only'])} | {s['final_gap']:+.3f} |"
                )
    lines += ["", "## Gap per step", ""]
    for language in result["languages"]:
        for d in language["directions"]:
            lines += [
                f"### {language['lang']} {d['direction']} ({d['questions']})",
                "",
                "| step | with | without | gap [CI] |",
                "|---|---|---|---|",
            ]
            for k, step in enumerate(language["steps"]):
                lines.append(
                    f"| {step} | {d['accuracy_with'][k]:.3f} | {d['accuracy_without'][k]:.3f} | {_fmt_ci(d['gap'][k], d['gap_ci'][k])} |"
                )
            lines.append("")
    diagnostics = [(language["lang"], d) for language in result["languages"] for d in language["bridge_diagnostic"]]
    if diagnostics:
        lines += [
            "## Bridge diagnostic (last checkpoint of each run)",
            "",
            "Mean token loss of the second side of held-out pairs (in the run's --pair_order: with en_first the "
            "target side after English) alone, after its own pair's first side, and after another pair's first "
            "side. A model that uses the bridge has own < mismatched.",
            "",
            "| language | run | bridges | step | alone | after own first side | after mismatched first side | pairs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for lang, d in diagnostics:
            lines.append(
                f"| {lang} | {d['run']} | {'with' if d['bridges'] else 'without'} | {d['step']} | {d['alone']:.3f} | "
                f"{d['after_own_context']:.3f} | {d['after_mismatched_context']:.3f} | {d['pairs']} |"
            )
        lines.append("")
    skipped = {lang["lang"]: lang["steps_left_out"] for lang in result["languages"] if lang["steps_left_out"]}
    if skipped:
        lines += ["Steps left out because not every run has them: " + json.dumps(skipped), ""]
    lines += [
        "Caution: with one run per setting the intervals cover question sampling only. On small models the step "
        "at which facts are memorised moves from seed to seed and swings single-run gaps by about ±0.3, so a "
        "question-only interval over one run pair overstates significance: use several seeds per setting.",
        "",
    ]
    return "\n".join(lines)


WITH_COLOR, WITHOUT_COLOR = "#1f77b4", "#ff7f0e"


def _direction_of(language: dict, direction: str, base: str) -> dict | None:
    found = [d for d in language["directions"] if d["direction"] == direction and d["parallel_group"] == base]
    return found[0] if found else None


def plot_transfer(result: dict, output_dir: Path) -> list[Path]:
    """Figure-3-style curves (row per language; target-language | English questions) and a Figure-1-style summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = result["languages"]
    pct = round(result["confidence"] * 100)
    rows = [
        (lang, base) for lang in languages for base in dict.fromkeys(d["parallel_group"] for d in lang["directions"])
    ]
    several_seeds = max(d["n_seed_pairs"] for lang in languages for d in lang["directions"]) > 1
    band = "seeds and questions" if several_seeds else "questions (one run per setting)"
    paths = []
    for name, figure in (("transfer_curves.png", _curves_figure), ("transfer_summary.png", _summary_figure)):
        fig = figure(plt, rows, several_seeds, pct, band)
        save_figure(fig, output_dir / name)
        plt.close(fig)
        paths.append(output_dir / name)
    return paths


def _curves_figure(plt, rows: list[tuple[dict, str]], several_seeds: bool, pct: int, band: str):
    """Accuracy with and without bridges per step, with bootstrap bands: one row per language (and question
    group), target-language questions left, English questions right."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.9 * len(rows) + 1.0), squeeze=False, sharey=True)
    for r, (language, base) in enumerate(rows):
        lang, steps = language["lang"], language["steps"]
        for c, direction in enumerate((f"en->{lang}", f"{lang}->en")):
            ax = axes[r, c]
            d = _direction_of(language, direction, base)
            kind = "target-language" if c == 0 else "English"
            arrow = direction.replace("->", " → ")
            if d is None:
                ax.set_title(f"{lang}: {kind} questions ({arrow})", fontsize=10)
                ax.text(0.5, 0.5, "no questions", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_title(
                f"{lang}: {kind} questions ({arrow})\nmean gap {d['mean_gap']:+.3f} "
                f"[{d['mean_gap_ci'][0]:+.3f}, {d['mean_gap_ci'][1]:+.3f}]: {d['verdict']}",
                fontsize=9.5,
            )
            for key, color in (("with", WITH_COLOR), ("without", WITHOUT_COLOR)):
                ci = np.array(d[f"accuracy_{key}_ci"])
                ax.fill_between(steps, ci[:, 0], ci[:, 1], color=color, alpha=0.15, linewidth=0)
                if d["n_seed_pairs"] > 1:
                    for s in d["per_seed"]:
                        ax.plot(steps, s[f"accuracy_{key}"], color=color, alpha=0.4, linewidth=0.7)
                ax.plot(steps, d[f"accuracy_{key}"], color=color, marker="o", markersize=3.5, linewidth=2)
            if d.get("chance_accuracy") is not None:
                ax.axhline(d["chance_accuracy"], color="grey", linestyle="--", linewidth=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            ax.grid(alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel("CPT step")
            if c == 0:
                ax.set_ylabel("cloze accuracy")
    handles = [
        Line2D([], [], color=WITH_COLOR, marker="o", linewidth=2, label="with bridges"),
        Line2D([], [], color=WITHOUT_COLOR, marker="o", linewidth=2, label="without bridges"),
    ]
    if any(d.get("chance_accuracy") is not None for lang, _ in rows for d in lang["directions"]):
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=0.8, label="chance"))
    if several_seeds:
        handles.append(Line2D([], [], color="black", alpha=0.4, linewidth=0.7, label="single seeds"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(f"Cloze accuracy during CPT (mean over seeds; bands: {pct}% bootstrap CI over {band})", fontsize=10)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig


def _summary_figure(plt, rows: list[tuple[dict, str]], several_seeds: bool, pct: int, band: str):
    """The mean gap over the curve with its interval, per language and direction (and seed pair)."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(rows) + 2.5), 4.4))
    labels = []
    styles = {
        "en->": ("#2ca02c", "o", -0.12, "English → target (target-language questions)"),
        "->en": ("#9467bd", "s", 0.12, "target → English (English questions)"),
    }
    for r, (language, base) in enumerate(rows):
        lang = language["lang"]
        labels.append(lang if sum(1 for x in rows if x[0] is language) == 1 else f"{lang}\n({base})")
        for direction, key in ((f"en->{lang}", "en->"), (f"{lang}->en", "->en")):
            d = _direction_of(language, direction, base)
            if d is None:
                continue
            color, marker, offset, _ = styles[key]
            lo, hi = d["mean_gap_ci"]
            ax.errorbar(
                r + offset,
                d["mean_gap"],
                yerr=[[d["mean_gap"] - lo], [hi - d["mean_gap"]]],
                fmt=marker,
                color=color,
                capsize=4,
                markersize=7,
            )
            if d["n_seed_pairs"] > 1:
                seeds = [s["mean_gap"] for s in d["per_seed"]]
                ax.scatter([r + offset + 0.05] * len(seeds), seeds, color=color, s=12, alpha=0.5, zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("accuracy gap: with − without bridges\n(mean over CPT steps)")
    ax.set_title(f"Transfer per language and direction\n({pct}% bootstrap CI over {band})", fontsize=10)
    handles = [
        Line2D([], [], color=color, marker=marker, linestyle="none", markersize=7, label=label)
        for color, marker, _, label in styles.values()
    ]
    if several_seeds:
        handles.append(
            Line2D(
                [], [], color="grey", marker="o", alpha=0.5, linestyle="none", markersize=4, label="single seed pairs"
            )
        )
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a PNG through a temporary name and a rename, like every other output (the study report's
    figures too)."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option, and the module docstring kept as written."""


def parse_arguments(argv: list[str] | None):
    """(TransferArguments, run_eval's EvalArguments or None): the flags this script does not know are
    run_eval.py's probing flags, parsed (and run_eval imported, with torch) only when some are given."""
    parser = HfArgumentParser(TransferArguments, description=__doc__, formatter_class=_HelpFormatter)
    transfer, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if bool(transfer.with_bridges) != bool(transfer.without_bridges):
        parser.error("--with_bridges and --without_bridges go together")
    if not (transfer.with_bridges or transfer.runs):
        parser.error("nothing to compare: pass --with_bridges A.. --without_bridges B.., or --runs R..")
    if transfer.n_bootstrap < 1 or not 0 < transfer.confidence < 1:
        parser.error("--n_bootstrap must be >= 1, --confidence in (0, 1)")
    if not rest:
        return transfer, None
    import run_eval

    probing = run_eval.parse_arguments(rest, require_model=False)
    if probing.model_name_or_path:
        parser.error(
            "give runs to compare (--with_bridges/--without_bridges/--runs), not --model_name_or_path "
            "(probe one model with run_eval.py)"
        )
    return transfer, probing


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments; run_eval's probing flags ride along for runs that were not probed yet.
    transfer, probing = parse_arguments(argv)
    setup_logging()
    # 2. The questions to probe such runs on (none given: every run must have its eval output).
    question_sets = []
    if probing is not None and probing.questions:
        question_sets = load_question_sets(probing.questions, probing.question_langs, probing.strict, probing.revision)
    # 3. Each run's per-item results, probed first where needed.
    inputs = [(p, True) for p in transfer.with_bridges or []] + [(p, False) for p in transfer.without_bridges or []]
    inputs += [(p, None) for p in transfer.runs or []]
    runs = [
        _resolve_run(path, bridges, probing, transfer, question_sets) for path, bridges in tqdm(inputs, desc="runs")
    ]
    # 4. The statistics, per language and direction.
    result = transfer_analysis(runs, transfer)
    # 5. transfer.json, transfer.md and the two figures.
    output_dir = Path(transfer.output_dir)
    write_json_atomic(output_dir / "transfer.json", result)
    write_text_atomic(output_dir / "transfer.md", transfer_markdown(result))
    plot_transfer(result, output_dir)
    for language in result["languages"]:
        for d in language["directions"]:
            logger.info(
                "%s %s: mean gap %s, verdict %s",
                language["lang"],
                d["direction"],
                _fmt_ci(d["mean_gap"], d["mean_gap_ci"]),
                d["verdict"],
            )
    return result


if __name__ == "__main__":
    exit_on_input_error(main)
