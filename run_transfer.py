#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8"]
# ///
"""The with-minus-without transfer analysis of CPT runs: does training with bridges carry knowledge across?

Step 3b of the study: ``--with_bridges A.. --without_bridges B.. [--mismatched_bridges M..]`` (several = several
seeds), each run its run_eval.py output folder or a run folder holding it in RUN/eval. Writes transfer_curves.png,
transfer_summary.png, transfer.md and, last, transfer.json to ``--output_dir``. docs/probing.md explains the
statistics and outputs, docs/decomposition.md the tiers and mismatched bridges, docs/refusals.md what is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

import cloze
from cloze import EVAL_DIR_NAME, TIE_POLICIES, read_predictions
from study_common import (
    InputError,
    exit_on_input_error,
    setup_logging,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("run_transfer")

#: The CPT settings, as cpt_setting["setting"] records them, and the flag that gives runs of each.
SETTING_FLAGS = {"bridges": "--with_bridges", "no_bridges": "--without_bridges",
                 "mismatched_bridges": "--mismatched_bridges"}  # fmt: skip
#: What every run of a language must share, else a gap measures that difference too: the cpt_setting of
#: run_cpt.py (base model and data by content, training length, packing), then the probing of run_eval.py.
PROBING_FIELDS = ("scoring", "dtype", "loss_dtype")  # from accuracy.json's header, the others from cpt_setting
SHARED_BY_ALL_RUNS = ("base_model_weights_sha256", "base_model_config_sha256", "dataset_sha256", "steps",
                      "windows_per_step", "block_size", "pair_order", "pair_separator", *PROBING_FIELDS)  # fmt: skip
#: What the runs of one seed must share besides (runs of different seeds see different documents).
SHARED_BY_A_SEED = ("documents_seen_sha256",)
#: The knowledge contrast of each direction (docs/decomposition.md): the tier of facts its source corpus states
#: often and the tier it never states, both stated equally often in the destination corpus.
KNOWLEDGE_CONTRASTS = {
    "en->X": {"often_tier": "high", "never_tier": "absent"},  # X questions; source corpus English
    "X->en": {"often_tier": "high", "never_tier": "en_only"},  # English questions; source corpus X
}
#: The tiers of facts (synthetic_world.TIERS) in the order tables show them.
TIER_ORDER = ("high", "low", "absent", "en_only")
#: What a direction's tie_policies keeps of the analysis under each tie rule.
POLICY_FIELDS = ("accuracy_with", "accuracy_without", "gap", "mean_gap", "mean_gap_ci", "final_gap", "verdict")


@dataclass
class TransferArguments:
    with_bridges: list[str] = field(
        metadata={"help": "Runs trained WITH bridges (run_eval.py output folders or run folders), one per seed."}
    )
    without_bridges: list[str] = field(metadata={"help": "Runs trained WITHOUT bridges, as for --with_bridges."})
    mismatched_bridges: list[str] | None = field(
        default=None, metadata={"help": "Runs of run_cpt.py --mismatched_bridges, as for --with_bridges (optional)."}
    )
    item_tiers: list[str] | None = field(
        default=None, metadata={"help": "item_tiers.json of synthetic_world.py: adds the gap per tier and knowledge."}
    )
    allow_differences: list[str] | None = field(
        default=None,
        metadata={"help": "Compare runs that differ in these recorded fields anyway (recorded in the outputs): "
                  + ", ".join(SHARED_BY_ALL_RUNS + SHARED_BY_A_SEED)},
    )  # fmt: skip
    output_dir: str = field(default="transfer_output", metadata={"help": "Where the outputs go."})
    n_bootstrap: int = field(
        default=1000, metadata={"help": "Bootstrap resamples: at least 10 / (1 - confidence) (200 for 95%%)."}
    )
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    tie_policy: Literal["first", "fractional"] = field(
        default="first",
        metadata={"help": "Credit of a tied item: first (the paper's rule) or fractional (1/k among k tied options)."},
    )
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})

    def __post_init__(self):
        # Refused before any run is read: too few resamples give intervals no verdict may rest on.
        if not 0 < self.confidence < 1:
            raise InputError(f"--confidence must be in (0, 1), got {self.confidence}.")
        floor = math.ceil(round(10 / (1 - self.confidence), 6))  # 5 resamples in each tail (200 for 95%)
        if self.n_bootstrap < floor:
            raise InputError(
                f"--n_bootstrap {self.n_bootstrap}: a {self.confidence:.0%} percentile interval needs at least "
                f"{floor} resamples (5 in each tail); pass --n_bootstrap {floor} or more."
            )
        fields = SHARED_BY_ALL_RUNS + SHARED_BY_A_SEED
        for unknown in sorted(set(self.allow_differences or ()) - set(fields)):
            raise InputError(f"--allow_differences {unknown}: not a compared field ({', '.join(fields)}).")


# The runs: their per-item results as run_eval.py wrote them, paired by seed and checked comparable


@dataclass
class RunResults:
    """The probing results of one CPT run, as read from its eval output folder."""

    name: str
    eval_dir: Path
    setting: str  # a key of SETTING_FLAGS
    lang: str
    seed: int | None
    steps: list[int]
    questions: dict  # stem -> describe() of the question set
    correct: dict[str, np.ndarray]  # stem -> bool array (steps x items), first-wins correctness
    fractional: dict[str, np.ndarray]  # stem -> float array (steps x items), random tie-breaking credit
    recorded: dict  # field of SHARED_BY_ALL_RUNS + SHARED_BY_A_SEED -> its value (None: not recorded)


def read_run(path: str, setting: str) -> RunResults:
    """The per-item results of the run given as ``path`` (its run_eval.py output folder, or a run folder holding it
    in RUN/eval) under ``setting``. Its cpt_setting must record that setting; a model trained elsewhere records none
    and is taken as given, except as mismatched bridges."""
    eval_dir = next((d for d in (Path(path), Path(path) / EVAL_DIR_NAME) if (d / "accuracy.json").is_file()), None)
    if eval_dir is None:
        raise InputError(
            f"{path}: no probing output (accuracy.json) here or in {Path(path) / EVAL_DIR_NAME}. Probe the run first: "
            f"python run_eval.py --model_name_or_path {path} --questions QUESTIONS (writes {Path(path) / EVAL_DIR_NAME})."
        )
    accuracy, correct = read_predictions(eval_dir)
    fractional = read_predictions(eval_dir, tie_policy="fractional")[1]
    cpt_setting = accuracy.get("cpt_setting") or {}
    recorded = cpt_setting.get("setting")
    if recorded != setting and (recorded is not None or setting == "mismatched_bridges"):
        raise InputError(
            f"{path} was given as {SETTING_FLAGS[setting]} but its cpt_setting says bridges="
            f"{cpt_setting.get('bridges')}, setting {recorded!r}: give it under the flag of its setting."
        )
    steps = sorted({e["step"] for e in accuracy["checkpoints"]})

    def cube(per_stem: dict) -> dict[str, np.ndarray]:  # read_predictions checked every step's items
        return {stem: np.stack([by_step[s] for s in steps]) for stem, by_step in per_stem.items() if steps}

    lang = cpt_setting.get("lang")
    targets = sorted({q["lang"] for q in accuracy["questions"].values() if q["lang"] != "en"})
    if lang is None and len(targets) != 1:
        raise InputError(
            f"{path}: no cpt_setting lang and the questions hold languages {targets}; cannot tell its language."
        )
    # Name a run after the model it probed (the run folder), else after the folder given.
    name = cpt_setting.get("run_name") or Path(accuracy.get("model_name_or_path") or path).name
    recorded_fields = {f: (accuracy if f in PROBING_FIELDS else cpt_setting).get(f) for f in SHARED_BY_ALL_RUNS}
    recorded_fields |= {f: cpt_setting.get(f) for f in SHARED_BY_A_SEED}
    return RunResults(name, eval_dir, setting, lang or targets[0], cpt_setting.get("seed"), steps,
                      accuracy["questions"], cube(correct), cube(fractional), recorded_fields)  # fmt: skip


def read_runs(transfer: TransferArguments) -> list[RunResults]:
    """Every run of the setting flags, each given once (a run given twice would count twice)."""
    runs = [read_run(path, s) for s, flag in SETTING_FLAGS.items() for path in getattr(transfer, flag[2:]) or []]
    for eval_dir, n in Counter(run.eval_dir.resolve() for run in runs).items():
        if n > 1:
            flags = ", ".join(SETTING_FLAGS[r.setting] for r in runs if r.eval_dir.resolve() == eval_dir)
            raise InputError(f"{eval_dir} is given {n} times ({flags}): each run counts once.")
    return runs


def read_item_tiers(paths: list[str]) -> dict[str, dict]:
    """parallel group -> {"path", "n_items", "tiers": {tier: item indices}}, one cloze.read_item_tiers file each."""
    found = {}
    for path in paths:
        tiers = cloze.read_item_tiers(path)
        if tiers["parallel_group"] in found:
            raise InputError(f"--item_tiers {path}: a second file for {tiers['parallel_group']!r}.")
        tier_of = np.array(tiers["tier_of"])
        by_tier = {tier: np.flatnonzero(tier_of == tier) for tier in sorted(set(tiers["tier_of"]))}
        found[tiers["parallel_group"]] = {"path": path, "n_items": len(tier_of), "tiers": by_tier}
    return found


def pair_seeds(lang: str, by_setting: dict[str, list[RunResults]]) -> list[tuple[RunResults, ...]]:
    """One group per seed holding one run of each setting (in the order of ``by_setting``), every run used once.
    A seed given twice in a setting or missing from one is refused, naming the runs: any other pairing would be a
    guess. Runs that record no seed count as seed None, so only one run per setting of those pairs."""

    def said(seed: int | None) -> str:
        return "no seed" if seed is None else f"seed {seed}"

    for setting, group in by_setting.items():
        repeated = [seed for seed, n in Counter(r.seed for r in group).items() if n > 1]
        if repeated:
            names = ", ".join(r.name for r in group if r.seed == repeated[0])
            raise InputError(
                f"{lang}: {SETTING_FLAGS[setting]} runs {names} all record {said(repeated[0])}; give one run per seed "
                "in each setting (a run's seed is its cpt_setting seed)."
            )
    runs = [r for group in by_setting.values() for r in group]
    seeds = sorted({r.seed for r in runs}, key=lambda seed: (seed is not None, seed))
    missing = {seed: [s for s, group in by_setting.items() if all(r.seed != seed for r in group)] for seed in seeds}
    unpaired = [f"{said(seed)}: {', '.join(r.name for r in runs if r.seed == seed)} has no "
                + " and no ".join(f"{SETTING_FLAGS[s]} run" for s in absent)
                for seed, absent in missing.items() if absent]  # fmt: skip
    if unpaired:
        raise InputError(
            f"{lang}: runs without a partner of the same seed ({'; '.join(unpaired)}); give every seed in every "
            "setting."
        )
    return [tuple(next(r for r in group if r.seed == seed) for group in by_setting.values()) for seed in seeds]


def check_comparable(lang: str, groups: list[tuple[RunResults, ...]], allowed: list[str]) -> dict:
    """Refuse runs that differ in a field of ``SHARED_BY_ALL_RUNS`` (or, within a seed, ``SHARED_BY_A_SEED``),
    naming the field, two runs and their values, unless ``allowed`` names it; the record of what was checked."""
    runs = [r for group in groups for r in group]
    record = {"checked": [], "not_recorded": [], "allowed_differences": {}}
    for key in SHARED_BY_ALL_RUNS + SHARED_BY_A_SEED:
        if all(r.recorded[key] is None for r in runs):
            record["not_recorded"].append(key)  # nothing to compare: said so in the outputs
            continue
        for scope in [runs] if key in SHARED_BY_ALL_RUNS else groups:
            other = next((r for r in scope if r.recorded[key] != scope[0].recorded[key]), None)
            if other is None:
                continue
            if key not in allowed:
                within = (
                    "" if key in SHARED_BY_ALL_RUNS else f" (seed {scope[0].seed}: the runs of a seed must share it)"
                )
                raise InputError(
                    f"{lang}: {scope[0].name} and {other.name} differ in {key}{within}: {scope[0].recorded[key]!r} "
                    f"vs {other.recorded[key]!r}; a gap between them would measure that difference too. Compare runs "
                    f"made alike, or pass --allow_differences {key} to compare them deliberately (recorded in the "
                    "outputs)."
                )
            record["allowed_differences"][key] = {r.name: r.recorded[key] for r in runs}
            break
        else:
            record["checked"].append(key)
    return record


# The statistics: paired bootstrap, exact McNemar, verdict


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


def verdict(ci: tuple[float, float], estimate: float) -> str:
    """From the interval: 'transfer' (> 0), 'reverse' (< 0), 'no evidence' (covers 0); 'undetermined' when the
    estimate lies outside its own interval (too few resamples to place it), which no verdict may rest on."""
    if not ci[0] - 1e-9 <= estimate <= ci[1] + 1e-9:
        return "undetermined"
    if ci[0] > 0:
        return "transfer"
    if ci[1] < 0:
        return "reverse"
    return "no evidence"


def _draws(rng: np.random.Generator, n: int, n_bootstrap: int) -> np.ndarray:
    """(bootstrap x n) multinomial counts: how often each of n units is drawn in each resample."""
    return rng.multinomial(n, np.full(n, 1 / n), size=n_bootstrap)


def _resampled(values: np.ndarray, question_weights: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """(bootstrap x steps) mean over resampled seeds and questions; values: seeds x steps x questions."""
    per_seed = np.einsum("bq,stq->bst", question_weights, values) / values.shape[2]
    return np.einsum("bs,bst->bt", seed_weights, per_seed) / values.shape[0]


def analyse_direction(
    with_correct, without_correct, n_bootstrap: int, seed: int, confidence: float, first_with=None, first_without=None
) -> dict:
    """Gap statistics from per-item credits (seeds x steps x questions, seed pairs aligned), bootstrapped over the
    questions (paired) and the seed pairs; McNemar on ``first_with/_without`` where the credits are fractional."""
    n_seeds, n_steps, n_questions = with_correct.shape
    if first_with is None:  # bool credits; numpy refuses ~ on fractional ones
        first_with, first_without = with_correct, without_correct
    rng = np.random.default_rng(seed)
    question_weights = _draws(rng, n_questions, n_bootstrap)
    seed_weights = _draws(rng, n_seeds, n_bootstrap)  # all ones with one seed pair
    w, o = with_correct.astype(np.float64), without_correct.astype(np.float64)
    acc_with, acc_without = w.mean(axis=(0, 2)), o.mean(axis=(0, 2))
    gap = acc_with - acc_without
    boot_with, boot_without = (_resampled(v, question_weights, seed_weights) for v in (w, o))
    gap_ci = _percentile_ci(boot_with - boot_without, confidence)
    mean_gap_ci = _percentile_ci((boot_with - boot_without).mean(axis=1), confidence)
    per_seed_gaps = (w - o).mean(axis=2)  # seeds x steps
    per_seed_boot = np.einsum("bq,stq->bst", question_weights, w - o) / n_questions
    per_seed_mean_ci = _percentile_ci(per_seed_boot.mean(axis=2), confidence)  # 2 x seeds
    per_seed = [{"gap": per_seed_gaps[s].tolist(), "mean_gap": float(per_seed_gaps[s].mean()),
                 "mean_gap_ci_questions_only": per_seed_mean_ci[:, s].tolist(),
                 "final_gap": float(per_seed_gaps[s, -1]), "accuracy_with": w[s].mean(axis=1).tolist(),
                 "accuracy_without": o[s].mean(axis=1).tolist()} for s in range(n_seeds)]  # fmt: skip
    return {
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
        "mcnemar_final": [mcnemar_exact(first_with[s, -1], first_without[s, -1]) for s in range(n_seeds)],
        "per_seed": per_seed,
        "ci_covers": "questions and seeds" if n_seeds > 1 else "questions only (one run pair)",
        "verdict": verdict(tuple(mean_gap_ci), float(gap.mean())),
    }


# The analysis: per language its seed groups, per direction the gap (and per tier, and mismatched bridges)


def transfer_analysis(runs: list[RunResults], transfer: TransferArguments, item_tiers: dict | None = None) -> dict:
    """transfer.json: the runs grouped by language and setting, each language analysed; ``item_tiers``:
    read_item_tiers' result (every file must be used)."""
    by_lang = defaultdict(lambda: {setting: [] for setting in SETTING_FLAGS})
    for run in runs:
        by_lang[run.lang][run.setting].append(run)
    languages = [_analyse_language(lang, by_lang[lang], transfer, item_tiers or {}) for lang in sorted(by_lang)]
    used = {d["parallel_group"] for language in languages for d in language["directions"]}
    unused = [tiers["path"] for group, tiers in (item_tiers or {}).items() if group not in used]
    if unused:
        raise InputError(
            f"--item_tiers {', '.join(unused)}: no analysed question group is theirs ({', '.join(sorted(used))})."
        )
    return {"n_bootstrap": transfer.n_bootstrap, "bootstrap_seed": transfer.bootstrap_seed,
            "confidence": transfer.confidence, "tie_policy": transfer.tie_policy,
            "allow_differences": sorted(transfer.allow_differences or []), "languages": languages}  # fmt: skip


def _analyse_language(lang: str, by_setting: dict, transfer: TransferArguments, item_tiers: dict) -> dict:
    """One language: its seed groups (bridges, no_bridges[, mismatched_bridges]) checked comparable, on the steps
    and questions all runs share; both directions of each parallel question group analysed."""
    pairs = pair_seeds(lang, {s: runs for s, runs in by_setting.items() if runs or s != "mismatched_bridges"})
    comparability = check_comparable(lang, pairs, transfer.allow_differences or [])
    runs = [r for pair in pairs for r in pair]
    steps = sorted(set.intersection(*(set(r.steps) for r in runs)))
    if not steps:
        listing = "; ".join(f"{r.name}: {r.steps}" for r in runs)
        raise InputError(f"{lang}: the runs share no checkpoint step ({listing}); they cannot be compared.")
    dropped = {r.name: sorted(set(r.steps) - set(steps)) for r in runs if set(r.steps) != set(steps)}
    if dropped:
        logger.warning("%s: steps not present in every run are left out: %s", lang, dropped)
    questions = runs[0].questions
    for run in runs[1:]:
        for stem in questions:
            if stem in run.questions and run.questions[stem]["sha256"] != questions[stem]["sha256"]:
                raise InputError(f"{lang}: {runs[0].name} and {run.name} were probed on different {stem} questions.")
    stems = defaultdict(dict)  # parallel group -> question language -> stem probed in every run
    for stem in (stem for stem in questions if all(stem in r.questions for r in runs)):
        stems[questions[stem]["parallel_group"]][questions[stem]["lang"]] = stem
    directions = [
        _analyse_questions(lang, stem, pairs, steps, transfer, item_tiers.get(base))
        for base, by_lang in sorted(stems.items())
        if lang in by_lang
        for stem in (by_lang[q] for q in (lang, "en") if q in by_lang)
    ]
    if not directions:
        raise InputError(f"{lang}: no question set in {lang} with a parallel English set among {list(questions)}.")
    return {
        "lang": lang,
        "steps": steps,
        "with_bridges": [str(p[0].eval_dir) for p in pairs],
        "without_bridges": [str(p[1].eval_dir) for p in pairs],
        **({"mismatched_bridges": [str(p[2].eval_dir) for p in pairs]} if len(pairs[0]) == 3 else {}),
        "run_names": [[r.name for r in p] for p in pairs],
        "comparability": comparability,
        "steps_left_out": dropped,
        "directions": directions,
    }


def _analyse_questions(lang: str, stem: str, pairs, steps, transfer, tiers: dict | None) -> dict:
    """One direction: the gap on question set ``stem`` under both tie policies; with ``tiers`` (read_item_tiers)
    the gap per tier and the knowledge contrast; with mismatched runs their two comparisons."""
    described, policy = pairs[0][0].questions[stem], transfer.tie_policy
    english = described["lang"] == "en"

    def cube(run: RunResults, rule: str) -> np.ndarray:  # steps x items
        return (run.correct if rule == "first" else run.fractional)[stem][[run.steps.index(s) for s in steps]]

    # side 0 bridges, 1 no bridges, 2 mismatched: seeds x steps x items under each tie rule
    credit = {(side, rule): np.stack([cube(p[side], rule) for p in pairs])
              for side in range(len(pairs[0])) for rule in TIE_POLICIES}  # fmt: skip

    def compare(a: int, b: int, rule: str = policy, items=slice(None)) -> dict:
        """Side a minus side b; McNemar on first-wins correctness whatever the tie rule."""
        with_, without, first_with, first_without = (credit[s, r][..., items] for r in (rule, "first") for s in (a, b))
        stats = analyse_direction(with_, without, transfer.n_bootstrap, transfer.bootstrap_seed, transfer.confidence,
                                  first_with, first_without)  # fmt: skip
        for pair, entry in zip(pairs, stats["per_seed"]):
            entry |= {"with_run": pair[a].name, "without_run": pair[b].name, "seeds": [pair[a].seed, pair[b].seed]}
        return stats

    by_rule = {rule: compare(0, 1, rule) for rule in TIE_POLICIES}
    summaries = {rule: {key: stats[key] for key in POLICY_FIELDS} for rule, stats in by_rule.items()}
    entry = {"direction": f"{lang}->en" if english else f"en->{lang}", "questions": stem,
             "parallel_group": described["parallel_group"], "chance_accuracy": described.get("chance_accuracy"),
             **by_rule[policy], "tie_policies": summaries,
             "tie_policies_differ": summaries["first"] != summaries["fractional"]}  # fmt: skip
    if len(pairs[0]) == 3:
        entry |= {"bridges_minus_mismatched": compare(0, 2), "mismatched_minus_none": compare(2, 1)}
    if tiers is not None:
        if tiers["n_items"] != described["items"]:
            raise InputError(
                f"--item_tiers {tiers['path']}: {tiers['n_items']} items, but {stem} has {described['items']}."
            )
        entry["tiers"] = {tier: compare(0, 1, items=items) for tier, items in tiers["tiers"].items()}
        gap = credit[0, policy].astype(np.float64) - credit[1, policy]
        knowledge = _knowledge_entry(lang, english, tiers["tiers"], entry["tiers"], gap, transfer)
        entry |= {"knowledge_transfer": knowledge} if knowledge else {}
    return entry


def _knowledge_entry(lang: str, english: bool, tier_items: dict, by_tier: dict, gap: np.ndarray, transfer) -> dict:
    """The knowledge contrast of a direction (KNOWLEDGE_CONTRASTS; None when one of its tiers has no items): the
    difference-in-differences of the per-item gaps (seeds x steps x items), whose bootstrap draws the seed pairs once
    for both tiers and the questions within each tier, and the gap on the never-stated tier (skill)."""
    contrast = KNOWLEDGE_CONTRASTS["X->en" if english else "en->X"]
    often, never = contrast["often_tier"], contrast["never_tier"]
    if often not in tier_items or never not in tier_items:
        return None
    tiers = [gap[..., tier_items[often]], gap[..., tier_items[never]]]
    rng = np.random.default_rng(transfer.bootstrap_seed)
    seed_weights = _draws(rng, gap.shape[0], transfer.n_bootstrap)
    boot = [_resampled(g, _draws(rng, g.shape[2], transfer.n_bootstrap), seed_weights) for g in tiers]
    did, boot_did = tiers[0].mean(axis=(0, 2)) - tiers[1].mean(axis=(0, 2)), boot[0] - boot[1]
    mean_ci = _percentile_ci(boot_did.mean(axis=1), transfer.confidence)
    source, destination = (lang, "English") if english else ("English", lang)
    return {
        "often_tier": often,
        "never_tier": never,
        "mean_did": float(did.mean()),
        "mean_did_ci": mean_ci.tolist(),
        "final_did": float(did[-1]),
        "final_did_ci": _percentile_ci(boot_did[:, -1], transfer.confidence).tolist(),
        "verdict": verdict(tuple(mean_ci), float(did.mean())),
        "skill_mean_gap": by_tier[never]["mean_gap"],
        "skill_mean_gap_ci": by_tier[never]["mean_gap_ci"],
        "skill_verdict": by_tier[never]["verdict"],
        "meaning": (
            f"mean_did is knowledge carried from the {source} corpus: the gap (with minus without bridges) "
            f"on facts it states often ({often}) minus the gap on facts it never states ({never}); both are "
            f"stated equally often in the {destination} corpus, so bridges' help with learning {destination} "
            f"cancels. That help, a skill and not knowledge, is the gap on the {never} facts (skill_mean_gap)."
        ),
    }


# Outputs: transfer.md (the one rendering of transfer.json, the study report's included) and the figures


def _fmt_ci(value: float, ci) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def gap_text(stats: dict, key: str = "mean_gap") -> str:
    """An estimate with its interval, as tables show it: +0.080 [+0.050, +0.111]."""
    return _fmt_ci(stats[key], stats[key + "_ci"])


def verdict_cell(verdict: str) -> str:
    return f"**{verdict}**" if verdict == "undetermined" else verdict


def markdown_table(header: list[str], rows) -> list[str]:
    """The lines of a Markdown table; a "|" inside a cell is escaped."""
    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in [header, *rows]]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def _section(title: str, header: list[str], rows: list, note: str | None = None) -> list[str]:
    """A titled table of transfer.md; none without rows."""
    return ["", f"## {title}", "", *([note, ""] if note else []), *markdown_table(header, rows)] if rows else []


def transfer_directions(result: dict, key: str | None = None) -> list[tuple[dict, dict]]:
    """(language, direction) of every direction (that has ``key``)."""
    return [(lang, d) for lang in result["languages"] for d in lang["directions"] if key is None or key in d]


def direction_words(direction: str, lang: str) -> str:
    if direction.startswith("en->"):
        return f"English → {lang} ({lang} questions)"
    return f"{lang} → English (English questions)"


UNDETERMINED_TEXT = (
    "**undetermined**: the estimate lies outside its own 95% interval (too few bootstrap resamples to place it), so "
    "no conclusion rests on it; rerun the analysis with a larger `--n_bootstrap`."
)


def knowledge_sentence(lang: str, d: dict) -> str:
    """Knowledge or skill in one sentence, from the difference-in-differences and the never-stated tier's gap."""
    k, direction = d["knowledge_transfer"], d["direction"]
    source, destination = ("English", lang) if direction.startswith("en->") else (lang, "English")
    head = direction_words(direction, lang)
    skill = f"{_fmt_ci(k['skill_mean_gap'], k['skill_mean_gap_ci'])} on facts {source} never states ({k['never_tier']})"
    difference = (f"difference-in-differences ({k['often_tier']} − {k['never_tier']}) "
                  f"{_fmt_ci(k['mean_did'], k['mean_did_ci'])}")  # fmt: skip
    verdicts = (k["verdict"], k["skill_verdict"])
    if "undetermined" in verdicts:
        which = " and ".join(w for w, v in zip(("the difference", "the skill gap"), verdicts) if v == "undetermined")
        return (f"{head}: undetermined: {which} lies outside its own interval (too few bootstrap resamples), so "
                f"neither knowledge nor skill is read from it: {difference}; gap {skill}.")  # fmt: skip
    if k["verdict"] == "transfer":
        beside = {"transfer": f"bridges also helped learning {destination} (skill): {skill}",
                  "no evidence": f"no evidence of a skill part: {skill}",
                  "reverse": f"bridges slowed learning {destination} on the rest: {skill}"}  # fmt: skip
        return (f"{head}: knowledge crossed from {source}: the gap on facts {source} states often exceeds the gap on "
                f"facts it never states, {difference} excludes 0; {beside[k['skill_verdict']]}.")  # fmt: skip
    if k["verdict"] == "reverse":
        return (f"{head}: no knowledge crossing: the gap is smaller on facts {source} states often than on facts it "
                f"never states, {difference} lies below 0; gap {skill}.")  # fmt: skip
    if k["skill_verdict"] == "transfer":
        return (f"{head}: the gap is skill, not knowledge: {skill}, {difference} includes 0 (no evidence of knowledge "
                f"from {source}; the interval allows up to {k['mean_did_ci'][1]:+.3f}).")  # fmt: skip
    if k["skill_verdict"] == "reverse":
        return (f"{head}: bridges slowed learning {destination}: {skill}; no evidence of knowledge from {source}: "
                f"{difference} includes 0.")  # fmt: skip
    return f"{head}: neither knowledge nor skill shown: {difference} and gap {skill} both include 0."


#: What bridges − mismatched and mismatched − none say, by verdict.
MISMATCHED_WORDS = {
    "bridges_minus_mismatched": {
        "transfer": "the right partner matters ({} excludes 0)",
        "no evidence": "no evidence that the right partner matters ({} includes 0)",
        "reverse": "mismatched bridges beat true ones ({} lies below 0): the translation did not help",
        "undetermined": "whether the right partner matters is undetermined ({}: outside its own interval)",
    },
    "mismatched_minus_none": {
        "transfer": "mere bilingual co-location helps ({} excludes 0)",
        "no evidence": "no evidence that bilingual co-location without the translation helps ({} includes 0)",
        "reverse": "bilingual co-location without the translation hurts ({} lies below 0)",
        "undetermined": "whether co-location alone helps is undetermined ({}: outside its own interval)",
    },
}


def mismatched_sentence(lang: str, d: dict) -> str:
    """Does the right partner matter (bridges − mismatched), does co-location alone help (mismatched − none)?"""
    labels = {"bridges_minus_mismatched": "bridges − mismatched", "mismatched_minus_none": "mismatched − none"}
    said = [MISMATCHED_WORDS[key][d[key]["verdict"]].format(f"{label} {gap_text(d[key])}")
            for key, label in labels.items()]  # fmt: skip
    return f"{direction_words(d['direction'], lang)}: {'; '.join(said)}."


def transfer_markdown(result: dict, level: int = 2, standalone: bool = True) -> str:
    """transfer.md: a title, then sections at heading ``level``. The study report includes it under its own heading
    (standalone False: no title)."""
    sections = (_summary_markdown, _tiers_markdown, _mismatched_markdown, _closing_markdown)
    lines = [line for section in sections for line in section(result)]
    lines = [("#" * (level - 2) + line) if line.startswith("## ") else line for line in lines]
    title = ["# Cross-lingual transfer: with minus without bridges", ""] if standalone else []
    text = "\n".join(title + lines).strip("\n")
    return text + ("\n\n" + UNDETERMINED_TEXT if "**undetermined**" in text else "") + "\n"


def _summary_markdown(result: dict) -> list[str]:
    """The gap per direction, what the runs of each language share (and differ in, deliberately), and the gaps
    under both tie rules where they differ."""
    rows = [
        [direction_words(d["direction"], lang["lang"]), d["questions"], d["n_seed_pairs"], lang["steps"][-1],
         f"{d['accuracy_with'][-1]:.3f}", f"{d['accuracy_without'][-1]:.3f}",
         _fmt_ci(d["final_gap"], d["final_gap_ci"]), gap_text(d),
         ", ".join(f"{m['p_value']:.3g}" for m in d["mcnemar_final"]), verdict_cell(d["verdict"])]
        for lang, d in transfer_directions(result)
    ]  # fmt: skip
    header = ["direction", "questions", "seeds", "final step", "acc. with", "acc. without", "final gap [CI]",
              "mean gap over curve [CI]", "McNemar p (final, per seed)", "verdict"]  # fmt: skip
    lines = [
        f"Gap = accuracy with bridges minus without; {round(result['confidence'] * 100)}% percentile bootstrap "
        f"({result['n_bootstrap']} resamples, seed {result['bootstrap_seed']}) over questions and seed pairs. "
        f"Tie policy: {result['tie_policy']} (McNemar: first-wins). docs/probing.md explains every column.",
        "",
        *markdown_table(header, rows),
        "",
    ]
    for language in result["languages"]:
        c = language["comparability"]
        lines.append(
            f"Comparable runs ({language['lang']}): they share {', '.join(c['checked']) or 'nothing recorded'}"
            + (f"; not recorded, so not checked: {', '.join(c['not_recorded'])}" if c["not_recorded"] else "")
            + "."
        )
        for key, values in c["allowed_differences"].items():
            shown = ", ".join(f"{run}: {value}" for run, value in values.items())
            lines.append(f"**They differ in {key}, compared deliberately (--allow_differences)**: {shown}.")
    rows = [
        [direction_words(d["direction"], lang["lang"]), policy, f"{p['accuracy_with'][-1]:.3f}",
         f"{p['accuracy_without'][-1]:.3f}", f"{p['final_gap']:+.3f}", gap_text(p), verdict_cell(p["verdict"])]
        for lang, d in transfer_directions(result) if d["tie_policies_differ"]
        for policy, p in d["tie_policies"].items()
    ]  # fmt: skip
    if not rows:
        return [*lines, "", "The two tie rules give the same curves, gaps and verdicts here."]
    header = ["direction", "tie rule", "acc. with (final)", "acc. without (final)", "final gap", "mean gap [CI]",
              "verdict"]  # fmt: skip
    note = "Ties change this analysis; under both rules (McNemar always counts first-rule correctness):"
    return lines + _section("Both tie rules", header, rows, note)


def _tiers_markdown(result: dict) -> list[str]:
    """Per direction the gap per tier of facts and, where a knowledge contrast is computable, knowledge (the
    difference-in-differences) and skill (the gap on the never-stated tier), with the sentence they support."""
    found = transfer_directions(result, "tiers")
    if not found:
        return []
    knowledge = any(d.get("knowledge_transfer") for _, d in found)
    contrasts = "; ".join(f"{key}: {c['often_tier']} − {c['never_tier']}" for key, c in KNOWLEDGE_CONTRASTS.items())
    note = f"The gap on the questions of each tier of facts (tie rule **{result['tie_policy']}**)."
    if knowledge:
        note += (" **Knowledge**: the gap on facts the source corpus states often minus the gap on facts it never "
                 f"states ({contrasts}); **skill**: the gap on the never-stated tier "
                 "(docs/decomposition.md).")  # fmt: skip
    title = "Knowledge or skill? The gap per tier of facts" if knowledge else "The gap per tier of facts"
    lines = ["", f"## {title}", "", note]
    for lang, d in found:
        k = d.get("knowledge_transfer")
        role = {k["often_tier"]: " (the source states it often)",
                k["never_tier"]: " (the source never states it: skill)"} if k else {}  # fmt: skip
        rows = [[f"tier {tier}{role.get(tier, '')}", s["n_questions"], f"{np.mean(s['accuracy_with']):.3f}",
                 f"{np.mean(s['accuracy_without']):.3f}", gap_text(s),
                 _fmt_ci(s["final_gap"], s["final_gap_ci"]), verdict_cell(s["verdict"])]
                for tier, s in sorted(d["tiers"].items(), key=lambda t: [*TIER_ORDER, t[0]].index(t[0]))]  # fmt: skip
        if k:
            rows.append([f"**knowledge**: gap {k['often_tier']} − gap {k['never_tier']}", "–", "–", "–",
                         _fmt_ci(k["mean_did"], k["mean_did_ci"]), _fmt_ci(k["final_did"], k["final_did_ci"]),
                         verdict_cell(k["verdict"])])  # fmt: skip
        lines += ["", f"**{direction_words(d['direction'], lang['lang'])}**:", "",
                  *markdown_table(["measure", "questions", "mean acc. with", "mean acc. without", "mean gap [CI]",
                           "final gap [CI]", "verdict"], rows)]  # fmt: skip
    sentences = [knowledge_sentence(lang["lang"], d) for lang, d in found if d.get("knowledge_transfer")]
    return lines + ([""] + [f"- {s}" for s in sentences] if sentences else [])


def _mismatched_markdown(result: dict) -> list[str]:
    found = transfer_directions(result, "mismatched_minus_none")
    rows = [[direction_words(d["direction"], lang["lang"]), *(cell for key in MISMATCHED_WORDS
             for cell in (gap_text(d[key]), verdict_cell(d[key]["verdict"])))] for lang, d in found]  # fmt: skip
    header = ["direction", "bridges − mismatched [CI]", "verdict", "mismatched − none [CI]", "verdict"]
    note = ("Each pair's first half shares a window with *another* pair's second half: only the partners differ from "
            "bridges (docs/decomposition.md).")  # fmt: skip
    sentences = [f"- {mismatched_sentence(lang['lang'], d)}" for lang, d in found]
    return _section("Mismatched bridges", header, rows, note) + ([""] + sentences if sentences else [])


def _closing_markdown(result: dict) -> list[str]:
    """Each seed pair's gap where a direction has several (one pair's would restate the main table), the steps
    left out, and the caution of a single run pair."""
    rows = [[direction_words(d["direction"], lang["lang"]), s["with_run"], s["without_run"],
             _fmt_ci(s["mean_gap"], s["mean_gap_ci_questions_only"]), f"{s['final_gap']:+.3f}"]
            for lang, d in transfer_directions(result) if d["n_seed_pairs"] > 1 for s in d["per_seed"]]  # fmt: skip
    header = ["direction", "with run", "without run", "mean gap [CI, questions only]", "final gap"]
    lines = [*_section("Per seed pair", header, rows), ""]
    skipped = {lang["lang"]: lang["steps_left_out"] for lang in result["languages"] if lang["steps_left_out"]}
    lines += ["Steps left out because not every run has them: " + json.dumps(skipped)] if skipped else []
    if any(d["n_seed_pairs"] == 1 for _, d in transfer_directions(result)):
        lines += ["", "Caution: with one run pair the intervals cover question sampling only, which overstates "
                  "significance (docs/probing.md): use several seeds per setting."]  # fmt: skip
    return lines


WITH_COLOR, WITHOUT_COLOR = "#1f77b4", "#ff7f0e"
#: The summary's marker per column of _panels: colour, marker, offset from the row's tick, legend label.
SUMMARY_STYLES = (("#2ca02c", "o", -0.12, "English → target (target-language questions)"),
                  ("#9467bd", "s", 0.12, "target → English (English questions)"))  # fmt: skip


def plot_transfer(result: dict) -> dict[str, bytes]:
    """Figure-3-style curves (row per language; target-language | English questions) and a Figure-1-style summary,
    as PNG bytes by file name (rendered before any output is written, so a plotting failure leaves none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = result["languages"]
    rows = [
        (lang, base) for lang in languages for base in dict.fromkeys(d["parallel_group"] for d in lang["directions"])
    ]
    several_seeds = max(d["n_seed_pairs"] for lang in languages for d in lang["directions"]) > 1
    band = "seeds and questions" if several_seeds else "questions (one run per setting)"
    ci_words = f"{round(result['confidence'] * 100)}% bootstrap CI over {band}"
    pngs = {}
    for name, figure in (("transfer_curves.png", _curves_figure), ("transfer_summary.png", _summary_figure)):
        fig, buffer = figure(plt, rows, ci_words), io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        pngs[name] = buffer.getvalue()
    return pngs


def _panels(rows: list[tuple[dict, str]]):
    """(row, column, language, direction or None) of both figures: per row (a language and its question group)
    column 0 the target-language questions (English → target), column 1 the English ones."""
    for r, (language, base) in enumerate(rows):
        for c, direction in enumerate((f"en->{language['lang']}", f"{language['lang']}->en")):
            found = (d for d in language["directions"] if (d["direction"], d["parallel_group"]) == (direction, base))
            yield r, c, language, next(found, None)


def _legend(axes) -> dict:
    """label -> handle, each label once, in the order the axes first show it."""
    return {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}


def _curves_figure(plt, rows: list[tuple[dict, str]], ci_words: str):
    """Accuracy with and without bridges per step, with bootstrap bands and thin single-seed lines."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.9 * len(rows) + 1.0), squeeze=False, sharey=True)
    for r, c, language, d in _panels(rows):
        ax, lang, steps = axes[r, c], language["lang"], language["steps"]
        kind, arrow = ("target-language", f"en → {lang}") if c == 0 else ("English", f"{lang} → en")
        title = f"{lang}: {kind} questions ({arrow})"
        if d is None:
            ax.set_title(title, fontsize=10)
            ax.text(0.5, 0.5, "no questions", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_title(f"{title}\nmean gap {gap_text(d)}: {d['verdict']}", fontsize=9.5)
        for key, color in (("with", WITH_COLOR), ("without", WITHOUT_COLOR)):
            ci = np.array(d[f"accuracy_{key}_ci"])
            ax.fill_between(steps, ci[:, 0], ci[:, 1], color=color, alpha=0.15, linewidth=0)
            for s in d["per_seed"] if d["n_seed_pairs"] > 1 else []:
                ax.plot(steps, s[f"accuracy_{key}"], color=color, alpha=0.4, linewidth=0.7, label="single seeds")
            ax.plot(steps, d[f"accuracy_{key}"], color=color, marker="o", markersize=3.5, label=f"{key} bridges")
        if d.get("chance_accuracy") is not None:
            ax.axhline(d["chance_accuracy"], color="grey", linestyle="--", linewidth=0.8, label="chance")
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.grid(alpha=0.3)
        if r == len(rows) - 1:
            ax.set_xlabel("CPT step")
        if c == 0:
            ax.set_ylabel("cloze accuracy")
    legend = _legend(axes.flat)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), frameon=False, fontsize=9)
    fig.suptitle(f"Cloze accuracy during CPT (mean over seeds; bands: {ci_words})", fontsize=10)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig


def _summary_figure(plt, rows: list[tuple[dict, str]], ci_words: str):
    """The mean gap over the curve with its interval, per language and direction (and seed pair)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(rows) + 2.5), 4.4))
    for r, c, _, d in _panels(rows):
        if d is None:
            continue
        color, marker, offset, label = SUMMARY_STYLES[c]
        lo, hi = d["mean_gap_ci"]
        error = [[max(0.0, d["mean_gap"] - lo)], [max(0.0, hi - d["mean_gap"])]]  # 'undetermined' verdicts
        ax.errorbar(r + offset, d["mean_gap"], error, fmt=marker, color=color, capsize=4, ms=7, label=label)
        if d["n_seed_pairs"] > 1:
            seeds = [s["mean_gap"] for s in d["per_seed"]]
            ax.scatter([r + offset + 0.05] * len(seeds), seeds, color=color, s=12, alpha=0.5, label="single seeds")
    several = Counter(language["lang"] for language, _ in rows)
    ax.set_xticks(
        range(len(rows)), [lang["lang"] + (f"\n({base})" if several[lang["lang"]] > 1 else "") for lang, base in rows]
    )
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("accuracy gap: with − without bridges\n(mean over CPT steps)")
    ax.set_title(f"Transfer per language and direction\n({ci_words})", fontsize=10)
    legend = _legend([ax])
    ax.legend(legend.values(), legend.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def parse_arguments(argv: list[str] | None) -> TransferArguments:
    from transformers import HfArgumentParser  # here: the study report imports this module for its rendering

    parser = HfArgumentParser(TransferArguments, description=__doc__)
    transfer, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (probing is run_eval.py's step: run it first)")
    return transfer


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments (checked as they are parsed, before any run is read) and logging.
    transfer = parse_arguments(argv)
    setup_logging()
    # 2. The inputs: each run's per-item results as run_eval.py wrote them, and the tiers of facts.
    runs = read_runs(transfer)
    item_tiers = read_item_tiers(transfer.item_tiers or [])
    # 3. The statistics, per language and direction, and everything written from them: nothing is written
    #    until all of it has been made (a failure leaves no output that looks complete).
    result = transfer_analysis(runs, transfer, item_tiers)
    markdown, pngs = transfer_markdown(result), plot_transfer(result)
    # 4. The figures, transfer.md and, last, transfer.json.
    output_dir = Path(transfer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        write_bytes_atomic(output_dir / name, data)
    write_text_atomic(output_dir / "transfer.md", markdown)
    write_json_atomic(output_dir / "transfer.json", result)
    for language, d in transfer_directions(result):
        logger.info("%s %s: mean gap %s, %s", language["lang"], d["direction"], gap_text(d), d["verdict"])
    return result


if __name__ == "__main__":
    exit_on_input_error(main)
