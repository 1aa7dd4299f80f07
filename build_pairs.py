#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["transformers>=5.0", "datasets>=4.0", "pyarrow>=15", "numpy>=2.0", "regex", "huggingface-hub>=1.0"]
# ///
"""Build the continual-pretraining dataset of one language: monolingual text, parallel pairs, replay.

Step 2a of the study. ONE dataset per language is built and every continual-pretraining setting (``run_cpt.py``)
reads it, so they start from the same documents. Each record is one document (``doc_id``, ``kind`` mono | pair |
replay, ``text``, ``pair_id``, ``en``, ``tgt``, ``source``); a record that fails a check is dropped and counted in
``build_stats.json``. Inputs stream to Arrow files on disk, checked in --num_proc processes. Fields, drop
reasons and the replay draw: docs/cpt.md.

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
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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

KINDS = ("mono", "pair", "replay")
#: Drop reasons that apply to each kind of record, in the order the checks run.
DROP_REASONS = {
    "mono": ("empty", "not_in_script", "contains_eval_sentence"),
    "pair": ("empty", "not_in_script", "contains_eval_sentence", "over_block_size", "duplicate_pair"),
    "replay": ("empty", "not_in_script", "contains_eval_sentence", "replay_beyond_ratio"),
}
RAW_FEATURES = datasets.Features(
    {
        "kind": datasets.Value("string"),
        "index": datasets.Value("int64"),
        "input": datasets.Value("int32"),  # position of the record's input in ``input_sources``
        "source": datasets.Value("string"),
        "text": datasets.Value("string"),
        "en": datasets.Value("string"),
        "tgt": datasets.Value("string"),
    }
)
OUTPUT_FEATURES = datasets.Features(
    {
        "doc_id": datasets.Value("string"),
        "kind": datasets.Value("string"),
        "text": datasets.Value("string"),
        "pair_id": datasets.Value("int64"),
        "en": datasets.Value("string"),
        "tgt": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


@dataclass
class BuildArguments:
    lang: str = field(
        metadata={"help": "Target language code: ko, zh, bo, mn (scripts known); any other with --script."}
    )
    tokenizer_name: str = field(
        default=str(DEFAULT_BASE_MODEL_DIR),
        metadata={"help": "The base model's tokenizer, measuring pairs against --block_size (default: runs/pretrain)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the dataset, build_stats.json and card go (default: runs/data-<lang>)."},
    )
    script: str | None = field(
        default=None, metadata={"help": "Unicode script of the target language (e.g. Cyrillic); needed if not listed."}
    )
    mono_files: list[str] | None = field(
        default=None, metadata={"help": "Target-language text files: .txt (one document per line), .json, .jsonl."}
    )
    mono_dataset: str | None = field(default=None, metadata={"help": "Hub dataset (or local dir) of mono text."})
    mono_dataset_config: str | None = field(default=None, metadata={"help": "Config name of --mono_dataset."})
    mono_split: str = field(default="train", metadata={"help": "Split of --mono_dataset."})
    mono_data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Files of --mono_dataset to read (default: all of them)."},
    )
    mono_text_column: str = field(default="text", metadata={"help": "Text column of mono .json/.jsonl or dataset."})
    pairs_files: list[str] | None = field(
        default=None, metadata={"help": "Parallel pair files: .jsonl, .json, .tsv or .csv (with a header row)."}
    )
    pairs_dataset: str | None = field(default=None, metadata={"help": "Hub dataset (or local dir) of pairs."})
    pairs_dataset_config: str | None = field(default=None, metadata={"help": "Config name of --pairs_dataset."})
    pairs_split: str = field(default="train", metadata={"help": "Split of --pairs_dataset."})
    pairs_data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Files of --pairs_dataset to read (default: all of them)."},
    )
    en_column: str = field(
        default="en", metadata={"help": "English column of the pairs; dotted for nested fields (translation.en)."}
    )
    tgt_column: str | None = field(
        default=None, metadata={"help": "Target column of the pairs (default: the --lang code; dotted allowed)."}
    )
    replay_files: list[str] | None = field(default=None, metadata={"help": "English replay text files (optional)."})
    replay_dataset: str | None = field(default=None, metadata={"help": "Hub dataset (or local dir) of replay text."})
    replay_dataset_config: str | None = field(default=None, metadata={"help": "Config name of --replay_dataset."})
    replay_split: str = field(default="train", metadata={"help": "Split of --replay_dataset."})
    replay_data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Files of --replay_dataset to read (default: all of them)."},
    )
    replay_text_column: str = field(default="text", metadata={"help": "Text column of replay .json/.jsonl or dataset."})
    replay_ratio: float | None = field(
        default=None,
        metadata={"help": "Share of replay in the final text tokens, in [0, 1); required with replay inputs."},
    )
    block_size: int = field(default=2048, metadata={"help": "Context window (tokens) a pair must fit into."})
    min_script_fraction: float = field(
        default=0.5, metadata={"help": "Minimum fraction of a text's letters in its expected script."}
    )
    eval_questions: list[str] | None = field(
        default=None,
        metadata={"help": "Cloze question sets whose filled sentences the data must not contain."},
    )
    min_eval_sentence_chars: int = field(
        default=8,
        metadata={"help": "Filled eval sentences shorter than this are too generic to guard (listed)."},
    )
    min_pairs: int = field(
        default=1,
        metadata={"help": "Fewest kept pairs a dataset may have; fewer is refused."},
    )
    max_records_per_input: int | None = field(
        default=None,
        metadata={"help": "Read at most the first N records of each input (a smoke run's budget)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the replay draw."})
    streaming: bool = field(default=False, metadata={"help": "Stream Hub datasets instead of downloading them whole."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the checks (tokenization, scripts)."})
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
    """Yield (en, tgt, "file:line") from a .jsonl, .json, .tsv or .csv pair file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such file. Check --pairs_files.")
    suffix = file.suffix.lower()
    if suffix in (".tsv", ".csv"):
        if file.stat().st_size == 0:
            raise InputError(f"{file}: the file is empty. Give a header row and at least one pair.")
        for where, (en, tgt) in read_delimited(file, [(en_column, "--en_column"), (tgt_column, "--tgt_column")]):
            yield en, tgt, where
    elif suffix in (".jsonl", ".json"):
        for where, record in read_json_records(file):
            en = _column(record, en_column, where, "--en_column")
            yield en, _column(record, tgt_column, where, "--tgt_column"), where
    else:
        raise InputError(f"{file}: unknown pair file type {suffix!r}; use .jsonl, .json, .tsv or .csv.")


class InputSource(NamedTuple):
    """One input the user gave: a file or a dataset, of one kind."""

    kind: str  # mono, pair, replay
    name: str  # the path or the dataset name
    is_file: bool


#: The argument prefix of each kind's inputs (``--pairs_files``, ``--mono_dataset``, ...).
ARGUMENT_PREFIX = {"mono": "mono", "pair": "pairs", "replay": "replay"}


def input_sources(args: BuildArguments) -> list[InputSource]:
    """Every input, in reading order: mono, then pairs, then replay; files before the dataset."""
    sources = []
    for kind in KINDS:
        prefix = ARGUMENT_PREFIX[kind]
        sources += [InputSource(kind, path, True) for path in getattr(args, f"{prefix}_files") or []]
        if getattr(args, f"{prefix}_dataset"):
            sources.append(InputSource(kind, getattr(args, f"{prefix}_dataset"), False))
    return sources


def input_rows(source: InputSource, args: BuildArguments, tgt_column: str):
    """``(where, text, en, tgt)`` of every record of one input."""
    kind, name, is_file = source
    column, flag = getattr(args, f"{kind}_text_column", None), f"--{kind}_text_column"
    if is_file and kind == "pair":
        for en, tgt, where in read_pair_file(name, args.en_column, tgt_column):
            yield where, None, en, tgt
    elif is_file:  # read_documents skips blank .txt lines: the count is the document number
        for number, text in enumerate(read_documents(name, column, column_flag=flag), start=1):
            yield f"{name}#{number}", text, None, None
    else:
        prefix = ARGUMENT_PREFIX[kind]
        split = getattr(args, f"{prefix}_split")
        config, data_files = getattr(args, f"{prefix}_dataset_config"), getattr(args, f"{prefix}_data_files")
        rows = load_dataset_split(name, config, split, flag=f"--{prefix}_dataset", streaming=args.streaming,
                                  data_files=data_files)  # fmt: skip
        for row_number, row in enumerate(rows):
            where = f"{name}/{split}:{row_number}"
            if kind == "pair":
                en = _column(row, args.en_column, where, "--en_column")
                yield where, None, en, _column(row, tgt_column, where, "--tgt_column")
            else:
                yield where, _column(row, column, where, flag), None, None


def generate_raw_records(args: BuildArguments, tgt_column: str):
    """Every input record, in input order (``input_sources``), the first --max_records_per_input of each input;
    ``index`` counts per kind."""
    counters = dict.fromkeys(KINDS, 0)
    for number, source in enumerate(input_sources(args)):
        rows = itertools.islice(input_rows(source, args, tgt_column), args.max_records_per_input)
        for where, text, en, tgt in rows:
            yield {"kind": source.kind, "index": counters[source.kind], "input": number, "source": where,
                   "text": text, "en": en, "tgt": tgt}  # fmt: skip
            counters[source.kind] += 1


# Contamination guard: filled sentences of cloze questions


def normalize_for_matching(text: str) -> str:
    """NFKC, casefolded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _strip_trailing_punctuation(text: str) -> str:
    end = len(text)
    while end and (unicodedata.category(text[end - 1])[0] in "PZ" or text[end - 1].isspace()):
        end -= 1
    return text[:end]


def filled_sentences(source: str) -> list[str]:
    """Every question of a cloze source (``cloze.load_question_sets``) filled with each of its answers, in
    both spellings: as the paper scores it, and as a Tibetan text stating the fact writes it (with a tsheg
    where the blank meets a syllable, as run_density.py counts it). Either spelling in a text is caught."""
    sentences = []
    for question_set in load_question_sets([source], require_options=False):
        for item in question_set.items:
            for answer in item["answers"]:
                sentences.append(fill_blanks(item["question"], answer))
                sentences.append(fill_blanks(item["question"], answer, tibetan_tsheg=True))
    return sentences


class FilledSentenceMatcher:
    """Find whether a text contains any of many sentences, in time linear in the text.

    Sentences are normalized (``normalize_for_matching``, trailing punctuation removed). A
    polynomial hash of the first ``k`` characters of each sentence is compared, with numpy,
    against the hash of every ``k``-character window of the text; only hash hits are checked
    character by character.
    """

    _BASE = np.uint64(1_000_003)

    def __init__(self, sentences: list[str], min_chars: int):
        normalized = {_strip_trailing_punctuation(normalize_for_matching(s)) for s in sentences}
        self.too_short = sorted(s for s in normalized if len(s) < min_chars)
        self.sentences = sorted(s for s in normalized if len(s) >= min_chars)
        self.k = min([16] + [len(s) for s in self.sentences])
        self.by_hash: dict[int, list[str]] = {}
        for sentence in self.sentences:
            self.by_hash.setdefault(int(self._window_hashes(sentence[: self.k])[0]), []).append(sentence)
        self.hashes = np.array(sorted(self.by_hash), dtype=np.uint64)

    def _window_hashes(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        count = len(codes) - self.k + 1
        hashes = np.zeros(max(count, 0), dtype=np.uint64)
        for offset in range(self.k):  # wraps modulo 2**64, which is what a hash wants
            hashes = hashes * self._BASE + codes[offset : offset + count]
        return hashes

    def first_match(self, text: str) -> str | None:
        if not self.sentences:
            return None
        normalized = normalize_for_matching(text)
        if len(normalized) < self.k:
            return None
        hashes = self._window_hashes(normalized)
        for position in np.flatnonzero(np.isin(hashes, self.hashes)):
            for sentence in self.by_hash[int(hashes[position])]:
                if normalized.startswith(sentence, int(position)):
                    return sentence
        return None


# Checks (stateless, run in --num_proc processes)


#: Drop reasons as small integer codes (0: kept), so that per-record bookkeeping of a paper-scale
#: build is a few bytes per record in numpy, never Python objects.
REASON_CODES = {reason: code for code, reason in enumerate(("", *dict.fromkeys(sum(DROP_REASONS.values(), ()))))}
CHECK_FEATURES = {
    "drop_code": datasets.Value("int8"),
    "text_tokens": datasets.Value("int64"),
    "dedup_hi": datasets.Value("int64"),
    "dedup_lo": datasets.Value("int64"),
}


def check_batch(batch, tokenizer, target_script, min_fraction, block_size, matcher):
    """Per record: the code of the first failing check (0 if none), its text tokens, and for a kept
    pair a 126-bit hash of its stripped sides (two int64) for deduplication."""
    n = len(batch["kind"])
    reasons, hashes = [""] * n, [(0, 0)] * n
    side_tokens: list[list[int]] = [[] for _ in range(n)]  # text tokens of each side (en, tgt) or document
    texts_to_encode: list[str] = []
    owners: list[int] = []
    for i in range(n):
        kind = batch["kind"][i]
        if kind == "pair":
            en, tgt = batch["en"][i] or "", batch["tgt"][i] or ""
            sides = ((en, "Latin"), (tgt, target_script))
        else:
            sides = ((batch["text"][i] or "", target_script if kind == "mono" else "Latin"),)
        if any(not text.strip() for text, _ in sides):
            reasons[i] = "empty"
        elif any(script_letter_fraction(text, script) < min_fraction for text, script in sides):
            reasons[i] = "not_in_script"
        elif matcher is not None and any(matcher.first_match(text) for text, _ in sides):
            reasons[i] = "contains_eval_sentence"
        else:
            for text, _ in sides:
                texts_to_encode.append(text)
                owners.append(i)
            if kind == "pair":
                digest = hashlib.blake2b(
                    json.dumps([en.strip(), tgt.strip()], ensure_ascii=False).encode(), digest_size=16
                ).digest()
                top = (1 << 63) - 1  # two non-negative int64: a 126-bit key
                hashes[i] = (int.from_bytes(digest[:8], "little") & top, int.from_bytes(digest[8:], "little") & top)
    if texts_to_encode:
        encoded = tokenizer(texts_to_encode, add_special_tokens=False)["input_ids"]
        for i, ids in zip(owners, encoded):
            side_tokens[i].append(len(ids))
    for i in range(n):
        # A pair must fit one window laid out as run_cpt.py lays it out (study_common.pair_segments).
        if not reasons[i] and batch["kind"][i] == "pair" and pair_token_count(*side_tokens[i]) > block_size:
            reasons[i] = "over_block_size"
    return {
        "drop_code": [REASON_CODES[r] for r in reasons],
        "text_tokens": [sum(sides) for sides in side_tokens],
        "dedup_hi": [h[0] for h in hashes],
        "dedup_lo": [h[1] for h in hashes],
    }


def to_output_record(batch):
    kinds = batch["kind"]
    return {
        "doc_id": [f"{kind}-{index:09d}" for kind, index in zip(kinds, batch["index"])],
        "pair_id": [index if kind == "pair" else None for kind, index in zip(kinds, batch["index"])],
    }


# Main


def count_per_input(
    input_numbers: np.ndarray, codes: np.ndarray, sources: list[InputSource], cap: int | None = None
) -> list[dict]:
    """Read, kept and dropped-by-reason counts of every input the user gave (files and datasets), and whether
    reading stopped at --max_records_per_input (``cap``)."""
    n_codes = len(REASON_CODES)
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


def _drop_counts(counts: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items() if n) or "none"


def per_input_summary(per_input: list[dict], kind: str) -> str:
    return "; ".join(
        f"{c['input']}: read {c['read']}, kept {c['kept']}, dropped {_drop_counts(c)}"
        for c in per_input
        if c["kind"] == kind
    )


def _why_nothing_was_kept(counts: dict, args: BuildArguments, target_script: str) -> str:
    """What the largest drop reason of an input usually means, and what to check."""
    if counts["read"] == 0:
        return "the input holds no records (an empty file, a [] JSON list, a header without rows, an empty split)"
    reason = max(counts["dropped"], key=counts["dropped"].get)
    kind, fraction = counts["kind"], args.min_script_fraction
    if reason == "empty":
        columns = "--en_column/--tgt_column" if kind == "pair" else f"--{kind}_text_column"
        return f"the texts are empty or null: check {columns}"
    if reason == "not_in_script" and kind == "pair":
        return (
            f"under {fraction:.0%} of the letters of the target side are in the {target_script} script (or of the "
            f"English side in Latin): check that --tgt_column names the {args.lang} column and --en_column the "
            f"English one, and that the target text is in the {target_script} script (e.g. Mongolian in Cyrillic "
            "is not the traditional script)"
        )
    if reason == "not_in_script" and kind == "replay":
        return f"under {fraction:.0%} of the letters are Latin: replay must be English text"
    if reason == "not_in_script":
        return f"under {fraction:.0%} of the letters are in the {target_script} script: is this {args.lang} text?"
    if reason == "contains_eval_sentence":
        return "every record contains a filled sentence of --eval_questions"
    if reason == "over_block_size":
        return f"no pair fits --block_size {args.block_size} tokens"
    return f"every record was dropped as {reason}"


def refuse_inputs_that_keep_nothing(per_input: list[dict], args: BuildArguments, target_script: str, output_dir):
    """An input the user gave that keeps nothing makes a dataset that silently lacks it: refuse.

    Replay documents passed over by the seeded draw (``replay_beyond_ratio``) passed cleaning: one
    replay file of several may lose all of them to the draw.
    """
    failures = [
        f"the {c['kind'] if c['kind'] != 'pair' else 'pairs'} input {c['input']} kept nothing: "
        + (
            f"read 0 records ({_why_nothing_was_kept(c, args, target_script)})"
            if c["read"] == 0
            else f"read {c['read']}, kept 0, dropped {_drop_counts(c)} ({_why_nothing_was_kept(c, args, target_script)})"
        )
        for c in per_input
        if c["kept"] + c["dropped"].get("replay_beyond_ratio", 0) == 0
    ]
    if failures:
        raise InputError("; ".join(failures) + f". Fix or leave out the input; nothing was written to {output_dir}.")


def push_dataset(output_dir: Path, repo_id: str, private: bool) -> None:
    """``Dataset.push_to_hub`` (parquet shards ``data/train-*``; an earlier push's shards deleted in the same
    commit), then build_stats.json and the card, with the Hub metadata push_to_hub wrote, in a second commit."""
    from huggingface_hub import DatasetCard, HfApi
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
    datasets.load_from_disk(str(output_dir)).push_to_hub(repo_id, private=private, commit_message="build_pairs.py")
    card = DatasetCard((output_dir / "README.md").read_text(encoding="utf-8"))
    for key, value in DatasetCard.load(repo_id, repo_type="dataset").data.to_dict().items():
        card.data[key] = value  # the configs and dataset_info push_to_hub wrote
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "README.md").write_text(str(card), encoding="utf-8")
        shutil.copy(output_dir / "build_stats.json", folder)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset", commit_message="build_pairs.py")


def validate(args: BuildArguments) -> None:
    if args.max_records_per_input is not None and args.max_records_per_input < 1:
        raise InputError(f"--max_records_per_input must be at least 1, got {args.max_records_per_input}.")
    for prefix in ("mono", "pairs", "replay"):
        if getattr(args, f"{prefix}_data_files") and not getattr(args, f"{prefix}_dataset"):
            raise InputError(
                f"--{prefix}_data_files names files of a dataset, but no --{prefix}_dataset was given; "
                f"give the dataset, or pass local files with --{prefix}_files."
            )
    if not args.pairs_files and not args.pairs_dataset:
        raise InputError("Give parallel pairs: --pairs_files FILE ... or --pairs_dataset NAME.")
    has_replay = bool(args.replay_files or args.replay_dataset)
    if has_replay and args.replay_ratio is None:
        raise InputError("Replay inputs were given without --replay_ratio; set the replay share, e.g. 0.1.")
    if args.replay_ratio is not None and not has_replay and args.replay_ratio > 0:
        raise InputError("--replay_ratio was given without --replay_files or --replay_dataset.")
    if args.replay_ratio is not None and not 0 <= args.replay_ratio < 1:
        raise InputError(f"--replay_ratio must be in [0, 1), got {args.replay_ratio}.")
    if has_replay and args.replay_ratio == 0:
        raise InputError("--replay_ratio 0 takes none of the replay inputs; leave them out or set a share, e.g. 0.1.")
    if args.min_pairs < 1:
        raise InputError(f"--min_pairs must be at least 1 (a CPT dataset without pairs measures nothing), "
                         f"got {args.min_pairs}.")  # fmt: skip
    if not 0 <= args.min_script_fraction <= 1:
        raise InputError(f"--min_script_fraction must be in [0, 1], got {args.min_script_fraction}.")
    if args.block_size < 4:
        raise InputError(f"--block_size must be at least 4 tokens, got {args.block_size}.")
    if args.push_to_hub and not args.hub_dataset_id:
        raise InputError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cpt-bo).")
    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise InputError(f"{output} exists and is not empty. Use another --output_dir or --overwrite_output_dir.")


def resolve_default_locations(args: BuildArguments) -> None:
    """The default --output_dir (where run_cpt.py --lang LANG looks) and a clear refusal when the default
    --tokenizer_name (run_pretrain.py's output) is not there yet."""
    if args.output_dir is None:
        args.output_dir = str(default_cpt_data_dir(args.lang))
    if args.tokenizer_name == str(DEFAULT_BASE_MODEL_DIR) and not DEFAULT_BASE_MODEL_DIR.is_dir():
        raise InputError(
            f"{DEFAULT_BASE_MODEL_DIR}: no base model here (the default --tokenizer_name). Run run_pretrain.py first "
            "(it saves there by default) or pass --tokenizer_name DIR_OR_HUB_ID."
        )


def contamination_guard(args: BuildArguments) -> FilledSentenceMatcher | None:
    """The matcher of every filled sentence of --eval_questions (None without them)."""
    if not args.eval_questions:
        return None
    sentences = [s for path in args.eval_questions for s in filled_sentences(path)]
    matcher = FilledSentenceMatcher(sentences, args.min_eval_sentence_chars)
    logger.info(
        "Contamination guard: %d filled eval sentences (%d too short to guard).",
        len(matcher.sentences),
        len(matcher.too_short),
    )
    return matcher


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
        # datasets refuses a generator that yields nothing; every input being empty is reported
        # later, input by input, like any other input that keeps nothing.
        if next(generate_raw_records(args, tgt_column), None) is not None:
            raise
        return datasets.Dataset.from_dict({name: [] for name in RAW_FEATURES}, features=RAW_FEATURES)


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
        fn_kwargs={
            "tokenizer": tokenizer,
            "target_script": target_script,
            "min_fraction": args.min_script_fraction,
            "block_size": args.block_size,
            "matcher": matcher,
        },
        features=checked_features,
        desc="Checking documents and pairs",
    )


def mark_duplicate_pairs(table: pa.Table, kind_codes: np.ndarray, codes: np.ndarray) -> None:
    """Drop (in ``codes``) every kept pair whose stripped sides equal an earlier kept pair's."""
    candidates = np.flatnonzero((kind_codes == KINDS.index("pair")) & (codes == 0))
    keys = np.stack(
        [table.column("dedup_hi").to_numpy()[candidates], table.column("dedup_lo").to_numpy()[candidates]], axis=1
    )
    _, first_occurrences = np.unique(keys, axis=0, return_index=True)
    duplicates = np.setdiff1d(np.arange(len(candidates)), first_occurrences)
    codes[candidates[duplicates]] = REASON_CODES["duplicate_pair"]


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
    replay_tokens = int(cumulative[n_take - 1]) if n_take else 0
    achieved = replay_tokens / (replay_tokens + base_tokens) if replay_tokens + base_tokens else 0.0
    if achieved < args.replay_ratio - 0.01:
        logger.warning(
            "Only %.3f replay share reached (asked %.3f): not enough replay text.", achieved, args.replay_ratio
        )
    return {
        "requested_ratio": args.replay_ratio,
        "achieved_ratio": round(achieved, 6),
        "replay_text_tokens": replay_tokens,
    }


def refuse_what_keeps_too_little(args, table, kind_codes, codes, target_script: str, output_dir: Path) -> list[dict]:
    """Every input the user gave must keep something, and the kept pairs must reach --min_pairs.
    Returns the per-input counts (build_stats.json "inputs")."""
    per_input = count_per_input(
        table.column("input").to_numpy(), codes, input_sources(args), args.max_records_per_input
    )
    for entry in per_input:
        if entry["reached_max_records"]:
            logger.warning("%s: read only its first %d records (--max_records_per_input).", entry["input"],
                           args.max_records_per_input)  # fmt: skip
    refuse_inputs_that_keep_nothing(per_input, args, target_script, output_dir)
    kept_pairs = int(((codes == 0) & (kind_codes == KINDS.index("pair"))).sum())
    if kept_pairs < args.min_pairs:
        raise InputError(
            f"kept {kept_pairs} pairs, fewer than --min_pairs {args.min_pairs}: too few to mean anything "
            f"(pairs read and dropped per input: {per_input_summary(per_input, 'pair')}). Add parallel pairs "
            f"or lower --min_pairs; nothing was written to {output_dir}."
        )
    return per_input


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
    kept = codes == 0
    return {
        "lang": args.lang,
        "script": target_script,
        "tokenizer": args.tokenizer_name,
        "block_size": args.block_size,
        "seed": args.seed,
        "min_script_fraction": args.min_script_fraction,
        "read": {kind: int((kind_codes == k).sum()) for k, kind in enumerate(KINDS)},
        "kept": {kind: int((kept & (kind_codes == k)).sum()) for k, kind in enumerate(KINDS)},
        "kept_text_tokens": {kind: int(text_tokens[kept & (kind_codes == k)].sum()) for k, kind in enumerate(KINDS)},
        "dropped": {
            kind: {
                reason: int(((codes == REASON_CODES[reason]) & (kind_codes == k)).sum())
                for reason in DROP_REASONS[kind]
            }
            for k, kind in enumerate(KINDS)
        },
        "inputs": per_input,
        "max_records_per_input": args.max_records_per_input,
        "replay": replay_stats,
        "eval_questions": {
            "files": args.eval_questions or [],
            "sentences_guarded": len(matcher.sentences) if matcher else 0,
            "sentences_too_short_to_guard": matcher.too_short if matcher else [],
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


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=argv)
    setup_logging()
    resolve_default_locations(args)
    validate(args)
    target_script = script_for_language(args.lang, args.script)
    tgt_column = args.tgt_column or args.lang
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    matcher = contamination_guard(args)

    # Everything is built in a staging folder beside --output_dir, which is replaced only at the end.
    output_dir = Path(args.output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        # 1. All inputs into Arrow files on disk, record by record (bounded memory).
        raw = read_raw_records(args, tgt_column, staging / "cache")
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
        per_input = refuse_what_keeps_too_little(args, table, kind_codes, codes, target_script, output_dir)
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

    # 7. The Hub copy (optional): parquet shards, build_stats.json and the card in one commit.
    if args.push_to_hub:
        push_dataset(output_dir, args.hub_dataset_id, args.hub_private_repo)
        logger.info("Pushed to the Hub dataset %s", args.hub_dataset_id)
    return output_dir


if __name__ == "__main__":
    exit_on_input_error(main)
