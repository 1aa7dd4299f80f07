#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8", "regex", "tqdm", "pyyaml"]
# ///
"""The whole study in one command: pretrain, build pairs, continual pretraining with and without
bridges, bilingual probing, transfer analysis, density, and a report.

Every step runs one of the study's own scripts as a subprocess, with the command line a user would
type (``python run_pretrain.py ...`` or, with ``--accelerate_config``, ``accelerate launch ...``), so
the study exercises exactly the code paths of a manual run. The commands are written to
``OUTPUT_DIR/commands.sh`` and printed with ``--dry_run``.

A study is a file (``--preset NAME`` reads ``configs/studies/NAME.yaml``, ``--preset PATH`` any such file):
top-level keys say what runs (langs, seeds, variants, settings, jobs, budget_s, ...), and one section per step
script (world, pretrain, build, cpt, eval, transfer, density; data for real corpora) holds that script's flags
(the format, and how each key is checked: study_config.py). The repository's studies, each file saying what it
runs: ``cpu`` (the default: a synthetic world, a ~0.5M-parameter Qwen2 model, about 15 minutes on a 2-core laptop
CPU), ``micro`` (CI-sized: the end-to-end test), ``gpu-small`` (minutes on one GPU), ``dose-response`` (the
pre-registered dose-response study's base, docs/dose-response-preregistration.md) and ``paper`` (the paper's scale,
Hub datasets and the paper's questions, a GPU cluster).

``--set KEY=VALUE`` changes any value without editing a file (``--set world.pair_mentions=30 --set
cpt.max_steps=2400 --set seeds=[0,1]``; VALUE is YAML); an unknown key or a wrongly typed value is refused,
naming the valid keys (a section's keys are its script's flags). ``--sweep KEY=V1,V2,...`` (repeatable) runs one
study per cell of the grid of the values, in ``OUTPUT_DIR/<cell>/``, as one plan: a step whose command is the same
in several cells (the world and the pretraining of cells that differ only in CPT) runs once, in
``OUTPUT_DIR/shared/``. ``sweep_report.md`` shows the gaps against each swept value. The effective configuration
is recorded in ``plan.json`` and shown at the top of every report.

Steps are skipped when finished: a step is done when its outputs exist and its done-marker
(``OUTPUT_DIR/.done/<step>.json``, written after success) holds the current command and the
finished runs of its upstream steps it was run on. After Ctrl-C, run the same command again:
finished steps are skipped, an interrupted training step resumes from its last checkpoint when it
was started with the same command on the same upstream runs, any other step starts afresh (its
earlier outputs removed), as does every step under ``--force``.

Outputs (``OUTPUT_DIR``, default ``study_runs/<preset>``): ``report.md``, ``report.html``,
``report.json`` (every number the report shows), ``figures/``, ``commands.sh``, ``plan.json`` (the plan and
its configuration), ``timings.json``, ``logs/<step>.log`` and the outputs of every step (world/, base/, data/,
cpt/, density/, ...).

The report (``study_report.py``) is written after the last step. ``--report_only`` rewrites it alone, from the
plan recorded in ``plan.json`` (flags that contradict the record are refused), and names every step that did
not finish.

Usage::

    python run_study.py                          # CPU default
    python run_study.py --preset micro           # CI-sized
    python run_study.py --preset gpu-small       # one GPU, minutes
    python run_study.py --preset paper --dry_run # print the paper-scale commands
    python run_study.py --set world.pair_mentions=30 --seeds 0 1 2 3 4
    python run_study.py --preset micro --sweep cpt.max_steps=30,60,120

Needs study_config.py, study_report.py, cloze.py and study_common.py beside it, and the scripts of the
steps it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloze import question_file_name
from study_common import InputError, exit_on_input_error, setup_logging, write_json_atomic, write_text_atomic
from study_config import (
    CONFIG_FLAGS,
    CPT_SETTINGS,
    PRESETS,
    REPO_DIR,
    Preset,
    check_study,
    checked_value,
    parse_assignment,
    read_study,
    smoke_preset,
    study_file,
    sweep_cells,
    sweep_factors,
    with_flags,
)
from study_report import (
    SETTINGS,
    configuration_text,
    done_marker,
    fmt_time,
    read_plan,
    read_record,
    read_step_seconds,
    started_record,
    upstream_changed,
    upstream_runs,
    utc_now,
    why_not_done,
    write_reports,
)

#: The paper's questions come from its public release; the default folder is in the repository's own (git-ignored)
#: working area, relative to the repository root, where the steps run.
PAPER_QUESTIONS_REPO = "https://github.com/luciusssss/cross-lingual-culture"
PAPER_QUESTIONS_DIR = "data/paper-questions"
PAPER_QUESTIONS_FETCH = (
    f"git clone --depth 1 {PAPER_QUESTIONS_REPO} /tmp/clc && mkdir -p {PAPER_QUESTIONS_DIR} && "
    f"cp /tmp/clc/data/*-culture-cloze_*.json {PAPER_QUESTIONS_DIR}/"
)

#: Training throughput per GPU behind the GPU-hours estimate of --dry_run, unless --tokens_per_second_per_gpu
#: gives another (docs/benchmarks.md and docs/paper-scale.md).
MEASURED_TOKENS_PER_SECOND_PER_GPU = 47_800
MEASURED_THROUGHPUT_SOURCE = (
    "bench/gpu_fsdp_check.sh on one NVIDIA H200 (Qwen2.5-0.5B shapes, 2048-token windows, bf16, FSDP, sdpa with "
    "per-document masks; 2026-11-26)"
)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


@dataclass
class StudyArguments:
    preset: str = field(
        default="cpu",
        metadata={
            "help": f"Which study to run: a study of configs/studies/ ({', '.join(PRESETS)}; see the module "
            "docstring and README) or the path of a study file (YAML or JSON, in the format of those)."
        },
    )
    set: list[str] | None = field(
        default=None,
        metadata={
            "action": "append",
            "help": "Change a value of the study's configuration: KEY=VALUE, KEY a top-level key (seeds, langs, "
            "settings, ...) or SECTION.FLAG (world.pair_mentions, cpt.max_steps, eval.batch_size, data.LANG.FLAG; a "
            "section's keys are its script's flags), VALUE in YAML (30, 1e-4, true, [0,1]; null: the script's "
            "default). Repeatable. Unknown keys and wrongly typed values are refused.",
        },
    )
    sweep: list[str] | None = field(
        default=None,
        metadata={
            "action": "append",
            "help": "KEY=V1,V2,...: run one study per value (KEY as for --set; the values a YAML list without its "
            "brackets). Repeatable: the cells are the grid of all values. Each cell runs in OUTPUT_DIR/<cell>; a step "
            "whose command is the same in several cells (the world and the pretraining when only CPT differs) runs "
            "once, in OUTPUT_DIR/shared. Writes sweep_report.md/.html/.json beside the cells' reports.",
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where every step writes (default: study_runs/<preset>, study_runs/<preset>-sweep)."},
    )
    langs: list[str] | None = field(
        default=None, metadata={"help": "Target languages (default: the study's); the same as --set langs=[...]."}
    )
    seeds: list[int] | None = field(
        default=None, metadata={"help": "CPT seeds, one run per setting and seed (default: the study's)."}
    )
    variants: list[str] | None = field(
        default=None,
        metadata={"help": "Synthetic studies: name variants to run, native (control) and/or anchors (default: both)."},
    )
    anchor_settings: list[str] | None = field(
        default=None,
        metadata={
            "help": "Synthetic studies: CPT settings run for the anchors variant, bridges and/or no_bridges "
            "(default: the study's; the cpu study runs no_bridges only, to fit its time budget)."
        },
    )
    jobs: int | None = field(
        default=None,
        metadata={
            "help": "Steps run at the same time (default: the study's). On CPU each gets cores/jobs threads; "
            "small models train faster as parallel single-thread processes than as one multi-thread process."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Launch training steps with `accelerate launch --config_file FILE` (e.g. "
            "accelerate_configs/multi_gpu.yaml). Default: the study's (plain python for the synthetic ones; the "
            "paper study uses accelerate_configs/multi_gpu.yaml)."
        },
    )
    questions_dir: str = field(
        default=PAPER_QUESTIONS_DIR,
        metadata={
            "help": "Paper study: folder holding the paper's <lang>-culture-cloze_<en|lang>.json files, from its "
            f"public release ({PAPER_QUESTIONS_REPO}, folder data/, Apache-2.0). Default: {PAPER_QUESTIONS_DIR} "
            f"(git-ignored); fill it with: {PAPER_QUESTIONS_FETCH}"
        },
    )
    paper_data: str | None = field(
        default=None,
        metadata={
            "help": "Paper study: a JSON file overriding the per-language build_pairs.py data flags of its data "
            'section, e.g. {"bo": {"pairs_files": ["my/en-bo.jsonl"], "en_column": "en", "tgt_column": "bo"}}.'
        },
    )
    python: str = field(
        default="python",
        metadata={
            "help": "Python interpreter of the steps; 'python' runs them with the interpreter running this script."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Print the commands, the time budget and the training cost (tokens, GPU-hours) without running "
            "(with --sweep: the cells and the steps they share)."
        },
    )
    tokens_per_second_per_gpu: float | None = field(
        default=None,
        metadata={
            "help": "Training throughput per GPU for the GPU-hours estimate of --dry_run (default: "
            f"{MEASURED_TOKENS_PER_SECOND_PER_GPU:,} tokens/s, measured by {MEASURED_THROUGHPUT_SOURCE}). Measure your "
            "own cluster's with bench/gpu_fsdp_check.sh."
        },
    )
    hub_org: str | None = field(
        default=None,
        metadata={
            "help": "Paper study: push the base model, each CPT dataset and every checkpoint of every run to the "
            "Hub under this organisation or user: ORG/<study>-base, ORG/<study>-data-<lang>, ORG/<study>-cpt-<run> "
            "(<study> is the study's name, with -smoke for --smoke), checkpoints as checkpoint-N folders."
        },
    )
    smoke: bool = field(
        default=False,
        metadata={
            "help": "Run every step of the study's plan exactly as the full run would (same scripts, data sources, "
            "columns, tokenizer, flags) with only the budgets cut (see study_config.SMOKE_BUDGETS: a tiny model, a "
            "few steps, short windows): what to run first on a cluster to prove data access, columns, launch config "
            "and outputs. Outputs go to study_runs/<preset>-smoke by default and never count as the full run's."
        },
    )
    force: bool = field(
        default=False,
        metadata={
            "help": "Forget every finished step of the plan and run each again from scratch: a step's earlier "
            "outputs are removed when it starts, and no training step resumes from an earlier checkpoint."
        },
    )
    report_only: bool = field(
        default=False,
        metadata={
            "help": "Only (re)write the report of the study in --output_dir, from the plan it recorded (plan.json, "
            "left as it is); flags that contradict that record are refused. Steps that did not finish are named."
        },
    )


#: Flags that shape a plan: --report_only refuses those that contradict the recorded one.
PLAN_FLAGS = ("preset", "set", "sweep", "langs", "seeds", "variants", "anchor_settings", "accelerate_config",
              "questions_dir", "paper_data", "python", "smoke", "hub_org")  # fmt: skip


# --------------------------------------------------------------------------------------
# The plan: steps and what they produce
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    """One command of the study."""

    id: str  # unique and file-name safe (a sweep's: <cell>/<id> or shared/<folder>): names its log and done-marker
    kind: str  # world, pretrain, build, cpt, eval, base_eval, transfer, density
    title: str
    command: list[str]
    outputs: list[str]  # files that must exist after success
    workdir: str | None = None  # the step's own output folder (removed before a fresh start)
    deps: list[str] = field(default_factory=list)
    trains: bool = False  # resumable from its checkpoints (run_pretrain.py, run_cpt.py)
    env: dict = field(default_factory=dict)


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
    groups: dict  # "<lang>/<variant>" -> paths of that group's data, questions, transfer and density outputs
    dirs: dict = field(default_factory=dict)  # the world's and the base model's folders
    config: dict = field(default_factory=dict)  # how it was configured (file, --set, flags; a sweep cell's values)
    state_dir: str | None = None  # where the runner's records are (.done/, timings.json): out, or the sweep's
    cells: dict = field(default_factory=dict)  # a sweep: each cell's own view of the plan (a Plan), by name


def _flags(arguments: dict) -> list[str]:
    """Command-line flags of a dict: True -> --flag, lists -> several values, None/False -> omitted."""
    flags = []
    for key, value in arguments.items():
        if value is None or value is False:
            continue
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def _question_files(folder: Path, lang: str) -> list[str]:
    """A language's two question files in ``folder``: the English questions, then the target language's."""
    return [str(folder / question_file_name(lang, question_lang)) for question_lang in ("en", lang)]


class _PlanBuilder:
    """The steps, runs and groups of a plan as they are added. Each step factory adds one step and returns its id:
    what later steps name as a dependency. The two plan builders (synthetic, paper) differ only in their data.

    In a sweep (``cell``: its name; ``out``: its folder) a step that cells may share writes to a folder of the
    sweep's ``shared/`` named by its command (place), and has the id ``shared/<folder>``; the cell's other steps have
    ids ``<cell>/<id>``."""

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
        """How a step's script starts: training steps under ``accelerate launch`` when the study has a config."""
        if trains and self.preset.accelerate_config:
            return ["accelerate", "launch", "--config_file", self.preset.accelerate_config, script]
        return [self.args.python, script]

    def place(self, name: str, script: str, arguments: dict, default: Path, trains: bool = False) -> Path:
        """The folder of a step that cells of a sweep may share, set as the ``output_dir`` of its ``arguments``:
        ``default`` in a study; in a sweep ``shared/<name>-<digest of the rest of its command>``, so that cells
        whose step would run the same command share the step and its outputs."""
        folder = default
        if self.cell is not None:
            rest = {key: value for key, value in arguments.items() if key != "output_dir"}
            command = json.dumps([*self.launcher(script, trains), *_flags(rest)])
            folder = self.shared / f"{name}-{hashlib.sha256(command.encode()).hexdigest()[:10]}"
        arguments["output_dir"] = str(folder)
        return folder

    def step(self, script: str, arguments: dict, outputs: list[str], **fields) -> str:
        """Add a step running ``script`` with ``arguments`` as its flags; its workdir is their --output_dir and
        ``outputs`` are file names in it."""
        workdir = Path(arguments["output_dir"])
        if self.cell is not None:
            fields["id"] = f"shared/{workdir.name}" if workdir.parent == self.shared else f"{self.cell}/{fields['id']}"
        launcher = self.launcher(script, fields.get("trains", False))
        self.steps.append(
            Step(
                command=[*launcher, *_flags(arguments)],
                outputs=[str(workdir / name) for name in outputs],
                workdir=str(workdir),
                **fields,
            )
        )
        return fields["id"]

    def push(self, kind: str, name: str) -> dict:
        """--hub_org (paper preset): the push flags of a step (training steps push every checkpoint as it is saved)."""
        if not self.args.hub_org or self.preset.synthetic:
            return {}
        study = self.preset.name + ("-smoke" if self.args.smoke else "")  # a smoke run never pushes over the real run
        if kind == "data":
            return {"push_to_hub": True, "hub_dataset_id": f"{self.args.hub_org}/{study}-{name}"}
        # hub_always_push: the Trainer otherwise skips a checkpoint's push while the previous one uploads, and
        # the learning curve needs every checkpoint (run_pretrain.py dropped its last one without it).
        return {
            "push_to_hub": True,
            "hub_model_id": f"{self.args.hub_org}/{study}-{name}",
            "hub_strategy": "all_checkpoints",
            "hub_always_push": True,
        }

    def group(self, lang: str, variant: str, name: str, questions: list[str], settings: list[str], **paths) -> dict:
        """A run group: one language (and name variant), its questions, CPT settings and output folders."""
        group = {"lang": lang, "variant": variant, "data": str(self.out / "data" / name), "questions": questions}
        group.update({key: value for key, value in paths.items() if value is not None})
        for kind in ("base_eval", "transfer", "density"):
            group[kind] = str(self.out / kind / name)
        group["settings"] = settings
        self.groups[f"{lang}/{variant}"] = group
        return group

    def base_eval(self, group: dict, name: str, base_dir: Path, what: str, deps: list[str]) -> str:
        arguments = dict(
            self.preset.eval,
            questions=group["questions"],
            model_name_or_path=str(base_dir),
            **_checks(group),
            output_dir=None,
        )
        group["base_eval"] = str(self.place(f"base-eval-{name}", "run_eval.py", arguments, Path(group["base_eval"])))
        return self.step(
            "run_eval.py",
            arguments,
            _eval_outputs(group, diagnostic=False),
            id=f"base-eval-{name}",
            kind="base_eval",
            title=f"probe the base model ({what})",
            deps=deps,
        )

    def cpt_runs(
        self, group: dict, name: str, seeds: list[int], base_dir: Path, build_id: str, what: str
    ) -> list[tuple[Run, str]]:
        """Per seed and setting of a group: its CPT step and the probing of every checkpoint (with the bridge
        diagnostic when the group has diagnostic pairs). Returns each run with the id of its probing step."""
        lang, variant = group["lang"], group["variant"]
        probed = []
        for seed in seeds:
            for setting in group["settings"]:
                run_name = f"{name}-{setting}-s{seed}"
                run_dir = self.out / "cpt" / run_name
                run = Run(lang, variant, setting, seed, str(run_dir), str(run_dir / "eval"))
                self.runs.append(run)
                cpt_args = dict(
                    self.preset.cpt,
                    model_name_or_path=str(base_dir),
                    dataset_path=group["data"],
                    lang=lang,
                    **{flag: setting == flag for flag in CPT_SETTINGS},  # exactly one; False flags are left out
                    output_dir=str(run_dir),
                    run_name=run_name,
                    seed=seed,
                    **self.push("model", f"cpt-{run_name}"),
                )
                cpt_id = self.step(
                    "run_cpt.py",
                    cpt_args,
                    ["config.json", "packing_audit.json"],
                    id=f"cpt-{run_name}",
                    kind="cpt",
                    title=f"continual pretraining {what}, {setting.replace('_', ' ')}, seed {seed}",
                    deps=[build_id],
                    trains=True,
                )
                diagnostic = group.get("diagnostic_pairs")
                eval_args = dict(
                    self.preset.eval,
                    questions=group["questions"],
                    model_name_or_path=str(run_dir),
                    diagnostic_pairs=diagnostic,
                    **_checks(group),
                    output_dir=run.eval_dir,
                )
                eval_id = self.step(
                    "run_eval.py",
                    eval_args,
                    _eval_outputs(group, diagnostic=bool(diagnostic)),
                    id=f"eval-{run_name}",
                    kind="eval",
                    title=f"probe every checkpoint of {run_name}" + (" (+ bridge diagnostic)" if diagnostic else ""),
                    deps=[cpt_id],
                )
                probed.append((run, eval_id))
        return probed

    def transfer(self, group: dict, name: str, probed: list[tuple[Run, str]], what: str) -> str:
        """The with-minus-without analysis of a group's runs (every seed pair; mismatched bridges as a third
        setting, and the gap per tier of facts, when the study has them)."""
        eval_dirs = {s: [r.eval_dir for r, _ in probed if r.setting == s] for s in CPT_SETTINGS}
        arguments = dict(
            self.preset.transfer,
            with_bridges=eval_dirs["bridges"],
            without_bridges=eval_dirs["no_bridges"],
            mismatched_bridges=eval_dirs["mismatched_bridges"] or None,
            item_tiers=[group["item_tiers"]] if "item_tiers" in group else None,
            output_dir=group["transfer"],
        )
        pairs = len(eval_dirs["bridges"])
        return self.step(
            "run_transfer.py",
            arguments,
            ["transfer.json"],
            id=f"transfer-{name}",
            kind="transfer",
            title=f"transfer analysis ({what}, {pairs} seed pair{'s' if pairs > 1 else ''})",
            deps=[eval_id for _, eval_id in probed],
        )

    def density(
        self, step_id: str, title: str, arguments: dict, probed: list[tuple[Run, str]], deps: list[str], then=None
    ) -> str:
        """The density of a group's culture in a corpus (``arguments``, then the first seed's final predictions of
        both settings for the instance-level analysis, then ``then``)."""
        first = {setting: next(p for p in probed if p[0].setting == setting) for setting in SETTINGS}
        arguments = dict(
            arguments,
            predictions_with=first["bridges"][0].eval_dir,
            predictions_without=first["no_bridges"][0].eval_dir,
            **(then or {}),
        )
        return self.step(
            "run_density.py",
            arguments,
            ["density.json"],
            id=step_id,
            kind="density",
            title=title,
            deps=[*deps, first["bridges"][1], first["no_bridges"][1]],
        )


def _checks(group: dict) -> dict:
    """run_eval.py's manipulation-check flags of a group whose world has the tiers that need them (else none)."""
    return {"name_alignment": group.get("name_alignment"), "item_tiers": group.get("item_tiers")}


def _eval_outputs(group: dict, diagnostic: bool) -> list[str]:
    outputs = ["accuracy.json", *(["bridge_diagnostic.json"] if diagnostic else [])]
    return outputs + (["manipulation_checks.json"] if "item_tiers" in group else [])


def build_plan(args: StudyArguments, preset: Preset, out: Path, cell: str | None = None) -> Plan:
    """The plan of a synthetic study (the paper's: build_paper_plan), with the flags that set configuration keys
    applied: world, pretraining, then per language and name variant the CPT dataset, the base model's probing, each
    run's CPT and probing, the transfer analysis and the density (the last two only for a group trained in both
    settings). ``cell``: the name of a sweep's cell, whose folder ``out`` is (see _PlanBuilder)."""
    preset = with_flags(preset, args)
    if not preset.synthetic:
        return build_paper_plan(args, preset, out, cell)
    langs, seeds, variants = preset.langs, preset.seeds, preset.variants
    plan = _PlanBuilder(args, preset, out, cell)
    # A world with the absent or en_only tier (C1) has what the knowledge/skill decomposition and the manipulation
    # checks read: each question's tier, and held-out name-alignment frames.
    tiers = any((preset.world.get(key) or 0) > 0 for key in ("absent_places", "en_only_places"))

    world_args = dict(preset.world, output_dir=None, langs=langs, seed=0, name_variants=variants)
    resource = [r for r in world_args.pop("resource", []) if r.split("=")[0] in langs]
    resource += [f"{lang}=mixed" for lang in langs if not any(r.startswith(f"{lang}=") for r in resource)]
    world_args["resource"] = resource
    world_dir = plan.place("world", "synthetic_world.py", world_args, out / "world")
    en_corpus = str(world_dir / "en_corpus.jsonl")
    world = plan.step(
        "synthetic_world.py",
        world_args,
        ["truth.json", "en_corpus.jsonl"],
        id="world",
        kind="world",
        title="generate the synthetic world",
    )
    pretrain_args = dict(
        preset.pretrain,
        train_tokenizer=True,
        tokenizer_files=[en_corpus, *(str(world_dir / lang / v / "mono.jsonl") for lang in langs for v in variants)],
        train_file=en_corpus,
        output_dir=None,
        seed=0,
    )
    base_dir = plan.place("base", "run_pretrain.py", pretrain_args, out / "base", trains=True)
    plan.dirs.update(world=str(world_dir), base=str(base_dir))
    pretrain = plan.step(
        "run_pretrain.py",
        pretrain_args,
        ["config.json", "data_stats.json"],
        id="pretrain",
        kind="pretrain",
        title="pretrain the base model on the English corpus",
        deps=[world],
        trains=True,
    )

    for lang in langs:
        for variant in variants:
            name, what, wdir = f"{lang}-{variant}", f"{lang}, {variant} names", world_dir / lang / variant
            # the anchors variant of the cpu study trains one setting only (it serves the anchors comparison)
            settings = list(preset.anchor_settings if variant == "anchors" else preset.settings)
            settings = [s for s in CPT_SETTINGS if s in settings]
            group = plan.group(
                lang,
                variant,
                name,
                _question_files(wdir, lang),
                settings,
                diagnostic_pairs=str(wdir / "diagnostic_pairs.jsonl"),
                mono=str(wdir / "mono.jsonl"),
                item_tiers=str(wdir / "item_tiers.json") if tiers else None,
                name_alignment=str(wdir / "name_alignment.json") if tiers else None,
            )
            build_args = dict(
                preset.build,
                lang=lang,
                pairs_files=str(wdir / "pairs.jsonl"),
                en_column="en",
                tgt_column=lang,
                mono_files=group["mono"],
                replay_files=en_corpus,
                tokenizer_name=str(base_dir),
                block_size=preset.cpt["block_size"],
                output_dir=None,
                seed=0,
            )
            group["data"] = str(plan.place(f"data-{name}", "build_pairs.py", build_args, Path(group["data"])))
            build = plan.step(
                "build_pairs.py",
                build_args,
                ["build_stats.json"],
                id=f"build-{name}",
                kind="build",
                title=f"build the CPT dataset ({what})",
                deps=[world, pretrain],
            )
            plan.base_eval(group, name, base_dir, what, deps=[world, pretrain])
            probed = plan.cpt_runs(group, name, seeds, base_dir, build, what)
            if not set(SETTINGS) <= set(settings):
                continue  # no with-minus-without analysis for a group trained in one setting
            plan.transfer(group, name, probed, what)
            # The culture's knowledge in the English corpus and in the target corpus.
            density_args = dict(
                preset.density,
                questions=group["questions"],
                corpus_files=[f"en={en_corpus}", f"{lang}={group['mono']}"],
                output_dir=group["density"],
            )
            plan.density(
                f"density-{name}",
                f"cultural density of {lang} knowledge in both corpora ({variant} names)",
                density_args,
                probed,
                deps=[world],
                then={"source_corpus": [f"{lang}=en", f"en={lang}"]},
            )
    return plan.plan()


def _in_run_order(steps: list[Step]) -> list[Step]:
    """Order steps so the critical path comes first: every CPT run before any probing or analysis."""
    priority = {"world": 0, "pretrain": 1, "build": 2, "cpt": 3, "eval": 4, "base_eval": 5, "transfer": 6, "density": 7}
    return sorted(steps, key=lambda s: priority[s.kind])


def build_paper_plan(args: StudyArguments, preset: Preset, out: Path, cell: str | None = None) -> Plan:
    """The paper-scale study: Hub datasets, the 0.5B architecture, the paper's questions; per language the CPT
    dataset, the base model's probing, each run's CPT and probing, the transfer analysis, and the density in
    English Wikipedia and in the language's own corpus."""
    paper_data = {lang: dict(flags) for lang, flags in preset.data.items()}
    if args.paper_data:
        overrides = checked_value(
            "data", json.loads(Path(args.paper_data).read_text(encoding="utf-8")), args.paper_data
        )
        for lang, flags in overrides.items():
            paper_data.setdefault(lang, {}).update(flags)
            if not paper_data[lang].get("mono_dataset"):  # the target corpus given as files instead
                paper_data[lang].pop("mono_data_files", None)
    unknown = [lang for lang in preset.langs if lang not in paper_data]
    if unknown:
        raise InputError(f"No data for {unknown} in the study's data section: give it with --paper_data FILE.json.")
    langs, seeds = preset.langs, preset.seeds
    plan = _PlanBuilder(args, preset, out, cell)
    pretrain_args = dict(preset.pretrain, output_dir=None, seed=0, **plan.push("model", "base"))
    base_dir = plan.place("base", "run_pretrain.py", pretrain_args, out / "base", trains=True)
    plan.dirs["base"] = str(base_dir)
    pretrain = plan.step(
        "run_pretrain.py",
        pretrain_args,
        ["config.json"],
        id="pretrain",
        kind="pretrain",
        title="pretrain Qwen2.5-0.5B (architecture) on Latin-only English Wikipedia",
        trains=True,
    )
    for lang in langs:
        settings = [s for s in CPT_SETTINGS if s in preset.settings]
        group = plan.group(lang, "real", lang, _question_files(Path(args.questions_dir), lang), settings)
        build_args = dict(
            {"block_size": preset.cpt["block_size"]},  # the CPT windows
            **preset.build,
            lang=lang,
            **paper_data[lang],
            replay_dataset="wikimedia/wikipedia",
            replay_dataset_config="20231101.en",
            eval_questions=group["questions"],
            tokenizer_name=str(base_dir),
            output_dir=None,
            seed=0,
            **plan.push("data", f"data-{lang}"),
        )
        group["data"] = str(plan.place(f"data-{lang}", "build_pairs.py", build_args, Path(group["data"])))
        build = plan.step(
            "build_pairs.py",
            build_args,
            ["build_stats.json"],
            id=f"build-{lang}",
            kind="build",
            title=f"build the CPT dataset ({lang})",
            deps=[pretrain],
        )
        plan.base_eval(group, lang, base_dir, lang, deps=[pretrain])
        probed = plan.cpt_runs(group, lang, seeds, base_dir, build, lang)
        plan.transfer(group, lang, probed, lang)
        mono = paper_data[lang]
        if mono.get("mono_files"):  # the target corpus as files (e.g. one language's file of MC^2)
            target_corpus = {
                "corpus_files": [f"{lang}={path}" for path in mono["mono_files"]],
                "corpus_streaming": None,
            }
        else:
            target_corpus = {
                "corpus_dataset": mono.get("mono_dataset"),
                "corpus_dataset_config": mono.get("mono_dataset_config"),
                "corpus_data_files": mono.get("mono_data_files"),
            }
        for corpus_label, corpus in (
            ("enwiki", {"corpus_dataset": "wikimedia/wikipedia", "corpus_dataset_config": "20231101.en"}),
            (lang, target_corpus),
        ):
            density_args = dict(
                preset.density,
                questions=group["questions"],
                **{"corpus_streaming": True, **corpus},
                corpus_label=corpus_label,
                output_dir=str(Path(group["density"]) / corpus_label),
            )
            plan.density(
                f"density-{lang}-{corpus_label}",
                f"cultural density of {lang} knowledge in {corpus_label}",
                density_args,
                probed,
                deps=[],
            )
    return plan.plan()


# --------------------------------------------------------------------------------------
# Sweeps: one plan for the cells of a grid
# --------------------------------------------------------------------------------------


def build_sweep(args: StudyArguments, out: Path, factors: dict[str, list]) -> Plan:
    """One plan for every cell of the grid of ``factors``: each cell is the study with its values set, planned in
    ``out/<cell>`` (plan.cells holds its own view, for its report); the plan runs the union of the cells' steps,
    a step shared by several cells (same command, see _PlanBuilder.place) once."""
    base, _ = configure(args)
    cells: dict[str, Plan] = {}
    steps: dict[str, Step] = {}
    for name, values in sweep_cells(factors).items():
        preset, _ = configure(args, values)
        cells[name] = build_plan(args, preset, out / name, cell=name)
        cells[name].state_dir, cells[name].config = str(out), {"cell": values}
        for step in cells[name].steps:
            if steps.setdefault(step.id, step).command != step.command:  # a shared id names its command
                raise RuntimeError(f"two cells plan step {step.id} with different commands")
    runs = [run for cell in cells.values() for run in cell.runs]
    groups = {f"{name}/{key}": group for name, cell in cells.items() for key, group in cell.groups.items()}
    return Plan(with_flags(base, args), str(out), _in_run_order(list(steps.values())), runs, groups, cells=cells)


# --------------------------------------------------------------------------------------
# Running the plan
# --------------------------------------------------------------------------------------


def _last_checkpoint(workdir: str | None) -> str | None:
    if not workdir or not Path(workdir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(workdir).iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    found = [(n, p) for n, p in found if (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def _prepare(out: Path, step: Step, reason: str) -> tuple[list[str], str | None]:
    """Resume or clean a step that is about to start (``reason``: why it runs). Returns its command, with a
    resume flag if any, and a note for the logs.

    A training step resumes from its last checkpoint only when its earlier start ran the same command on the
    same finished runs of its upstream steps (an interruption). Anything else starts afresh, its earlier outputs
    removed, so no run continues from checkpoints trained on other inputs."""
    started = read_record(started_record(out, step))
    upstream = upstream_runs(out, step)
    if started is None:
        mismatch = None
    elif started.get("command") != step.command:
        mismatch = "its earlier start ran another command"
    elif changed := upstream_changed(started.get("upstream"), upstream):
        mismatch = f"upstream step {', '.join(changed)} finished a new run since its earlier start"
    else:
        mismatch = ""
    command = list(step.command)
    checkpoint = _last_checkpoint(step.workdir) if step.trains and mismatch == "" else None
    note = None
    if checkpoint:
        command += ["--resume_from_checkpoint", checkpoint]
        note = (
            f"{step.id}: resumes from {checkpoint} (its earlier start ran the same command on the same upstream runs)"
        )
    elif step.workdir and Path(step.workdir).exists():
        shutil.rmtree(step.workdir)
        # an interrupted step that does not resume says why (its planned reason does not)
        interrupted = reason == "it did not finish" or reason.startswith("outputs missing")
        why = f"{reason}; {mismatch}" if mismatch and interrupted else reason
        note = f"{step.id}: starts afresh ({why}); removed its earlier outputs {step.workdir}"
    # From here on the step's outputs are not those of a finished run.
    done_marker(out, step.id).unlink(missing_ok=True)
    write_json_atomic(started_record(out, step), {"command": step.command, "upstream": upstream, "started": utc_now()})
    return command, note


class StudyBusyError(RuntimeError):
    """The study does not start: another process works on the same outputs."""


def _pid_file(out: Path, step_id: str) -> Path:
    """The lock of a running step: the pid of its supervisor, which leads the step's process group."""
    return out / ".running" / f"{step_id}.pid"


def _process_group_alive(pgid) -> bool:
    """Whether a live process of the group remains. Zombies do not count: a supervisor orphaned by kill -9 of
    the study stays one until init reaps it (in some containers, never), and it writes nothing."""
    return isinstance(pgid, int) and any(group == pgid for _, group in _process_table().values())


def _claim_step(out: Path, step: Step) -> str | None:
    """Refuse to start a step whose earlier process still runs; take over the pid file of a dead one (returns a
    note saying so). The runner writes the new pid file once the step's process exists."""
    path = _pid_file(out, step.id)
    record = read_record(path)
    if record is None:
        return None
    if _process_group_alive(record.get("pid")):
        raise StudyBusyError(
            f"step {step.id} still runs as pid {record['pid']} (pid file {path}, started {record.get('started')} by "
            f"run_study.py pid {record.get('study_pid')}); wait for it to end or stop it (kill -- -{record['pid']})."
        )
    path.unlink()
    return f"{step.id}: took over the stale pid file {path} (pid {record.get('pid')} no longer runs)"


def _lock_output_dir(out: Path):
    """Hold an exclusive lock on the output folder for as long as this process lives (the kernel drops it when
    the process dies, kill -9 included), or refuse, naming the pid of the run_study.py that holds it. Steps do not
    inherit it (Popen closes other file descriptors); their own lock is their pid file."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".study.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StudyBusyError(
            f"another run_study.py (pid {holder}) is running on {out} (it holds {path}); wait for it to end or "
            f"stop it (kill {holder}), then run this command again."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


# --------------------------------------------------------------------------------------
# The step supervisor: no process of a step outlives the study
# --------------------------------------------------------------------------------------

#: How every step is started: ``python -c _SUPERVISOR <study pid> <command...>`` (see supervise_step).
_SUPERVISOR = (
    f"import sys; sys.path.insert(0, {str(REPO_DIR)!r}); import run_study; sys.exit(run_study.supervise_step())"
)
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_STOP_GRACE_S = 10.0


def supervise_step(argv: list[str] | None = None) -> int:
    """Run one step's command (argv: the study's pid, then the command) so that none of its processes outlives
    the study, and return its exit status.

    The runner starts this process in a session of its own and records its pid as the step's lock. It asks the
    kernel for SIGTERM when the study dies (Linux parent-death signal; elsewhere it notices within a poll), and
    becomes the reaper of the step's orphaned descendants. On SIGTERM or the study's death it stops every
    descendant of the step, also those in sessions of their own (``accelerate launch`` starts its workers through
    torch.distributed, each in a new session, out of reach of a process-group signal), SIGTERM first and SIGKILL
    after a grace period. The command itself gets SIGTERM if this process is killed outright."""
    argv = sys.argv[1:] if argv is None else argv
    study_pid, command = int(argv[0]), argv[1:]
    stop_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != study_pid:  # the study died before its death could be signalled
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    while child.poll() is None and not stop_signals and os.getppid() == study_pid:
        time.sleep(0.2)
    if child.returncode is None:
        _stop_descendants()
        return 128 + (stop_signals[0] if stop_signals else signal.SIGTERM)
    leftovers = _stop_descendants()
    if leftovers:
        print(f"run_study.py: {leftovers} processes of the step still ran after its command ended; stopped them.")
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _process_table() -> dict[int, tuple[int, int]]:
    """Parent pid and process group of every live (not zombie) process."""
    table = {}
    if Path("/proc/self/stat").is_file():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:  # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
                fields = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            if fields[0] not in ("Z", "X"):
                table[int(entry)] = (int(fields[1]), int(fields[2]))
        return table
    listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, ppid, pgid, state = line.split()[:4]
        if not state.startswith("Z"):
            table[int(pid)] = (int(ppid), int(pgid))
    return table


def _descendants(root: int, table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _stop_descendants(grace_s: float = _STOP_GRACE_S) -> int:
    """SIGTERM every descendant of this process, SIGKILL those still alive after ``grace_s``; return their count."""
    me, targets = os.getpid(), set()
    deadline = time.time() + grace_s
    while time.time() < deadline + 5:  # past that, only unkillable (uninterruptible) processes remain
        while True:  # reap ended children (orphans of the step are ours, as their subreaper)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        table = _process_table()
        alive = {p for p in targets if p in table} | _descendants(me, table)
        if not alive:
            break
        late = time.time() > deadline
        for pid in alive if late else alive - targets:
            try:
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            except ProcessLookupError:
                pass
        targets |= alive
        time.sleep(0.1)
    return len(targets)


class StudyRunner:
    """Runs the steps of a plan, ``jobs`` at a time, in dependency order, with a progress display."""

    def __init__(self, plan: Plan, jobs: int, force: bool, budget_s: int):
        self.plan, self.jobs, self.force, self.budget_s = plan, max(1, jobs), force, budget_s
        self.out = Path(plan.out)
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
        if self.plan.preset.synthetic:
            # Synthetic presets never touch the network or the Hub.
            env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return env

    def _plan_reruns(self) -> dict[str, str]:
        """Why each step that must run runs; the others are done. ``--force`` first forgets every finished and
        started step of the plan on disk, so that an interrupted forced run, rerun without --force, still reruns
        every step it had not reached and resumes none from a checkpoint trained before --force."""
        reasons: dict[str, str] = {}
        if self.force:
            for step in self.plan.steps:
                done_marker(self.out, step.id).unlink(missing_ok=True)
                started_record(self.out, step).unlink(missing_ok=True)
            return {step.id: "--force" for step in self.plan.steps}
        root_cause: dict[str, str] = {}  # step -> the upstream step whose own change makes it rerun
        for step in self.plan.steps:  # dependencies come first (_in_run_order)
            stale = next((d for d in step.deps if d in reasons), None)
            if stale is not None:
                root = root_cause[step.id] = root_cause.get(stale, stale)
                reasons[step.id] = f"upstream step {root} reruns: {reasons[root]}"
            elif (why := why_not_done(self.out, step)) is not None:
                reasons[step.id] = why
                if why != "no record of an earlier run":
                    print(f"{step.id} reruns: {why}.")
        return reasons

    def run(self) -> dict[str, float]:
        """Run every step that is not done, each once its dependencies are; returns the seconds of each step (done
        earlier or now) and writes timings.json. A failed step stops the others and raises RuntimeError."""
        steps = self.plan.steps
        n = len(steps)
        start = time.time()
        self._refuse_steps_still_running()
        reasons = self._plan_reruns()
        done = {s.id for s in steps if s.id not in reasons}
        previous = read_step_seconds(self.out)
        self.timings = {k: v for k, v in previous.items() if k in done}
        if done:
            print(f"{len(done)}/{n} steps already done in {self.out} (skipped; --force reruns them).")
        running: dict[str, tuple[subprocess.Popen, float, object]] = {}
        pending = [s for s in steps if s.id not in done]
        ran_any = bool(pending)
        finished_count = len(done)
        env = self._env()
        self.logs.mkdir(parents=True, exist_ok=True)
        load_samples: list[float] = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
        last_sample = time.time()
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=finished_count, unit="step", desc="study", dynamic_ncols=True, disable=None)
            while pending or running:
                for step in list(pending):
                    if len(running) >= self.jobs:
                        break
                    if all(d in done for d in step.deps):
                        ready = [p for p in pending if p is not step and all(d in done for d in p.deps)]
                        # Nothing else can run meanwhile (e.g. pretraining) and nothing else loads the machine:
                        # give this step every core. On a shared machine more threads than free cores make torch
                        # slower, not faster, so it keeps its share.
                        every_core = not running and not ready and _machine_is_quiet()
                        running[step.id] = self._start(step, reasons[step.id], env, bar, every_core)
                        pending.remove(step)
                        bar.write(f"[{finished_count + len(running):>2}/{n}] start  {step.title}")
                for step_id, (process, started, log) in list(running.items()):
                    if process.poll() is None:
                        continue
                    log.close()
                    del running[step_id]
                    step = next(s for s in steps if s.id == step_id)
                    seconds = self._finish(step, process, started, running, bar)
                    done.add(step.id)
                    finished_count += 1
                    bar.update(1)
                    elapsed = time.time() - start
                    budget = f" of a {fmt_time(self.budget_s)} budget" if self.budget_s else ""
                    bar.write(
                        f"[{finished_count:>2}/{n}] done   {step.title} in {seconds:.0f} s "
                        f"(elapsed {fmt_time(elapsed)}{budget})"
                    )
                if running:
                    time.sleep(0.2)
                    if time.time() - last_sample > 10 and hasattr(os, "getloadavg"):
                        load_samples.append(os.getloadavg()[0])
                        last_sample = time.time()
            bar.close()
        except KeyboardInterrupt:
            self._stop(running)
            print(
                "\nInterrupted. Finished steps are kept; run the same command again to resume "
                "(training steps continue from their last checkpoint)."
            )
            raise
        except BaseException:  # a failed step, a refusal, a bug: no step keeps running without the study
            self._stop(running)
            raise
        if not ran_any:  # everything was already done: keep the record of the run that did the work
            return self.timings
        write_json_atomic(
            self.out / "timings.json",
            {
                "steps": self.timings,
                "wall_s_this_invocation": time.time() - start,
                "jobs": self.jobs,
                "cpu_count": os.cpu_count(),
                # 1-minute load average sampled every 10 s while steps ran (includes the study's own jobs)
                "load_average_samples": load_samples,
            },
        )
        return self.timings

    def _start(self, step: Step, reason: str, env: dict, bar, every_core: bool) -> tuple:
        """Start a step (``reason``: why it runs) through the step supervisor; returns (process, start time, log)."""
        takeover = _claim_step(self.out, step)
        if takeover:
            bar.write(f"        {takeover}")
        command, note = _prepare(self.out, step, reason)
        if command[0] == "python":  # the same interpreter (and environment) as the study
            command = [sys.executable, *command[1:]]
        (self.logs / step.id).parent.mkdir(parents=True, exist_ok=True)  # a sweep's ids have a folder
        log = open(self.logs / f"{step.id}.log", "w", encoding="utf-8")  # noqa: SIM115
        if note:
            bar.write(f"        {note}")
            log.write(f"run_study.py: {note}\n")
        log.write("$ " + shlex.join(command) + "\n\n")
        log.flush()
        step_env = {**env, **step.env}
        if every_core:
            cores = str(os.cpu_count() or 1)
            step_env.update(OMP_NUM_THREADS=cores, MKL_NUM_THREADS=cores)
        # Through the step supervisor (supervise_step), in a session of its own: Ctrl-C reaches the study, which
        # then stops its steps, and no process of a step outlives the study.
        process = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), *command],
            cwd=REPO_DIR,
            env=step_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        write_json_atomic(
            _pid_file(self.out, step.id),
            {"pid": process.pid, "study_pid": os.getpid(), "started": utc_now(), "command": command},
        )
        return process, time.time(), log

    def _finish(self, step: Step, process: subprocess.Popen, started: float, running: dict, bar) -> float:
        """Record a step whose process ended: its done-marker when it succeeded and wrote its outputs; otherwise
        stop the other running steps and raise with the end of its log. Returns the seconds it took."""
        _pid_file(self.out, step.id).unlink(missing_ok=True)
        seconds = time.time() - started
        missing = [p for p in step.outputs if not Path(p).exists()]
        if process.returncode != 0 or missing:
            self._stop(running)
            tail = (self.logs / f"{step.id}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
            reason = f"exit code {process.returncode}" if process.returncode else f"missing outputs {missing}"
            bar.close()
            raise RuntimeError(
                f"Step {step.id} failed ({reason}) after {seconds:.0f} s. Its log: "
                f"{self.logs / (step.id + '.log')}\n--- last lines ---\n{tail}"
            )
        self.timings[step.id] = seconds
        write_json_atomic(
            done_marker(self.out, step.id),
            {
                "command": step.command,
                # the finished upstream runs it started on (see _prepare), and its own run's identity
                "upstream": (read_record(started_record(self.out, step)) or {}).get("upstream"),
                "run_id": uuid.uuid4().hex,
                "seconds": seconds,
                "finished": utc_now(),
            },
        )
        return seconds

    def _refuse_steps_still_running(self) -> None:
        """Refuse before anything starts when a process of some step of the plan still runs (one started by
        another runner, or left from before parent-death signals): two processes never write one step folder."""
        busy = []
        for step in self.plan.steps:
            record = read_record(_pid_file(self.out, step.id))
            if record and _process_group_alive(record.get("pid")):
                busy.append(
                    f"{step.id} (pid {record['pid']}, started {record.get('started')} by run_study.py pid "
                    f"{record.get('study_pid')})"
                )
        if busy:
            raise StudyBusyError(
                f"steps of this study still run in {self.out}: {'; '.join(busy)}. A step whose process is alive "
                "is not started again; wait for it to end or stop it (kill -- -PID), then run this command again."
            )

    def _stop(self, running: dict) -> None:
        for process, _, _log in running.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for step_id, (process, _, log) in running.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
            _pid_file(self.out, step_id).unlink(missing_ok=True)
        running.clear()


def _machine_is_quiet() -> bool:
    """Less than one core's worth of other work (1-minute load average) on the machine."""
    return not hasattr(os, "getloadavg") or os.getloadavg()[0] < 1.0


def estimate_seconds(plan: Plan, jobs: int) -> float:
    """Expected wall time on the preset's reference machine: the critical path, then parallel work / jobs."""
    estimates = plan.preset.estimates_s
    if not estimates:
        return 0.0
    serial = sum(estimates.get(s.kind, 0) for s in plan.steps if s.kind in ("world", "pretrain"))
    parallel = sum(estimates.get(s.kind, 0) for s in plan.steps if s.kind not in ("world", "pretrain"))
    return serial + parallel / max(1, jobs)


def _flag_value(command: list[str], flag: str, default=None):
    """The value that follows ``flag`` in a command, or ``default``."""
    return command[command.index(flag) + 1] if flag in command else default


def _num_processes(command: list[str]) -> int | None:
    """Processes (GPUs) a training command runs on: ``accelerate launch``'s --num_processes, else the
    num_processes of its --config_file; 1 for plain python; None when the config file cannot be read."""
    if command[:2] != ["accelerate", "launch"]:
        return 1
    script = next(i for i, c in enumerate(command) if c.endswith(".py"))
    launcher = command[:script]
    if "--num_processes" in launcher:
        return int(_flag_value(launcher, "--num_processes"))
    config = _flag_value(launcher, "--config_file")
    if config is None or not Path(config).is_file():
        return None
    import yaml

    return int((yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}).get("num_processes", 1))


def training_cost(plan: Plan, tokens_per_second_per_gpu: float | None) -> list[dict]:
    """Per training step: the windows and tokens its flags train on (steps x windows per step x block size,
    windows per step = per-device batch x gradient accumulation x processes) and, given a throughput, the
    GPU-hours and wall hours that takes."""
    rows = []
    for step in plan.steps:
        if not step.trains:
            continue
        command = step.command
        steps = int(_flag_value(command, "--max_steps"))
        batch = int(_flag_value(command, "--per_device_train_batch_size", 8))  # TrainingArguments' default
        accumulation = int(_flag_value(command, "--gradient_accumulation_steps", 1))
        block = int(_flag_value(command, "--block_size"))
        processes = _num_processes(command)
        per_step = None if processes is None else batch * accumulation * processes
        tokens = None if per_step is None else steps * per_step * block
        gpu_hours = tokens / tokens_per_second_per_gpu / 3600 if tokens and tokens_per_second_per_gpu else None
        rows.append(
            {"step": step.id, "processes": processes, "steps": steps, "batch": batch, "accumulation": accumulation,
             "windows_per_step": per_step, "block_size": block, "windows": None if per_step is None else steps * per_step,
             "tokens": tokens, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / processes if gpu_hours else None}
        )  # fmt: skip
    return rows


def cost_table(plan: Plan, args: StudyArguments) -> str:
    """The training cost of the plan as printed by --dry_run: tokens and windows exact from the flags; GPU-hours an
    estimate from a throughput figure (the paper preset, or any preset given --tokens_per_second_per_gpu)."""
    throughput = args.tokens_per_second_per_gpu
    source = "given with --tokens_per_second_per_gpu"
    if throughput is None and not plan.preset.synthetic:
        throughput, source = MEASURED_TOKENS_PER_SECOND_PER_GPU, f"measured by {MEASURED_THROUGHPUT_SOURCE}"
    rows = training_cost(plan, throughput)

    def number(value, spec=",") -> str:
        return "?" if value is None else format(value, spec)

    lines = ["Training cost per step (tokens = steps x windows per step x block size; windows per step = per-device "
             "batch x gradient accumulation x processes, from the accelerate config):"]  # fmt: skip
    width = max([28, *(len(r["step"]) for r in rows)])  # a sweep's step ids are longer
    header = (
        f"  {'step':<{width}} {'GPUs':>4} {'steps':>7} {'windows/step':>20} {'block':>5} {'windows':>11} {'tokens':>15}"
    )
    if throughput:
        header += f" {'GPU-hours':>9} {'wall hours':>10}"
    lines.append(header)
    for r in rows:
        shape = f"{r['windows_per_step']} ({r['batch']}x{r['accumulation']}x{r['processes']})"
        line = (
            f"  {r['step']:<{width}} {number(r['processes']):>4} {r['steps']:>7,} {shape if r['processes'] else '?':>20} "
            f"{r['block_size']:>5} {number(r['windows']):>11} {number(r['tokens']):>15}"
        )
        if throughput:
            line += f" {number(r['gpu_hours'], '.2f'):>9} {number(r['wall_hours'], '.2f'):>10}"
        lines.append(line)
    tokens = [r["tokens"] for r in rows]
    if rows and None not in tokens:
        total = f"  {'all training steps':<{width}} {'':>4} {'':>7} {'':>20} {'':>5} {sum(r['windows'] for r in rows):>11,} "
        total += f"{sum(tokens):>15,}"
        if throughput:
            total += f" {sum(r['gpu_hours'] for r in rows):>9.2f}"
        lines.append(total)
    if None in tokens:
        lines.append("  ?: the accelerate config file was not found, so the number of processes is unknown.")
    if throughput:
        lines.append(
            f"  GPU-hours are an ESTIMATE at {throughput:,.0f} tokens/s per GPU ({source}), assuming throughput "
            "scales linearly with GPUs; wall hours = GPU-hours / GPUs of the step. Not counted: data building, "
            "probing, density, checkpoint saving, start-up. A CPT run may train fewer steps when its data cannot "
            "fill them (see its packing_audit.json). Measure your own cluster with bench/gpu_fsdp_check.sh and pass "
            "--tokens_per_second_per_gpu N."
        )
    return "\n".join(lines)


def commands_script(plan: Plan, args: StudyArguments) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# The commands of `python run_study.py --preset {plan.preset.name}{' --smoke' if args.smoke else ''}`, in an "
        "order that respects their",
        "# dependencies. run_study.py runs them (several at a time, skipping finished ones); this file lets",
        "# anyone rerun or inspect any single step by hand. Run from the repository root.",
        f"# Configuration: {configuration_text(plan.config)}",
        "set -euo pipefail",
        "",
    ]
    for step in plan.steps:
        lines += [f"# {step.title}", shlex.join(step.command), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(StudyArguments, description=__doc__.split("\n\n")[0])


def parse_arguments(argv: list[str] | None = None) -> tuple[StudyArguments, Preset, list[str]]:
    """The study's arguments, its configuration (see configure) and the lines saying what --smoke cut."""
    parser = _parser()
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    args.preset = str(study_file(args.preset))  # a path that holds after the move to the repository root
    for name in ("set", "sweep"):  # repeated flags, each with one or more values
        setattr(args, name, [text for given in getattr(args, name) or [] for text in given] or None)
    preset, smoke_cuts = configure(args)
    if args.hub_org and preset.synthetic:
        parser.error("--hub_org applies to the paper study only (synthetic studies never touch the Hub)")
    if args.hub_org and args.sweep:
        parser.error("--hub_org does not go with --sweep (every cell would push to the same repositories)")
    if args.variants and not preset.synthetic:
        parser.error("--variants applies to the synthetic studies only")
    return args, preset, smoke_cuts


def configure(args: StudyArguments, cell: dict | None = None) -> tuple[Preset, list[str]]:
    """A study's configuration: its file (--preset), then --set, then a sweep cell's values, every key checked
    against its script's flags, and the whole checked with the flags that set keys applied; under --smoke, its
    budgets cut (with the lines saying what was cut)."""
    path = study_file(args.preset)
    preset = read_study(path, args.set or [], cell)
    given = [f"--set {text}" for text in args.set or []] + [f"{k}={v}" for k, v in (cell or {}).items()]
    check_study(with_flags(preset, args), f"{path}" + (f" with {', '.join(given)}" if given else ""))
    if not args.smoke:
        return preset, []
    return smoke_preset(preset, on_gpu=_cuda_available())


def given_flags(argv: list[str] | None) -> set[str]:
    """The flags given on the command line (not left at their defaults)."""
    parser = _parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def configuration(args: StudyArguments, argv: list[str] | None, factors: dict | None) -> dict:
    """How the study was configured, for plan.json and the reports: its file, --set, --sweep and the other flags
    that shape the plan, as given, and all arguments."""
    given = given_flags(argv)
    return {
        "preset": Path(args.preset).stem,
        "file": str(study_file(args.preset)),
        "set": args.set or [],
        "sweep": factors,
        "flags": {k: getattr(args, k) for k in PLAN_FLAGS if k in given and k not in ("preset", "set", "sweep")},
        "arguments": asdict(args),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the exit status (2: bad input or a busy output folder, 1: a step failed, 130:
    interrupted)."""
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
    if args.report_only:  # the report of the study recorded there, and nothing else
        return report_only(args, argv, out, factors)
    # 3. The plan: a study, or the cells of a sweep as one plan.
    plan = build_sweep(args, out, factors) if factors else build_plan(args, preset, out)
    plan.config = configuration(args, argv, factors)
    for cell in plan.cells.values():
        cell.config = {**plan.config, **cell.config}
    # 4. What runs, and how long it should take; --dry_run stops here with the cost and the commands.
    _print_overview(plan, args, smoke_cuts)
    if args.dry_run:
        _print_dry_run(plan, args)
        return 0
    # 5. Refuse to start without the plan's own inputs, or beside another study on the same outputs.
    problem = _missing_inputs_message(plan, args)
    if problem:
        print(f"run_study.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        lock = _lock_output_dir(out)  # held until this process ends
    except StudyBusyError as err:
        print(f"run_study.py: error: {err}", file=sys.stderr)
        return 2
    try:
        # 6. The commands and the plan on disk (the report reads the plan back from plan.json on its own).
        write_text_atomic(out / "commands.sh", commands_script(plan, args))
        for record_plan in [plan, *plan.cells.values()]:
            write_json_atomic(Path(record_plan.out) / "plan.json", plan_record(record_plan))
        started = time.time()
        # 7. Every step not done yet. A scheduler's or `timeout`'s SIGTERM stops the study like Ctrl-C: running
        # steps are stopped, not orphaned.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            StudyRunner(plan, plan.preset.jobs, args.force, 0 if factors else plan.preset.budget_s).run()
        except KeyboardInterrupt:
            return 130
        except StudyBusyError as err:
            print(f"run_study.py: error: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:
            print(f"\n{err}", file=sys.stderr)
            return 1
        # 8. The reports, from the files the steps wrote.
        _print_report_paths(write_reports(plan), f"Study finished in {fmt_time(time.time() - started)}.")
        return 0
    finally:
        os.close(lock)  # the kernel drops the lock with it


def report_only(args: StudyArguments, argv: list[str] | None, out: Path, factors: dict | None) -> int:
    """--report_only: the report of the study recorded in ``out/plan.json`` (plan.json and commands.sh stay as the
    study wrote them), after refusing the flags that contradict the record."""
    recorded = read_plan(out)
    conflicts = _conflicts(args, given_flags(argv), recorded, factors)
    if conflicts:
        raise InputError(
            f"--report_only writes the report of the study recorded in {out}/plan.json and changes nothing of it, but "
            f"this command contradicts that record: {'; '.join(conflicts)}. Drop those flags (the recorded plan is "
            "reported), or run without --report_only the study they describe, in another --output_dir."
        )
    _print_report_paths(write_reports(recorded), "Report rewritten.")
    return 0


def _conflicts(args: StudyArguments, given: set[str], recorded, factors: dict | None) -> list[str]:
    """The flags given that contradict the plan recorded by the study (each: what it gives, what the study ran);
    ``args`` as parse_arguments gives them, ``factors`` their --sweep's."""
    ran, values = recorded.config["arguments"], recorded.preset
    found = []
    for flag in (f for f in PLAN_FLAGS if f in given):
        if flag == "set":
            for text in (t for t in args.set if t not in recorded.config["set"]):  # given alike: no contradiction
                key, value = parse_assignment(text, "--set")
                value, then = checked_value(key, value, f"--set {text}"), vars(values)
                for part in key.split("."):
                    then = then.get(part) if isinstance(then, dict) else None
                if value != then:
                    found.append(f"--set {text} (the study ran with {key}={json.dumps(then)})")
            continue
        if flag == "preset":
            now, then = args.preset, recorded.config["file"]
        elif flag == "sweep":
            now, then = factors, recorded.config["sweep"]
        elif flag in CONFIG_FLAGS:
            now, then = getattr(args, flag), getattr(values, flag)
        else:
            now, then = getattr(args, flag), ran.get(flag)
        if now != then:
            found.append(f"--{flag} {json.dumps(now)} (the study ran with {json.dumps(then)})")
    return found


def _print_report_paths(written: dict, done: str) -> None:
    """Where the report is, and whether the study finished: a report of an unfinished study says so first."""
    unfinished = written["unfinished"]
    if unfinished:
        print(
            f"The study is NOT finished: {len(unfinished)} of {written['steps']} steps have no finished run "
            f"({', '.join(list(unfinished)[:5])}{', ...' if len(unfinished) > 5 else ''}); the report says which "
            "and shows only what the finished ones wrote. Run the study's command again to finish it."
        )
    else:
        print(done)
    print(f"Report: {written['md']} and {written['html']}")


def plan_record(plan: Plan) -> dict:
    """plan.json: the plan, its configuration (how it was configured and every effective value) and, for a sweep,
    each cell's own record."""
    record = {
        "configuration": plan.config,
        "preset": asdict(plan.preset),
        "out": plan.out,
        "state_dir": plan.state_dir,
        "dirs": plan.dirs,
        "runs": [asdict(r) | {"name": r.name} for r in plan.runs],
        "groups": plan.groups,
        "steps": [asdict(s) for s in plan.steps],
    }
    if plan.cells:
        record["cells"] = {name: plan_record(cell) for name, cell in plan.cells.items()}
    return record


def _print_overview(plan: Plan, args: StudyArguments, smoke_cuts: list[str]) -> None:
    """The study, its configuration, the output folder, the steps by kind (and, for a sweep, its cells and the steps
    they share) and, for a study with a time budget, the estimate."""
    preset, jobs = plan.preset, plan.preset.jobs
    print(_study_line(plan))
    print(f"Configuration: {configuration_text(plan.config)}")
    print(f"Output: {plan.out}")
    if args.smoke:
        print("Smoke run: every step of the plan, only these budgets cut:\n  " + "\n  ".join(smoke_cuts))
    counts = {}
    for step in plan.steps:
        counts[step.kind] = counts.get(step.kind, 0) + 1
    print(
        "Steps: " + ", ".join(f"{k} x{v}" for k, v in counts.items()) + f" ({len(plan.steps)} in all), {jobs} at a time"
    )
    if plan.cells:
        planned = sum(len(cell.steps) for cell in plan.cells.values())
        print(f"Sweep: {len(plan.cells)} cells, {planned} steps planned, {len(plan.steps)} to run (shared once):")
        for name, cell in plan.cells.items():
            shared = sum(s.id.startswith("shared/") for s in cell.steps)
            print(f"  {name}: {len(cell.steps)} steps ({shared} shared)")
    if preset.budget_s and not plan.cells:
        print(
            f"Time budget: {fmt_time(preset.budget_s)} on {preset.reference_machine}; estimated "
            f"{fmt_time(estimate_seconds(plan, jobs))} for this plan."
        )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        cores = os.cpu_count() or 1
        if load > 0.5 * cores:
            print(f"Note: the machine is busy (load {load:.1f} on {cores} cores): expect it to take longer.")


def _study_line(plan: Plan) -> str:
    """The first line printed: the study and its file's description, naming what changed the file's values (--set,
    the flags that set keys: --seeds, ...; a sweep's values), which the description does not know of."""
    config, preset = plan.config, plan.preset
    changes = [f"--set {text}" for text in config["set"]]
    for flag in (f for f in CONFIG_FLAGS if f in config["flags"]):
        value = config["flags"][flag]
        changes.append(f"--{flag} " + " ".join(map(str, value if isinstance(value, list) else [value])))
    changes += [f"--sweep {key}={','.join(map(json.dumps, values))}" for key, values in (config["sweep"] or {}).items()]
    if not changes:
        return f"Study preset {preset.name!r}: {preset.description}"
    return f"Study {preset.name!r} with {', '.join(changes)}: {preset.description}"


def _print_dry_run(plan: Plan, args: StudyArguments) -> None:
    """--dry_run: what a real run would miss, the training cost, and the commands."""
    problem = _missing_inputs_message(plan, args)
    if problem:
        print(f"Note: before a real run, {problem}.")
    print()
    print(cost_table(plan, args))
    print()
    try:
        print(commands_script(plan, args))
    except BrokenPipeError:  # e.g. piped into head
        pass


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _local_inputs(plan: Plan) -> tuple[list[str], list[str]]:
    """Files the plan reads that no step writes: (question files, local corpus and pair files of the paper
    preset)."""
    if plan.preset.synthetic:
        return [], []
    questions = sorted({q for group in plan.groups.values() for q in group["questions"]})
    files = []
    for step in plan.steps:
        for flag in ("--pairs_files", "--mono_files"):
            if step.kind == "build" and flag in step.command:
                start = step.command.index(flag) + 1
                files += list(itertools.takewhile(lambda c: not c.startswith("--"), step.command[start:]))
    return questions, sorted(set(files))


def _missing_inputs_message(plan: Plan, args: StudyArguments) -> str | None:
    """What is missing of the plan's own inputs and exactly how to get it, or None."""
    questions, files = _local_inputs(plan)
    problems = []
    missing_questions = [q for q in questions if not Path(q).is_file()]
    if missing_questions:
        where = args.questions_dir
        fetch = (
            PAPER_QUESTIONS_FETCH
            if Path(where).resolve() == (REPO_DIR / PAPER_QUESTIONS_DIR).resolve()
            else PAPER_QUESTIONS_FETCH.replace(PAPER_QUESTIONS_DIR, shlex.quote(where))
        )
        problems.append(
            f"the paper's questions are missing from {where} ({', '.join(Path(q).name for q in missing_questions)}). "
            f"They come from the paper's public release ({PAPER_QUESTIONS_REPO}, Apache-2.0); get them with:\n"
            f"  {fetch}\nor pass --questions_dir DIR (a folder holding <lang>-culture-cloze_en.json and "
            "<lang>-culture-cloze_<lang>.json)"
        )
    missing_files = [f for f in files if not Path(f).exists()]
    if missing_files:
        problems.append(
            f"these corpus/pair files of the plan are missing: {', '.join(missing_files)}; no public Hub dataset "
            "has them: give your own files with --paper_data FILE.json (see the data section of configs/studies/paper.yaml)"
        )
    return ";\n".join(problems) or None


if __name__ == "__main__":
    exit_on_input_error(main)
