#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "accelerate>=1.10", "datasets>=4.0", "numpy>=2.0", "huggingface-hub>=1.0"]
# ///
"""Step 2b of the study: continual pretraining on one language WITH, WITHOUT or with MISMATCHED bridges.

    accelerate launch run_cpt.py --lang bo --bridges
    accelerate launch run_cpt.py --model_name_or_path BASE --dataset_path DATA --lang bo --no_bridges \\
        --block_size 2048 --output_dir runs/cpt-bo-no-bridges --max_steps 1500 --save_steps 100

Continues a base model (run_pretrain.py) on a build_pairs.py dataset in exactly one setting. The settings train on
the same documents, tokens, windows and steps and differ only in whether the halves of each parallel pair share a
context window (packing.py); packing_audit.json proves it before training, or nothing is trained. The paper:
--block_size 2048, 256 windows per step, --max_steps 1500. Outputs, defaults and resuming: docs/cpt.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed

from packing import (
    SETTINGS,
    BridgePackingCollator,
    PackingPlan,
    PackingUnit,
    Segment,
    audit_windows,
    equal_across_settings,
    mismatched_unavailable,
    plan_guarantees,
    plan_packing,
)
from study_common import (
    DEFAULT_BASE_MODEL_DIR,
    PAIR_ORDERS,
    RUNS_DIR,
    WEIGHT_FILES,
    InputError,
    default_cpt_data_dir,
    default_cpt_run_name,
    document_start_id,
    exit_on_input_error,
    load_dataset_split,
    local_weight_digests,
    output_dir_given,
    pair_first_side,
    pair_segments,
    setup_logging,
    weights_sha256,
    write_json_atomic,
)
from train_common import (
    CardTrainer,
    RunCard,
    autocast_dtype,
    check_document_isolation,
    finish_training,
    guard_flash_attention_inputs,
    isolation_failure,
    packed_batch,
    parse_training_flags,
    resume_checkpoint,
)

logger = logging.getLogger("run_cpt")


@dataclass
class CPTArguments:
    model_name_or_path: str = field(
        default=str(DEFAULT_BASE_MODEL_DIR),
        metadata={"help": "Base model: a folder or Hub id (default: runs/pretrain)."},
    )
    lang: str | None = field(
        default=None, metadata={"help": "Target language; default (and it must equal): the dataset's build_stats.json."}
    )
    bridges: bool = field(default=False, metadata={"help": "WITH bridges: each parallel pair is one document."})
    no_bridges: bool = field(default=False, metadata={"help": "WITHOUT bridges: pair halves never share a window."})
    mismatched_bridges: bool = field(
        default=False, metadata={"help": "The control: each first half is one document with another pair's second."}
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "build_pairs.py output folder (default with --lang: runs/data-<lang>)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset pushed by build_pairs.py."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Revision of --dataset_name."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    block_size: int = field(default=2048, metadata={"help": "Context window in tokens (paper: 2048)."})
    pair_order: str = field(
        default="en_first", metadata={"help": "Side of a pair that comes first: en_first, tgt_first or random."}
    )
    pair_separator: str = field(default="", metadata={"help": "Text appended to the first side of every pair."})
    max_open_windows: int = field(default=64, metadata={"help": "Packer lookahead: windows kept open at once."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager; on a GPU also flex_attention or a flash kernel."}
    )
    dtype: str | None = field(default=None, metadata={"help": "Load weights in this dtype, e.g. bfloat16."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    @property
    def setting(self) -> str:
        """The one setting flag given (``SETTINGS``)."""
        return next(name for name in SETTINGS if getattr(self, name))


def parse_args(argv: list[str] | None = None) -> tuple[CPTArguments, TrainingArguments]:
    parser = HfArgumentParser((CPTArguments, TrainingArguments))
    cpt_args, training_args = parse_training_flags(parser, argv)
    if sum(getattr(cpt_args, name) for name in SETTINGS) != 1:
        raise InputError(
            "Give exactly one of --bridges (pairs co-located in one context window), --no_bridges (pair halves "
            "never in the same window) and --mismatched_bridges (each first half in one window with another "
            "pair's second half); the setting is never implied."
        )
    if cpt_args.dataset_path is not None and cpt_args.dataset_name is not None:
        raise InputError("Give only one of --dataset_path DIR (build_pairs.py output) and --dataset_name HUB_ID.")
    if cpt_args.dataset_path is None and cpt_args.dataset_name is None:
        if cpt_args.lang is None:
            raise InputError(
                "No dataset: give --lang LANG to read build_pairs.py's default output runs/data-LANG, "
                "or --dataset_path DIR, or --dataset_name HUB_ID."
            )
        cpt_args.dataset_path = str(default_cpt_data_dir(cpt_args.lang))
        if not Path(cpt_args.dataset_path).is_dir():
            raise InputError(
                f"{cpt_args.dataset_path}: no CPT dataset here (the default --dataset_path for --lang "
                f"{cpt_args.lang}). Run build_pairs.py --lang {cpt_args.lang} first or pass --dataset_path."
            )
    if cpt_args.model_name_or_path == str(DEFAULT_BASE_MODEL_DIR) and not DEFAULT_BASE_MODEL_DIR.is_dir():
        raise InputError(
            f"{DEFAULT_BASE_MODEL_DIR}: no base model here (the default --model_name_or_path). Run run_pretrain.py "
            "first or pass --model_name_or_path."
        )
    if cpt_args.pair_order not in PAIR_ORDERS:
        raise InputError(f"--pair_order must be en_first, tgt_first or random, got {cpt_args.pair_order!r}.")
    if cpt_args.block_size < 4:
        raise InputError(f"--block_size must be at least 4, got {cpt_args.block_size}.")
    if cpt_args.max_open_windows < 1:
        raise InputError(f"--max_open_windows must be at least 1, got {cpt_args.max_open_windows}.")
    if training_args.auto_find_batch_size:
        raise InputError(
            "--auto_find_batch_size changes the batch size during training, which would break the packing plan "
            "(every setting must consume the same windows per step). Set --per_device_train_batch_size."
        )
    if training_args.use_cache:
        raise InputError(
            "--use_cache makes training forwards build a KV cache, which turns off the document-isolated attention "
            "that packed windows rely on (documents would attend to each other); remove it."
        )
    if training_args.ignore_data_skip:
        raise InputError("--ignore_data_skip would re-train windows already seen when resuming; remove it.")
    return cpt_args, training_args


def name_the_run(cpt_args: CPTArguments, training_args, argv: list[str] | None) -> Path:
    """Run name and --output_dir by language, setting and seed, unless given; returns the output folder."""
    run_name = default_cpt_run_name(cpt_args.lang, cpt_args.setting, training_args.seed)
    if training_args.run_name is None:
        training_args.run_name = run_name
    if not output_dir_given(argv):
        training_args.output_dir = str(RUNS_DIR / run_name)
    return Path(training_args.output_dir)


# ---- Data: every unit tokenized into segments, identically for every setting ------------------

#: The columns of a build_pairs.py dataset that a run reads.
REQUIRED_COLUMNS = ("doc_id", "kind", "text", "pair_id", "en", "tgt")


def load_cpt_dataset(cpt_args: CPTArguments) -> tuple[datasets.Dataset, Path, dict | None]:
    """The build_pairs.py dataset, the folder it came from and its build_stats.json (None: none)."""
    if cpt_args.dataset_name:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(cpt_args.dataset_name, repo_type="dataset", revision=cpt_args.dataset_revision))
    else:
        folder = Path(cpt_args.dataset_path)
        if not folder.is_dir():
            raise InputError(f"{folder}: no such dataset directory. Build it with build_pairs.py.")
    flag = "--dataset_name" if cpt_args.dataset_name else "--dataset_path"
    loaded = load_dataset_split(str(folder), None, "train", flag=flag)  # the Hub's parquet shards: one split
    missing = [c for c in REQUIRED_COLUMNS if c not in loaded.column_names]
    if missing:
        raise InputError(
            f"{folder}: not a build_pairs.py dataset (missing columns {missing}; found {loaded.column_names})."
        )
    stats_file = folder / "build_stats.json"
    return loaded, folder, json.loads(stats_file.read_text()) if stats_file.is_file() else None


def dataset_language(lang: str | None, build_stats: dict | None, build_stats_file: Path) -> str:
    """The run's language: the dataset's (build_stats.json ``lang``); a --lang given must equal it."""
    recorded = (build_stats or {}).get("lang")
    if lang is None and recorded is None:
        raise InputError(
            f"{build_stats_file}: no such file or no 'lang' in it, and no --lang: the run's language is unknown. "
            "Pass --lang, or train on a dataset built by build_pairs.py."
        )
    if lang is not None and recorded is not None and lang != recorded:
        raise InputError(
            f"--lang {lang} but the dataset is {recorded!r} ({build_stats_file}): the run would be grouped and "
            f"probed as {lang}. Drop --lang (it defaults to the dataset's) or point --dataset_path at the {lang} data."
        )
    return lang if lang is not None else recorded


def tokenize_units(batch, tokenizer, start_id, block_size, pair_order, separator_ids, seed):
    """Segments of every unit (identical for every setting), or the reason it is dropped; and a digest of what
    the record says (resuming recognises the same data by it, wherever it sits)."""
    encoded = {side: tokenizer([text or "" for text in batch[side]], add_special_tokens=False)["input_ids"]
               for side in ("en", "tgt", "text")}  # fmt: skip
    result = {"segments": [], "first_side": [], "drop_reason": [], "content_digest": []}
    piece = block_size - 1  # every segment is [start] + at most block_size - 1 tokens
    for i, kind in enumerate(batch["kind"]):
        first_side, reason = "", ""
        if kind == "pair":
            en, tgt = encoded["en"][i], encoded["tgt"][i]
            first_side = pair_first_side(batch["pair_id"][i], pair_order, seed)
            segments = pair_segments(*((en, tgt) if first_side == "en" else (tgt, en)), start_id, separator_ids)
            if not en or not tgt:
                reason, segments = "empty_after_tokenization", []
            elif len(segments[0]) + len(segments[1]) > block_size:
                reason, segments = "pair_over_block_size", []
        elif kind in ("mono", "replay"):
            ids = encoded["text"][i]
            reason = "" if ids else "empty_after_tokenization"
            segments = [[start_id] + ids[at : at + piece] for at in range(0, len(ids), piece)]
        else:
            raise InputError(f"document {batch['doc_id'][i]}: unknown kind {kind!r} (expected mono, pair, replay).")
        record = [kind, batch["text"][i], batch["en"][i], batch["tgt"][i]]
        digest = hashlib.blake2b(json.dumps(record, ensure_ascii=False).encode(), digest_size=16).hexdigest()
        for key, value in zip(result, (segments, first_side, reason, digest)):
            result[key].append(value)
    return result


def tokenize_dataset(raw: datasets.Dataset, tokenizer, cpt_args: CPTArguments, seed: int) -> datasets.Dataset:
    """One row per unit: ``doc_id``, ``kind``, ``pair_id`` and ``tokenize_units``' columns."""
    separator = (
        tokenizer(cpt_args.pair_separator, add_special_tokens=False)["input_ids"] if cpt_args.pair_separator else []
    )
    kept, text = ("doc_id", "kind", "pair_id"), datasets.Value("string")
    return raw.map(
        tokenize_units,
        batched=True,
        num_proc=cpt_args.preprocessing_num_workers,
        remove_columns=[c for c in raw.column_names if c not in kept],
        features=datasets.Features({**{c: raw.features[c] for c in kept},
                                    "segments": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                                    "first_side": text, "drop_reason": text, "content_digest": text}),
        fn_kwargs={"tokenizer": tokenizer, "start_id": document_start_id(tokenizer), "block_size": cpt_args.block_size,
                   "pair_order": cpt_args.pair_order, "separator_ids": separator, "seed": seed},
        desc="Tokenizing units into segments",
    )  # fmt: skip


class CPTData:
    """The run's tokenized rows (``folder`` and ``build_stats`` beside them), the units the packer sees (every row
    not dropped, keyed by its row; a pair's group is its first side, so mismatched partners are an English and a
    target half) and the tokens of each segment, read zero-copy from the Arrow files."""

    def __init__(self, folder: Path, build_stats: dict | None, tokenized: datasets.Dataset):
        self.folder, self.build_stats, self.tokenized = folder, build_stats, tokenized
        self.kinds, self.reasons = list(tokenized["kind"]), list(tokenized["drop_reason"])
        # A document by its id and by what it says.
        self.document_keys = [f"{i}\t{digest}" for i, digest in zip(tokenized["doc_id"], tokenized["content_digest"])]
        self._chunks, starts, lengths = [], [0], []
        for chunk in tokenized.data.table.column("segments").chunks:
            outer, inner = chunk.offsets.to_numpy(), chunk.values.offsets.to_numpy()
            self._chunks.append((outer, inner, chunk.values.values.to_numpy(zero_copy_only=False)))
            starts.append(starts[-1] + len(chunk))
            sizes = np.diff(inner)
            lengths += [tuple(sizes[outer[r] : outer[r + 1]].tolist()) for r in range(len(chunk))]
        self._starts = np.array(starts)
        rows = zip(self.kinds, self.reasons, tokenized["first_side"], lengths)
        self.units = [PackingUnit(row, lengths, kind == "pair", side or None)
                      for row, (kind, reason, side, lengths) in enumerate(rows) if not reason]  # fmt: skip

    def segment_tokens(self, segment: Segment) -> np.ndarray:
        chunk = int(np.searchsorted(self._starts, segment.key, side="right")) - 1
        outer, inner, values = self._chunks[chunk]
        at = int(outer[segment.key - self._starts[chunk]]) + segment.part
        return values[inner[at] : inner[at + 1]]


def units_dropped(kinds: list[str], reasons: list[str], block_size: int) -> dict:
    """What tokenization dropped (in every setting alike), why, and (``note``, None: nothing) what to do."""
    dropped = Counter((kind, reason) for kind, reason in zip(kinds, reasons) if reason)
    by_reason = {f"{kind}:{reason}": n for (kind, reason), n in sorted(dropped.items())}
    if not dropped:
        return {"count": 0, "by_reason": by_reason, "note": None}
    why = {"pair_over_block_size": f"longer than --block_size {block_size}", "empty_after_tokenization": "empty"}
    counts = "; ".join(f"{n} of {kinds.count(kind)} {kind} records ({why.get(reason, reason)}: {reason})"
                       for (kind, reason), n in sorted(dropped.items()))  # fmt: skip
    advice = (
        f"To train on them raise --block_size; for data that matches this window, rebuild it at this block size "
        f"(build_pairs.py --block_size {block_size}, which records the drop in build_stats.json)"
        if any(reason == "pair_over_block_size" for _, reason in dropped)
        else "Check the dataset's text and the tokenizer"
    )
    note = f"Dropped before packing, in every setting alike: {counts}. {advice}."
    return {"count": sum(dropped.values()), "by_reason": by_reason, "note": note}


def refuse_data_that_measures_nothing(data: CPTData, cpt_args: CPTArguments) -> None:
    """Without pairs the settings train on identical windows; mismatched bridges need partners that fit."""
    if not any(unit.is_pair for unit in data.units):
        stats = data.build_stats
        dropped_here = Counter(reason for kind, reason in zip(data.kinds, data.reasons) if kind == "pair" and reason)
        counts = (
            f"build_stats.json: pair read {stats['read']['pair']}, kept {stats['kept']['pair']}, "
            f"dropped { {r: n for r, n in stats['dropped']['pair'].items() if n} }"
            if stats
            else "no build_stats.json"
        )
        raise InputError(
            f"{data.folder}: no parallel pair to train on ({data.kinds.count('pair')} pair records"
            + (f", all dropped here: {dict(dropped_here)}" if dropped_here else "")
            + f"; {counts}). With no pairs the settings train on the same windows and their comparison measures "
            "nothing; rebuild the dataset with build_pairs.py from parallel pairs."
        )
    if cpt_args.mismatched_bridges and (why := mismatched_unavailable(data.units, cpt_args.block_size)):
        raise InputError(
            f"--mismatched_bridges cannot run on {data.folder}: {why}. It needs two pairs of each pair order "
            f"and every first half to fit one window with any second half: add pairs, rebuild the data with "
            f"pairs of at most half the window (build_pairs.py --block_size {cpt_args.block_size // 2}), or "
            "raise --block_size."
        )


class PackedWindows(torch.utils.data.Dataset):
    """The planned windows of one setting, materialized lazily as features."""

    def __init__(self, windows: list[list[tuple]], data: CPTData, collator: BridgePackingCollator):
        self.windows, self.data, self.collator = windows, data, collator

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        return self.collator.window_features(self.windows[index], self.data.segment_tokens)


class CPTCollator(BridgePackingCollator):
    """The packing collator in the layout of the run's kernel (``train_common.packed_batch``): padded rows, or
    one flattened row with sequence boundaries for flash kernels."""

    def __init__(self, block_size: int, pad_token_id: int, attn_implementation: str = "sdpa"):
        super().__init__(block_size, pad_token_id)
        self.attn_implementation = attn_implementation

    def __call__(self, features: list[dict]) -> dict:
        rows = super().__call__(features)
        return packed_batch(rows["input_ids"], rows["position_ids"], rows["labels"], self.attn_implementation)


def plan_run(data: CPTData, cpt_args: CPTArguments, training_args) -> PackingPlan:
    """Every setting over the same documents, in whole steps of the run's batch geometry."""
    per_process = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    windows_per_step = per_process * training_args.world_size
    try:
        return plan_packing(
            data.units,
            block_size=cpt_args.block_size,
            windows_per_step=windows_per_step,
            seed=run_seed(training_args),
            max_steps=training_args.max_steps if training_args.max_steps > 0 else None,
            num_epochs=None if training_args.max_steps > 0 else training_args.num_train_epochs,
            max_open_windows=cpt_args.max_open_windows,
            # All-padding windows only where the data has fewer documents than windows, never all that one
            # process reads in a step (a step without targets would be NaN).
            max_empty_windows=per_process - 1,
        )
    except ValueError as err:
        raise InputError(f"{data.folder}: {err} ({windows_per_step} windows per step).") from err


def run_seed(training_args) -> int:
    """The seed of the data order and of a random pair order: --data_seed, else --seed."""
    return training_args.data_seed if training_args.data_seed is not None else training_args.seed


# ---- The audit: every planned setting measured from the features the model will receive ----------


def base_model_identity(model_name_or_path: str) -> dict:
    """The base model by content: SHA-256 of every weights file, whole (a safetensors header has no values),
    and of its config as sorted JSON without ``transformers_version``."""
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_name_or_path, allow_patterns=[*WEIGHT_FILES, "config.json"]))
    digests = local_weight_digests(folder)
    if not digests:
        raise InputError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES)}) to identify the base model.")
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return {
        "base_model_weights_sha256": weights_sha256(digests),
        "base_model_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }


def recorded_setting(cpt_args: CPTArguments, seed: int, data: CPTData, plan: PackingPlan, documents_seen: str) -> dict:
    """``cpt_setting``: what the run trains, as config.json, the audit and the card record it; a checkpoint must
    match it to be resumed, the base model and the data by content (docs/cpt.md)."""
    return {
        "lang": cpt_args.lang,
        "setting": cpt_args.setting,
        "bridges": cpt_args.setting == "bridges",
        "block_size": cpt_args.block_size,
        "pair_order": cpt_args.pair_order,
        "pair_separator": cpt_args.pair_separator,
        "seed": seed,
        "dataset": cpt_args.dataset_name or str(Path(cpt_args.dataset_path).resolve()),
        "dataset_sha256": hashlib.sha256("\n".join(data.document_keys).encode()).hexdigest(),
        "base_model": cpt_args.model_name_or_path,
        **base_model_identity(cpt_args.model_name_or_path),
        "steps": plan.steps,
        "windows_per_step": plan.windows_per_step,
        "documents_seen_sha256": documents_seen,
    }


def build_audit(plan: PackingPlan, data: CPTData, collator, cpt_args, training_args, *, vocab_size: int) -> dict:
    """packing_audit.json before training: every planned setting measured from the features the model will
    receive, this run's beside the others', and the run's ``cpt_setting``."""
    audits = {name: audit_windows(planned, collator, data.segment_tokens, data.units,
                                  unit_names=data.document_keys.__getitem__, vocab_size=vocab_size)
              for name, planned in plan.settings.items()}  # fmt: skip
    setting, planned, mine = cpt_args.setting, plan.settings[cpt_args.setting], audits[cpt_args.setting]
    return {
        "setting": setting,
        "cpt_setting": recorded_setting(cpt_args, run_seed(training_args), data, plan,
                                        mine["hashes"]["documents_seen_sha256"]),
        "world_size": training_args.world_size,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "windows_per_step": plan.windows_per_step,
        "dataset": {
            "units": len(data.kinds),
            "units_by_kind": dict(Counter(data.kinds)),
            "units_dropped": units_dropped(data.kinds, data.reasons, cpt_args.block_size),
            "units_packed": len(data.units),
            "text_units_cut_into_segments": sum(1 for u in data.units if not u.is_pair and len(u.segment_lengths) > 1),
            "build_stats_dropped": data.build_stats.get("dropped") if data.build_stats else None,
        },
        "plan": {
            "requested_steps": plan.requested_steps,
            "steps": plan.steps,
            "steps_trimmed": plan.requested_steps - plan.steps,
            "windows": len(planned.windows),
            "units_seen": len(plan.seen),
            "data_passes_touched": plan.seen[-1][0] + 1,
            "data_epochs": round(len(plan.seen) / len(data.units), 6),
            "documents_seen_by_kind": dict(Counter(data.kinds[key[1]] for key in plan.seen)),
            "packer_windows": planned.packer_windows,
            "packer_real_token_fraction": round(mine["real_tokens"] / (planned.packer_windows * cpt_args.block_size), 6),
            "windows_split_to_equalize": len(planned.windows) - planned.packer_windows,
            "max_open_windows": cpt_args.max_open_windows,
            "settings": list(plan.settings),
            "mismatched_bridges_unavailable": plan.mismatched_unavailable,
        },
        **mine,
        "other_settings": {name: {**audit, "packer_windows": plan.settings[name].packer_windows}
                           for name, audit in audits.items() if name != setting},
        "equal_across_settings": equal_across_settings(audits),
    }  # fmt: skip


def check_plan_isolation(model, windows, data: CPTData, collator, *, autocast_dtype=None) -> dict:
    """``train_common.check_document_isolation`` on two windows of the plan, batched by the training collator (two:
    the batch layout is part of what is checked): the planned windows with the most documents; when none holds
    two, the first is built from the plan's shortest documents. ``window`` says which."""
    ranked = sorted((w for w in windows if w), key=len, reverse=True)
    checked = [ranked[0], ranked[min(1, len(ranked) - 1)]]  # a plan of one window: that window twice
    origin = "the planned windows with the most documents"
    if len(checked[0]) < 2:
        built, used = [], 0
        lengths = ((sum(len(data.segment_tokens(s)) for s in document), document) for w in windows for document in w)
        for length, document in sorted(lengths):
            if used + length > collator.block_size:
                break
            built.append(document)
            used += length
        if len(built) >= 2:
            checked[0], origin = built, "a window built from the plan's shortest documents, and a planned window"
    tokens = [[[data.segment_tokens(segment) for segment in document] for document in window] for window in checked]
    return {**check_document_isolation(model, collator, tokens, autocast_dtype=autocast_dtype), "window": origin}


def enforce_guarantees(audit: dict, audit_file: Path | None) -> None:
    """Judge every guarantee (document isolation on the run's model, ``packing.plan_guarantees``), record the
    verdict in the audit, write it (``audit_file`` None: not this process) and refuse to train unless every
    guarantee was checked and holds."""
    broken, unchecked = plan_guarantees({audit["setting"]: audit, **audit["other_settings"]}, audit["setting"])
    if not (isolation := audit["document_isolation"])["holds"]:
        broken.insert(
            0,
            f"attention crosses documents with attn_implementation={isolation['attn_implementation']} "
            f"({isolation['layout']} layout, {isolation['compute_dtype']} on {isolation['device']}): "
            f"{isolation_failure(isolation) or 'the isolation check did not hold'}; use sdpa or eager",
        )
    audit["unchecked"] = unchecked
    audit["guarantees_hold"] = not broken and not unchecked
    if audit_file is not None:
        write_json_atomic(audit_file, audit)
    if broken:
        raise RuntimeError(f"Packing audit failed: {'; '.join(broken)}. See {audit_file or 'packing_audit.json'}.")
    if unchecked:
        raise InputError(
            f"Refusing to train: a guarantee of the setting could not be checked: {'; '.join(unchecked)}. "
            "Raise --max_steps or add pairs to the dataset. Nothing was trained."
        )
    logger.info("Packing audit: every guarantee holds: %s", json.dumps(audit["plan"]))
    if audit["plan"]["steps_trimmed"]:
        logger.warning("Trained steps trimmed from %d to %d so that the settings see the same documents.",
                       audit["plan"]["requested_steps"], audit["plan"]["steps"])  # fmt: skip


# ---- The setting, recorded; resuming only the same setting, base model, data and plan ------------


#: cpt_setting keys that say where things are, not what they are (content hashes recognise a moved copy).
LOCATION_KEYS = ("dataset", "base_model")
#: How a difference in a content hash is named when a checkpoint is refused.
CONTENT_KEYS = {
    "base_model_weights_sha256": "base model weights differ",
    "base_model_config_sha256": "base model config differs",
    "dataset_sha256": "dataset content differs",
    "documents_seen_sha256": "documents seen differ",
}


def check_resume_setting(checkpoint: str, cpt_setting: dict) -> None:
    """Refuse a checkpoint whose ``cpt_setting`` differs from this run's in any key but ``LOCATION_KEYS``,
    naming each difference."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise InputError(f"{checkpoint}: no config.json; is it a checkpoint of run_cpt.py?")
    stored = json.loads(config_file.read_text()).get("cpt_setting") or {}
    differ = sorted(k for k in set(stored) | set(cpt_setting)
                    if k not in LOCATION_KEYS and stored.get(k) != cpt_setting.get(k))  # fmt: skip
    if not differ:
        return

    def described(key: str) -> str:
        old, new = stored.get(key), cpt_setting.get(key)
        if key in CONTENT_KEYS and isinstance(old, str) and isinstance(new, str):
            return f"{CONTENT_KEYS[key]} (sha256 {old[:12]}.. in the checkpoint vs {new[:12]}.. now)"
        return f"{key} differs ({old!r} in the checkpoint vs {new!r} now)"

    raise InputError(
        f"{checkpoint} does not match this run: {'; '.join(described(k) for k in differ)} (differs in {differ}). "
        "It was trained with another setting, base model, data or packing plan: resume with the same base "
        "model, data, arguments and world size, or use a new --output_dir."
    )


# ---- The model, the trainer and its card ------------------------------------------------------------


def load_base_model(cpt_args: CPTArguments):
    """(model, tokenizer) of the base, with the flash guard on the model and no KV cache (a cache would turn
    the document isolation of restarting position ids off)."""
    tokenizer = AutoTokenizer.from_pretrained(cpt_args.tokenizer_name or cpt_args.model_name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cpt_args.model_name_or_path, dtype=cpt_args.dtype, attn_implementation=cpt_args.attn_implementation
        )
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise InputError(f"--attn_implementation {cpt_args.attn_implementation}: {err}") from err
    guard_flash_attention_inputs(model)
    model.config.use_cache = False
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cpt_args.block_size > max_positions:
        raise InputError(f"--block_size {cpt_args.block_size} exceeds the model's {max_positions} positions.")
    return model, tokenizer


def model_card(audit: dict, cpt_args: CPTArguments, training_args) -> RunCard:
    """The model card: the run's cpt_setting and packing, and the steps trained when it is written."""
    setting = audit["cpt_setting"]
    how = {"bridges": "WITH bridges", "no_bridges": "WITHOUT bridges"}.get(audit["setting"], "with MISMATCHED bridges")
    rows = {
        **setting,
        "run name": training_args.run_name,
        "tokens per step": audit["windows_per_step"] * cpt_args.block_size,
        "pairs co-located": f"{audit['pairs']['co_located_percent']}%",
        **({"planned mismatched partners co-located": f"{audit['mismatched_pairs']['co_located_percent']}%"}
           if "mismatched_pairs" in audit else {}),
        "real-token fraction": audit["real_token_fraction"],
        "units dropped before packing": audit["dataset"]["units_dropped"]["note"] or "none",
        "world size": training_args.world_size,
    }  # fmt: skip
    return RunCard(
        title=f"CPT {setting['lang']}, {audit['setting']}, seed {setting['seed']}",
        summary=f"Continual pretraining of {cpt_args.model_name_or_path} on {setting['lang']} {how}. "
        "packing_audit.json proves the setting.",
        setting=rows,
        tags=["cross-lingual-transfer", "cpt", audit["setting"]],
        progress=lambda steps: {"steps trained": steps},
    )


def main(argv: list[str] | None = None) -> dict:
    """Continue the base model in one setting; returns the packing audit (also OUT/packing_audit.json)."""
    # 1. Arguments, and the refusals that need no data: nothing is read or written before them.
    cpt_args, training_args = parse_args(argv)
    setup_logging(training_args)

    # 2. The dataset and its language, which name the run and its folder; the checkpoint it resumes from.
    raw, dataset_folder, build_stats = load_cpt_dataset(cpt_args)
    cpt_args.lang = dataset_language(cpt_args.lang, build_stats, dataset_folder / "build_stats.json")
    output_dir = name_the_run(cpt_args, training_args, argv)
    checkpoint = resume_checkpoint(training_args.resume_from_checkpoint, output_dir)  # never one silently

    # 3. The base model, its tokenizer and the collator of the run's kernel.
    model, tokenizer = load_base_model(cpt_args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_start_id(tokenizer)
    collator = CPTCollator(cpt_args.block_size, pad_id, cpt_args.attn_implementation)

    # 4. Data: every unit tokenized into segments, identically for every setting.
    with training_args.main_process_first(desc="tokenizing the CPT dataset"):
        tokenized = tokenize_dataset(raw, tokenizer, cpt_args, run_seed(training_args))
    data = CPTData(dataset_folder, build_stats, tokenized)
    refuse_data_that_measures_nothing(data, cpt_args)

    # 5. The plan: every setting over the same documents, audited; a checkpoint must be of this very plan.
    plan = plan_run(data, cpt_args, training_args)
    windows = plan.settings[cpt_args.setting].windows
    vocab_size = max(len(tokenizer), model.config.vocab_size)
    audit = build_audit(plan, data, collator, cpt_args, training_args, vocab_size=vocab_size)
    if note := audit["dataset"]["units_dropped"]["note"]:
        logger.warning(note)
    if checkpoint:
        check_resume_setting(checkpoint, audit["cpt_setting"])

    # 6. Document isolation checked where and how the run trains (its device, under FSDP the unsharded model, its
    # kernel, precision and batch layout); then every guarantee judged, and training only if all hold.
    model.to(training_args.device)
    audit["document_isolation"] = check_plan_isolation(
        model, windows, data, collator, autocast_dtype=autocast_dtype(training_args)
    )
    enforce_guarantees(audit, output_dir / "packing_audit.json" if training_args.should_save else None)

    # 7. Train one epoch of the planned windows (whole global batches: each window once); the model, metrics, card.
    model.config.cpt_setting = audit["cpt_setting"]
    training_args.max_steps = plan.steps
    set_seed(training_args.seed)
    trainer = CardTrainer(
        model=model,
        args=training_args,
        train_dataset=PackedWindows(windows, data, collator),
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.model_card = model_card(audit, cpt_args, training_args)
    trainer.create_model_card()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    metrics = {**result.metrics, "train_windows": len(windows), "train_real_tokens": audit["real_tokens"]}
    finish_training(trainer, metrics, commit_message=f"End of training: {training_args.run_name}")
    return audit


if __name__ == "__main__":
    exit_on_input_error(main)
