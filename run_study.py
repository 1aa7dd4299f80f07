#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8", "regex", "tqdm", "pyyaml", "psutil"]
# ///
"""The whole study in one command: pretrain, build pairs, continual pretraining with and without bridges, bilingual
probing, transfer analysis, density, and a report. Every step runs one of the study's own scripts as a subprocess,
with the command line a user would type (OUTPUT_DIR/commands.sh); run the same command again after Ctrl-C or a crash
to resume. How studies, --set, --sweep, resuming and the outputs work: docs/study.md.

Usage::

    python run_study.py                          # CPU default
    python run_study.py --preset paper --dry_run # the paper-scale commands and their cost
    python run_study.py --preset micro --sweep cpt.max_steps=30,60,120
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cloze import EVAL_DIR_NAME, question_file_name
from study_common import InputError, exit_on_input_error, setup_logging, write_json_atomic, write_text_atomic
from study_config import (
    CPT_SETTINGS,
    PRESETS,
    REPO_DIR,
    SETTINGS,
    Preset,
    check_study,
    checked_value,
    read_study,
    smoke_preset,
    study_file,
    sweep_cells,
    sweep_factors,
    with_flags,
)
from study_report import configuration_text, write_reports
from study_runner import StudyRunner, fmt_time, lock_output_dir

#: The paper's questions come from its public release, into a git-ignored folder of the repository.
PAPER_QUESTIONS_REPO = "https://github.com/luciusssss/cross-lingual-culture"
PAPER_QUESTIONS_DIR = "data/paper-questions"
PAPER_QUESTIONS_FETCH = (
    f"git clone --depth 1 {PAPER_QUESTIONS_REPO} /tmp/clc && mkdir -p {PAPER_QUESTIONS_DIR} && "
    f"cp /tmp/clc/data/*-culture-cloze_*.json {PAPER_QUESTIONS_DIR}/"
)
#: Training throughput per GPU behind --dry_run's GPU-hours (docs/benchmarks.md).
MEASURED_TOKENS_PER_SECOND_PER_GPU = 47_800
MEASURED_THROUGHPUT_SOURCE = (
    "bench/gpu_fsdp_check.sh on one NVIDIA H200 (Qwen2.5-0.5B shapes, 2048-token windows, bf16, FSDP, sdpa with "
    "per-document masks; 2026-11-26)"
)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class StudyArguments:
    preset: str = field(
        default="cpu", metadata={"help": f"A study of configs/studies/ ({', '.join(PRESETS)}) or a study file's path."}
    )
    set: list[str] | None = field(
        default=None,
        metadata={"action": "extend", "help": "KEY=VALUE (VALUE in YAML): change a key of the study, e.g. "
                  "cpt.max_steps=120 or seeds=[0,1]; repeatable."},
    )  # fmt: skip
    sweep: list[str] | None = field(
        default=None,
        metadata={"action": "extend", "help": "KEY=V1,V2,...: one study per value in OUTPUT_DIR/<cell> (repeatable: "
                  "the grid), shared steps once in OUTPUT_DIR/shared."},
    )  # fmt: skip
    output_dir: str | None = field(
        default=None, metadata={"help": "Where every step writes (default: study_runs/<preset>[-sweep][-smoke])."}
    )
    langs: list[str] | None = field(default=None, metadata={"help": "Target languages (as --set langs=[...])."})
    seeds: list[int] | None = field(default=None, metadata={"help": "CPT seeds, one run per setting and seed."})
    variants: list[str] | None = field(
        default=None, metadata={"help": "Synthetic studies: name variants, native (control) and/or anchors."}
    )
    anchor_settings: list[str] | None = field(
        default=None, metadata={"help": "Synthetic studies: CPT settings of the anchors variant."}
    )
    jobs: int | None = field(
        default=None, metadata={"help": "Steps run at the same time; on CPU each gets cores/jobs threads."}
    )
    accelerate_config: str | None = field(
        default=None, metadata={"help": "Launch training steps with `accelerate launch --config_file FILE`."}
    )
    questions_dir: str = field(
        default=PAPER_QUESTIONS_DIR,
        metadata={
            "help": f"Paper study: folder of the paper's <lang>-culture-cloze_<en|lang>.json ({PAPER_QUESTIONS_FETCH})."
        },
    )
    paper_data: str | None = field(
        default=None,
        metadata={"help": "Paper study: a JSON file of build_pairs.py data flags per language overriding the study's "
                  "data section (docs/paper-scale.md)."},
    )  # fmt: skip
    python: str = field(default="python", metadata={"help": "Interpreter of the steps ('python': this one)."})
    dry_run: bool = field(
        default=False, metadata={"help": "Print the plan, its time budget, training cost and commands; run nothing."}
    )
    tokens_per_second_per_gpu: float | None = field(
        default=None,
        metadata={"help": "Throughput per GPU behind --dry_run's GPU-hours (default: the paper study's measured one)."},
    )
    hub_org: str | None = field(
        default=None,
        metadata={"help": "Paper study: push the base model, CPT datasets and checkpoints to ORG/<study>-*."},
    )
    smoke: bool = field(
        default=False,
        metadata={"help": "Every step of the plan with only its budgets cut (study_config.SMOKE_BUDGETS)."},
    )
    force: bool = field(default=False, metadata={"help": "Forget every finished step and run each again from scratch."})


#: Flags besides --preset, --set and --sweep that shape a plan (recorded in plan.json as given).
PLAN_FLAGS = ("langs", "seeds", "variants", "anchor_settings", "accelerate_config", "questions_dir", "paper_data",
              "python", "smoke", "hub_org")  # fmt: skip


# --------------------------------------------------------------------------------------
# The plan: steps and what they produce
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    id: str  # unique and file-name safe (a sweep's: <cell>/<id> or shared/<folder>): names its log and done-marker
    kind: str  # world, pretrain, build, cpt, eval, base_eval, transfer, density
    title: str
    command: list[str]
    outputs: list[str]  # files that must exist after success
    workdir: str | None = None  # the step's own output folder (removed before a fresh start)
    deps: list[str] = field(default_factory=list)
    trains: bool = False  # resumable from its checkpoints (run_pretrain.py, run_cpt.py)


@dataclass
class Run:
    """One continual-pretraining run and where its outputs go."""

    lang: str
    variant: str
    setting: str  # one of CPT_SETTINGS
    seed: int
    dir: str
    eval_dir: str

    @property
    def name(self) -> str:
        return f"{self.lang}-{self.variant}-{self.setting}-s{self.seed}"


@dataclass
class Plan:
    preset: Preset  # the effective configuration
    out: str
    steps: list[Step]
    runs: list[Run]
    groups: dict  # "<lang>/<variant>" -> paths of that group's data, questions, probing, transfer and density
    dirs: dict = field(default_factory=dict)  # the world's and the base model's folders
    config: dict = field(default_factory=dict)  # how it was configured (file, --set, flags; a sweep cell's values)
    state_dir: str | None = None  # where the runner's records are (.done/, timings.json): out, or the sweep's
    cells: dict = field(default_factory=dict)  # a sweep: each cell's own plan, by name


def _in_run_order(steps: list[Step]) -> list[Step]:
    """The critical path first: every CPT run before any probing or analysis (a stable sort)."""
    order = ("world", "pretrain", "build", "cpt", "eval", "base_eval", "transfer", "density")
    return sorted(steps, key=lambda s: order.index(s.kind))


def _flags(arguments: dict) -> list[str]:
    """Command-line flags of a dict: True -> --flag, lists -> several values, None/False -> omitted."""
    flags = []
    for key, value in arguments.items():
        if value is None or value is False:
            continue
        values = [] if value is True else list(value) if isinstance(value, (list, tuple)) else [value]
        flags += [f"--{key}", *map(str, values)]
    return flags


class _PlanBuilder:
    """The steps, runs and groups of a plan as they are added; each step factory returns the id of its step.

    In a sweep (``cell``: its name; ``out``: its folder) a step that cells may share writes to
    ``shared/<name>-<digest of its command>`` and has the id ``shared/<folder>``; the cell's other steps have ids
    ``<cell>/<id>``."""

    def __init__(self, args: StudyArguments, preset: Preset, out: Path, cell: str | None = None):
        self.args, self.preset, self.out, self.cell = args, preset, out, cell
        self.shared = out.parent / "shared"
        self.steps: list[Step] = []
        self.runs: list[Run] = []
        self.groups: dict[str, dict] = {}
        self.dirs: dict[str, str] = {}

    def plan(self) -> Plan:
        return Plan(self.preset, str(self.out), _in_run_order(self.steps), self.runs, self.groups, self.dirs)

    def launcher(self, script: str, trains: bool) -> list[str]:
        if trains and self.preset.accelerate_config:
            return ["accelerate", "launch", "--config_file", self.preset.accelerate_config, script]
        return [self.args.python, script]

    def place(self, name: str, script: str, arguments: dict, default: Path, trains: bool = False) -> Path:
        """Set the ``output_dir`` of a step that cells may share: ``default`` in a study, in a sweep a folder of
        ``shared/`` named by the rest of its command (cells that would run the same command share it)."""
        folder = default
        if self.cell is not None:
            rest = {key: value for key, value in arguments.items() if key != "output_dir"}
            digest = hashlib.sha256(json.dumps([*self.launcher(script, trains), *_flags(rest)]).encode()).hexdigest()
            folder = self.shared / f"{name}-{digest[:10]}"
        arguments["output_dir"] = str(folder)
        return folder

    def step(self, step_id, kind, title, script, arguments, outputs, deps=(), trains=False) -> str:
        """Add a step running ``script`` with ``arguments`` as flags; ``outputs``: file names in its --output_dir."""
        workdir = Path(arguments["output_dir"])
        if self.cell is not None:
            step_id = f"shared/{workdir.name}" if workdir.parent == self.shared else f"{self.cell}/{step_id}"
        command = [*self.launcher(script, trains), *_flags(arguments)]
        self.steps.append(
            Step(step_id, kind, title, command, [str(workdir / o) for o in outputs], str(workdir), list(deps), trains)
        )
        return step_id

    def push(self, kind: str, name: str) -> dict:
        """--hub_org (paper study): the push flags of a step; training steps push every checkpoint."""
        if not self.args.hub_org or self.preset.synthetic:
            return {}
        study = self.preset.name + ("-smoke" if self.args.smoke else "")  # a smoke run never pushes over the real one
        if kind == "data":
            return {"push_to_hub": True, "hub_dataset_id": f"{self.args.hub_org}/{study}-{name}"}
        # hub_always_push: otherwise the Trainer skips a checkpoint's push while the previous one uploads
        return {"push_to_hub": True, "hub_model_id": f"{self.args.hub_org}/{study}-{name}",
                "hub_strategy": "all_checkpoints", "hub_always_push": True}  # fmt: skip

    def group(self, lang: str, variant: str, name: str, questions: list[str], settings: list[str], **paths) -> dict:
        """A run group: one language (and name variant), its questions, CPT settings and output folders."""
        group = {"lang": lang, "variant": variant, "data": str(self.out / "data" / name), "questions": questions}
        group.update({key: value for key, value in paths.items() if value is not None})
        group.update({kind: str(self.out / kind / name) for kind in ("base_eval", "transfer", "density")})
        group["settings"] = settings
        self.groups[f"{lang}/{variant}"] = group
        return group

    def probe(self, group: dict, model: str, output_dir, diagnostic: str | None = None) -> tuple[dict, list[str]]:
        """run_eval.py's flags and outputs for a model of a group (manipulation checks where the world has tiers)."""
        arguments = dict(self.preset.eval, questions=group["questions"], model_name_or_path=model,
                         diagnostic_pairs=diagnostic, name_alignment=group.get("name_alignment"),
                         item_tiers=group.get("item_tiers") if "name_alignment" in group else None,
                         output_dir=output_dir)  # fmt: skip
        outputs = ["accuracy.json", *(["bridge_diagnostic.json"] if diagnostic else [])]
        return arguments, outputs + (["manipulation_checks.json"] if "name_alignment" in group else [])

    def base_eval(self, group: dict, name: str, base_dir: Path, what: str, deps: list[str]) -> str:
        arguments, outputs = self.probe(group, str(base_dir), None)
        group["base_eval"] = str(self.place(f"base-eval-{name}", "run_eval.py", arguments, Path(group["base_eval"])))
        title = f"probe the base model ({what})"
        return self.step(f"base-eval-{name}", "base_eval", title, "run_eval.py", arguments, outputs, deps)

    def cpt_runs(self, group: dict, name: str, base_dir: Path, build_id: str, what: str) -> list[tuple[Run, str]]:
        """Per seed and setting of a group: its CPT step and the probing of every checkpoint (+ the bridge diagnostic
        where the group has diagnostic pairs). Returns each run with the id of its probing step."""
        probed = []
        for seed in self.preset.seeds:
            for setting in group["settings"]:
                run_name, diagnostic = f"{name}-{setting}-s{seed}", group.get("diagnostic_pairs")
                run_dir = self.out / "cpt" / run_name
                run = Run(group["lang"], group["variant"], setting, seed, str(run_dir), str(run_dir / EVAL_DIR_NAME))
                self.runs.append(run)
                cpt_args = dict(self.preset.cpt, model_name_or_path=str(base_dir), dataset_path=group["data"],
                                lang=group["lang"], **{flag: setting == flag for flag in CPT_SETTINGS},
                                output_dir=str(run_dir), run_name=run_name, seed=seed,
                                **self.push("model", f"cpt-{run_name}"))  # fmt: skip
                title = f"continual pretraining {what}, {setting.replace('_', ' ')}, seed {seed}"
                outputs = ["config.json", "packing_audit.json"]
                cpt_id = self.step(f"cpt-{run_name}", "cpt", title, "run_cpt.py", cpt_args, outputs, [build_id], True)
                eval_args, outputs = self.probe(group, str(run_dir), run.eval_dir, diagnostic)
                title = f"probe every checkpoint of {run_name}" + (" (+ bridge diagnostic)" if diagnostic else "")
                probed.append((run, self.step(f"eval-{run_name}", "eval", title, "run_eval.py", eval_args, outputs,
                                              [cpt_id])))  # fmt: skip
        return probed

    def transfer(self, group: dict, name: str, probed: list[tuple[Run, str]], what: str) -> str:
        """The with-minus-without analysis of a group's runs (+ mismatched bridges and the tiers, where present)."""
        bridges, no_bridges, mismatched = ([r.eval_dir for r, _ in probed if r.setting == s] for s in CPT_SETTINGS)
        arguments = dict(self.preset.transfer, with_bridges=bridges, without_bridges=no_bridges,
                         mismatched_bridges=mismatched or None,
                         item_tiers=[group["item_tiers"]] if "item_tiers" in group else None,
                         output_dir=group["transfer"])  # fmt: skip
        pairs = len(bridges)
        title = f"transfer analysis ({what}, {pairs} seed pair{'s' if pairs > 1 else ''})"
        deps = [eval_id for _, eval_id in probed]
        return self.step(f"transfer-{name}", "transfer", title, "run_transfer.py", arguments, ["transfer.json"], deps)

    def density(self, step_id: str, title: str, arguments: dict, probed, deps: list[str], then=None) -> str:
        """The density of a group's culture in a corpus, with the first seed's final predictions of both settings
        for the instance-level analysis."""
        first = {setting: next(p for p in probed if p[0].setting == setting) for setting in SETTINGS}
        arguments = dict(arguments, predictions_with=first["bridges"][0].eval_dir,
                         predictions_without=first["no_bridges"][0].eval_dir, **(then or {}))  # fmt: skip
        deps = [*deps, first["bridges"][1], first["no_bridges"][1]]
        return self.step(step_id, "density", title, "run_density.py", arguments, ["density.json"], deps)


def _question_files(folder: Path, lang: str) -> list[str]:
    """A language's two question files: the English questions, then the target language's."""
    return [str(folder / question_file_name(lang, question_lang)) for question_lang in ("en", lang)]


def build_plan(args: StudyArguments, preset: Preset, out: Path, cell: str | None = None) -> Plan:
    """The plan of a study for ``preset``, its effective configuration (configure): the synthetic world and
    pretraining, then per language and name variant the CPT dataset and runs, their probing and analyses."""
    if not preset.synthetic:
        return build_paper_plan(args, preset, out, cell)
    langs, variants, plan = preset.langs, preset.variants, _PlanBuilder(args, preset, out, cell)
    world_args = dict(preset.world, output_dir=None, langs=langs, seed=0, name_variants=variants)
    resource = [r for r in world_args.pop("resource", []) if r.split("=")[0] in langs]
    resource += [f"{lang}=mixed" for lang in langs if not any(r.startswith(f"{lang}=") for r in resource)]
    world_args["resource"] = resource
    world_dir = plan.place("world", "synthetic_world.py", world_args, out / "world")
    en_corpus = str(world_dir / "en_corpus.jsonl")
    outputs = ["truth.json", "en_corpus.jsonl"]
    world = plan.step("world", "world", "generate the synthetic world", "synthetic_world.py", world_args, outputs)
    tokenizer_files = [en_corpus, *(str(world_dir / lang / v / "mono.jsonl") for lang in langs for v in variants)]
    pretrain_args = dict(preset.pretrain, train_tokenizer=True, tokenizer_files=tokenizer_files, train_file=en_corpus,
                         output_dir=None, seed=0)  # fmt: skip
    base_dir = plan.place("base", "run_pretrain.py", pretrain_args, out / "base", trains=True)
    plan.dirs.update(world=str(world_dir), base=str(base_dir))
    title = "pretrain the base model on the English corpus"
    outputs = ["config.json", "data_stats.json"]
    pretrain = plan.step("pretrain", "pretrain", title, "run_pretrain.py", pretrain_args, outputs, [world], True)
    # A world with the absent or en_only tier has what the manipulation checks read; every world has item tiers.
    checks = any((preset.world.get(key) or 0) > 0 for key in ("absent_places", "en_only_places"))
    for lang, variant in itertools.product(langs, variants):
        name, what, wdir = f"{lang}-{variant}", f"{lang}, {variant} names", world_dir / lang / variant
        settings = preset.anchor_settings if variant == "anchors" else preset.settings
        settings = [s for s in CPT_SETTINGS if s in settings]
        group = plan.group(lang, variant, name, _question_files(wdir, lang), settings,
                           diagnostic_pairs=str(wdir / "diagnostic_pairs.jsonl"), mono=str(wdir / "mono.jsonl"),
                           item_tiers=str(wdir / "item_tiers.json"),
                           name_alignment=str(wdir / "name_alignment.json") if checks else None)  # fmt: skip
        build_args = dict(preset.build, lang=lang, pairs_files=str(wdir / "pairs.jsonl"), en_column="en",
                          tgt_column=lang, mono_files=group["mono"], replay_files=en_corpus,
                          tokenizer_name=str(base_dir), block_size=preset.cpt["block_size"],
                          output_dir=None, seed=0)  # fmt: skip
        group["data"] = str(plan.place(f"data-{name}", "build_pairs.py", build_args, Path(group["data"])))
        title = f"build the CPT dataset ({what})"
        build = plan.step(f"build-{name}", "build", title, "build_pairs.py", build_args, ["build_stats.json"],
                          [world, pretrain])  # fmt: skip
        plan.base_eval(group, name, base_dir, what, deps=[world, pretrain])
        probed = plan.cpt_runs(group, name, base_dir, build, what)
        if not set(SETTINGS) <= set(group["settings"]):
            continue  # a group trained in one setting serves the anchors comparison only
        plan.transfer(group, name, probed, what)
        density_args = dict(preset.density, questions=group["questions"],
                            corpus_files=[f"en={en_corpus}", f"{lang}={group['mono']}"],
                            output_dir=group["density"])  # fmt: skip
        title = f"cultural density of {lang} knowledge in both corpora ({variant} names)"
        source = {"source_corpus": [f"{lang}=en", f"en={lang}"]}
        plan.density(f"density-{name}", title, density_args, probed, [world], source)
    return plan.plan()


def _paper_data(args: StudyArguments, preset: Preset) -> dict:
    """The paper study's build_pairs.py data flags per language, with --paper_data's overrides."""
    paper_data = {lang: dict(flags) for lang, flags in preset.data.items()}
    if args.paper_data:
        given = json.loads(Path(args.paper_data).read_text(encoding="utf-8"))
        for lang, flags in checked_value("data", given, args.paper_data).items():
            paper_data.setdefault(lang, {}).update(flags)
            if not paper_data[lang].get("mono_dataset"):  # the target corpus given as files instead
                paper_data[lang].pop("mono_data_files", None)
    unknown = [lang for lang in preset.langs if lang not in paper_data]
    if unknown:
        raise InputError(f"No data for {unknown} in the study's data section: give it with --paper_data FILE.json.")
    return paper_data


def build_paper_plan(args: StudyArguments, preset: Preset, out: Path, cell: str | None = None) -> Plan:
    """The paper-scale study: per language the CPT dataset, the base model's probing, each run's CPT and probing,
    the transfer analysis, and the density in English Wikipedia and in the language's own corpus."""
    paper_data, plan = _paper_data(args, preset), _PlanBuilder(args, preset, out, cell)
    pretrain_args = dict(preset.pretrain, output_dir=None, seed=0, **plan.push("model", "base"))
    base_dir = plan.place("base", "run_pretrain.py", pretrain_args, out / "base", trains=True)
    plan.dirs["base"] = str(base_dir)
    title = "pretrain Qwen2.5-0.5B (architecture) on Latin-only English Wikipedia"
    pretrain = plan.step("pretrain", "pretrain", title, "run_pretrain.py", pretrain_args, ["config.json"], trains=True)
    enwiki = {"corpus_dataset": "wikimedia/wikipedia", "corpus_dataset_config": "20231101.en"}
    for lang in preset.langs:
        settings = [s for s in CPT_SETTINGS if s in preset.settings]
        group = plan.group(lang, "real", lang, _question_files(Path(args.questions_dir), lang), settings)
        build_args = dict({"block_size": preset.cpt["block_size"]}, **preset.build, lang=lang, **paper_data[lang],
                          replay_dataset="wikimedia/wikipedia", replay_dataset_config="20231101.en",
                          eval_questions=group["questions"], tokenizer_name=str(base_dir), output_dir=None, seed=0,
                          **plan.push("data", f"data-{lang}"))  # fmt: skip
        group["data"] = str(plan.place(f"data-{lang}", "build_pairs.py", build_args, Path(group["data"])))
        title = f"build the CPT dataset ({lang})"
        outputs = ["build_stats.json"]
        build = plan.step(f"build-{lang}", "build", title, "build_pairs.py", build_args, outputs, [pretrain])
        plan.base_eval(group, lang, base_dir, lang, deps=[pretrain])
        probed = plan.cpt_runs(group, lang, base_dir, build, lang)
        plan.transfer(group, lang, probed, lang)
        mono = paper_data[lang]
        if mono.get("mono_files"):  # the target corpus as files (e.g. one language's file of MC^2)
            target = {"corpus_files": [f"{lang}={path}" for path in mono["mono_files"]], "corpus_streaming": None}
        else:
            target = {key.replace("mono", "corpus"): mono.get(key)
                      for key in ("mono_dataset", "mono_dataset_config", "mono_data_files")}  # fmt: skip
        for label, corpus in (("enwiki", enwiki), (lang, target)):
            density_args = dict(preset.density, questions=group["questions"], **{"corpus_streaming": True, **corpus},
                                corpus_label=label, output_dir=str(Path(group["density"]) / label))  # fmt: skip
            title = f"cultural density of {lang} knowledge in {label}"
            plan.density(f"density-{lang}-{label}", title, density_args, probed, [])
    return plan.plan()


def build_sweep(args: StudyArguments, out: Path, factors: dict[str, list]) -> Plan:
    """One plan for every cell of the grid of ``factors``, each planned in ``out/<cell>`` (plan.cells holds its own
    plan, for its report); the plan runs the union of the cells' steps, a step shared by several cells once."""
    base, _ = configure(args)
    cells: dict[str, Plan] = {}
    steps: dict[str, Step] = {}
    for name, values in sweep_cells(factors).items():
        preset, _ = configure(args, values)
        cells[name] = build_plan(args, preset, out / name, cell=name)
        cells[name].state_dir, cells[name].config = str(out), {"cell": values}
        steps.update({step.id: step for step in cells[name].steps})  # a shared step's id names its command
    runs = [run for cell in cells.values() for run in cell.runs]
    groups = {f"{name}/{key}": group for name, cell in cells.items() for key, group in cell.groups.items()}
    return Plan(base, str(out), _in_run_order(list(steps.values())), runs, groups, cells=cells)


# --------------------------------------------------------------------------------------
# What a plan costs, and its commands
# --------------------------------------------------------------------------------------


def estimate_seconds(plan: Plan, jobs: int) -> float:
    """Expected wall time on the study's reference machine: the critical path, then parallel work / jobs."""
    estimates = plan.preset.estimates_s or {}
    serial = sum(estimates.get(s.kind, 0) for s in plan.steps if s.kind in ("world", "pretrain"))
    parallel = sum(estimates.get(s.kind, 0) for s in plan.steps if s.kind not in ("world", "pretrain"))
    return serial + parallel / max(1, jobs)


def _flag_value(command: list[str], flag: str, default=None):
    return command[command.index(flag) + 1] if flag in command else default


def _num_processes(command: list[str]) -> int:
    """Processes (GPUs) of a training command: the num_processes of its accelerate config, 1 for plain python."""
    if command[:2] != ["accelerate", "launch"]:
        return 1
    config = Path(_flag_value(command, "--config_file"))
    if not config.is_file():
        raise InputError(f"--accelerate_config {config}: no such file (its num_processes sizes the training cost).")
    return int((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("num_processes", 1))


def training_cost(plan: Plan, args: StudyArguments) -> str:
    """--dry_run's training cost: windows and tokens exact from the flags, GPU-hours an estimate from a throughput."""
    throughput, source = args.tokens_per_second_per_gpu, "given with --tokens_per_second_per_gpu"
    if throughput is None and not plan.preset.synthetic:
        throughput, source = MEASURED_TOKENS_PER_SECOND_PER_GPU, f"measured by {MEASURED_THROUGHPUT_SOURCE}"
    lines = ["Training cost (windows per step = per-device batch x gradient accumulation x processes):"]
    total_tokens = total_hours = 0
    for step in (s for s in plan.steps if s.trains):
        command = step.command
        shape = (int(_flag_value(command, "--per_device_train_batch_size", 8)),  # TrainingArguments' default
                 int(_flag_value(command, "--gradient_accumulation_steps", 1)), _num_processes(command))  # fmt: skip
        steps, block = int(_flag_value(command, "--max_steps")), int(_flag_value(command, "--block_size"))
        windows = steps * math.prod(shape)
        total_tokens += windows * block
        line = (f"  {step.id}: {steps:,} steps x {math.prod(shape)} windows ({'x'.join(map(str, shape))}) = "
                f"{windows:,} windows x {block} tokens = {windows * block:,} tokens")  # fmt: skip
        if throughput:
            hours = windows * block / throughput / 3600
            total_hours += hours
            line += f"; {hours:.2f} GPU-hours, {hours / shape[2]:.2f} wall hours on {shape[2]} GPUs"
        lines.append(line)
    lines.append(
        f"  all training steps: {total_tokens:,} tokens" + (f"; {total_hours:.2f} GPU-hours" if throughput else "")
    )
    if throughput:
        lines.append(
            f"  GPU-hours are an ESTIMATE at {throughput:,.0f} tokens/s per GPU ({source}), assuming throughput "
            "scales linearly with GPUs. Not counted: data building, probing, density, checkpoint saving, start-up. A "
            "CPT run may train fewer steps when its data cannot fill them (its packing_audit.json). Measure your own "
            "cluster with bench/gpu_fsdp_check.sh and pass --tokens_per_second_per_gpu N."
        )
    return "\n".join(lines)


def commands_script(plan: Plan, args: StudyArguments) -> str:
    """commands.sh: every command of the plan in dependency order, to rerun or inspect any step by hand."""
    lines = ["#!/usr/bin/env bash",
             f"# The commands of `python run_study.py --preset {plan.preset.name}{' --smoke' if args.smoke else ''}`, "
             "in dependency order; run from the repository root.",
             f"# Configuration: {configuration_text(plan.config)}", "set -euo pipefail", ""]  # fmt: skip
    for step in plan.steps:
        lines += [f"# {step.title}", shlex.join(step.command), ""]
    return "\n".join(lines)


def _missing_inputs(plan: Plan, args: StudyArguments) -> str | None:
    """What is missing of the inputs no step writes (the paper's questions, local corpus and pair files) and how to
    get it; None when nothing is."""
    if plan.preset.synthetic:
        return None
    problems = []
    questions = sorted({q for group in plan.groups.values() for q in group["questions"] if not Path(q).is_file()})
    if questions:
        where = args.questions_dir
        fetch = PAPER_QUESTIONS_FETCH
        if Path(where).resolve() != (REPO_DIR / PAPER_QUESTIONS_DIR).resolve():
            fetch = fetch.replace(PAPER_QUESTIONS_DIR, shlex.quote(where))
        problems.append(
            f"the paper's questions are missing from {where} ({', '.join(Path(q).name for q in questions)}). "
            f"They come from the paper's public release ({PAPER_QUESTIONS_REPO}, Apache-2.0); get them with:\n"
            f"  {fetch}\nor pass --questions_dir DIR (a folder holding <lang>-culture-cloze_en.json and "
            "<lang>-culture-cloze_<lang>.json)"
        )
    files = sorted({f for f in _local_files(plan) if not Path(f).exists()})
    if files:
        problems.append(
            f"these corpus/pair files of the plan are missing: {', '.join(files)}; no public Hub dataset has them: "
            "give your own files with --paper_data FILE.json (see the data section of configs/studies/paper.yaml)"
        )
    return ";\n".join(problems) or None


def _local_files(plan: Plan) -> list[str]:
    """The local corpus and pair files the build steps of a plan read."""
    files = []
    for step in (s for s in plan.steps if s.kind == "build"):
        for flag in ("--pairs_files", "--mono_files"):
            if flag in step.command:
                rest = step.command[step.command.index(flag) + 1 :]
                files += itertools.takewhile(lambda c: not c.startswith("--"), rest)
    return files


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(StudyArguments, description=__doc__.split("\n\n")[0])


def parse_arguments(argv: list[str] | None = None) -> tuple[StudyArguments, Preset, list[str]]:
    """The study's arguments, its configuration (configure) and the lines saying what --smoke cut."""
    (args,) = _parser().parse_args_into_dataclasses(args=argv)
    args.preset = str(study_file(args.preset))  # a path that holds after the move to the repository root
    preset, smoke_cuts = configure(args)
    if args.hub_org and preset.synthetic:
        raise InputError("--hub_org applies to the paper study only (synthetic studies never touch the Hub).")
    if args.hub_org and args.sweep:
        raise InputError("--hub_org does not go with --sweep (every cell would push to the same repositories).")
    if args.variants and not preset.synthetic:
        raise InputError("--variants applies to the synthetic studies only (the paper study has real names).")
    return args, preset, smoke_cuts


def configure(args: StudyArguments, cell: dict | None = None) -> tuple[Preset, list[str]]:
    """A study's effective configuration (its file, --set, a sweep cell's values, --smoke's cuts, then the flags that
    set keys), checked, and the lines saying what --smoke cut."""
    path = study_file(args.preset)
    preset = read_study(path, args.set or [], cell)
    preset, cuts = smoke_preset(preset, on_gpu=_cuda_available()) if args.smoke else (preset, [])
    preset = with_flags(preset, args)
    given = [f"--set {text}" for text in args.set or []] + [f"{k}={v}" for k, v in (cell or {}).items()]
    check_study(preset, f"{path}" + (f" with {', '.join(given)}" if given else ""))
    return preset, cuts


def configuration(args: StudyArguments, argv: list[str] | None, factors: dict | None) -> dict:
    """How the study was configured, for plan.json and the reports: file, --set, --sweep, the other flags given."""
    parser = _parser()
    for action in parser._actions:  # without defaults, parsing argv again yields only the flags given
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    return {"preset": Path(args.preset).stem, "file": str(study_file(args.preset)), "set": args.set or [],
            "sweep": factors, "arguments": asdict(args),
            "flags": {k: getattr(args, k) for k in PLAN_FLAGS if k in given}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the exit status (1: a step failed, 130: interrupted; a bad input or a busy output
    folder raises InputError, exit status 2)."""
    # 1. Arguments and the study's configuration.
    setup_logging()
    args, preset, smoke_cuts = parse_arguments(argv)
    factors = sweep_factors(args.sweep, args.set or []) if args.sweep else None
    # 2. The output folder. Steps run from the repository root; paths inside it are written relative to it.
    name = preset.name + ("-sweep" if factors else "") + ("-smoke" if args.smoke else "")
    out = Path(args.output_dir or REPO_DIR / "study_runs" / name).resolve()
    os.chdir(REPO_DIR)
    if out.is_relative_to(REPO_DIR):
        out = out.relative_to(REPO_DIR)
    # 3. The plan: a study, or the cells of a sweep as one plan.
    plan = build_sweep(args, out, factors) if factors else build_plan(args, preset, out)
    plan.config = configuration(args, argv, factors)
    for cell in plan.cells.values():
        cell.config = {**plan.config, **cell.config}
    # 4. What runs, and how long it should take; --dry_run stops here with the cost and the commands.
    _print_overview(plan, args, smoke_cuts)
    problem = _missing_inputs(plan, args)
    if args.dry_run:
        print(f"Note: before a real run, {problem}.\n" if problem else "")
        print(training_cost(plan, args) + "\n")
        print(commands_script(plan, args))
        return 0
    # 5. Refuse to start without the plan's own inputs, or beside another study on the same outputs.
    if problem:
        raise InputError(problem)
    lock = lock_output_dir(out)  # held until this process ends
    try:
        # 6. The commands and the plan on disk (the report reads the plan back from plan.json).
        write_text_atomic(out / "commands.sh", commands_script(plan, args))
        for record_plan in [plan, *plan.cells.values()]:
            write_json_atomic(Path(record_plan.out) / "plan.json", plan_record(record_plan))
        started = time.time()
        # 7. Every step not done yet; a scheduler's or `timeout`'s SIGTERM stops the study like Ctrl-C.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            StudyRunner(plan, plan.preset.jobs, args.force, 0 if factors else plan.preset.budget_s).run()
        except KeyboardInterrupt:
            return 130
        except RuntimeError as err:
            print(f"\n{err}", file=sys.stderr)
            return 1
        # 8. The reports, from the files the steps wrote (every step finished: the runner raises otherwise).
        written = write_reports(plan)
        print(f"Study finished in {fmt_time(time.time() - started)}.\nReport: {written['md']} and {written['html']}")
        return 0
    finally:
        os.close(lock)  # the kernel drops the lock with it


def plan_record(plan: Plan) -> dict:
    """plan.json: the plan, its configuration and every effective value, and for a sweep each cell's record."""
    record = {"configuration": plan.config, "preset": asdict(plan.preset), "out": plan.out, "state_dir": plan.state_dir,
              "dirs": plan.dirs, "runs": [asdict(r) | {"name": r.name} for r in plan.runs], "groups": plan.groups,
              "steps": [asdict(s) for s in plan.steps]}  # fmt: skip
    if plan.cells:
        record["cells"] = {name: plan_record(cell) for name, cell in plan.cells.items()}
    return record


def _print_overview(plan: Plan, args: StudyArguments, smoke_cuts: list[str]) -> None:
    """The study, its configuration and output folder, the steps by kind (a sweep's per cell) and the time budget."""
    config, preset = plan.config, plan.preset
    print(
        f"Study {preset.name!r}: {preset.description}\nConfiguration: {configuration_text(config)}\nOutput: {plan.out}"
    )
    if args.smoke:
        print("Smoke run: every step of the plan, only these budgets cut:\n  " + "\n  ".join(smoke_cuts))
    kinds = ", ".join(f"{k} x{v}" for k, v in Counter(s.kind for s in plan.steps).items())
    print(f"Steps: {kinds} ({len(plan.steps)} in all), {preset.jobs} at a time")
    if plan.cells:
        planned = sum(len(cell.steps) for cell in plan.cells.values())
        print(f"Sweep: {len(plan.cells)} cells, {planned} steps planned, {len(plan.steps)} to run (shared once):")
        for name, cell in plan.cells.items():
            print(f"  {name}: {len(cell.steps)} steps ({sum(s.id.startswith('shared/') for s in cell.steps)} shared)")
    elif preset.budget_s:
        estimate = fmt_time(estimate_seconds(plan, preset.jobs))
        budget = f"{fmt_time(preset.budget_s)} on {preset.reference_machine}"
        print(f"Time budget: {budget}; estimated {estimate} for this plan.")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            print(f"Note: the machine is busy (load {load:.1f} on {cores} cores): expect it to take longer.")


if __name__ == "__main__":
    exit_on_input_error(main)
