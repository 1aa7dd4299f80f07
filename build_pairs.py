#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["transformers>=5.0", "datasets>=4.0", "pyarrow>=15", "numpy>=2.0", "regex", "huggingface-hub>=1.0"]
# ///
"""Build the continual-pretraining dataset of one language: monolingual text, parallel pairs, replay.

Step 2a of the study. ONE dataset per language is built and every continual-pretraining setting (``run_cpt.py``)
reads it, so they start from the same documents. Each record is one document; a record that fails a check is
dropped and counted in ``build_stats.json``. Inputs stream to Arrow files on disk, checked in --num_proc processes.
Fields, drop reasons, the replay draw and the outputs: docs/cpt.md.

Example:
    python build_pairs.py --lang bo --pairs_files pairs.jsonl --en_column en --tgt_column bo \\
        --mono_files mono.txt --tokenizer_name BASE --block_size 2048 --output_dir data/cpt-bo

Needs study_common.py and cloze.py beside it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex
from transformers import AutoTokenizer, HfArgumentParser

from cloze import fill_blanks, load_question_sets
from study_common import (
    DEFAULT_BASE_MODEL_DIR,
    InputError,
    default_cpt_data_dir,
    exit_on_input_error,
    load_dataset_split,
    pair_token_count,
    read_delimited,
    read_documents,
    read_json_records,
    script_for_language,
    script_letter_fraction,
    setup_logging,
    write_card,
    write_json_atomic,
)

logger = logging.getLogger("build_pairs")

#: The kinds of record, in reading order, and the prefix of their input flags (--pairs_files, --mono_dataset, ...).
ARGUMENT_PREFIX = {"mono": "mono", "pair": "pairs", "replay": "replay"}
KINDS = tuple(ARGUMENT_PREFIX)
#: Drop reasons that apply to each kind of record, in the order the checks run.
DROP_REASONS = {
    "mono": ("empty", "not_in_script", "contains_eval_sentence"),
    "pair": ("empty", "not_in_script", "contains_eval_sentence", "over_block_size", "duplicate_pair"),
    "replay": ("empty", "not_in_script", "contains_eval_sentence", "replay_beyond_ratio"),
}
#: Drop reasons as small integer codes (0: kept): per-record bookkeeping is a few bytes in numpy.
REASON_CODES = {reason: code for code, reason in enumerate(("", *dict.fromkeys(sum(DROP_REASONS.values(), ()))))}
#: What an input's main drop reason usually means, said when the input keeps nothing.
HINTS = {
    "empty": "the texts are empty or null: check {columns}",
    "not_in_script": "under {fraction:.0%} of the letters are in the {expected}",
    "contains_eval_sentence": "every record contains a filled sentence of --eval_questions",
    "over_block_size": "no pair fits --block_size {block_size} tokens",
    "duplicate_pair": "every pair repeats an earlier one",
}
STRING, INT32, INT64 = datasets.Value("string"), datasets.Value("int32"), datasets.Value("int64")
#: A record as read; ``input``: the position of its input in ``input_sources``, ``index``: its place in its kind.
RAW_FEATURES = datasets.Features(
    {"kind": STRING, "index": INT64, "input": INT32, "source": STRING, "text": STRING, "en": STRING, "tgt": STRING}
)
#: What ``check_batch`` adds: the drop code (0: kept), the text tokens and a kept pair's hash.
CHECK_FEATURES = {"drop_code": datasets.Value("int8"), "text_tokens": INT64, "dedup_key": datasets.Value("binary")}
OUTPUT_FEATURES = datasets.Features(
    {"doc_id": STRING, "kind": STRING, "text": STRING, "pair_id": INT64, "en": STRING, "tgt": STRING, "source": STRING}
)


@dataclass
class BuildArguments:
    lang: str = field(metadata={"help": "Target language code: ko, zh, bo, mn, or any other with --script."})
    tokenizer_name: str = field(default=str(DEFAULT_BASE_MODEL_DIR), metadata={"help": "Tokenizer measuring pairs."})
    output_dir: str | None = field(default=None, metadata={"help": "Output folder (default: runs/data-<lang>)."})
    script: str | None = field(default=None, metadata={"help": "Script of --lang if not known (e.g. Cyrillic)."})
    mono_files: list[str] | None = field(default=None, metadata={"help": "Target-language text files."})
    mono_dataset: str | None = field(default=None, metadata={"help": "Hub dataset (or local folder) of mono text."})
    mono_dataset_config: str | None = field(default=None, metadata={"help": "Config of --mono_dataset."})
    mono_split: str = field(default="train", metadata={"help": "Split of --mono_dataset."})
    mono_data_files: list[str] | None = field(default=None, metadata={"help": "Files of --mono_dataset to read."})
    mono_text_column: str = field(default="text", metadata={"help": "Text column of mono .json/.jsonl or dataset."})
    pairs_files: list[str] | None = field(default=None, metadata={"help": "Pair files (.jsonl, .json, .tsv, .csv)."})
    pairs_dataset: str | None = field(default=None, metadata={"help": "Hub dataset (or local folder) of pairs."})
    pairs_dataset_config: str | None = field(default=None, metadata={"help": "Config of --pairs_dataset."})
    pairs_split: str = field(default="train", metadata={"help": "Split of --pairs_dataset."})
    pairs_data_files: list[str] | None = field(default=None, metadata={"help": "Files of --pairs_dataset to read."})
    en_column: str = field(default="en", metadata={"help": "English column of pairs (dotted: nested, translation.en)."})
    tgt_column: str | None = field(default=None, metadata={"help": "Target column of pairs (default: --lang)."})
    replay_files: list[str] | None = field(default=None, metadata={"help": "English replay text files (optional)."})
    replay_dataset: str | None = field(default=None, metadata={"help": "Hub dataset (or local folder) of replay."})
    replay_dataset_config: str | None = field(default=None, metadata={"help": "Config of --replay_dataset."})
    replay_split: str = field(default="train", metadata={"help": "Split of --replay_dataset."})
    replay_data_files: list[str] | None = field(default=None, metadata={"help": "Files of --replay_dataset to read."})
    replay_text_column: str = field(default="text", metadata={"help": "Text column of replay .json/.jsonl or dataset."})
    replay_ratio: float | None = field(default=None, metadata={"help": "Replay share of kept text tokens, in [0, 1)."})
    block_size: int = field(default=2048, metadata={"help": "Context window (tokens) a pair must fit into."})
    min_script_fraction: float = field(default=0.5, metadata={"help": "Least share of a text's letters in its script."})
    eval_questions: list[str] | None = field(default=None, metadata={"help": "Cloze questions to keep out of data."})
    min_eval_sentence_chars: int = field(default=8, metadata={"help": "Shorter filled sentences are not guarded."})
    min_pairs: int = field(default=1, metadata={"help": "Fewest kept pairs a dataset may have; fewer is refused."})
    max_records_per_input: int | None = field(default=None, metadata={"help": "Read the first N records per input."})
    seed: int = field(default=0, metadata={"help": "Seed of the replay draw."})
    streaming: bool = field(default=False, metadata={"help": "Stream Hub datasets instead of downloading them."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the checks."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the dataset, stats and card to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repo id (needed to push)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub dataset repo as private."})


# Reading inputs


def _column(record, column: str, where: str, flag: str):
    """``record[column]``, following dots into nested dicts (``translation.en``)."""
    value = record
    for key in column.split("."):
        if not isinstance(value, dict) or key not in value:
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{where}: no column {column!r} (found: {found}). Pass {flag} NAME.")
        value = value[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: column {column!r} holds {type(value).__name__}, not text.")
    return value


def read_pair_file(path: str, en_column: str, tgt_column: str):
    """``(where, en, tgt)`` of every pair of a .jsonl, .json, .tsv or .csv file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such file. Check --pairs_files.")
    suffix = file.suffix.lower()
    if suffix in (".tsv", ".csv"):
        if file.stat().st_size == 0:
            raise InputError(f"{file}: the file is empty. Give a header row and at least one pair.")
        for where, (en, tgt) in read_delimited(file, [(en_column, "--en_column"), (tgt_column, "--tgt_column")]):
            yield where, en, tgt
    elif suffix in (".jsonl", ".json"):
        for where, record in read_json_records(file):
            en = _column(record, en_column, where, "--en_column")
            yield where, en, _column(record, tgt_column, where, "--tgt_column")
    else:
        raise InputError(f"{file}: unknown pair file type {suffix!r}; use .jsonl, .json, .tsv or .csv.")


def input_sources(args: BuildArguments) -> list[tuple[str, str, bool]]:
    """Every input as ``(kind, path or dataset name, is_file)``: mono, pairs, then replay; files before the dataset."""
    sources = []
    for kind, prefix in ARGUMENT_PREFIX.items():
        sources += [(kind, path, True) for path in getattr(args, f"{prefix}_files") or []]
        if getattr(args, f"{prefix}_dataset"):
            sources.append((kind, getattr(args, f"{prefix}_dataset"), False))
    return sources


def input_rows(kind: str, name: str, is_file: bool, args: BuildArguments, tgt_column: str):
    """``(where, text, en, tgt)`` of every record of one input."""
    prefix, column, flag = ARGUMENT_PREFIX[kind], getattr(args, f"{kind}_text_column", None), f"--{kind}_text_column"
    if is_file and kind == "pair":
        for where, en, tgt in read_pair_file(name, args.en_column, tgt_column):
            yield where, None, en, tgt
    elif is_file:  # read_documents skips blank .txt lines: the count is the document number
        for number, text in enumerate(read_documents(name, column, column_flag=flag), start=1):
            yield f"{name}#{number}", text, None, None
    else:
        split = getattr(args, f"{prefix}_split")
        config, data_files = getattr(args, f"{prefix}_dataset_config"), getattr(args, f"{prefix}_data_files")
        rows = load_dataset_split(
            name, config, split, flag=f"--{prefix}_dataset", streaming=args.streaming, data_files=data_files
        )
        for row_number, row in enumerate(rows):
            where = f"{name}/{split}:{row_number}"
            if kind == "pair":
                en = _column(row, args.en_column, where, "--en_column")
                yield where, None, en, _column(row, tgt_column, where, "--tgt_column")
            else:
                yield where, _column(row, column, where, flag), None, None


def generate_raw_records(args: BuildArguments, tgt_column: str):
    """Every input record, in input order, the first --max_records_per_input of each; ``index`` counts per kind."""
    counters = dict.fromkeys(KINDS, 0)
    for number, (kind, name, is_file) in enumerate(input_sources(args)):
        rows = itertools.islice(input_rows(kind, name, is_file, args, tgt_column), args.max_records_per_input)
        for where, text, en, tgt in rows:
            yield dict(kind=kind, index=counters[kind], input=number, source=where, text=text, en=en, tgt=tgt)
            counters[kind] += 1


def read_raw_records(args: BuildArguments, tgt_column: str, cache_dir: Path) -> datasets.Dataset:
    """Every input record (``generate_raw_records``) written to Arrow files on disk as it comes."""
    try:
        return datasets.Dataset.from_generator(
            generate_raw_records,
            features=RAW_FEATURES,
            cache_dir=str(cache_dir),
            gen_kwargs={"args": args, "tgt_column": tgt_column},
            fingerprint=uuid.uuid4().hex,
        )
    except datasets.exceptions.DatasetGenerationError as error:
        # Surface our own input errors (file:line and what to do) rather than the wrapper.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, InputError):
            raise cause from None
        raise
    except ValueError:
        # datasets refuses a generator that yields nothing; empty inputs are refused later, input by input.
        if next(generate_raw_records(args, tgt_column), None) is not None:
            raise
        return datasets.Dataset.from_dict({name: [] for name in RAW_FEATURES}, features=RAW_FEATURES)


# Contamination guard: filled sentences of cloze questions


def normalize_for_matching(text: str) -> str:
    """NFKC, casefolded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def filled_sentences(source: str) -> list[str]:
    """Every question of a cloze source filled with each of its answers, as the paper scores it and as a Tibetan
    text stating the fact writes it (a tsheg where the blank meets a syllable, as run_density.py counts it)."""
    return [
        fill_blanks(item["question"], answer, tibetan_tsheg=tsheg)
        for question_set in load_question_sets([source], require_options=False)
        for item in question_set.items
        for answer in item["answers"]
        for tsheg in (False, True)
    ]


class FilledSentenceMatcher:
    """Whether a text contains any of many sentences (normalized, trailing punctuation removed), in time linear in
    the text: a sentence is compared only where the text's next ``k`` characters are its first ``k``."""

    def __init__(self, sentences: list[str], min_chars: int):
        normalized = {regex.sub(r"[\p{P}\p{Z}]+$", "", normalize_for_matching(s)) for s in sentences}
        self.too_short = sorted(s for s in normalized if len(s) < min_chars)
        self.sentences = sorted(s for s in normalized if len(s) >= min_chars)
        self.k = min([16] + [len(s) for s in self.sentences])
        self.by_prefix: dict[str, list[str]] = {}
        for sentence in self.sentences:
            self.by_prefix.setdefault(sentence[: self.k], []).append(sentence)

    def first_match(self, text: str) -> str | None:
        if not self.sentences:
            return None
        normalized = normalize_for_matching(text)
        for start in range(len(normalized) - self.k + 1):
            for sentence in self.by_prefix.get(normalized[start : start + self.k], ()):
                if normalized.startswith(sentence, start):
                    return sentence
        return None


def contamination_guard(args: BuildArguments) -> FilledSentenceMatcher:
    """The matcher of every filled sentence of --eval_questions (it matches nothing without them)."""
    sentences = [sentence for path in args.eval_questions or [] for sentence in filled_sentences(path)]
    matcher = FilledSentenceMatcher(sentences, args.min_eval_sentence_chars)
    guarded, too_short = len(matcher.sentences), len(matcher.too_short)
    logger.info("Contamination guard: %d filled eval sentences (%d too short to guard).", guarded, too_short)
    return matcher


# Checks (stateless, run in --num_proc processes)


def check_batch(batch, tokenizer, target_script: str, args: BuildArguments, matcher: FilledSentenceMatcher):
    """Per record: the code of the first failing check (0 if none), its text tokens, and for a kept pair a
    128-bit hash of its stripped sides (for deduplication)."""
    n = len(batch["kind"])
    reasons, keys = [""] * n, [None] * n
    side_tokens: list[list[int]] = [[] for _ in range(n)]  # text tokens of each side (en, tgt) or document
    texts_to_encode, owners = [], []  # the texts to tokenize in one call, and their records
    for i in range(n):
        kind = batch["kind"][i]
        if kind == "pair":
            en, tgt = batch["en"][i] or "", batch["tgt"][i] or ""
            sides = ((en, "Latin"), (tgt, target_script))
        else:
            sides = ((batch["text"][i] or "", target_script if kind == "mono" else "Latin"),)
        if any(not text.strip() for text, _ in sides):
            reasons[i] = "empty"
        elif any(script_letter_fraction(text, script) < args.min_script_fraction for text, script in sides):
            reasons[i] = "not_in_script"
        elif any(matcher.first_match(text) for text, _ in sides):
            reasons[i] = "contains_eval_sentence"
        else:
            for text, _ in sides:
                texts_to_encode.append(text)
                owners.append(i)
            if kind == "pair":
                stripped = json.dumps([en.strip(), tgt.strip()], ensure_ascii=False).encode()
                keys[i] = hashlib.blake2b(stripped, digest_size=16).digest()
    if texts_to_encode:
        encoded = tokenizer(texts_to_encode, add_special_tokens=False)["input_ids"]
        for i, ids in zip(owners, encoded):
            side_tokens[i].append(len(ids))
    for i in range(n):
        # A pair must fit one window laid out as run_cpt.py lays it out (study_common.pair_segments).
        if not reasons[i] and batch["kind"][i] == "pair" and pair_token_count(*side_tokens[i]) > args.block_size:
            reasons[i] = "over_block_size"
    return {
        "drop_code": [REASON_CODES[r] for r in reasons],
        "text_tokens": [sum(sides) for sides in side_tokens],
        "dedup_key": keys,
    }


def check_records(raw: datasets.Dataset, args: BuildArguments, tokenizer, target_script: str, matcher):
    """``check_batch`` over every record, in --num_proc processes."""
    checked_features = datasets.Features({**raw.features, **CHECK_FEATURES})
    if not len(raw):  # map adds no columns to an empty dataset
        return datasets.Dataset.from_dict({name: [] for name in checked_features}, features=checked_features)
    return raw.map(
        check_batch,
        batched=True,
        batch_size=1000,
        num_proc=args.num_proc,
        fn_kwargs={"tokenizer": tokenizer, "target_script": target_script, "args": args, "matcher": matcher},
        features=checked_features,
        desc="Checking documents and pairs",
    )


def mark_duplicate_pairs(table: pa.Table, kind_codes: np.ndarray, codes: np.ndarray) -> None:
    """Drop (in ``codes``) every kept pair whose stripped sides equal an earlier kept pair's."""
    candidates = np.flatnonzero((kind_codes == KINDS.index("pair")) & (codes == 0))
    keys = table.column("dedup_key").take(candidates)
    _, first_occurrences = np.unique(pc.index_in(keys, value_set=pc.unique(keys)).to_numpy(), return_index=True)
    codes[np.setdiff1d(candidates, candidates[first_occurrences])] = REASON_CODES["duplicate_pair"]


def draw_replay(args: BuildArguments, kind_codes: np.ndarray, codes: np.ndarray, text_tokens: np.ndarray) -> dict:
    """Keep replay documents, in a seeded random order, until their share of the text tokens reaches
    --replay_ratio; the rest are dropped (in ``codes``) as replay_beyond_ratio. Returns the replay stats."""
    if args.replay_ratio is None:
        return {}
    kept, replay = codes == 0, KINDS.index("replay")
    base_tokens = int(text_tokens[kept & (kind_codes != replay)].sum())
    target = args.replay_ratio / (1 - args.replay_ratio) * base_tokens
    candidates = np.flatnonzero(kept & (kind_codes == replay))
    order = np.random.default_rng(args.seed).permutation(candidates)
    cumulative = np.cumsum(text_tokens[order])
    n_take = int(np.searchsorted(cumulative, target, side="left")) + 1 if target > 0 else 0
    n_take = min(n_take, len(order))
    codes[order[n_take:]] = REASON_CODES["replay_beyond_ratio"]
    drawn = int(cumulative[n_take - 1]) if n_take else 0
    achieved = drawn / (drawn + base_tokens) if drawn + base_tokens else 0.0
    if achieved < args.replay_ratio - 0.01:
        logger.warning("Replay share %.3f, not %.3f: too little replay text.", achieved, args.replay_ratio)
    return {"requested_ratio": args.replay_ratio, "achieved_ratio": round(achieved, 6), "replay_text_tokens": drawn}


def count_per_input(input_numbers: np.ndarray, codes: np.ndarray, args: BuildArguments) -> list[dict]:
    """Read, kept and dropped-by-reason counts of every input (build_stats.json "inputs"), and whether reading
    stopped at --max_records_per_input."""
    sources, n_codes, cap = input_sources(args), len(REASON_CODES), args.max_records_per_input
    table = np.bincount(input_numbers.astype(np.int64) * n_codes + codes, minlength=len(sources) * n_codes)
    table = table.reshape(len(sources), n_codes)
    return [
        {
            "kind": kind,
            "input": name,
            "read": int(table[number].sum()),
            "kept": int(table[number, 0]),
            "dropped": {reason: int(table[number, REASON_CODES[reason]]) for reason in DROP_REASONS[kind]},
            "reached_max_records": cap is not None and int(table[number].sum()) >= cap,
        }
        for number, (kind, name, _) in enumerate(sources)
    ]


def _counts(entry: dict) -> str:
    dropped = ", ".join(f"{reason} {n}" for reason, n in entry["dropped"].items() if n) or "none"
    return f"read {entry['read']}, kept {entry['kept']}, dropped {dropped}"


def refuse_what_keeps_too_little(args, per_input: list[dict], kept_pairs: int, target_script: str, output_dir):
    """An input that keeps nothing would make a dataset silently without it, and too few pairs measure nothing:
    refuse both. Replay passed over by the draw passed cleaning (one replay input of several may lose all of it)."""
    expected = {
        "mono": f"{target_script} script: is this {args.lang} text?",
        "pair": f"{target_script} script (target side) and Latin (English side): check --en_column/--tgt_column",
        "replay": "Latin script: replay must be English text",
    }
    failures = []
    for entry in per_input:
        kind = entry["kind"]
        if entry["kept"] + entry["dropped"].get("replay_beyond_ratio", 0):
            continue
        if entry["read"]:
            columns = "--en_column/--tgt_column" if kind == "pair" else f"--{kind}_text_column"
            hint = HINTS[max(entry["dropped"], key=entry["dropped"].get)].format(
                columns=columns, fraction=args.min_script_fraction, expected=expected[kind], block_size=args.block_size
            )
            what = f"{_counts(entry)} ({hint})"
        else:
            what = "read 0 records (an empty file, a [] JSON list, a header without rows or an empty split)"
        failures.append(f"the {ARGUMENT_PREFIX[kind]} input {entry['input']} kept nothing: {what}")
    if failures:
        raise InputError("; ".join(failures) + f". Fix or leave out the input; nothing was written to {output_dir}.")
    if kept_pairs < args.min_pairs:
        pair_inputs = "; ".join(f"{e['input']}: {_counts(e)}" for e in per_input if e["kind"] == "pair")
        raise InputError(
            f"kept {kept_pairs} pairs, fewer than --min_pairs {args.min_pairs}: too few to mean anything (pairs read "
            f"and dropped per input: {pair_inputs}). Add parallel pairs or lower --min_pairs; nothing was written "
            f"to {output_dir}."
        )


# Outputs


def to_output_record(batch):
    kinds = batch["kind"]
    return {
        "doc_id": [f"{kind}-{index:09d}" for kind, index in zip(kinds, batch["index"])],
        "pair_id": [index if kind == "pair" else None for kind, index in zip(kinds, batch["index"])],
    }


def save_kept_records(checked: datasets.Dataset, kept: np.ndarray, dataset_dir: Path) -> None:
    """The output dataset: the kept records in input order, with stable ids (``to_output_record``)."""
    # Typed up front: a batch of mono documents alone has only None pair ids, which Arrow
    # cannot type (the first batches of a large build are often all mono).
    record_features = datasets.Features(
        {**checked.features, "doc_id": OUTPUT_FEATURES["doc_id"], "pair_id": OUTPUT_FEATURES["pair_id"]}
    )
    final = checked.select(np.flatnonzero(kept)).map(
        to_output_record, batched=True, features=record_features, desc="Assigning document ids"
    )
    final = final.select_columns(list(OUTPUT_FEATURES)).cast(OUTPUT_FEATURES).flatten_indices()
    final.save_to_disk(str(dataset_dir))


def build_stats(args, target_script, kind_codes, codes, text_tokens, per_input, replay_stats, matcher) -> dict:
    """build_stats.json: what was read, kept and dropped (by kind, reason and input), and the setting."""
    kept, by_kind = codes == 0, [kind_codes == k for k in range(len(KINDS))]
    return {
        "lang": args.lang,
        "script": target_script,
        "tokenizer": args.tokenizer_name,
        "block_size": args.block_size,
        "seed": args.seed,
        "min_script_fraction": args.min_script_fraction,
        "read": {kind: int(is_kind.sum()) for kind, is_kind in zip(KINDS, by_kind)},
        "kept": {kind: int((kept & is_kind).sum()) for kind, is_kind in zip(KINDS, by_kind)},
        "kept_text_tokens": {kind: int(text_tokens[kept & is_kind].sum()) for kind, is_kind in zip(KINDS, by_kind)},
        "dropped": {
            kind: {reason: int(((codes == REASON_CODES[reason]) & is_kind).sum()) for reason in DROP_REASONS[kind]}
            for kind, is_kind in zip(KINDS, by_kind)
        },
        "inputs": per_input,
        "max_records_per_input": args.max_records_per_input,
        "replay": replay_stats,
        "eval_questions": {
            "files": args.eval_questions or [],
            "sentences_guarded": len(matcher.sentences),
            "sentences_too_short_to_guard": matcher.too_short,
        },
        "arguments": asdict(args),
    }


def write_dataset_card(dataset_dir: Path, args: BuildArguments, stats: dict) -> None:
    setting = {
        "lang": args.lang,
        "script": stats["script"],
        "tokenizer": args.tokenizer_name,
        "block_size": args.block_size,
        "mono": args.mono_files or args.mono_dataset or "none",
        "pairs": args.pairs_files or args.pairs_dataset,
        "replay": args.replay_files or args.replay_dataset or "none",
        "replay_ratio": stats["replay"].get("achieved_ratio", 0.0),
        "kept documents": stats["kept"],
        "kept text tokens": stats["kept_text_tokens"],
        "dropped": {k: {r: c for r, c in v.items() if c} for k, v in stats["dropped"].items()},
        "eval questions guarded": args.eval_questions or "none",
        "seed": args.seed,
    }
    write_card(
        dataset_dir,
        f"Continual-pretraining data: {args.lang}",
        "One document per record (kind mono | pair | replay); both continual-pretraining settings "
        "(with and without bridges) read this same dataset. Lengths were checked with the tokenizer below.",
        setting,
        ["cross-lingual-transfer", "continual-pretraining", f"lang-{args.lang}"],
        dataset=True,
    )


def push_dataset(output_dir: Path, repo_id: str, private: bool) -> None:
    """build_stats.json and the card in one commit, then ``Dataset.push_to_hub``: parquet shards ``data/train-*``,
    an earlier push's shards deleted in the same commit, and the card kept with its Hub metadata added."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        # push_to_hub must list the repository to delete an earlier build's shards; one it cannot list (other
        # than "not found") is said here in one line, before anything is uploaded.
        api.list_repo_files(repo_id, repo_type="dataset")
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 404:
            raise RuntimeError(
                f"could not list the files of the Hub dataset {repo_id} to replace an earlier push's data "
                f"files ({error}); nothing was pushed. The dataset in {output_dir} is complete: push it again "
                "once the listing works."
            ) from error
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    files = [CommitOperationAdd(name, output_dir / name) for name in ("README.md", "build_stats.json")]
    api.create_commit(repo_id, files, commit_message="build_pairs.py", repo_type="dataset")
    datasets.load_from_disk(str(output_dir)).push_to_hub(repo_id, private=private, commit_message="build_pairs.py")


# Main


def resolve_default_locations(args: BuildArguments) -> None:
    """The default --output_dir (where run_cpt.py looks) and --tokenizer_name (where run_pretrain.py saves)."""
    if args.output_dir is None:
        args.output_dir = str(default_cpt_data_dir(args.lang))
    if args.tokenizer_name == str(DEFAULT_BASE_MODEL_DIR) and not DEFAULT_BASE_MODEL_DIR.is_dir():
        raise InputError(
            f"{DEFAULT_BASE_MODEL_DIR}: no base model here (the default --tokenizer_name). Run run_pretrain.py first "
            "(it saves there by default) or pass --tokenizer_name DIR_OR_HUB_ID."
        )


def validate(args: BuildArguments) -> None:
    if args.max_records_per_input is not None and args.max_records_per_input < 1:
        raise InputError(f"--max_records_per_input must be at least 1, got {args.max_records_per_input}.")
    for prefix in ARGUMENT_PREFIX.values():
        if getattr(args, f"{prefix}_data_files") and not getattr(args, f"{prefix}_dataset"):
            raise InputError(f"--{prefix}_data_files needs --{prefix}_dataset (local files: --{prefix}_files).")
    if not args.pairs_files and not args.pairs_dataset:
        raise InputError("Give parallel pairs: --pairs_files FILE ... or --pairs_dataset NAME.")
    has_replay = bool(args.replay_files or args.replay_dataset)
    if has_replay and not args.replay_ratio:
        raise InputError(
            "Replay inputs were given without --replay_ratio (or with 0, which takes none of them); set the replay "
            "share, e.g. 0.1."
        )
    if args.replay_ratio is not None and not has_replay and args.replay_ratio > 0:
        raise InputError("--replay_ratio was given without --replay_files or --replay_dataset.")
    if args.replay_ratio is not None and not 0 <= args.replay_ratio < 1:
        raise InputError(f"--replay_ratio must be in [0, 1), got {args.replay_ratio}.")
    if args.min_pairs < 1:
        raise InputError(
            f"--min_pairs must be at least 1 (a dataset without pairs measures nothing), got {args.min_pairs}."
        )
    if not 0 <= args.min_script_fraction <= 1:
        raise InputError(f"--min_script_fraction must be in [0, 1], got {args.min_script_fraction}.")
    if args.block_size < 4:
        raise InputError(f"--block_size must be at least 4 tokens, got {args.block_size}.")
    if args.push_to_hub and not args.hub_dataset_id:
        raise InputError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cpt-bo).")
    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise InputError(f"{output} exists and is not empty. Use another --output_dir or --overwrite_output_dir.")


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=argv)
    setup_logging()
    resolve_default_locations(args)
    validate(args)
    target_script = script_for_language(args.lang, args.script)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    matcher = contamination_guard(args)

    # Everything is built in a staging folder beside --output_dir, which is replaced only at the end.
    output_dir = Path(args.output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        # 1. All inputs into Arrow files on disk, record by record (bounded memory).
        raw = read_raw_records(args, args.tgt_column or args.lang, staging / "cache")
        # 2. Stateless checks in parallel: per record a drop code (0: kept), its text tokens, a pair's hash.
        checked = check_records(raw, args, tokenizer, target_script, matcher)
        table = checked.data
        kind_codes = pc.index_in(table.column("kind"), value_set=pa.array(KINDS)).to_numpy(zero_copy_only=False)
        codes = table.column("drop_code").to_numpy().astype(np.int8)
        text_tokens = table.column("text_tokens").to_numpy()
        # 3. Exact duplicate pairs among the pairs still kept (first occurrence wins).
        mark_duplicate_pairs(table, kind_codes, codes)
        # 4. Replay share, in text tokens, drawn in a seeded random order.
        replay_stats = draw_replay(args, kind_codes, codes, text_tokens)
        # 5. Every input the user gave must keep something, and the pairs must be enough.
        per_input = count_per_input(table.column("input").to_numpy(), codes, args)
        kept_pairs = int(((codes == 0) & (kind_codes == KINDS.index("pair"))).sum())
        refuse_what_keeps_too_little(args, per_input, kept_pairs, target_script, output_dir)
        # 6. The output dataset, its build_stats.json and its card, then moved into place.
        dataset_dir = staging / "dataset"
        save_kept_records(checked, codes == 0, dataset_dir)
        stats = build_stats(args, target_script, kind_codes, codes, text_tokens, per_input, replay_stats, matcher)
        write_json_atomic(dataset_dir / "build_stats.json", stats)
        write_dataset_card(dataset_dir, args, stats)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(dataset_dir, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    for kind in KINDS:
        dropped = {r: c for r, c in stats["dropped"][kind].items() if c}
        logger.info("%-6s read %d, kept %d, dropped %s", kind, stats["read"][kind], stats["kept"][kind], dropped or 0)
    logger.info("Saved %s", output_dir)

    # 7. The Hub copy (optional): build_stats.json and the card, then the parquet shards with push_to_hub.
    if args.push_to_hub:
        push_dataset(output_dir, args.hub_dataset_id, args.hub_private_repo)
        logger.info("Pushed to the Hub dataset %s", args.hub_dataset_id)
    return output_dir


if __name__ == "__main__":
    exit_on_input_error(main)
