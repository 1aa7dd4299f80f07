"""A study is a file: read it, check it against the step scripts' flags, override it with --set, expand a --sweep
into cells, cut its budgets for --smoke.

A study file (``configs/studies/NAME.yaml``; JSON is YAML too) holds what runs at the top level (the fields of
Preset) and one section per step script holding that script's flags by name (SECTIONS; ``data.LANG`` for a real
corpus). A flag the plan gives a script itself (paths, languages, seeds, the CPT setting: PLAN_SETS) is refused;
null leaves a flag at its script's default. Every key is checked where it is read, from the file or the command line
(checked_value)::

    python run_study.py --preset micro --set cpt.max_steps=120            # VALUE is YAML: 120, 1e-4, true, [0,1]
    python run_study.py --preset micro --set cpt.max_stps=120
        # run_study.py: error: --set cpt.max_stps=120: unknown key 'cpt.max_stps': run_cpt.py has no flag
        # --max_stps. Did you mean max_steps, save_steps, eval_steps, warmup_steps? The keys of cpt are ...
    python run_study.py --preset micro --sweep world.pair_mentions=2,3    # two cells; repeatable: the grid
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib
import itertools
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from study_common import InputError

REPO_DIR = Path(__file__).resolve().parent
STUDIES_DIR = REPO_DIR / "configs" / "studies"
#: The two CPT settings of every run pair; a study may add the mismatched-bridges control (docs/decomposition.md).
SETTINGS = ("bridges", "no_bridges")
CPT_SETTINGS = (*SETTINGS, "mismatched_bridges")
VARIANT_TITLES = {"native": "native-script names (control)", "anchors": "shared Latin names (anchors)"}


@dataclass
class Preset:
    """A study's configuration: what runs, and the flags of each step script, one section per script."""

    name: str  # the file's name
    description: str
    langs: list[str]
    seeds: list[int]
    jobs: int  # steps run at the same time (each with cores // jobs threads on CPU)
    budget_s: int  # what the study is designed to take on its reference machine (0: no budget)
    reference_machine: str
    variants: list[Literal["native", "anchors", "real"]] = field(default_factory=lambda: ["native", "anchors"])
    # CPT settings of every variant but anchors, and of the anchors variant
    settings: list[Literal["bridges", "no_bridges", "mismatched_bridges"]] = field(
        default_factory=lambda: list(SETTINGS)
    )
    anchor_settings: list[Literal["bridges", "no_bridges"]] = field(default_factory=lambda: list(SETTINGS))
    world: dict = field(default_factory=dict)  # synthetic_world.py flags
    pretrain: dict = field(default_factory=dict)  # run_pretrain.py flags
    build: dict = field(default_factory=dict)  # build_pairs.py flags
    cpt: dict = field(default_factory=dict)  # run_cpt.py flags
    eval: dict = field(default_factory=dict)  # run_eval.py flags
    transfer: dict = field(default_factory=dict)  # run_transfer.py flags
    density: dict = field(default_factory=dict)  # run_density.py flags
    data: dict = field(default_factory=dict)  # real corpora: per language, build_pairs.py's corpus and pair flags
    estimates_s: dict = field(default_factory=dict)  # expected seconds per step kind (reference machine)
    accelerate_config: str | None = None
    synthetic: bool = True


#: The sections of a study file: the script whose flags each holds, and the argument dataclasses that define them.
SECTIONS = {
    "world": ("synthetic_world", ("WorldArguments",)),
    "pretrain": ("run_pretrain", ("ModelArguments", "DataArguments", "TrainingArguments")),
    "build": ("build_pairs", ("BuildArguments",)),
    "cpt": ("run_cpt", ("CPTArguments", "TrainingArguments")),
    "eval": ("run_eval", ("EvalArguments",)),
    "transfer": ("run_transfer", ("TransferArguments",)),
    "density": ("run_density", ("DensityArguments",)),
    "data": ("build_pairs", ("BuildArguments",)),  # data.<lang>.<flag>
}
_HUB = {"push_to_hub", "hub_model_id", "hub_strategy", "hub_always_push", "hub_dataset_id", "resume_from_checkpoint"}
_DATA = {"mono_files", "mono_dataset", "mono_dataset_config", "mono_data_files", "pairs_files", "pairs_dataset",
         "pairs_dataset_config", "en_column", "tgt_column"}  # fmt: skip
_BUILD = {"lang", "output_dir", "seed", "tokenizer_name", "block_size", "replay_files", "replay_dataset",
          "replay_dataset_config", "eval_questions", *_HUB}  # fmt: skip
#: Flags the plan gives each script itself (paths, languages, runs, seeds; --hub_org's pushes): not configurable.
PLAN_SETS = {
    "world": {"output_dir", "langs", "seed", "name_variants"},
    "pretrain": {"output_dir", "seed", "train_tokenizer", "tokenizer_files", "train_file", *_HUB},
    "build": _BUILD | _DATA,
    "cpt": {"model_name_or_path", "dataset_path", "lang", *CPT_SETTINGS, "output_dir", "run_name", "seed", *_HUB},
    "eval": {"questions", "model_name_or_path", "diagnostic_pairs", "name_alignment", "item_tiers", "output_dir"},
    "transfer": {"with_bridges", "without_bridges", "mismatched_bridges", "item_tiers", "output_dir"},
    "density": {"questions", "corpus_files", "corpus_dataset", "corpus_dataset_config", "corpus_data_files",
                "corpus_streaming", "corpus_label", "source_corpus", "predictions_with", "predictions_without",
                "output_dir"},
    "data": _BUILD,
}  # fmt: skip
#: Top-level keys a sweep may not vary: they change how a study runs or is described, not what it measures.
NOT_SWEPT = ("jobs", "budget_s", "estimates_s", "description", "reference_machine")
#: Flags of run_study.py that set the configuration key of their name (--seeds 0 1 is --set seeds=[0,1]).
CONFIG_FLAGS = ("langs", "seeds", "variants", "anchor_settings", "jobs", "accelerate_config")
_STUDY_HINTS = {k: v for k, v in typing.get_type_hints(Preset).items() if k != "name"}
_REQUIRED = [f.name for f in dataclasses.fields(Preset)[1:] if dataclasses.MISSING is f.default is f.default_factory]


class _YamlLoader(yaml.SafeLoader):
    """YAML as a user writes it: 1e-4 is a float (plain PyYAML, after YAML 1.1, reads it as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.inf|\.nan)$", re.IGNORECASE),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader


@functools.cache
def script_flags(section: str) -> dict[str, tuple[object, object]]:
    """The flags of a section's script, from its argument dataclasses: name -> (type, default)."""
    module_name, classes = SECTIONS[section]
    module = importlib.import_module(module_name)
    flags = {}
    for name in classes:
        hints = typing.get_type_hints(getattr(module, name))
        for f in dataclasses.fields(getattr(module, name)):
            if f.init and not f.name.startswith("_"):
                flags[f.name] = (hints[f.name], f.default)
    return flags


def _fits(value, hint) -> bool:
    """Whether ``value`` is of type ``hint`` as a command line takes it (a list flag also takes one value)."""
    origin, args = typing.get_origin(hint), _choices_over_str(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return all(_fits(v, args[0]) for v in (value if isinstance(value, list) else [value]))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {member.value for member in hint}
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return hint is typing.Any or (isinstance(hint, type) and isinstance(value, hint))


def _choices_over_str(hint) -> tuple:
    """The types of a hint; of ``Choices | str`` the choices alone, as HfArgumentParser reads it."""
    args = typing.get_args(hint)
    if any(typing.get_origin(a) is typing.Literal or (isinstance(a, type) and issubclass(a, enum.Enum)) for a in args):
        return tuple(a for a in args if a is not str)
    return args


def _type_words(hint) -> str:
    origin, args = typing.get_origin(hint), _choices_over_str(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args)
    if origin is typing.Literal or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return "one of " + ", ".join(str(getattr(v, "value", v)) for v in (args or hint))
    if origin is list:
        return f"a list of {_type_words(args[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _close(word: str, valid) -> str:
    matches = difflib.get_close_matches(word, list(valid), n=5, cutoff=0.6)
    return f" Did you mean {', '.join(matches)}?" if matches else ""


def checked_value(key: str, value, where: str, flags: bool = True):
    """``value`` of the key ``key`` (``seeds``, ``cpt.max_steps``, ``data.bo.pairs_files`` or a whole section), checked:
    a top-level key's type, a section key against its script's flags and their types (``flags=False``: the structure
    only, without importing the scripts)."""
    path = key.split(".")
    top = path[0]
    if top not in _STUDY_HINTS:
        raise InputError(
            f"{where}: unknown key {top!r}.{_close(top, _STUDY_HINTS)} A study's keys: {', '.join(_STUDY_HINTS)} "
            f"(sections: {', '.join(SECTIONS)})."
        )
    if top not in SECTIONS:
        return _checked_top_value(key, value, where)
    depth = 3 if top == "data" else 2  # SECTION.FLAG; data.LANG.FLAG
    if len(path) < depth:  # a whole section, or one language's data
        if not isinstance(value, dict):
            raise InputError(f"{where}: {key} must be a mapping of {'languages' if key == 'data' else 'flags'}.")
        return {k: checked_value(f"{key}.{k}", v, where, flags) for k, v in value.items()}
    if len(path) > depth:
        raise InputError(
            f"{where}: {key!r} is too deep: {top}'s keys are {'data.LANG.FLAG' if depth == 3 else 'FLAG'}."
        )
    return _checked_flag(top, key, value, where, flags)


def _checked_top_value(key: str, value, where: str):
    """A top-level key's value (one value where a list is expected is a list of one)."""
    top, _, below = key.partition(".")
    if below:
        raise InputError(f"{where}: {top} has no keys of its own ({key!r}); give {top}=VALUE.")
    hint = _STUDY_HINTS[top]
    value = [value] if typing.get_origin(hint) is list and not isinstance(value, list) else value
    if not _fits(value, hint):
        raise InputError(f"{where}: {top} must be {_type_words(hint)}, not {value!r}.")
    return value


def _checked_flag(section: str, key: str, value, where: str, flags: bool):
    script, flag = f"{SECTIONS[section][0]}.py", key.rsplit(".", 1)[1]
    if flag in PLAN_SETS[section]:
        hint = " (a language's corpus and pairs go in data.LANG)" if section == "build" and flag in _DATA else ""
        raise InputError(f"{where}: {key}: the plan sets {script} --{flag} itself, from the study's structure{hint}.")
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
        raise InputError(f"{where}: {key} must be a value or a list of values (a command-line flag), not {value!r}.")
    if not flags:
        return value
    known = script_flags(section)
    if flag not in known:
        valid = sorted(set(known) - PLAN_SETS[section])
        raise InputError(
            f"{where}: unknown key {key!r}: {script} has no flag --{flag}.{_close(flag, valid)} The keys of {section} "
            f"are {script}'s flags (less those the plan sets): {', '.join(valid)}."
        )
    hint, default = known[flag]
    if value is None:  # the flag left at the script's default
        return None
    if value is False and default is True:
        raise InputError(f"{where}: {key}: {script} --{flag} is on by default and the plan passes only true flags.")
    if not _fits(value, hint):
        raise InputError(f"{where}: {key} must be {_type_words(hint)} ({script} --{flag}), not {value!r}.")
    return value


def parse_assignment(text: str, flag: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"{flag} {text!r}: give KEY=VALUE (e.g. cpt.max_steps=2400, seeds=[0,1]).")
    try:
        return key.strip(), _yaml(value)
    except yaml.YAMLError as err:
        raise InputError(f"{flag} {text!r}: the value is not YAML ({err}).") from None


def _assign(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def study_file(preset: str) -> Path:
    """--preset: a study of configs/studies/ by name, or a study file's path (from where the user is, else from the
    repository root); relative to the repository root (where steps run) when inside it."""
    if preset.endswith((".yaml", ".yml", ".json")) or os.sep in preset:
        path = Path(preset).resolve()
        if not path.is_file() and not Path(preset).is_absolute():
            path = (REPO_DIR / preset).resolve()
        if not path.is_file():
            raise InputError(f"--preset {preset}: no such study file.")
        return path.relative_to(REPO_DIR) if path.is_relative_to(REPO_DIR) else path
    for suffix in (".yaml", ".json"):
        if (STUDIES_DIR / f"{preset}{suffix}").is_file():
            return (STUDIES_DIR / f"{preset}{suffix}").relative_to(REPO_DIR)
    names = sorted(p.stem for p in STUDIES_DIR.glob("*.*"))
    raise InputError(
        f"--preset {preset!r}: no study of that name in configs/studies/.{_close(preset, names)} Studies: "
        f"{', '.join(names)}; or give the path of a study file (YAML or JSON)."
    )


def _file_keys(path: Path) -> dict:
    text = (path if path.is_absolute() or path.is_file() else REPO_DIR / path).read_text(encoding="utf-8")
    try:
        raw = _yaml(text)
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not a YAML or JSON file ({err}).") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a study file is a mapping of keys (see configs/studies/cpu.yaml).")
    return raw


def read_study(path: Path, sets=(), cell: dict | None = None, flags: bool = True) -> Preset:
    """A study file with its ``--set`` changes and a sweep cell's values (checked by sweep_factors) applied."""
    config = {key: checked_value(str(key), value, str(path), flags) for key, value in _file_keys(path).items()}
    for text in sets:
        key, value = parse_assignment(text, "--set")
        _assign(config, key, checked_value(key, value, f"--set {text}", flags))
    for key, value in (cell or {}).items():
        _assign(config, key, value)
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise InputError(f"{path}: missing keys {', '.join(missing)} (every study gives them; see cpu.yaml).")
    return Preset(name=path.stem, **config)


def with_flags(preset: Preset, args) -> Preset:
    """The configuration with run_study.py's flags that set its keys (CONFIG_FLAGS) applied."""
    given = {key: getattr(args, key) for key in CONFIG_FLAGS if getattr(args, key) is not None}
    return replace(preset, **{key: checked_value(key, value, f"--{key}") for key, value in given.items()})


def check_study(preset: Preset, where: str) -> None:
    """What a plan needs of a configuration besides the types of its keys."""
    problems = []
    for key in ("langs", "seeds", "variants", "settings"):
        values = getattr(preset, key)
        if not values or len(set(map(str, values))) < len(values):
            problems.append(f"{key} must name at least one, each once (got {values})")
    if not set(SETTINGS) <= set(preset.settings):
        problems.append(
            f"settings must hold bridges and no_bridges (their gap is the measurement), not {preset.settings}"
        )
    if preset.data if preset.synthetic else preset.world:
        problems.append("data applies to real corpora (synthetic: false), world to synthetic ones")
    for section in ("pretrain", "cpt"):
        problems += [
            f"{section}.{key} is required" for key in ("block_size", "max_steps") if key not in getattr(preset, section)
        ]
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems) + ".")


#: The studies of configs/studies/ as their files give them (run_study.configure checks them against the flags).
PRESETS: dict[str, Preset] = {
    path.stem: read_study(path.relative_to(REPO_DIR), flags=False) for path in sorted(STUDIES_DIR.glob("*.yaml"))
}


def sweep_factors(sweeps: list[str], sets: list[str]) -> dict[str, list]:
    """--sweep KEY=V1,V2,... -> {KEY: [values]}, each value checked as --set checks it."""
    factors: dict[str, list] = {}
    for text in sweeps:
        key, sep, values = text.partition("=")
        try:
            parsed = _yaml(f"[{values}]") if sep else None
        except yaml.YAMLError:
            parsed = None
        if not key or not parsed:
            raise InputError(f"--sweep {text!r}: give KEY=V1,V2,... (e.g. cpt.max_steps=400,800).")
        if key in factors or key.split(".")[0] in NOT_SWEPT:
            why = "swept twice" if key in factors else "it changes how the study runs, not what it measures"
            raise InputError(f"--sweep {text!r}: {key} cannot be swept ({why}).")
        if any(s.partition("=")[0].strip() == key for s in sets):
            raise InputError(f"--sweep {text!r}: {key} is also given by --set; give it one way.")
        factors[key] = [checked_value(key, value, f"--sweep {text}") for value in parsed]
    return factors


def _value_text(value) -> str:
    if isinstance(value, list):
        return "+".join(map(_value_text, value))
    return json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)


def cell_name(values: dict) -> str:
    """A cell's folder name, readable and file-name safe: world.pair_mentions=30,cpt.max_steps=2400."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{key}={_value_text(v)}" for key, v in values.items()))


def sweep_cells(factors: dict[str, list]) -> dict[str, dict]:
    """The cells of the grid of ``factors`` by folder name: each cell's value of every swept key."""
    cells: dict[str, dict] = {}
    for values in itertools.product(*factors.values()):
        values = dict(zip(factors, values))
        name = cell_name(values)
        if name in cells:
            raise InputError(f"--sweep: two cells would share the folder {name!r}; give values that differ in it.")
        cells[name] = values
    return cells


#: --smoke: the budget flags cut per step kind; every other flag stays as the full run has it. A checkpoint before
#: the last step, so that every checkpoint-reading step reads more than one.
_SMOKE_TRAINING = dict(block_size=128, max_steps=4, save_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=1, warmup_steps=1, logging_steps=1)  # fmt: skip
_TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2"
_SMOKE_MODEL = dict(config_name="configs/tiny.json", config_overrides=_TINY)
SMOKE_BUDGETS: dict[str, dict] = {
    "pretrain": dict(_SMOKE_MODEL, **_SMOKE_TRAINING, shuffle_buffer_size=16),
    "build": dict(num_proc=2, max_records_per_input=200),  # its windows are the CPT budget's
    "cpt": dict(_SMOKE_TRAINING),
    "eval": dict(batch_size=16),
    "density": dict(top_k=5, max_documents=2000),
}
#: Flags that exist to cut a budget: a smoke run adds them although the full run leaves them out.
SMOKE_ONLY_FLAGS = {"max_records_per_input", "max_documents"}
#: Without a GPU a smoke run also trains and probes in float32 (bfloat16 on a CPU only slows it down).
SMOKE_CPU_PRECISION = {"pretrain": dict(bf16=False), "cpt": dict(bf16=False), "eval": dict(dtype="float32")}


def smoke_preset(preset: Preset, on_gpu: bool) -> tuple[Preset, list[str]]:
    """The preset with only its budgets cut (``--smoke``), and one line per cut flag. Without a GPU the training
    steps run without bf16, as plain python."""
    cuts: list[str] = []
    changed = {}
    for kind, budget in SMOKE_BUDGETS.items():
        full = getattr(preset, kind)
        budget = dict(budget, **({} if on_gpu else SMOKE_CPU_PRECISION.get(kind, {})))
        # Only flags the full run passes are cut, and the budget-only flags and the shuffle buffer of a streamed
        # pretraining (it would read 10,000 windows before step 1) added.
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
