#!/usr/bin/env python
"""The whole study in one command: pretrain, build pairs, continual pretraining with and without
bridges, bilingual probing, transfer analysis, density, and a report.

Every step runs one of the study's own scripts as a subprocess, with the command line a user would
type (``python run_pretrain.py ...`` or, with ``--accelerate_config``, ``accelerate launch ...``), so
the study exercises exactly the code paths of a manual run. The commands are written to
``OUTPUT_DIR/commands.sh`` and printed with ``--dry_run``.

Presets (``--preset``):

* ``cpu`` (default): a synthetic world (``synthetic_world.py``) with planted facts, a ~0.6M-parameter
  Qwen2 model, one language (bo), both name variants (native script = the control; Latin "anchors"),
  both CPT settings, 3 seeds. Made to finish in about 15 minutes on a 2-core laptop CPU.
* ``micro``: the same pipeline, CI-sized (a couple of minutes); used by the end-to-end test.
* ``gpu-small``: a larger world and model (minutes on one GPU), no network access.
* ``paper``: the paper-scale plan (Hub datasets, configs/qwen2.5-0.5b.json, 1,500 CPT steps x 0.5M
  tokens, ko zh bo mn x 2 settings, the paper's released questions) for a GPU cluster.

Steps are skipped when finished: a step is done when its outputs exist and its done-marker
(``OUTPUT_DIR/.done/<step>.json``, written after success) holds the current command and the
finished runs of its upstream steps it was run on. After Ctrl-C, run the same command again:
finished steps are skipped, an interrupted training step resumes from its last checkpoint when it
was started with the same command on the same upstream runs, any other step starts afresh (its
earlier outputs removed), as does every step under ``--force``.

Outputs (``OUTPUT_DIR``, default ``study_runs/<preset>``): ``report.md``, ``report.html``,
``report.json`` (every number the report shows), ``figures/``, ``commands.sh``, ``timings.json``,
``logs/<step>.log`` and the outputs of every step (world/, base/, data/, cpt/, density/, ...).

Usage::

    python run_study.py                          # CPU default
    python run_study.py --preset micro           # CI-sized
    python run_study.py --preset gpu-small       # one GPU, minutes
    python run_study.py --preset paper --dry_run # print the paper-scale commands
"""

from __future__ import annotations

import html
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
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from study_common import write_json_atomic, write_text_atomic

REPO_DIR = Path(__file__).resolve().parent
#: The paper's questions come from its public release; the default folder is in the repository's own (git-ignored)
#: working area, relative to the repository root, where the steps run.
PAPER_QUESTIONS_REPO = "https://github.com/luciusssss/cross-lingual-culture"
PAPER_QUESTIONS_DIR = "data/paper-questions"
PAPER_QUESTIONS_FETCH = (
    f"git clone --depth 1 {PAPER_QUESTIONS_REPO} /tmp/clc && mkdir -p {PAPER_QUESTIONS_DIR} && "
    f"cp /tmp/clc/data/*-culture-cloze_*.json {PAPER_QUESTIONS_DIR}/"
)
SETTINGS = (("bridges", True), ("no_bridges", False))
VARIANT_TITLES = {"native": "native-script names (control)", "anchors": "shared Latin names (anchors)"}

# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


@dataclass
class Preset:
    """Everything a study run needs besides the output folder. Numbers are per step."""

    name: str
    description: str
    langs: list[str]
    seeds: list[int]
    jobs: int  # steps run at the same time (each with cores // jobs threads on CPU)
    budget_s: int  # what the preset is designed to take on its reference machine
    reference_machine: str
    variants: list[str] = field(default_factory=lambda: ["native", "anchors"])
    # CPT settings of the anchors variant (the anchors-vs-control comparison needs only one of them)
    anchor_settings: list[str] = field(default_factory=lambda: ["bridges", "no_bridges"])
    world: dict = field(default_factory=dict)  # synthetic_world.py arguments
    pretrain: dict = field(default_factory=dict)  # run_pretrain.py arguments
    build: dict = field(default_factory=dict)  # build_pairs.py arguments
    cpt: dict = field(default_factory=dict)  # run_cpt.py arguments
    eval: dict = field(default_factory=dict)  # run_eval.py arguments
    density: dict = field(default_factory=dict)  # run_density.py arguments
    estimates_s: dict = field(default_factory=dict)  # expected seconds per step kind (reference machine)
    accelerate_config: str | None = None
    synthetic: bool = True


def _synthetic_training(block: int, pretrain_steps: int, pretrain_batch: int, cpt_steps: int, cpt_batch: int, **kw):
    """Trainer arguments shared by the synthetic presets (small windows, many small steps)."""
    common = {"block_size": block, "logging_steps": 50, "report_to": "none", "save_total_limit": None}
    pretrain = {
        **common,
        "max_steps": pretrain_steps,
        "save_steps": pretrain_steps,
        "per_device_train_batch_size": pretrain_batch,
        "learning_rate": kw.get("pretrain_lr", 3e-3),
        "warmup_steps": max(1, pretrain_steps // 20),
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.01,
    }
    cpt = {
        **common,
        "max_steps": cpt_steps,
        "save_steps": kw.get("save_steps", max(1, cpt_steps // 8)),
        "per_device_train_batch_size": cpt_batch,
        "learning_rate": kw.get("cpt_lr", 1e-3),
        "warmup_steps": max(1, cpt_steps // 20),
        "lr_scheduler_type": "constant_with_warmup",
        "weight_decay": 0.01,
    }
    for d in (pretrain, cpt):
        d.pop("save_total_limit")
    return pretrain, cpt


_MICRO_PRETRAIN, _MICRO_CPT = _synthetic_training(64, 100, 16, 60, 8, save_steps=20)
_CPU_PRETRAIN, _CPU_CPT = _synthetic_training(64, 1000, 16, 800, 8, save_steps=100)
# gpu-small: tiny models are bound by per-step overhead on a GPU, so larger batches cost almost nothing and
# parallel processes (one per CPU core pair) add throughput. Measured on one H200 with the first sizing
# (2000 x 32 pretraining, 1500 x 16 CPT, 6 jobs): pretraining 92 s, CPT ~170 s per run 6 at a time (~9.5 min in
# all); this sizing halves the CPT steps (twice the batch) and runs all 12 CPT runs at once.
_GPU_PRETRAIN, _GPU_CPT = _synthetic_training(128, 1500, 64, 800, 32, save_steps=80, pretrain_lr=1.5e-3, cpt_lr=7e-4)

PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro",
        description="CI-sized: the whole pipeline on a tiny world and model in a couple of minutes. Its numbers "
        "mean nothing; it checks that every step and every report artefact works.",
        langs=["mn"],
        seeds=[0, 1],
        jobs=2,
        budget_s=180,
        reference_machine="2-core CPU",
        world=dict(
            places=8,
            relations=2,
            resource=["mn=mixed"],
            en_count=8,
            tgt_count=6,
            low_resource_ratio=8.0,
            statement_filler=1,
            en_filler_documents=60,
            mono_filler_documents=60,
            pairs=150,
            diagnostic_pairs=20,
            pair_mentions=2,
            mono_mentions=1,
        ),
        anchor_settings=["no_bridges"],
        pretrain=dict(
            config_name="configs/tiny.json",
            config_overrides="hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2",
            vocab_size=600,
            **_MICRO_PRETRAIN,
        ),
        build=dict(replay_ratio=0.25),
        cpt=dict(_MICRO_CPT),
        eval=dict(batch_size=64),
        density=dict(top_k=20),
        estimates_s=dict(world=2, pretrain=17, build=8, cpt=15, eval=11, base_eval=11, transfer=10, density=3),
    ),
    "cpu": Preset(
        name="cpu",
        description="Laptop CPU: a synthetic world (one culture, traditional Mongolian script), a ~0.5M-parameter Qwen2 "
        "model; native-script names with and without bridges, shared Latin names (anchors) without bridges; 3 seeds.",
        langs=["mn"],
        seeds=[0, 1, 2],
        jobs=2,
        budget_s=15 * 60,
        reference_machine="2-core CPU (quiet)",
        world=dict(
            places=16,
            relations=6,
            resource=["mn=mixed"],
            en_count=24,
            tgt_count=10,
            low_resource_ratio=60.0,
            statement_filler=1,
            en_filler_documents=300,
            mono_filler_documents=350,
            pairs=1500,
            diagnostic_pairs=200,
            pair_mentions=3,
            mono_mentions=2,
        ),
        anchor_settings=["no_bridges"],
        pretrain=dict(
            config_name="configs/tiny.json",
            config_overrides="intermediate_size=256",
            vocab_size=2000,
            **_CPU_PRETRAIN,
        ),
        build=dict(replay_ratio=0.25),
        cpt=dict(_CPU_CPT),
        eval=dict(batch_size=128),
        density=dict(top_k=50),
        # measured 2026-11-26 on the 2-core machine at load ~1.7 (10:16 in all)
        estimates_s=dict(world=3, pretrain=137, build=10, cpt=80, eval=20, base_eval=11, transfer=10, density=4),
    ),
    "gpu-small": Preset(
        name="gpu-small",
        description="One GPU, minutes: a larger world (256 facts, 4x the pairs), a ~4.5M-parameter model with "
        "windows of 128 tokens, 3.3M CPT tokens per run; both name variants in both settings, 3 seeds; no network access.",
        langs=["mn"],
        seeds=[0, 1, 2],
        jobs=12,
        budget_s=5 * 60,
        reference_machine="one H100 GPU, 16 CPU cores",
        world=dict(
            places=32,
            relations=8,
            resource=["mn=mixed"],
            en_count=32,
            tgt_count=12,
            low_resource_ratio=60.0,
            statement_filler=1,
            en_filler_documents=2000,
            mono_filler_documents=1500,
            pairs=6000,
            diagnostic_pairs=300,
            pair_mentions=4,
            mono_mentions=2,
        ),
        pretrain=dict(
            config_name="configs/tiny.json",
            config_overrides="hidden_size=256,intermediate_size=1024,num_hidden_layers=4,num_attention_heads=8,"
            "num_key_value_heads=4",
            vocab_size=4000,
            bf16=True,
            **_GPU_PRETRAIN,
        ),
        build=dict(replay_ratio=0.25),
        cpt=dict(bf16=True, **_GPU_CPT),
        eval=dict(batch_size=256),
        density=dict(top_k=50),
        estimates_s=dict(world=10, pretrain=75, build=15, cpt=130, eval=15, base_eval=10, transfer=15, density=20),
    ),
    "paper": Preset(
        name="paper",
        description="The paper's scale on a GPU cluster: English Wikipedia pretraining of the Qwen2.5-0.5B "
        "architecture, 1,500 CPT steps x 0.5M tokens per language and setting, ko zh bo mn, the paper's questions.",
        langs=["ko", "zh", "bo", "mn"],
        seeds=[0],
        jobs=1,
        budget_s=0,
        reference_machine="8 x 80 GB GPUs per run",
        variants=["real"],
        synthetic=False,
        accelerate_config="accelerate_configs/multi_gpu.yaml",
        pretrain=dict(
            config_name="configs/qwen2.5-0.5b.json",
            tokenizer_name="Qwen/Qwen2.5-0.5B",
            dataset_name="wikimedia/wikipedia",
            dataset_config_name="20231101.en",
            streaming=True,
            script_filter="latin",
            block_size=2048,
            max_steps=20000,
            save_steps=1000,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,
            learning_rate=3e-4,
            warmup_steps=1000,
            lr_scheduler_type="cosine",
            weight_decay=0.1,
            bf16=True,
            logging_steps=10,
            report_to="none",
        ),
        build=dict(block_size=2048, replay_ratio=0.1, streaming=True, num_proc=16),
        cpt=dict(
            block_size=2048,
            max_steps=1500,
            save_steps=100,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,  # 16 x 2 x 8 GPUs x 2048 tokens = 0.5M tokens per step
            learning_rate=1e-4,
            warmup_steps=50,
            lr_scheduler_type="cosine",
            bf16=True,
            logging_steps=10,
            report_to="none",
        ),
        eval=dict(batch_size=64, dtype="bfloat16"),
        density=dict(top_k=50),
        estimates_s={},
    ),
}

#: Paper-scale data per language: build_pairs.py flags for the target corpus and the parallel pairs,
#: and the corpus run_density.py measures. Wikipedia for ko/zh, MC^2 (pkupie/mc2_corpus, gated: accept
#: its terms on the Hub first and log in, or set HF_TOKEN) for bo/mn, OPUS-100 pairs for ko/zh. No public
#: Hub dataset pairs English with Tibetan or with Mongolian in the traditional script (OPUS-100's mn is
#: Cyrillic, which build_pairs.py would drop as not_in_script), so bo/mn pairs are read from files the
#: user provides. Override any of it with --paper_data FILE.json ({"bo": {"pairs_files": [...]}, ...}).
#:
#: MC^2 has no per-language configs: its card lists one JSON-lines file per language,
#: bo-crawl-only-release-20231127.jsonl and mn-crawl-only-release-20231127.jsonl (one document per line,
#: in its `text` field). The language is chosen by reading that file alone, as its card shows
#: (load_dataset("pkupie/mc2_corpus", data_files=FILE)): build_pairs.py --mono_data_files and
#: run_density.py --corpus_data_files. Reading the whole dataset would index every language's documents
#: and make the density of one language's knowledge a share of all four corpora.
PAPER_DATA = {
    "ko": {
        "mono_dataset": "wikimedia/wikipedia",
        "mono_dataset_config": "20231101.ko",
        "pairs_dataset": "Helsinki-NLP/opus-100",
        "pairs_dataset_config": "en-ko",
        "en_column": "translation.en",
        "tgt_column": "translation.ko",
    },
    "zh": {
        "mono_dataset": "wikimedia/wikipedia",
        "mono_dataset_config": "20231101.zh",
        "pairs_dataset": "Helsinki-NLP/opus-100",
        "pairs_dataset_config": "en-zh",
        "en_column": "translation.en",
        "tgt_column": "translation.zh",
    },
    "bo": {
        "mono_dataset": "pkupie/mc2_corpus",
        "mono_data_files": ["bo-crawl-only-release-20231127.jsonl"],
        "pairs_files": ["data/pairs/en-bo.jsonl"],
        "en_column": "en",
        "tgt_column": "bo",
    },
    "mn": {
        "mono_dataset": "pkupie/mc2_corpus",
        "mono_data_files": ["mn-crawl-only-release-20231127.jsonl"],
        "pairs_files": ["data/pairs/en-mn.jsonl"],
        "en_column": "en",
        "tgt_column": "mn",
    },
}


#: Training throughput per GPU behind the GPU-hours estimate of --dry_run, unless --tokens_per_second_per_gpu
#: gives another (README, "Paper scale" of step 1).
MEASURED_TOKENS_PER_SECOND_PER_GPU = 47_800
MEASURED_THROUGHPUT_SOURCE = (
    "bench/gpu_fsdp_check.sh on one NVIDIA H200 (Qwen2.5-0.5B shapes, 2048-token windows, bf16, FSDP, sdpa with "
    "per-document masks; 2026-11-26)"
)

#: --smoke: the budget flags cut per step kind; every other flag of every command stays as the full run has it
#: (same scripts, data sources, columns, tokenizer, launch config). A few training steps with a checkpoint
#: between them (so every checkpoint-reading step reads more than one), short windows, a tiny model of the same
#: architecture family, small batches and buffers. tests/test_study_smoke.py compares the two plans flag by flag.
#: The training budget of a smoke run, the same for pretraining and CPT.
_SMOKE_TRAINING = dict(
    block_size=128,
    max_steps=4,
    save_steps=2,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    warmup_steps=1,
    logging_steps=1,
)
SMOKE_BUDGETS: dict[str, dict] = {
    "pretrain": dict(
        config_name="configs/tiny.json",
        config_overrides="hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2",
        **_SMOKE_TRAINING,
        shuffle_buffer_size=16,
    ),
    "build": dict(block_size=128, num_proc=2, max_records_per_input=200),
    "cpt": dict(_SMOKE_TRAINING),
    "eval": dict(batch_size=16),
    "density": dict(top_k=5, max_documents=2000),
}
#: Flags that exist to cut a budget: a smoke run adds them although the full run leaves them out (reading a few
#: records of each input, indexing a few documents of each corpus, instead of whole Wikipedia dumps).
SMOKE_ONLY_FLAGS = {"max_records_per_input", "max_documents"}
#: Without a GPU a smoke run also trains and probes in float32 (bfloat16 on a CPU only slows it down).
SMOKE_CPU_PRECISION: dict[str, dict] = {
    "pretrain": dict(bf16=False),
    "cpt": dict(bf16=False),
    "eval": dict(dtype="float32"),
}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def smoke_preset(preset: Preset, on_gpu: bool) -> tuple[Preset, list[str]]:
    """The preset with only its budgets cut (``--smoke``), and one line per cut flag saying what was cut.

    Without a GPU the training steps run without bf16 and, unless --accelerate_config says otherwise, as
    plain python."""
    cuts: list[str] = []
    changed = {}
    for kind in ("pretrain", "build", "cpt", "eval", "density"):
        full = getattr(preset, kind)
        budget = dict(SMOKE_BUDGETS[kind], **({} if on_gpu else SMOKE_CPU_PRECISION.get(kind, {})))
        # Only flags the full run passes are cut (a flag it leaves at its default stays there), except the
        # budget-only flags and the shuffle buffer of a streamed pretraining, which would otherwise read
        # 10,000 windows before step 1.
        budget = {
            key: value
            for key, value in budget.items()
            if key in full or key in SMOKE_ONLY_FLAGS or (key == "shuffle_buffer_size" and full.get("streaming"))
        }
        cut = dict(full)
        for key, value in budget.items():
            if full.get(key) != value:
                cuts.append(f"{kind}: --{key} {full.get(key, '(default)')} -> {value}")
            cut[key] = value
        changed[kind] = cut
    if not on_gpu and preset.accelerate_config:
        cuts.append(f"training steps: accelerate launch --config_file {preset.accelerate_config} -> python (no GPU)")
    smoke = replace(
        preset,
        description=f"SMOKE RUN of the {preset.name} plan (every step, budgets cut: its numbers mean nothing). "
        + preset.description,
        budget_s=0,
        accelerate_config=preset.accelerate_config if on_gpu else None,
        **changed,
    )
    return smoke, cuts


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


@dataclass
class StudyArguments:
    preset: str = field(
        default="cpu",
        metadata={"help": f"Which study to run: {', '.join(PRESETS)} (see the module docstring and README)."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where every step writes (default: study_runs/<preset>)."}
    )
    langs: list[str] | None = field(
        default=None, metadata={"help": "Target languages (default: the preset's; synthetic presets: ko zh bo mn)."}
    )
    seeds: list[int] | None = field(
        default=None, metadata={"help": "CPT seeds, one run per setting and seed (default: the preset's)."}
    )
    variants: list[str] | None = field(
        default=None,
        metadata={"help": "Synthetic presets: name variants to run, native (control) and/or anchors (default: both)."},
    )
    anchor_settings: list[str] | None = field(
        default=None,
        metadata={
            "help": "Synthetic presets: CPT settings run for the anchors variant, bridges and/or no_bridges "
            "(default: the preset's; the cpu preset runs no_bridges only, to fit its time budget)."
        },
    )
    jobs: int | None = field(
        default=None,
        metadata={
            "help": "Steps run at the same time (default: the preset's). On CPU each gets cores/jobs threads; "
            "small models train faster as parallel single-thread processes than as one multi-thread process."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Launch training steps with `accelerate launch --config_file FILE` (e.g. "
            "accelerate_configs/multi_gpu.yaml). Default: plain python for synthetic presets; the paper preset "
            "uses accelerate_configs/multi_gpu.yaml."
        },
    )
    questions_dir: str = field(
        default=PAPER_QUESTIONS_DIR,
        metadata={
            "help": "Paper preset: folder holding the paper's <lang>-culture-cloze_<en|lang>.json files, from its "
            f"public release ({PAPER_QUESTIONS_REPO}, folder data/, Apache-2.0). Default: {PAPER_QUESTIONS_DIR} "
            f"(git-ignored); fill it with: {PAPER_QUESTIONS_FETCH}"
        },
    )
    paper_data: str | None = field(
        default=None,
        metadata={
            "help": "Paper preset: a JSON file overriding the per-language build_pairs.py data flags, e.g. "
            '{"bo": {"pairs_files": ["my/en-bo.jsonl"], "en_column": "en", "tgt_column": "bo"}} (see PAPER_DATA).'
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
            "help": "Print the commands, the time budget and the training cost (tokens, GPU-hours) without running."
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
            "help": "Paper preset: push the base model, each CPT dataset and every checkpoint of every run to the "
            "Hub under this organisation or user: ORG/<study>-base, ORG/<study>-data-<lang>, ORG/<study>-cpt-<run> "
            "(<study> is the preset's name, with -smoke for --smoke), checkpoints as checkpoint-N folders."
        },
    )
    smoke: bool = field(
        default=False,
        metadata={
            "help": "Run every step of the preset's plan exactly as the full run would (same scripts, data sources, "
            "columns, tokenizer, flags) with only the budgets cut (see SMOKE_BUDGETS: a tiny model, a few steps, "
            "short windows): what to run first on a cluster to prove data access, columns, launch config and "
            "outputs. Outputs go to study_runs/<preset>-smoke by default and never count as the full run's."
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
        default=False, metadata={"help": "Only (re)write the report from the outputs already in --output_dir."}
    )


# --------------------------------------------------------------------------------------
# The plan: steps and what they produce
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    """One command of the study."""

    id: str  # unique and file-name safe: names its log and its done-marker
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
    setting: str  # bridges | no_bridges
    seed: int
    dir: str
    eval_dir: str

    @property
    def name(self) -> str:
        return f"{self.lang}-{self.variant}-{self.setting}-s{self.seed}"


@dataclass
class Plan:
    preset: Preset
    out: str
    steps: list[Step]
    runs: list[Run]
    groups: dict  # "<lang>/<variant>" -> paths of that group's data, questions, transfer and density outputs


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


def _launcher(args: StudyArguments, preset: Preset, script: str, trains: bool) -> list[str]:
    config = args.accelerate_config or preset.accelerate_config
    if trains and config:
        return ["accelerate", "launch", "--config_file", config, script]
    return [args.python, script]


def build_plan(args: StudyArguments, preset: Preset, out: Path) -> Plan:
    if not preset.synthetic:
        return build_paper_plan(args, preset, out)
    langs, seeds = args.langs or preset.langs, args.seeds if args.seeds is not None else preset.seeds
    variants = args.variants or preset.variants
    anchor_settings = args.anchor_settings or preset.anchor_settings
    python = args.python
    world_dir, base_dir = out / "world", out / "base"
    steps: list[Step] = []
    runs: list[Run] = []
    groups: dict[str, dict] = {}

    world_args = dict(preset.world, output_dir=str(world_dir), langs=langs, seed=0, name_variants=variants)
    resource = [r for r in world_args.pop("resource", []) if r.split("=")[0] in langs]
    resource += [f"{lang}=mixed" for lang in langs if not any(r.startswith(f"{lang}=") for r in resource)]
    world_args["resource"] = resource
    steps.append(
        Step(
            id="world",
            kind="world",
            title="generate the synthetic world",
            command=[python, "synthetic_world.py", *_flags(world_args)],
            outputs=[str(world_dir / "truth.json"), str(world_dir / "en_corpus.jsonl")],
            workdir=str(world_dir),
        )
    )

    tokenizer_files = [str(world_dir / "en_corpus.jsonl")]
    tokenizer_files += [str(world_dir / lang / v / "mono.jsonl") for lang in langs for v in variants]
    pretrain_args = dict(
        preset.pretrain,
        train_tokenizer=True,
        tokenizer_files=tokenizer_files,
        train_file=str(world_dir / "en_corpus.jsonl"),
        output_dir=str(base_dir),
        seed=0,
    )
    steps.append(
        Step(
            id="pretrain",
            kind="pretrain",
            title="pretrain the base model on the English corpus",
            command=[*_launcher(args, preset, "run_pretrain.py", True), *_flags(pretrain_args)],
            outputs=[str(base_dir / "config.json"), str(base_dir / "data_stats.json")],
            workdir=str(base_dir),
            deps=["world"],
            trains=True,
        )
    )

    block_size = preset.cpt["block_size"]
    for lang in langs:
        for variant in variants:
            key = f"{lang}/{variant}"
            wdir = world_dir / lang / variant
            data_dir = out / "data" / f"{lang}-{variant}"
            questions = [str(wdir / f"{lang}-culture-cloze_en.json"), str(wdir / f"{lang}-culture-cloze_{lang}.json")]
            group = {
                "lang": lang,
                "variant": variant,
                "data": str(data_dir),
                "questions": questions,
                "diagnostic_pairs": str(wdir / "diagnostic_pairs.jsonl"),
                "mono": str(wdir / "mono.jsonl"),
                "base_eval": str(out / "base_eval" / f"{lang}-{variant}"),
                "transfer": str(out / "transfer" / f"{lang}-{variant}"),
                "density": str(out / "density" / f"{lang}-{variant}"),
            }
            groups[key] = group
            build_args = dict(
                preset.build,
                lang=lang,
                pairs_files=str(wdir / "pairs.jsonl"),
                en_column="en",
                tgt_column=lang,
                mono_files=str(wdir / "mono.jsonl"),
                replay_files=str(world_dir / "en_corpus.jsonl"),
                tokenizer_name=str(base_dir),
                block_size=block_size,
                output_dir=str(data_dir),
                seed=0,
            )
            steps.append(
                Step(
                    id=f"build-{lang}-{variant}",
                    kind="build",
                    title=f"build the CPT dataset ({lang}, {variant} names)",
                    command=[python, "build_pairs.py", *_flags(build_args)],
                    outputs=[str(data_dir / "build_stats.json")],
                    workdir=str(data_dir),
                    deps=["world", "pretrain"],
                )
            )
            eval_common = dict(preset.eval, questions=questions)
            steps.append(
                Step(
                    id=f"base-eval-{lang}-{variant}",
                    kind="base_eval",
                    title=f"probe the base model ({lang}, {variant} names)",
                    command=[
                        python,
                        "run_eval.py",
                        *_flags(dict(eval_common, model_name_or_path=str(base_dir), output_dir=group["base_eval"])),
                    ],
                    outputs=[str(Path(group["base_eval"]) / "accuracy.json")],
                    workdir=group["base_eval"],
                    deps=["world", "pretrain"],
                )
            )
            group_runs = []
            settings = [
                (name, bridges) for name, bridges in SETTINGS if variant != "anchors" or name in anchor_settings
            ]
            group["settings"] = [name for name, _ in settings]
            for seed in seeds:
                for setting, bridges in settings:
                    run_dir = out / "cpt" / f"{lang}-{variant}-{setting}-s{seed}"
                    run = Run(lang, variant, setting, seed, str(run_dir), str(run_dir / "eval"))
                    runs.append(run)
                    group_runs.append(run)
                    cpt_args = dict(
                        preset.cpt,
                        model_name_or_path=str(base_dir),
                        dataset_path=str(data_dir),
                        lang=lang,
                        bridges=bridges,
                        no_bridges=not bridges,
                        output_dir=str(run_dir),
                        run_name=run.name,
                        seed=seed,
                    )
                    steps.append(
                        Step(
                            id=f"cpt-{run.name}",
                            kind="cpt",
                            title=f"continual pretraining {lang}, {variant} names, {setting.replace('_', ' ')}, seed {seed}",
                            command=[*_launcher(args, preset, "run_cpt.py", True), *_flags(cpt_args)],
                            outputs=[str(run_dir / "config.json"), str(run_dir / "packing_audit.json")],
                            workdir=str(run_dir),
                            deps=[f"build-{lang}-{variant}"],
                            trains=True,
                        )
                    )
                    steps.append(
                        Step(
                            id=f"eval-{run.name}",
                            kind="eval",
                            title=f"probe every checkpoint of {run.name} (+ bridge diagnostic)",
                            command=[
                                python,
                                "run_eval.py",
                                *_flags(
                                    dict(
                                        eval_common,
                                        model_name_or_path=str(run_dir),
                                        diagnostic_pairs=group["diagnostic_pairs"],
                                        output_dir=run.eval_dir,
                                    )
                                ),
                            ],
                            outputs=[
                                str(Path(run.eval_dir) / "accuracy.json"),
                                str(Path(run.eval_dir) / "bridge_diagnostic.json"),
                            ],
                            workdir=run.eval_dir,
                            deps=[f"cpt-{run.name}"],
                        )
                    )
            if len(settings) < 2:
                continue  # one setting only (anchors variant of the cpu preset): no with-minus-without analysis
            with_dirs = [r.eval_dir for r in group_runs if r.setting == "bridges"]
            without_dirs = [r.eval_dir for r in group_runs if r.setting == "no_bridges"]
            steps.append(
                Step(
                    id=f"transfer-{lang}-{variant}",
                    kind="transfer",
                    title=f"transfer analysis ({lang}, {variant} names, {len(seeds)} seed pairs)",
                    command=[
                        python,
                        "run_eval.py",
                        "--with_bridges",
                        *with_dirs,
                        "--without_bridges",
                        *without_dirs,
                        "--output_dir",
                        group["transfer"],
                    ],
                    outputs=[str(Path(group["transfer"]) / "transfer.json")],
                    workdir=group["transfer"],
                    deps=[f"eval-{r.name}" for r in group_runs],
                )
            )
            # Density of the culture's knowledge in the English corpus and in the target corpus, with
            # the instance-level analysis on the first seed's final checkpoints.
            first_with = next(r for r in group_runs if r.setting == "bridges")
            first_without = next(r for r in group_runs if r.setting == "no_bridges")
            density_args = dict(
                preset.density,
                questions=questions,
                corpus_files=[f"en={world_dir / 'en_corpus.jsonl'}", f"{lang}={wdir / 'mono.jsonl'}"],
                output_dir=group["density"],
                predictions_with=first_with.eval_dir,
                predictions_without=first_without.eval_dir,
                source_corpus=[f"{lang}=en", f"en={lang}"],
            )
            steps.append(
                Step(
                    id=f"density-{lang}-{variant}",
                    kind="density",
                    title=f"cultural density of {lang} knowledge in both corpora ({variant} names)",
                    command=[python, "run_density.py", *_flags(density_args)],
                    outputs=[str(Path(group["density"]) / "density.json")],
                    workdir=group["density"],
                    deps=["world", f"eval-{first_with.name}", f"eval-{first_without.name}"],
                )
            )
    return Plan(preset, str(out), _in_run_order(steps), runs, groups)


def _in_run_order(steps: list[Step]) -> list[Step]:
    """Order steps so the critical path comes first: every CPT run before any probing or analysis."""
    priority = {"world": 0, "pretrain": 1, "build": 2, "cpt": 3, "eval": 4, "base_eval": 5, "transfer": 6, "density": 7}
    return sorted(steps, key=lambda s: priority[s.kind])


def build_paper_plan(args: StudyArguments, preset: Preset, out: Path) -> Plan:
    """The paper-scale study: Hub datasets, the 0.5B architecture, the paper's questions."""
    paper_data = {lang: dict(flags) for lang, flags in PAPER_DATA.items()}
    if args.paper_data:
        overrides = json.loads(Path(args.paper_data).read_text(encoding="utf-8"))
        for lang, flags in overrides.items():
            paper_data.setdefault(lang, {}).update(flags)
            if not paper_data[lang].get("mono_dataset"):  # the target corpus given as files instead
                paper_data[lang].pop("mono_data_files", None)
    unknown = [lang for lang in (args.langs or preset.langs) if lang not in paper_data]
    if unknown:
        raise ValueError(f"No paper-scale data for {unknown}: give it with --paper_data FILE.json.")
    langs, seeds = args.langs or preset.langs, args.seeds if args.seeds is not None else preset.seeds
    python = args.python
    base_dir = out / "base"
    questions_dir = Path(args.questions_dir)
    study = preset.name + ("-smoke" if args.smoke else "")  # a smoke run's pushes never land on the real run's

    def push(kind: str, name: str) -> dict:
        """--hub_org: the push flags of a step (training steps push every checkpoint as it is saved)."""
        if not args.hub_org:
            return {}
        if kind == "data":
            return {"push_to_hub": True, "hub_dataset_id": f"{args.hub_org}/{study}-{name}"}
        # hub_always_push: the Trainer otherwise skips a checkpoint's push while the previous one uploads, and
        # the learning curve needs every checkpoint (run_pretrain.py dropped its last one without it).
        return {
            "push_to_hub": True,
            "hub_model_id": f"{args.hub_org}/{study}-{name}",
            "hub_strategy": "all_checkpoints",
            "hub_always_push": True,
        }

    steps: list[Step] = []
    runs: list[Run] = []
    groups: dict[str, dict] = {}
    steps.append(
        Step(
            id="pretrain",
            kind="pretrain",
            title="pretrain Qwen2.5-0.5B (architecture) on Latin-only English Wikipedia",
            command=[
                *_launcher(args, preset, "run_pretrain.py", True),
                *_flags(dict(preset.pretrain, output_dir=str(base_dir), seed=0, **push("model", "base"))),
            ],
            outputs=[str(base_dir / "config.json")],
            workdir=str(base_dir),
            trains=True,
        )
    )
    for lang in langs:
        questions = [
            str(questions_dir / f"{lang}-culture-cloze_en.json"),
            str(questions_dir / f"{lang}-culture-cloze_{lang}.json"),
        ]
        data_dir = out / "data" / lang
        key = f"{lang}/real"
        group = {
            "lang": lang,
            "variant": "real",
            "data": str(data_dir),
            "questions": questions,
            "base_eval": str(out / "base_eval" / lang),
            "transfer": str(out / "transfer" / lang),
            "density": str(out / "density" / lang),
        }
        groups[key] = group
        build_args = dict(
            preset.build,
            lang=lang,
            **paper_data[lang],
            replay_dataset="wikimedia/wikipedia",
            replay_dataset_config="20231101.en",
            eval_questions=questions,
            tokenizer_name=str(base_dir),
            output_dir=str(data_dir),
            seed=0,
            **push("data", f"data-{lang}"),
        )
        steps.append(
            Step(
                id=f"build-{lang}",
                kind="build",
                title=f"build the {lang} CPT dataset",
                command=[python, "build_pairs.py", *_flags(build_args)],
                outputs=[str(data_dir / "build_stats.json")],
                workdir=str(data_dir),
                deps=["pretrain"],
            )
        )
        steps.append(
            Step(
                id=f"base-eval-{lang}",
                kind="base_eval",
                title=f"probe the base model on the {lang} questions",
                command=[
                    python,
                    "run_eval.py",
                    *_flags(
                        dict(
                            preset.eval,
                            questions=questions,
                            model_name_or_path=str(base_dir),
                            output_dir=group["base_eval"],
                        )
                    ),
                ],
                outputs=[str(Path(group["base_eval"]) / "accuracy.json")],
                workdir=group["base_eval"],
                deps=["pretrain"],
            )
        )
        group_runs = []
        for seed in seeds:
            for setting, bridges in SETTINGS:
                run_dir = out / "cpt" / f"{lang}-{setting}-s{seed}"
                run = Run(lang, "real", setting, seed, str(run_dir), str(run_dir / "eval"))
                runs.append(run)
                group_runs.append(run)
                cpt_args = dict(
                    preset.cpt,
                    model_name_or_path=str(base_dir),
                    dataset_path=str(data_dir),
                    lang=lang,
                    bridges=bridges,
                    no_bridges=not bridges,
                    output_dir=str(run_dir),
                    run_name=f"{lang}-{setting}-s{seed}",
                    seed=seed,
                    **push("model", f"cpt-{lang}-{setting}-s{seed}"),
                )
                steps.append(
                    Step(
                        id=f"cpt-{lang}-{setting}-s{seed}",
                        kind="cpt",
                        title=f"continual pretraining {lang}, {setting.replace('_', ' ')}, seed {seed}",
                        command=[*_launcher(args, preset, "run_cpt.py", True), *_flags(cpt_args)],
                        outputs=[str(run_dir / "config.json"), str(run_dir / "packing_audit.json")],
                        workdir=str(run_dir),
                        deps=[f"build-{lang}"],
                        trains=True,
                    )
                )
                steps.append(
                    Step(
                        id=f"eval-{lang}-{setting}-s{seed}",
                        kind="eval",
                        title=f"probe every checkpoint of {lang} {setting} seed {seed}",
                        command=[
                            python,
                            "run_eval.py",
                            *_flags(
                                dict(
                                    preset.eval,
                                    questions=questions,
                                    model_name_or_path=str(run_dir),
                                    output_dir=run.eval_dir,
                                )
                            ),
                        ],
                        outputs=[str(Path(run.eval_dir) / "accuracy.json")],
                        workdir=run.eval_dir,
                        deps=[f"cpt-{lang}-{setting}-s{seed}"],
                    )
                )
        steps.append(
            Step(
                id=f"transfer-{lang}",
                kind="transfer",
                title=f"transfer analysis ({lang})",
                command=[
                    python,
                    "run_eval.py",
                    "--with_bridges",
                    *[r.eval_dir for r in group_runs if r.setting == "bridges"],
                    "--without_bridges",
                    *[r.eval_dir for r in group_runs if r.setting == "no_bridges"],
                    "--output_dir",
                    group["transfer"],
                ],
                outputs=[str(Path(group["transfer"]) / "transfer.json")],
                workdir=group["transfer"],
                deps=[f"eval-{lang}-{s}-s{seed}" for seed in seeds for s, _ in SETTINGS],
            )
        )
        first_with = next(r for r in group_runs if r.setting == "bridges")
        first_without = next(r for r in group_runs if r.setting == "no_bridges")
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
            density_dir = Path(group["density"]) / corpus_label
            steps.append(
                Step(
                    id=f"density-{lang}-{corpus_label}",
                    kind="density",
                    title=f"cultural density of {lang} knowledge in {corpus_label}",
                    command=[
                        python,
                        "run_density.py",
                        *_flags(
                            dict(
                                preset.density,
                                questions=questions,
                                **{"corpus_streaming": True, **corpus},
                                corpus_label=corpus_label,
                                output_dir=str(density_dir),
                                predictions_with=first_with.eval_dir,
                                predictions_without=first_without.eval_dir,
                            )
                        ),
                    ],
                    outputs=[str(density_dir / "density.json")],
                    workdir=str(density_dir),
                    deps=[
                        f"eval-{first_with.lang}-bridges-s{first_with.seed}",
                        f"eval-{first_without.lang}-no_bridges-s{first_without.seed}",
                    ],
                )
            )
    return Plan(preset, str(out), _in_run_order(steps), runs, groups)


# --------------------------------------------------------------------------------------
# Running the plan
# --------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _marker(out: Path, step_id: str) -> Path:
    return out / ".done" / f"{step_id}.json"


def _started_record(out: Path, step: Step) -> Path:
    return out / ".started" / f"{step.id}.json"


def _read_record(path: Path) -> dict | None:
    """A JSON record the runner wrote, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _finished_run(out: Path, step_id: str) -> dict | None:
    """What identifies the finished run of a step: its done-marker's run id, finish stamp and command.

    A step records this for each of its dependencies when it starts and when it finishes, so a new run
    upstream (another run id) is seen downstream even when the downstream command is unchanged."""
    marker = _read_record(_marker(out, step_id))
    return None if marker is None else {key: marker.get(key) for key in ("run_id", "finished", "command")}


def _upstream(out: Path, step: Step) -> dict:
    return {dep: _finished_run(out, dep) for dep in step.deps}


def _upstream_changed(recorded: dict | None, current: dict) -> list[str]:
    """Dependencies whose finished run is not the one recorded (all of them when nothing was recorded)."""
    recorded = recorded or {}
    return [dep for dep, run in current.items() if recorded.get(dep) != run]


def _why_not_done(out: Path, step: Step) -> str | None:
    """None when the step is done: its done-marker holds the current command and the finished runs of its
    upstream steps, and its outputs exist. Otherwise why it must run."""
    marker = _read_record(_marker(out, step.id))
    if marker is None:
        if _marker(out, step.id).exists():
            return "its done-marker is unreadable"
        return "it did not finish" if _started_record(out, step).exists() else "no record of an earlier run"
    if marker.get("command") != step.command:
        return "its command changed"
    if step.deps and "upstream" not in marker:
        return "its done-marker does not say which upstream runs it used (an older run_study.py wrote it)"
    changed = _upstream_changed(marker.get("upstream"), _upstream(out, step))
    if changed:
        return f"upstream step {', '.join(changed)} finished a new run since {step.id} ran"
    missing = [p for p in step.outputs if not Path(p).exists()]
    return f"outputs missing: {', '.join(missing)}" if missing else None


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
    started = _read_record(_started_record(out, step))
    upstream = _upstream(out, step)
    if started is None:
        mismatch = None
    elif started.get("command") != step.command:
        mismatch = "its earlier start ran another command"
    elif changed := _upstream_changed(started.get("upstream"), upstream):
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
    _marker(out, step.id).unlink(missing_ok=True)
    write_json_atomic(_started_record(out, step), {"command": step.command, "upstream": upstream, "started": _now()})
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
    record = _read_record(path)
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
                _marker(self.out, step.id).unlink(missing_ok=True)
                _started_record(self.out, step).unlink(missing_ok=True)
            return {step.id: "--force" for step in self.plan.steps}
        root_cause: dict[str, str] = {}  # step -> the upstream step whose own change makes it rerun
        for step in self.plan.steps:  # dependencies come first (_in_run_order)
            stale = next((d for d in step.deps if d in reasons), None)
            if stale is not None:
                root = root_cause[step.id] = root_cause.get(stale, stale)
                reasons[step.id] = f"upstream step {root} reruns: {reasons[root]}"
            elif (why := _why_not_done(self.out, step)) is not None:
                reasons[step.id] = why
                if why != "no record of an earlier run":
                    print(f"{step.id} reruns: {why}.")
        return reasons

    def run(self) -> dict[str, float]:
        steps = self.plan.steps
        n = len(steps)
        start = time.time()
        self._refuse_steps_still_running()
        reasons = self._plan_reruns()
        done = {s.id for s in steps if s.id not in reasons}
        previous = _read_timings(self.out)
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
                        takeover = _claim_step(self.out, step)
                        if takeover:
                            bar.write(f"        {takeover}")
                        command, note = _prepare(self.out, step, reasons[step.id])
                        if command[0] == "python":  # the same interpreter (and environment) as the study
                            command = [sys.executable, *command[1:]]
                        log = open(self.logs / f"{step.id}.log", "w", encoding="utf-8")  # noqa: SIM115
                        if note:
                            bar.write(f"        {note}")
                            log.write(f"run_study.py: {note}\n")
                        log.write("$ " + shlex.join(command) + "\n\n")
                        log.flush()
                        step_env = {**env, **step.env}
                        ready = [p for p in pending if p is not step and all(d in done for d in p.deps)]
                        if not running and not ready and _machine_is_quiet():
                            # Nothing else can run meanwhile (e.g. pretraining) and nothing else loads the
                            # machine: give this step every core. On a shared machine more threads than free
                            # cores make torch slower, not faster, so it keeps its share.
                            cores = str(os.cpu_count() or 1)
                            step_env.update(OMP_NUM_THREADS=cores, MKL_NUM_THREADS=cores)
                        # Through the step supervisor (supervise_step), in a session of its own: Ctrl-C reaches
                        # the study, which then stops its steps, and no process of a step outlives the study.
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
                            {"pid": process.pid, "study_pid": os.getpid(), "started": _now(), "command": command},
                        )
                        running[step.id] = (process, time.time(), log)
                        pending.remove(step)
                        bar.write(f"[{finished_count + len(running):>2}/{n}] start  {step.title}")
                for step_id, (process, started, log) in list(running.items()):
                    if process.poll() is None:
                        continue
                    log.close()
                    del running[step_id]
                    step = next(s for s in steps if s.id == step_id)
                    _pid_file(self.out, step.id).unlink(missing_ok=True)
                    seconds = time.time() - started
                    missing = [p for p in step.outputs if not Path(p).exists()]
                    if process.returncode != 0 or missing:
                        self._stop(running)
                        tail = (self.logs / f"{step.id}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
                        reason = (
                            f"exit code {process.returncode}" if process.returncode else f"missing outputs {missing}"
                        )
                        bar.close()
                        raise RuntimeError(
                            f"Step {step.id} failed ({reason}) after {seconds:.0f} s. Its log: "
                            f"{self.logs / (step.id + '.log')}\n--- last lines ---\n{tail}"
                        )
                    self.timings[step.id] = seconds
                    write_json_atomic(
                        _marker(self.out, step.id),
                        {
                            "command": step.command,
                            # the finished upstream runs it started on (see _prepare), and its own run's identity
                            "upstream": (_read_record(_started_record(self.out, step)) or {}).get("upstream"),
                            "run_id": uuid.uuid4().hex,
                            "seconds": seconds,
                            "finished": _now(),
                        },
                    )
                    done.add(step.id)
                    finished_count += 1
                    bar.update(1)
                    elapsed = time.time() - start
                    budget = f" of a {_fmt_time(self.budget_s)} budget" if self.budget_s else ""
                    bar.write(
                        f"[{finished_count:>2}/{n}] done   {step.title} in {seconds:.0f} s "
                        f"(elapsed {_fmt_time(elapsed)}{budget})"
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

    def _refuse_steps_still_running(self) -> None:
        """Refuse before anything starts when a process of some step of the plan still runs (one started by
        another runner, or left from before parent-death signals): two processes never write one step folder."""
        busy = []
        for step in self.plan.steps:
            record = _read_record(_pid_file(self.out, step.id))
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


def _read_timings(out: Path) -> dict[str, float]:
    timings = {}
    for marker in (out / ".done").glob("*.json") if (out / ".done").is_dir() else []:
        try:
            timings[marker.stem] = json.loads(marker.read_text(encoding="utf-8")).get("seconds", 0.0)
        except json.JSONDecodeError:
            continue
    return timings


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    header = f"  {'step':<28} {'GPUs':>4} {'steps':>7} {'windows/step':>20} {'block':>5} {'windows':>11} {'tokens':>15}"
    if throughput:
        header += f" {'GPU-hours':>9} {'wall hours':>10}"
    lines.append(header)
    for r in rows:
        shape = f"{r['windows_per_step']} ({r['batch']}x{r['accumulation']}x{r['processes']})"
        line = (
            f"  {r['step']:<28} {number(r['processes']):>4} {r['steps']:>7,} {shape if r['processes'] else '?':>20} "
            f"{r['block_size']:>5} {number(r['windows']):>11} {number(r['tokens']):>15}"
        )
        if throughput:
            line += f" {number(r['gpu_hours'], '.2f'):>9} {number(r['wall_hours'], '.2f'):>10}"
        lines.append(line)
    tokens = [r["tokens"] for r in rows]
    if rows and None not in tokens:
        total = f"  {'all training steps':<28} {'':>4} {'':>7} {'':>20} {'':>5} {sum(r['windows'] for r in rows):>11,} "
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
        "set -euo pipefail",
        "",
    ]
    for step in plan.steps:
        lines += [f"# {step.title}", shlex.join(step.command), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The report: every number comes from a file a step wrote; text is written from the numbers
# --------------------------------------------------------------------------------------


class ReportDoc:
    """A report as blocks, rendered to Markdown and to standalone HTML (no extra dependency)."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", headers, [[str(c) for c in row] for row in rows]))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        lines: list[str] = []
        for block in self.blocks:
            if block[0] == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "ul":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif block[0] == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
                lines.append("")
            elif block[0] == "img":
                lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
            "img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}"
            "figcaption{font-style:italic;font-size:0.9em}</style></head><body>",
        ]
        for block in self.blocks:
            if block[0] == "h":
                parts.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                parts.append(f"<p>{_inline_html(block[1])}</p>")
            elif block[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
            elif block[0] == "table":
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
                body = "".join(
                    "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2]
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif block[0] == "img":
                parts.append(
                    f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                    f"<figcaption>{_inline_html(block[2])}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """The few inline Markdown forms the report uses: `code`, **bold**, [text](link)."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _read_json(path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _direction_words(direction: str, lang: str) -> str:
    return (
        f"English → {lang} ({lang} questions)"
        if direction.startswith("en->")
        else f"{lang} → English (English questions)"
    )


def _gap_sentence(what: str, gap: float, ci, n_seeds: int) -> str:
    """A conclusion written from a gap and its interval, never stronger than the interval allows."""
    over = "seeds and questions" if n_seeds > 1 else "questions only (one run pair: overstates certainty)"
    if ci[0] > 0:
        return f"{what}: {gap:+.3f}, 95% CI {_ci(ci)} (over {over}) excludes 0: evidence of a positive effect."
    if ci[1] < 0:
        return f"{what}: {gap:+.3f}, 95% CI {_ci(ci)} (over {over}) lies below 0: a negative effect."
    return f"{what}: {gap:+.3f}, 95% CI {_ci(ci)} (over {over}) includes 0: no evidence of an effect at this scale."


def _load_cubes(runs: list[Run], stems: list[str]) -> tuple[list[int], dict[str, dict[str, object]]]:
    """Per run name and questions stem: a bool array (steps x questions) on the steps all runs share."""
    import numpy as np

    from run_eval import read_eval_output

    per_run = {}
    for run in runs:
        _, by_stem = read_eval_output(Path(run.eval_dir))
        per_run[run.name] = by_stem
    common = sorted(set.intersection(*(set(per_run[r.name][stems[0]]) for r in runs)))
    cubes = {r.name: {s: np.stack([per_run[r.name][s][t] for t in common]) for s in stems} for r in runs}
    return common, cubes


def _tier_indices(truth: dict, lang: str) -> dict[str, list[int]]:
    tiers: dict[str, list[int]] = {}
    for record in truth["questions"][lang]:
        tiers.setdefault(record["tier"], []).append(record["index"])
    return tiers


def write_report(plan: Plan, wall_s: float) -> dict:
    """Write report.md, report.html and report.json into the plan's output folder."""
    out = Path(plan.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    doc = ReportDoc()
    record: dict = {"preset": plan.preset.name, "generated": _now(), "sections": {}}
    preset = plan.preset
    timings = _read_timings(out)
    doc.h(1, f"Cross-lingual culture transfer study: preset `{preset.name}`")
    doc.p(
        f"Generated {record['generated']} by `python run_study.py --preset {preset.name}`. {preset.description} "
        "Every number below is read from a file a step wrote (paths given per section; all of them are collected "
        "in `report.json`), and every sentence of conclusion is written from those numbers."
    )
    _report_machine(doc, record, plan, timings, wall_s)
    truth = _read_json(out / "world" / "truth.json") if preset.synthetic else None
    if truth:
        _report_world(doc, record, plan, truth)
    _report_questions(doc, record, plan)
    _report_transfer(doc, record, plan, truth, figures)
    if truth and {"native", "anchors"} <= {g["variant"] for g in plan.groups.values()}:
        _report_anchors(doc, record, plan, truth, figures)
    _report_diagnostic(doc, record, plan, figures)
    _report_density(doc, record, plan, truth)
    _report_packing(doc, record, plan)
    _report_scale(doc, record, plan)
    doc.h(2, "Reproduce")
    doc.p(
        "Every command of this study is in `commands.sh` (dependency order); each step's full output is in "
        "`logs/<step>.log`. Rerunning `python run_study.py` with the same preset skips finished steps."
    )
    md, page = out / "report.md", out / "report.html"
    write_text_atomic(md, doc.markdown())
    write_text_atomic(page, doc.html(f"Study report ({preset.name})"))
    write_json_atomic(out / "report.json", record)
    return {"md": md, "html": page, "json": out / "report.json"}


def _report_machine(doc: ReportDoc, record: dict, plan: Plan, timings: dict, wall_s: float) -> None:
    import platform

    steps_total = sum(timings.get(s.id, 0.0) for s in plan.steps)
    device = "CPU"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the report must not fail on a device query
        pass
    run = _read_json(Path(plan.out) / "timings.json") or {}
    samples = run.get("load_average_samples") or []
    load = {"mean": sum(samples) / len(samples), "min": min(samples), "max": max(samples)} if samples else None
    record["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "steps_wall_s": run.get("wall_s_this_invocation"),
        "jobs": run.get("jobs"),
        "load_average": load,
        "step_seconds_total": steps_total,
        "step_seconds": {s.id: timings.get(s.id) for s in plan.steps},
    }
    by_kind: dict[str, list[float]] = {}
    for s in plan.steps:
        if s.id in timings:
            by_kind.setdefault(s.kind, []).append(timings[s.id])
    rows = [[k, len(v), _f(sum(v), ".0f"), _f(max(v), ".0f")] for k, v in by_kind.items()]
    doc.h(2, "Run")
    text = f"Machine: {os.cpu_count()} CPU cores, device {device}, {platform.platform()}. "
    if run.get("wall_s_this_invocation") is not None:
        text += (
            f"The last invocation that ran steps took {_fmt_time(run['wall_s_this_invocation'])} (wall), "
            f"{run.get('jobs')} steps at a time; the steps took {_fmt_time(steps_total)} in all. "
        )
    if load:
        text += (
            f"1-minute load average while it ran: mean {load['mean']:.1f} (min {load['min']:.1f}, max "
            f"{load['max']:.1f}), the study's own {run.get('jobs')} jobs included: above {run.get('jobs')} means "
            "other work shared the machine and the times above are longer than on a quiet one."
        )
    doc.p(text)
    doc.table(["step kind", "steps", "seconds (sum)", "seconds (longest)"], rows)


def _report_world(doc: ReportDoc, record: dict, plan: Plan, truth: dict) -> None:
    out = Path(plan.out)
    world = _read_json(out / "world" / "world.json") or {}
    base_stats = _read_json(out / "base" / "data_stats.json") or {}
    base_config = _read_json(out / "base" / "config.json") or {}
    doc.h(2, "The synthetic world and the model")
    args = world.get("arguments", {})
    doc.p(
        "A generated world with planted ground truth (`synthetic_world.py`): each target language has one synthetic "
        "culture whose places have one fact per relation (favourite dish, great festival, ...). Facts of the "
        "**high** tier are frequent in the English pretraining corpus and in the target corpus; facts of the **low** "
        f"tier are frequent in the target corpus and {args.get('low_resource_ratio', '?')}x rarer in English (the "
        "paper's Table 1 ratio for Tibetan culture is ~60x). Each question's four options are the answers of four "
        "facts with identical planted counts, so a model that knows nothing scores 0.25 whatever the frequencies."
    )
    rows = []
    for lang, tiers in truth["densities"].items():
        for tier, d in tiers.items():
            if tier == "all":
                continue
            rows.append(
                [lang, tier, d["facts"], d["en_statements"], d["tgt_statements"], _f(d["en_density"], ".2e"),
                 _f(d["tgt_density"], ".2e"), _f(d["tgt_over_en"], ".1f") if d["tgt_over_en"] else "∞"]
            )  # fmt: skip
    doc.table(
        ["language", "tier", "facts", "English statements", "target statements", "English density",
         "target density", "target / English"],
        rows,
    )  # fmt: skip
    params = _parameter_count(out / "base")
    record["sections"]["world"] = {
        "densities": truth["densities"],
        "base_params": params,
        "base_data_stats": base_stats,
    }
    tokens = base_stats.get("tokens") or base_stats.get("tokens_out")
    pre, cpt = plan.preset.pretrain, plan.preset.cpt
    seeds = sorted({r.seed for r in plan.runs})
    size = f"{params / 1e6:.2f}M parameters" if params else "size unknown"
    corpus = f"{world.get('en_corpus', {}).get('documents', '?')} documents"
    if isinstance(tokens, int):
        corpus += f", {tokens:,} tokens"
    doc.p(
        f"Base model: Qwen2 architecture, hidden {base_config.get('hidden_size', '?')}, "
        f"{base_config.get('num_hidden_layers', '?')} layers, vocabulary {base_config.get('vocab_size', '?')} ({size}), "
        f"pretrained on the English corpus ({corpus}) for {pre.get('max_steps')} steps of "
        f"{pre.get('per_device_train_batch_size')} x {pre.get('block_size')} tokens. Continual pretraining: "
        f"{cpt.get('max_steps')} steps of {cpt.get('per_device_train_batch_size')} x {cpt.get('block_size')} tokens "
        f"per run, a checkpoint every {cpt.get('save_steps')} steps, seeds {', '.join(map(str, seeds))}, English "
        f"replay {plan.preset.build.get('replay_ratio', 0):.0%} of the CPT tokens (sampled from the pretraining corpus)."
    )


def _parameter_count(model_dir: Path) -> int | None:
    """Parameters stored in a model's safetensors files (read from their headers; tied weights count once)."""
    total, found = 0, False
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
                found = True
    return total if found else None


def _copy_figure(source: Path, figures: Path, name: str) -> str | None:
    if not source.is_file():
        return None
    shutil.copyfile(source, figures / name)
    return f"figures/{name}"


def _base_accuracy(group: dict) -> dict[str, float]:
    accuracy = _read_json(Path(group["base_eval"]) / "accuracy.json")
    if not accuracy or not accuracy.get("checkpoints"):
        return {}
    return {stem: v["accuracy"] for stem, v in accuracy["checkpoints"][-1]["accuracy"].items()}


#: Ties above this share of a file's items are flagged (run_eval.py warns at the same rate).
TIE_FLAG_RATE = 0.05
TIE_RULES_TEXT = (
    "Two tie rules: **first** (the paper's: an exact tie for the best score goes to the first tied option, right or "
    "wrong) and **fractional** (the tie broken uniformly at random: 1/k credit for a k-way tie that includes the "
    "answer)."
)


def _final_accuracy(eval_dir: str) -> tuple[dict, dict] | None:
    """(accuracy.json, its last checkpoint's per-file accuracy) of a probing output, or None."""
    accuracy = _read_json(Path(eval_dir) / "accuracy.json")
    if not accuracy or not accuracy.get("checkpoints"):
        return None
    return accuracy, accuracy["checkpoints"][-1]


def _report_questions(doc: ReportDoc, record: dict, plan: Plan) -> None:
    """Per question file: where the answers sit, what always answering option 0 scores, and per model the tie rate
    and the accuracy under both tie rules at the final checkpoint (run_eval.py's accuracy.json)."""
    doc.h(2, "Questions: answer positions, ties and the two tie rules")
    doc.p(
        "Each option is scored by its loss and the lowest wins. "
        + TIE_RULES_TEXT
        + " Where the answers sit matters for the first rule: every exact tie goes to option 0, so a file whose "
        "answer is often option 0 rewards ties. Numbers from `accuracy.json` of each probing step (`run_eval.py`), "
        "at the final checkpoint; CPT settings are the mean over seeds."
    )
    section = record["sections"].setdefault("questions", {})
    for key, group in plan.groups.items():
        models = [("base model", "base", [group["base_eval"]])]
        for setting in group.get("settings", [name for name, _ in SETTINGS]):
            runs = [
                r
                for r in plan.runs
                if r.lang == group["lang"] and r.variant == group["variant"] and r.setting == setting
            ]
            models.append((f"CPT {setting.replace('_', ' ')}", setting, [r.eval_dir for r in runs]))
        finals = {name: [f for f in map(_final_accuracy, dirs) if f] for _, name, dirs in models}
        described = next((a["questions"] for found in finals.values() for a, _ in found), None)
        if not described:
            doc.p(f"{key}: no probing output found.")
            continue
        doc.h(3, key if plan.preset.synthetic else group["lang"])
        stems = [Path(q).stem for q in group["questions"] if Path(q).stem in described]
        file_rows, files = [], {}
        for stem in stems:
            info = described[stem]
            bias = info.get("position_bias") or {}
            shares = bias.get("answer_position_share", {})
            files[stem] = {"items": info.get("items"), "chance_accuracy": info.get("chance_accuracy"), **bias}
            file_rows.append(
                [stem, info.get("items"), ", ".join(f"{k}: {v:.2f}" for k, v in shares.items()),
                 _f(bias.get("always_first_accuracy")), _f(info.get("chance_accuracy"))]
            )  # fmt: skip
        doc.table(
            ["questions", "items", "share of answers at option position", "always option 0: acc.", "chance acc."],
            file_rows,
        )
        rows, entries, flagged = [], [], []
        for label, name, _ in models:
            found = finals[name]
            for stem in stems:
                per_seed = [entry["accuracy"][stem] for _, entry in found if stem in entry["accuracy"]]
                if not per_seed or any("accuracy_fractional" not in a for a in per_seed):
                    continue  # probed by a version without tie accounting

                def mean(field_name: str, per_seed: list = per_seed) -> float:
                    return sum(a[field_name] for a in per_seed) / len(per_seed)

                steps = sorted({entry["step"] for _, entry in found})
                entry = {
                    "model": name, "questions": stem, "seeds": len(per_seed), "final_steps": steps,
                    "ties": [a["ties"] for a in per_seed], "tie_rate": mean("tie_rate"),
                    "accuracy_first": mean("accuracy"), "accuracy_fractional": mean("accuracy_fractional"),
                    "ties_advantage": mean("ties_advantage"),
                }  # fmt: skip
                entries.append(entry)
                rows.append(
                    [label, stem, len(per_seed), ", ".join(map(str, steps)), _f(entry["tie_rate"]),
                     _f(entry["accuracy_first"]), _f(entry["accuracy_fractional"]), f"{entry['ties_advantage']:+.3f}"]
                )  # fmt: skip
                if entry["tie_rate"] > TIE_FLAG_RATE:
                    flagged.append(
                        f"{label}, {stem}: {entry['tie_rate']:.1%} of items tie for the best score (above "
                        f"{TIE_FLAG_RATE:.0%}): accuracy {entry['accuracy_first']:.3f} under the first rule, "
                        f"{entry['accuracy_fractional']:.3f} with ties broken at random; always option 0 scores "
                        f"{_f(files[stem].get('always_first_accuracy'))}."
                    )
        if rows:
            doc.table(
                ["model", "questions", "seeds", "final step", "tie rate", "acc. (first rule)",
                 "acc. (fractional rule)", "first − fractional"],
                rows,
            )  # fmt: skip
        doc.bullets(
            flagged or [f"Ties stay at or below {TIE_FLAG_RATE:.0%} of the items for every model and file here."]
            if rows
            else []
        )
        section[key] = {"files": files, "final": entries, "tie_flags": flagged}


def _report_transfer(doc: ReportDoc, record: dict, plan: Plan, truth: dict | None, figures: Path) -> None:
    from run_eval import analyse_direction

    doc.h(2, "Transfer: with minus without bridges (the paper's measurement)")
    doc.p(
        "Both settings train on exactly the same documents; with bridges each parallel pair shares one context "
        "window, without bridges its halves never do. The gap (accuracy with − without bridges) on target-language "
        "questions measures English → target transfer, on English questions target → English transfer. Intervals "
        "are 95% bootstrap intervals over questions and seed pairs (`run_eval.py` transfer analysis). "
        + TIE_RULES_TEXT
        + " Each table says which rule it uses; the base accuracies and the per-tier tables use the first rule."
    )
    section = record["sections"].setdefault("transfer", {})
    for key, group in plan.groups.items():
        lang, variant = group["lang"], group["variant"]
        result = _read_json(Path(group["transfer"]) / "transfer.json")
        title = f"{lang}, {VARIANT_TITLES.get(variant, variant)}" if plan.preset.synthetic else lang
        if len(group.get("settings", ["bridges", "no_bridges"])) < 2:
            doc.p(
                f"{title}: trained only {' and '.join(s.replace('_', ' ') for s in group['settings'])} (it serves "
                "the anchors-vs-control comparison below), so there is no with-minus-without analysis for it."
            )
            continue
        doc.h(3, title)
        if not result:
            doc.p(f"No transfer analysis found at `{group['transfer']}/transfer.json` (the step did not run).")
            continue
        prefix = f"{lang}-{variant}"
        for name in ("transfer_curves", "transfer_summary"):
            rel = _copy_figure(Path(group["transfer"]) / f"{name}.png", figures, f"{prefix}-{name}.png")
            if rel:
                caption = (
                    f"{title}: accuracy during CPT with (blue) and without (orange) bridges, Figure-3 style"
                    if name == "transfer_curves"
                    else f"{title}: mean gap over the curve per direction, Figure-1 style"
                )
                doc.img(rel, caption)
        base = _base_accuracy(group)
        rows, sentences, entries = [], [], []
        for language in result["languages"]:
            for d in language["directions"]:
                per_seed = ", ".join(f"{s['mean_gap']:+.3f}" for s in d["per_seed"])
                p_values = ", ".join(f"{m['p_value']:.3g}" for m in d["mcnemar_final"])
                rows.append(
                    [
                        _direction_words(d["direction"], language["lang"]),
                        _f(base.get(d["questions"])),
                        language["steps"][-1],
                        _f(d["accuracy_with"][-1]),
                        _f(d["accuracy_without"][-1]),
                        f"{d['final_gap']:+.3f} {_ci(d['final_gap_ci'])}",
                        f"{d['mean_gap']:+.3f} {_ci(d['mean_gap_ci'])}",
                        per_seed,
                        p_values,
                        d["verdict"],
                    ]
                )
                sentences.append(
                    _gap_sentence(
                        f"{_direction_words(d['direction'], language['lang'])}, mean gap over the curve",
                        d["mean_gap"],
                        d["mean_gap_ci"],
                        d["n_seed_pairs"],
                    )
                )
                spread = [s["mean_gap"] for s in d["per_seed"]]
                entries.append(
                    {
                        "direction": d["direction"],
                        "questions": d["questions"],
                        "base_accuracy": base.get(d["questions"]),
                        "final_step": language["steps"][-1],
                        "accuracy_with_final": d["accuracy_with"][-1],
                        "accuracy_without_final": d["accuracy_without"][-1],
                        "final_gap": d["final_gap"],
                        "final_gap_ci": d["final_gap_ci"],
                        "mean_gap": d["mean_gap"],
                        "mean_gap_ci": d["mean_gap_ci"],
                        "per_seed_mean_gaps": spread,
                        "mcnemar_p_final": [m["p_value"] for m in d["mcnemar_final"]],
                        "verdict": d["verdict"],
                        "tie_policy": result.get("tie_policy", "first"),
                        # both tie rules, as run_eval.py's transfer analysis computed them (absent: older outputs)
                        "tie_policies": d.get("tie_policies"),
                        "tie_policies_differ": d.get("tie_policies_differ"),
                    }
                )
                if len(spread) > 1:
                    sentences[-1] += f" Per-seed mean gaps range from {min(spread):+.3f} to {max(spread):+.3f}."
        doc.table(
            ["direction", "base acc.", "final step", "acc. with", "acc. without", "final gap [95% CI]",
             "mean gap over curve [95% CI]", "per-seed mean gaps", "McNemar p (final, per seed)", "verdict"],
            rows,
        )  # fmt: skip
        doc.bullets(sentences)
        _report_tie_rules(doc, entries, lang, result.get("tie_policy", "first"))
        group_record = {"transfer_json": str(Path(group["transfer"]) / "transfer.json"), "directions": entries}
        # Per tier: the same analysis (run_eval.analyse_direction) on the questions of each tier.
        runs = [r for r in plan.runs if r.lang == lang and r.variant == variant]
        if truth and runs and all((Path(r.eval_dir) / "accuracy.json").is_file() for r in runs):
            stems = [Path(q).stem for q in reversed(group["questions"])]  # target-language questions first
            steps, cubes = _load_cubes(runs, stems)
            tiers = _tier_indices(truth, lang)
            tier_rows, tier_entries = [], []
            seeds = sorted({r.seed for r in runs})
            for stem in stems:
                question_lang = stem.rsplit("_", 1)[1]
                direction = f"en->{lang}" if question_lang == lang else f"{lang}->en"
                for tier, indices in sorted(tiers.items()):
                    with_cube = _stack(cubes, runs, "bridges", seeds, stem, indices)
                    without_cube = _stack(cubes, runs, "no_bridges", seeds, stem, indices)
                    stats = analyse_direction(with_cube, without_cube, 1000, 0, 0.95)
                    tier_rows.append(
                        [_direction_words(direction, lang), tier, len(indices),
                         _f(float(sum(stats["accuracy_with"]) / len(steps))),
                         _f(float(sum(stats["accuracy_without"]) / len(steps))),
                         f"{stats['mean_gap']:+.3f} {_ci(stats['mean_gap_ci'])}", stats["verdict"]]
                    )  # fmt: skip
                    tier_entries.append(
                        {"direction": direction, "tier": tier, "questions": len(indices),
                         "mean_gap": stats["mean_gap"], "mean_gap_ci": stats["mean_gap_ci"], "verdict": stats["verdict"]}
                    )  # fmt: skip
            doc.p("The same gap per tier of facts (high: frequent in English and target; low: rare in English):")
            doc.table(
                [
                    "direction",
                    "tier",
                    "questions",
                    "mean acc. with",
                    "mean acc. without",
                    "mean gap [95% CI]",
                    "verdict",
                ],
                tier_rows,
            )
            group_record["tiers"] = tier_entries
        section[key] = group_record


def _report_tie_rules(doc: ReportDoc, entries: list[dict], lang: str, tie_policy: str) -> None:
    """Which tie rule the transfer table uses, and the analysis under both rules where they differ."""
    known = [e for e in entries if e.get("tie_policies")]
    if not known:
        doc.p(
            f"Tie rule of the table above: **{tie_policy}**. This transfer analysis records no second tie rule (it was "
            "written by an earlier run_eval.py); rerun its step for both."
        )
        return
    differ = [e for e in known if e["tie_policies_differ"]]
    whose = " (the paper's)" if tie_policy == "first" else " (the paper's is first)"
    if not differ:
        doc.p(
            f"Tie rule of the table above: **{tie_policy}**{whose}. The two tie rules give the same "
            "curves, gaps and verdicts here: no exact tie for the best score changes a number of this analysis."
        )
        return
    doc.p(
        f"Tie rule of the table above: **{tie_policy}**{whose}. Ties change this analysis; under both "
        "rules (the McNemar test always counts first-rule correctness):"
    )
    rows = []
    for e in differ:
        for policy, p in e["tie_policies"].items():
            rows.append(
                [_direction_words(e["direction"], lang), policy, _f(p["accuracy_with"][-1]),
                 _f(p["accuracy_without"][-1]), f"{p['final_gap']:+.3f}", f"{p['mean_gap']:+.3f} {_ci(p['mean_gap_ci'])}",
                 p["verdict"]]
            )  # fmt: skip
    doc.table(
        ["direction", "tie rule", "acc. with (final)", "acc. without (final)", "final gap", "mean gap [95% CI]",
         "verdict"],
        rows,
    )  # fmt: skip


def _stack(cubes: dict, runs: list[Run], setting: str, seeds: list[int], stem: str, indices: list[int]):
    """seeds x steps x questions (the given question indices) for one setting, seeds in order."""
    import numpy as np

    by_seed = {r.seed: r for r in runs if r.setting == setting}
    return np.stack([cubes[by_seed[s].name][stem][:, indices] for s in seeds])


def _report_anchors(doc: ReportDoc, record: dict, plan: Plan, truth: dict, figures: Path) -> None:
    import numpy as np

    from run_eval import analyse_direction, read_eval_output

    doc.h(2, "Anchors vs control: shared entity names and the frequency asymmetry")
    doc.p(
        "The same study run twice on worlds that differ only in how the target language writes names: in its own "
        "script (control: nothing is shared with English but what parallel pairs teach) or with the very same "
        "Latin names as English (anchors). Difference = accuracy with anchors − accuracy in the control, mean over "
        "the CPT curve, per tier of facts; 95% bootstrap intervals over questions and seed pairs "
        "(`run_eval.analyse_direction`); where both variants ran both CPT settings, pooled over them and per "
        "setting, else in the one setting both ran."
    )
    section = record["sections"].setdefault("anchors", {})
    for lang in sorted({g["lang"] for g in plan.groups.values()}):
        native = [r for r in plan.runs if r.lang == lang and r.variant == "native"]
        anchors = [r for r in plan.runs if r.lang == lang and r.variant == "anchors"]
        if (
            not native
            or not anchors
            or not all((Path(r.eval_dir) / "accuracy.json").is_file() for r in native + anchors)
        ):
            doc.p(f"{lang}: probing results of both variants are missing; nothing to compare.")
            continue
        stems = [f"{lang}-culture-cloze_{lang}", f"{lang}-culture-cloze_en"]
        steps_n, cubes_n = _load_cubes(native, stems)
        steps_a, cubes_a = _load_cubes(anchors, stems)
        steps = sorted(set(steps_n) & set(steps_a))
        pick_n = [steps_n.index(s) for s in steps]
        pick_a = [steps_a.index(s) for s in steps]
        tiers = _tier_indices(truth, lang)
        seeds = sorted({r.seed for r in native} & {r.seed for r in anchors})
        rows, entries, curves = [], [], {}
        shared = [
            name
            for name, _ in SETTINGS
            if any(r.setting == name for r in native) and any(r.setting == name for r in anchors)
        ]
        for stem in stems:
            question_lang = stem.rsplit("_", 1)[1]
            direction = f"en->{lang}" if question_lang == lang else f"{lang}->en"
            for tier, indices in sorted(tiers.items()):
                primary = "pooled" if len(shared) > 1 else shared[0]
                for setting in [primary] + (shared if len(shared) > 1 else []):
                    settings = shared if setting == "pooled" else [setting]
                    a = np.concatenate([_stack(cubes_a, anchors, s, seeds, stem, indices)[:, pick_a] for s in settings])
                    n = np.concatenate([_stack(cubes_n, native, s, seeds, stem, indices)[:, pick_n] for s in settings])
                    stats = analyse_direction(a, n, 1000, 0, 0.95)
                    acc_a, acc_n = float(np.mean(stats["accuracy_with"])), float(np.mean(stats["accuracy_without"]))
                    if setting == primary:
                        curves[(question_lang, tier)] = (stats["accuracy_with"], stats["accuracy_without"])
                    rows.append(
                        [_direction_words(direction, lang), tier, setting.replace("_", " "), len(indices), a.shape[0],
                         _f(acc_a), _f(acc_n), f"{stats['mean_gap']:+.3f} {_ci(stats['mean_gap_ci'])}", stats["verdict"]]
                    )  # fmt: skip
                    entries.append(
                        {"direction": direction, "tier": tier, "setting": setting, "questions": len(indices),
                         "run_pairs": int(a.shape[0]), "accuracy_anchors": acc_a, "accuracy_control": acc_n,
                         "difference": stats["mean_gap"], "difference_ci": stats["mean_gap_ci"],
                         "final_difference": stats["final_gap"], "final_difference_ci": stats["final_gap_ci"],
                         "verdict": stats["verdict"]}
                    )  # fmt: skip
        doc.h(3, f"{lang}: anchors − control")
        rel = _plot_anchors(lang, steps, curves, plan, truth, figures, read_eval_output)
        if rel:
            which = " and ".join(x.replace("_", " ") for x in shared)
            doc.img(rel, f"{lang}: accuracy during CPT with shared Latin names (anchors) and native-script names "
                         f"(control), mean over seeds ({which}); step 0 is the base model")  # fmt: skip
        doc.table(
            ["direction", "tier", "CPT setting", "questions", "run pairs", "mean acc. anchors", "mean acc. control",
             "difference [95% CI]", "verdict"],
            rows,
        )  # fmt: skip
        primary = "pooled" if len(shared) > 1 else shared[0]
        pooled = {(e["direction"], e["tier"]): e for e in entries if e["setting"] == primary}
        conclusions = _anchor_conclusions(lang, pooled)
        asymmetry = next((c for c in conclusions if "asymmetry" in c), "")
        doc.bullets(conclusions)
        section[lang] = {"steps": steps, "comparisons": entries, "conclusions": conclusions, "asymmetry": asymmetry}


def _anchor_conclusions(lang: str, pooled: dict) -> list[str]:
    """Sentences about the asymmetry, each only as strong as its intervals."""
    sentences = []
    high, low = pooled.get((f"en->{lang}", "high")), pooled.get((f"en->{lang}", "low"))
    for entry, what in ((high, "facts frequent in English"), (low, "facts rare in English")):
        if entry:
            sentences.append(
                _gap_sentence(
                    f"English → {lang} ({lang} questions), {what}: anchors − control",
                    entry["difference"],
                    entry["difference_ci"],
                    entry["run_pairs"],
                )
            )
    if high and low:
        if high["difference_ci"][0] > 0 and high["difference_ci"][0] > low["difference_ci"][1]:
            sentences.append(
                f"Frequency asymmetry (English → {lang}): shared names carried facts frequent in English into {lang} "
                f"({high['difference']:+.3f}) more than facts rare in English ({low['difference']:+.3f}); the "
                "intervals do not overlap."
            )
        else:
            sentences.append(
                f"No evidence here of a frequency asymmetry English → {lang}: the high-tier interval "
                f"{_ci(high['difference_ci'])} does not lie above 0 and above the low-tier interval {_ci(low['difference_ci'])}."
            )
    reverse = pooled.get((f"{lang}->en", "low"))
    if reverse:
        sentences.append(
            _gap_sentence(
                f"{lang} → English (English questions), facts rare in English and frequent in {lang}: anchors − control",
                reverse["difference"],
                reverse["difference_ci"],
                reverse["run_pairs"],
            )
        )
    return sentences


def _plot_anchors(lang, steps, curves, plan, truth, figures, read_eval_output) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    base = {}
    for variant in ("anchors", "native"):
        group = plan.groups.get(f"{lang}/{variant}")
        if group and (Path(group["base_eval"]) / "accuracy.json").is_file():
            _, by_stem = read_eval_output(Path(group["base_eval"]))
            base[variant] = {stem: next(iter(v.values())) for stem, v in by_stem.items() if v}
    tiers = _tier_indices(truth, lang)
    fig, axes = plt.subplots(2, len(tiers), figsize=(5 * len(tiers), 6.4), squeeze=False, sharey=True)
    for r, question_lang in enumerate((lang, "en")):
        stem = f"{lang}-culture-cloze_{question_lang}"
        for c, tier in enumerate(sorted(tiers)):
            ax = axes[r, c]
            anchors_curve, control_curve = curves[(question_lang, tier)]
            for variant, values, color in (("anchors", anchors_curve, "#2ca02c"), ("native", control_curve, "#7f7f7f")):
                xs, ys = list(steps), list(values)
                if variant in base and stem in base[variant]:
                    xs, ys = [0, *xs], [float(np.mean(base[variant][stem][tiers[tier]])), *ys]
                label = "anchors (shared Latin names)" if variant == "anchors" else "control (native-script names)"
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
            ax.axhline(0.25, color="black", linewidth=0.6, linestyle=":")
            direction = f"English → {lang}" if question_lang == lang else f"{lang} → English"
            tier_words = "frequent in English" if tier == "high" else "rare in English"
            ax.set_title(f"{question_lang} questions ({direction}), {tier} tier: {tier_words}", fontsize=9)
            ax.set_xlabel("CPT step")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("cloze accuracy")
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{lang}: shared names vs native names (dotted: chance)", fontsize=10)
    fig.tight_layout()
    name = f"{lang}-anchors_vs_control.png"
    tmp = figures / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, figures / name)
    plt.close(fig)
    return f"figures/{name}"


def _report_diagnostic(doc: ReportDoc, record: dict, plan: Plan, figures: Path) -> None:
    doc.h(2, "Bridge diagnostic: does the model use the English side in context?")
    doc.p(
        "On held-out parallel pairs (never trained on), the mean token loss of the target side alone, after its own "
        "English side, and after another pair's English side (`run_eval.py --diagnostic_pairs`), at the final "
        "checkpoint, mean over seeds. If the model learned to read a bridge, the loss after its own English side "
        "falls below the loss alone and the mismatched English side does not help."
    )
    section = record["sections"].setdefault("diagnostic", {})
    rows, sentences = [], []
    curves = {}
    for key, group in plan.groups.items():
        for setting, _ in SETTINGS:
            runs = [
                r
                for r in plan.runs
                if r.lang == group["lang"] and r.variant == group["variant"] and r.setting == setting
            ]
            results = [_read_json(Path(r.eval_dir) / "bridge_diagnostic.json") for r in runs]
            results = [x for x in results if x and x.get("checkpoints")]
            if not results:
                continue
            finals = [_diagnostic_losses(x["checkpoints"][-1]) for x in results]
            # the side a pair shows first (English unless the runs used --pair_order tgt_first/random)
            context = {"en": "English side"}.get(results[0].get("context_side", "en"), "other side")
            mean = {
                k: sum(f[k] for f in finals) / len(finals)
                for k in ("alone", "after_own_context", "after_mismatched_context")
            }
            own_gain = [f["after_own_context"] - f["alone"] for f in finals]
            entry = {
                "setting": setting,
                "seeds": len(finals),
                "final_step": finals[0]["step"],
                **mean,
                "own_minus_alone_per_seed": own_gain,
                "mismatched_minus_alone": mean["after_mismatched_context"] - mean["alone"],
            }
            section.setdefault(key, []).append(entry)
            curves[(key, setting)] = results
            rows.append(
                [key, setting.replace("_", " "), len(finals), finals[0]["step"], _f(mean["alone"]),
                 _f(mean["after_own_context"]), _f(mean["after_mismatched_context"]),
                 ", ".join(f"{g:+.3f}" for g in own_gain)]
            )  # fmt: skip
            if setting == "bridges":
                uses = all(g < -0.05 for g in own_gain) and mean["after_mismatched_context"] > mean["after_own_context"]
                verb = (
                    f"the model learned to use the {context} in context"
                    if uses
                    else f"no consistent sign that the model uses the {context} in context"
                )
                sentences.append(
                    f"{key}, with bridges: target loss {mean['alone']:.3f} alone, {mean['after_own_context']:.3f} after "
                    f"its own {context} (per seed {', '.join(f'{g:+.3f}' for g in own_gain)}), "
                    f"{mean['after_mismatched_context']:.3f} after a mismatched one: {verb}."
                )
    if not rows:
        doc.p("No bridge diagnostic outputs found.")
        return
    doc.table(
        ["run group", "CPT setting", "seeds", "step", "loss alone", "after own English", "after mismatched English",
         "own − alone (per seed)"],
        rows,
    )  # fmt: skip
    doc.bullets(sentences)
    rel = _plot_diagnostic(curves, figures)
    if rel:
        doc.img(rel, "Bridge diagnostic during CPT (mean over seeds): target-side loss in three contexts")


def _diagnostic_losses(entry: dict) -> dict:
    """The three losses of a bridge_diagnostic.json checkpoint (outputs made before the pair order was followed
    name the context English)."""
    return {
        **entry,
        "after_own_context": entry.get("after_own_context", entry.get("after_own_english")),
        "after_mismatched_context": entry.get("after_mismatched_context", entry.get("after_mismatched_english")),
    }


def _plot_diagnostic(curves: dict, figures: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = sorted({k for k, _ in curves}, key=lambda k: (k.split("/")[1] != "native", k))  # the control first
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    for c, key in enumerate(keys):
        ax = axes[0, c]
        for setting, style in (("bridges", "-"), ("no_bridges", "--")):
            results = curves.get((key, setting))
            if not results:
                continue
            steps = [e["step"] for e in results[0]["checkpoints"]]
            for measure, color in (
                ("alone", "#7f7f7f"),
                ("after_own_context", "#1f77b4"),
                ("after_mismatched_context", "#d62728"),
            ):
                values = np.mean(
                    [[_diagnostic_losses(e)[measure] for e in x["checkpoints"][: len(steps)]] for x in results], axis=0
                )
                ax.plot(steps, values, style, color=color, marker="o", markersize=2.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("CPT step")
        ax.set_ylabel("target-side loss (nats/token)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=color, label=label)
        for color, label in (("#7f7f7f", "alone"), ("#1f77b4", "after its own English side"),
                             ("#d62728", "after a mismatched English side"))
    ] + [Line2D([], [], color="black", linestyle=style, label=label)
         for style, label in (("-", "trained with bridges"), ("--", "trained without bridges"))]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    name = "bridge_diagnostic.png"
    tmp = figures / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, figures / name)
    plt.close(fig)
    return f"figures/{name}"


def _report_density(doc: ReportDoc, record: dict, plan: Plan, truth: dict | None) -> None:
    doc.h(2, "Cultural density: measured vs planted")
    doc.p(
        "`run_density.py` retrieves the top-k BM25 documents of each question (filled with its answer) from a corpus "
        "and counts those its lexical judge says state the fact; density = occurrences / documents (the paper's "
        "Table 1)."
        + (
            " The synthetic world knows the true count of every fact in every corpus (`world/truth.json`)."
            if truth
            else ""
        )
    )
    section = record["sections"].setdefault("density", {})
    for key, group in plan.groups.items():
        result = _read_json(Path(group["density"]) / "density.json")
        lang = group["lang"]
        if not result and len(group.get("settings", ["bridges", "no_bridges"])) < 2:
            continue  # no density step for a group that serves only the anchors comparison
        if not result:
            doc.p(f"{key}: no density output at `{group['density']}/density.json`.")
            continue
        doc.h(3, f"{key}")
        measured: dict[tuple[str, str], dict[int, int]] = {}
        for entry in result["questions"]:
            measured.setdefault((entry["questions"], entry["corpus"]), {})[entry["index"]] = entry["occurrences"]
        rows, entries = [], []
        for row in result["table"]:
            question_lang = row["questions"].rsplit("_", 1)[1]
            planted_key = question_lang if truth else None
            corpus_lang = row["corpus"]
            comparable = truth and question_lang == corpus_lang
            planted = [r["counts"][planted_key] for r in truth["questions"][lang]] if comparable else None
            got = measured.get((row["questions"], row["corpus"]), {})
            entry = {"questions": row["questions"], "corpus": row["corpus"], "documents": row["documents"],
                     "occurrences": row["occurrences"], "density": row["density"]}  # fmt: skip
            cells = [
                row["questions"],
                row["corpus"],
                f"{row['documents']:,}",
                row["occurrences"],
                _f(row["density"], ".3e"),
            ]
            if planted is not None:
                exact = sum(1 for i, c in enumerate(planted) if got.get(i) == min(c, result["setting"]["top_k"]))
                error = sum(abs(got.get(i, 0) - c) for i, c in enumerate(planted)) / len(planted)
                planted_total = sum(planted)
                entry.update(planted_occurrences=planted_total, planted_density=planted_total / row["documents"],
                             questions_exact=exact, questions_planted=len(planted), mean_abs_error=error)  # fmt: skip
                cells += [
                    planted_total,
                    _f(planted_total / row["documents"], ".3e"),
                    f"{exact}/{len(planted)}",
                    _f(error, ".2f"),
                ]
            else:
                cells += ["–", "–", "–", "–"]
            rows.append(cells)
            entries.append(entry)
        doc.table(
            ["questions", "corpus", "documents", "measured occurrences", "measured density", "planted occurrences",
             "planted density", "questions exact", "mean |error| per question"],
            rows,
        )  # fmt: skip
        if truth:
            tier_rows = []
            tiers = _tier_indices(truth, lang)
            for tier, indices in sorted(tiers.items()):
                cells = [tier, len(indices)]
                for question_lang in ("en", lang):
                    stem = f"{lang}-culture-cloze_{question_lang}"
                    got = measured.get((stem, question_lang), {})
                    docs = next((r["documents"] for r in result["table"] if r["corpus"] == question_lang), None)
                    planted = sum(truth["questions"][lang][i]["counts"][question_lang] for i in indices)
                    found = sum(got.get(i, 0) for i in indices)
                    cells += [f"{found} / {planted}", _f(found / docs, ".2e") if docs else "–"]
                tier_rows.append(cells)
            doc.p("Per tier (Table-1 style), measured / planted occurrences and measured density:")
            doc.table(
                [
                    "tier",
                    "questions",
                    "English corpus: occ.",
                    "English density",
                    f"{lang} corpus: occ.",
                    f"{lang} density",
                ],
                tier_rows,
            )
        analysis = result.get("instance_analysis")
        if analysis and analysis.get("results"):
            doc.p(
                "Instance-level analysis (`run_density.py`, first seed, final checkpoint): mean occurrences in the "
                "source corpus of items that transferred (right with bridges, wrong without) vs all items."
            )
            doc.table(
                ["questions", "source corpus", "items", "transferred", "mean occ. transferred", "mean occ. all"],
                [
                    [r["questions"], r["source_corpus"], r["items"], r["transferred"],
                     _f(r["mean_occurrences_transferred"], ".2f"), _f(r["mean_occurrences_all"], ".2f")]
                    for r in analysis["results"]
                ],
            )  # fmt: skip
        section[key] = {"density_json": str(Path(group["density"]) / "density.json"), "rows": entries,
                        "instance_analysis": (analysis or {}).get("results")}  # fmt: skip


def _report_packing(doc: ReportDoc, record: dict, plan: Plan) -> None:
    doc.h(2, "Packing audits: the two settings differ only in co-location")
    doc.p(
        "Each CPT run writes `packing_audit.json` before training (`run_cpt.py`). With bridges every pair must be "
        "co-located (100%), without bridges none (0%), and both settings of a seed must pack the same multiset of "
        "tokens and see the same documents (equal hashes across the two actual runs)."
    )
    rows, entries = [], []
    hashes: dict[tuple, dict[str, tuple]] = {}
    for run in plan.runs:
        audit = _read_json(Path(run.dir) / "packing_audit.json")
        if not audit:
            continue
        pairs, digests = audit.get("pairs", {}), audit.get("hashes", {})
        digest = (digests.get("tokens_multiset_sha256"), digests.get("documents_seen_sha256"))
        hashes.setdefault((run.lang, run.variant, run.seed), {})[run.setting] = digest
        share = pairs.get("co_located_percent")
        rows.append(
            [run.name, pairs.get("total"), pairs.get("co_located"), pairs.get("split"), _f(share, ".0f"),
             str(digest[0])[:12], str(digest[1])[:12], _f(audit.get("real_token_fraction"), ".3f"),
             audit.get("windows"), audit.get("guarantees_hold"), "; ".join(audit.get("unchecked") or []) or "none"]
        )  # fmt: skip
        entries.append(
            {"run": run.name, "setting": run.setting, "pairs_total": pairs.get("total"),
             "pairs_co_located": pairs.get("co_located"), "pairs_split": pairs.get("split"),
             "co_located_percent": share, "tokens_multiset_sha256": digest[0], "documents_seen_sha256": digest[1],
             "real_token_fraction": audit.get("real_token_fraction"), "windows": audit.get("windows"),
             "guarantees_hold": audit.get("guarantees_hold"), "unchecked": audit.get("unchecked") or []}
        )  # fmt: skip
    if not rows:
        doc.p("No packing audits found.")
        return
    doc.table(
        ["run", "pairs", "co-located", "split", "co-located %", "token multiset hash", "documents-seen hash",
         "real-token fraction", "windows", "audit: guarantees hold", "unchecked guarantees"],
        rows,
    )  # fmt: skip
    colocation_ok = all(e["co_located_percent"] == (100.0 if e["setting"] == "bridges" else 0.0) for e in entries)
    pairs_of_runs = [v for v in hashes.values() if len(v) == 2]
    equal_hashes = bool(pairs_of_runs) and all(
        len(set(v.values())) == 1 and None not in next(iter(v.values())) for v in pairs_of_runs
    )
    unchecked = [e for e in entries if e["unchecked"]]
    guarantees_hold = all(e["guarantees_hold"] is True for e in entries)
    doc.bullets(
        [
            "Co-location: " + ("every with-bridges run 100%, every without-bridges run 0%." if colocation_ok else
                               "**NOT as required** (see the table): the comparison is not valid."),
            "Same tokens and documents in both settings: " + (
                "equal hashes for every seed pair of actual runs." if equal_hashes
                else "**hashes differ or are missing** for some seed pair."),
            "Every run's audit: " + ("all guarantees checked and holding." if guarantees_hold else
                                     "**guarantees not all shown to hold** (`guarantees_hold` false or absent)."),
        ]
        + [
            f"**{e['run']}: unchecked**, so not shown to hold: {'; '.join(e['unchecked'])}."
            for e in unchecked
        ]
    )  # fmt: skip
    record["sections"]["packing"] = {"runs": entries, "colocation_ok": colocation_ok, "equal_hashes": equal_hashes,
                                     "guarantees_hold": guarantees_hold,
                                     "unchecked": {e["run"]: e["unchecked"] for e in unchecked}}  # fmt: skip


def _report_scale(doc: ReportDoc, record: dict, plan: Plan) -> None:
    doc.h(2, "What this scale can and cannot show")
    sections = record["sections"]
    items = []
    if plan.preset.synthetic:
        verdicts = [d["verdict"] for g in sections.get("transfer", {}).values() for d in g.get("directions", [])]
        if verdicts and all(v == "no evidence" for v in verdicts):
            items.append(
                "No with-minus-without gap excludes 0 here. This is not evidence against the paper: a model of this "
                "size on a synthetic language is far below the scale where the paper measured transfer through "
                "bridges; it only shows that at this scale bridges do not turn into measurable transfer."
            )
        elif verdicts:
            shown = sorted({v for v in verdicts})
            items.append(
                f"Verdicts of the with-minus-without gaps here: {', '.join(shown)} (see the transfer tables for which "
                "direction). A synthetic world and a small model make this a demonstration of the method, not a "
                "replication of the paper's numbers."
            )
        diag = sections.get("diagnostic", {})
        learned = [
            e for entries in diag.values() for e in entries if e["setting"] == "bridges" and e["own_minus_alone_per_seed"]
            and all(g < -0.05 for g in e["own_minus_alone_per_seed"])
        ]  # fmt: skip
        if learned:
            items.append(
                "What it can show: the bridge diagnostic shows the model reading the English side of a pair in "
                "context, so whether knowledge then transfers is a separate question that accuracy gaps answer."
            )
        anchors = sections.get("anchors", {})
        for entry in anchors.values():
            items.append("What it can show with shared names: " + entry["asymmetry"])
        packing = sections.get("packing")
        if packing:
            items.append(
                "The guarantees of the comparison on this run: "
                + ("co-location 100/0 and " if packing["colocation_ok"] else "co-location NOT 100/0 and ")
                + ("equal document multisets" if packing["equal_hashes"] else "document multisets NOT equal")
                + (
                    "; every audit checked all its guarantees."
                    if packing["guarantees_hold"]
                    else f"; NOT every guarantee was checked (unchecked in {', '.join(packing['unchecked']) or '?'})."
                )
            )
        items.append(
            "What it cannot show: how large the effects are in real languages and real models; with "
            f"{len({r.seed for r in plan.runs})} seeds the intervals are wide, and facts are memorised at a step "
            "that moves from seed to seed, which swings single-run gaps; use `--preset gpu-small` or `--preset paper` "
            "for larger scales."
        )
    else:
        items.append("Paper scale: read the tables above against the paper's Figure 3 and Table 1.")
    doc.bullets(items)
    record["sections"]["scale"] = items


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(StudyArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.preset not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(PRESETS)} (got {args.preset!r})")
    preset = PRESETS[args.preset]
    if args.hub_org and preset.synthetic:
        parser.error("--hub_org applies to the paper preset only (synthetic presets never touch the Hub)")
    if args.variants and not preset.synthetic:
        parser.error("--variants applies to the synthetic presets only")
    for setting in args.anchor_settings or []:
        if setting not in dict(SETTINGS):
            parser.error(f"--anchor_settings: unknown setting {setting!r} (bridges, no_bridges)")
    for variant in args.variants or []:
        if variant not in VARIANT_TITLES:
            parser.error(f"--variants: unknown variant {variant!r} (native, anchors)")
    seeds = args.seeds if args.seeds is not None else preset.seeds
    if not seeds:
        parser.error("--seeds: give at least one seed")
    smoke_cuts: list[str] = []
    if args.smoke:
        preset, smoke_cuts = smoke_preset(preset, on_gpu=_cuda_available())
    out = Path(args.output_dir or REPO_DIR / "study_runs" / (preset.name + ("-smoke" if args.smoke else ""))).resolve()
    # Steps run from the repository root; paths inside it are written relative to it (readable commands).
    os.chdir(REPO_DIR)
    if out.is_relative_to(REPO_DIR):
        out = out.relative_to(REPO_DIR)
    plan = build_plan(args, preset, out)
    jobs = args.jobs or preset.jobs
    estimate = estimate_seconds(plan, jobs)

    print(f"Study preset {preset.name!r}: {preset.description}")
    print(f"Output: {out}")
    if args.smoke:
        print("Smoke run: every step of the plan, only these budgets cut:\n  " + "\n  ".join(smoke_cuts))
    counts = {}
    for step in plan.steps:
        counts[step.kind] = counts.get(step.kind, 0) + 1
    print(
        "Steps: " + ", ".join(f"{k} x{v}" for k, v in counts.items()) + f" ({len(plan.steps)} in all), {jobs} at a time"
    )
    if preset.budget_s:
        print(
            f"Time budget: {_fmt_time(preset.budget_s)} on {preset.reference_machine}; estimated "
            f"{_fmt_time(estimate)} for this plan."
        )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        cores = os.cpu_count() or 1
        if load > 0.5 * cores:
            print(f"Note: the machine is busy (load {load:.1f} on {cores} cores): expect it to take longer.")
    if args.dry_run:
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
        return 0
    problem = None if args.report_only else _missing_inputs_message(plan, args)
    if problem:
        print(f"run_study.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        lock = _lock_output_dir(out)  # held until this process ends
    except StudyBusyError as err:
        print(f"run_study.py: error: {err}", file=sys.stderr)
        return 2
    try:
        write_text_atomic(out / "commands.sh", commands_script(plan, args))
        write_json_atomic(out / "plan.json", _plan_record(plan, args))
        started = time.time()
        # A scheduler's or `timeout`'s SIGTERM stops the study like Ctrl-C: running steps are stopped, not orphaned.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        if not args.report_only:
            try:
                StudyRunner(plan, jobs, args.force, preset.budget_s).run()
            except KeyboardInterrupt:
                return 130
            except StudyBusyError as err:
                print(f"run_study.py: error: {err}", file=sys.stderr)
                return 2
            except RuntimeError as err:
                print(f"\n{err}", file=sys.stderr)
                return 1
        paths = write_report(plan, time.time() - started)
        print(f"Study finished in {_fmt_time(time.time() - started)}. Report: {paths['md']} and {paths['html']}")
        return 0
    finally:
        os.close(lock)  # the kernel drops the lock with it


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
            "has them: give your own files with --paper_data FILE.json (see PAPER_DATA in run_study.py)"
        )
    return ";\n".join(problems) or None


def _plan_record(plan: Plan, args: StudyArguments) -> dict:
    return {
        "preset": asdict(plan.preset),
        "arguments": asdict(args),
        "runs": [asdict(r) | {"name": r.name} for r in plan.runs],
        "groups": plan.groups,
        "steps": [asdict(s) for s in plan.steps],
    }


if __name__ == "__main__":
    sys.exit(main())
