#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "accelerate>=1.10", "datasets>=4.0", "pyarrow>=15", "tokenizers>=0.22", "numpy>=2.0", "regex", "huggingface-hub>=1.0"]
# ///
"""Step 1 of the study: pretrain a Qwen2.5-architecture model from random initialisation on Latin-only text.

Reads documents, filters them to the Latin script (counting every drop), trains or loads a tokenizer, packs
``[eos] + tokens`` documents into ``--block_size`` windows with document-isolated attention (checked on the run's
own model before training), trains with the ``Trainer`` and writes the model, ``data_stats.json`` and a model
card. Options and outputs: docs/pretraining.md; batches, isolation check, resume and launches: docs/training.md.

    python run_pretrain.py --config_name configs/tiny.json --train_tokenizer --vocab_size 2000 \\
        --tokenizer_files A.txt B.txt --train_file corpus.txt --block_size 128 --output_dir OUT --max_steps 20
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import regex
import torch
from datasets import Dataset, Features, IterableDataset, Sequence, Value
from datasets.fingerprint import Hasher
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from study_common import (
    DEFAULT_BASE_MODEL_DIR,
    InputError,
    document_start_id,
    exit_on_input_error,
    filter_to_latin,
    has_non_latin_letter,
    load_dataset_split,
    output_dir_given,
    read_documents,
    setup_logging,
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
    uses_flattened_layout,
)

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent


@dataclass
class ModelArguments:
    config_name: str = field(
        default="configs/tiny.json",
        metadata={"help": "Architecture: a config.json file or a Hub id (its config only: weights start random)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value overrides of the config, e.g. 'num_hidden_layers=4'."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer to load (path or Hub id); it needs an EOS token."}
    )
    train_tokenizer: bool = field(
        default=False,
        metadata={"help": "Train a byte-level BPE tokenizer on --tokenizer_files instead of loading one."},
    )
    vocab_size: int = field(default=8000, metadata={"help": "Vocabulary size of the trained tokenizer."})
    tokenizer_files: list[str] | None = field(
        default=None, metadata={"help": "With --train_tokenizer: text files of every language of the study."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel: sdpa, eager; on a GPU also flex_attention or a flash kernel."},
    )
    batch_layout: Literal["auto", "flattened"] = field(
        default="auto",
        metadata={"help": "auto: by kernel (docs/training.md); flattened: one row of B*L tokens for every kernel."},
    )
    document_attention: bool = field(
        default=True,
        metadata={"help": "Keep attention inside each packed document (--no_document_attention: as run_clm)."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Training documents: .txt (one per line), .json, .jsonl, .csv or .tsv."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text in files and datasets."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets dataset (Hub id or folder), e.g. wikimedia/wikipedia."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. 20231101.en."})
    dataset_split: str = field(default="train", metadata={"help": "Which split to train on."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset, filtering and packing lazily (needs --max_steps)."}
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "With --streaming: size of the buffer packed blocks are shuffled in."}
    )
    script_filter: Literal["latin", "none"] = field(
        default="latin", metadata={"help": "latin: keep only the Latin script; none: no filter."}
    )
    filter_mode: Literal["chars", "documents"] = field(
        default="chars",
        metadata={"help": "chars (the paper's): remove non-Latin characters; documents: drop documents holding any."},
    )
    block_size: int = field(default=512, metadata={"help": "Tokens per training window."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for filtering and tokenizing."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches its files."})


def train_tokenizer(
    files_or_texts: Iterable[str | os.PathLike], vocab_size: int, *, text_column: str = "text", show_progress=True
) -> PreTrainedTokenizerFast:
    """A ``Qwen2Tokenizer`` (byte-level BPE; the pipeline ``AutoTokenizer`` rebuilds for a qwen2 model) learnt on
    ``Path`` items (files) and strings (texts): EOS ``<|endoftext|>`` id 0, pad ``<|pad|>`` id 1, every byte."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    if vocab_size < 260:
        raise InputError(
            f"--vocab_size {vocab_size} is too small: 256 bytes and 2 special tokens need 258; use >= 260."
        )

    def texts() -> Iterator[str]:
        for source in files_or_texts:
            yield from read_documents(source, text_column) if isinstance(source, os.PathLike) else [source]

    untrained = Qwen2Tokenizer(pad_token="<|pad|>", clean_up_tokenization_spaces=False)
    return untrained.train_new_from_iterator(
        texts(), vocab_size, initial_alphabet=ByteLevel.alphabet(), show_progress=show_progress
    )


def train_tokenizer_on_main_process(model_args: ModelArguments, data_args: DataArguments, training_args):
    """The tokenizer trained by the main process and sent to the others (identical ids everywhere)."""
    files = model_args.tokenizer_files
    if not files:  # not --train_file alone: a vocabulary learnt on English cuts the target scripts into bytes
        raise InputError("--train_tokenizer needs --tokenizer_files FILE [FILE ...]: text of every study language.")
    for file in files:  # on every process: only the main one reads them all
        check_document_file(file, "--tokenizer_files", data_args.text_column)
    trained = [None]
    if training_args.process_index == 0:
        logger.info("Training a byte-level BPE tokenizer (vocab %d) on %s", model_args.vocab_size, files)
        trained = [train_tokenizer([Path(f) for f in files], model_args.vocab_size, text_column=data_args.text_column)]
    if training_args.world_size > 1:
        torch.distributed.broadcast_object_list(trained, src=0)
    return trained[0], {"kind": "trained byte-level BPE", "files": list(files), "vocab_size": model_args.vocab_size}


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments, training_args, resume_dir):
    """The run's tokenizer and where it came from: the checkpoint's when resuming, else trained or loaded."""
    if resume_dir is not None and (Path(resume_dir) / "tokenizer_config.json").is_file():
        tokenizer, source = AutoTokenizer.from_pretrained(resume_dir), {"kind": "from checkpoint", "path": resume_dir}
    elif model_args.train_tokenizer:
        tokenizer, source = train_tokenizer_on_main_process(model_args, data_args, training_args)
    elif model_args.tokenizer_name:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        except (OSError, ValueError) as err:
            raise InputError(
                f"--tokenizer_name {model_args.tokenizer_name!r} could not be loaded ({err.__class__.__name__}: "
                f"{str(err)[:200]}). Give a folder with tokenizer files or a reachable Hub id, or --train_tokenizer."
            ) from err
        source = {"kind": "loaded", "name": model_args.tokenizer_name}
    else:
        raise InputError("No tokenizer: pass --tokenizer_name NAME, or --train_tokenizer with --tokenizer_files.")
    if tokenizer.eos_token_id is None:
        where = source.get("path") or source.get("name") or "the trained tokenizer"
        raise InputError(
            f"Tokenizer {where!r} has no EOS token; every document starts with it and it separates packed "
            "documents. Set eos_token in its tokenizer_config.json (e.g. '<|endoftext|>'), or use --train_tokenizer."
        )
    if tokenizer.pad_token_id is None:
        logger.info("Tokenizer has no pad token; using EOS as pad (windows are full, nothing is padded).")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, {**source, "length": len(tokenizer), "eos_token": tokenizer.eos_token}


# Data: read, filter, tokenize, pack

#: Why a document is dropped: blank; no letter or digit left by the character filter; (--filter_mode documents)
#: a non-Latin letter or digit in it.
DROP_REASONS = ("empty_input", "empty_after_filter", "non_latin_letter")
_LETTER_OR_NUMBER = regex.compile(r"[\p{L}\p{N}]")


def filter_and_tokenize(batch, tokenizer, start_id: int, text_column: str, script_filter: str, filter_mode: str):
    """Batched map: filter each document and tokenize the kept ones as ``[start] + tokens``; one row per input
    document (``input_ids`` empty and ``drop_reason`` set when dropped), so that every drop is counted."""
    texts = [text or "" for text in batch[text_column]]
    reasons, removed, kept = [], [], []  # kept: the filtered text, None when dropped
    for text in texts:
        reason, n_removed = "", 0
        if not text.strip():
            reason = "empty_input"
        elif script_filter == "latin" and filter_mode == "documents":
            reason = "non_latin_letter" if has_non_latin_letter(text) else ""
        elif script_filter == "latin":
            text, n_removed = filter_to_latin(text)
            if not _LETTER_OR_NUMBER.search(text):  # only spaces or punctuation are left
                reason, n_removed = "empty_after_filter", 0
        reasons.append(reason)
        removed.append(n_removed)
        kept.append(None if reason else text)
    kept_texts = [text for text in kept if text is not None]
    encoded = iter(tokenizer(kept_texts, add_special_tokens=False)["input_ids"] if kept_texts else [])
    return {
        "input_ids": [[] if text is None else [start_id, *next(encoded)] for text in kept],
        "drop_reason": reasons,
        "n_chars_in": [len(text) for text in texts],
        "n_chars_removed": removed,
        "n_chars_out": [0 if text is None else len(text) for text in kept],
    }


def pack_documents(batch, block_size: int):
    """Batched map: concatenate documents into full ``block_size`` windows (the batch's tail dropped, as run_clm's
    ``group_texts``); ``position_ids`` restart at 0 at every document and window."""
    docs = batch["input_ids"]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    n_blocks = int(lengths.sum()) // block_size
    if n_blocks == 0:
        return {"input_ids": [], "position_ids": []}
    ids = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(lengths.sum()))
    starts = np.zeros(len(ids), dtype=bool)
    starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))[lengths > 0]] = True
    ids = ids[: n_blocks * block_size].reshape(n_blocks, block_size)
    starts = starts[: n_blocks * block_size].reshape(n_blocks, block_size)
    starts[:, 0] = True
    index = np.broadcast_to(np.arange(block_size), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {"input_ids": list(ids), "position_ids": list((index - last_start).astype(np.int32))}


BLOCK_FEATURES = Features({"input_ids": Sequence(Value("int32")), "position_ids": Sequence(Value("int32"))})


@dataclass
class PackedBlockCollator:
    """Batches packed windows in ``train_common.packed_batch``'s layout (docs/training.md); labels are -100 at
    every document start. Without ``document_attention`` there are no position ids (as run_clm)."""

    document_attention: bool = True
    attn_implementation: str = "sdpa"
    flatten: bool | None = None

    def __call__(self, examples: list[dict]) -> dict:
        input_ids = torch.tensor(np.asarray([e["input_ids"] for e in examples]), dtype=torch.long)
        position_ids = torch.tensor(np.asarray([e["position_ids"] for e in examples]), dtype=torch.long)
        labels = input_ids.masked_fill(position_ids == 0, -100)
        if not self.document_attention:
            return {"input_ids": input_ids, "labels": labels}
        return packed_batch(input_ids, position_ids, labels, self.attn_implementation, flatten=self.flatten)


def check_document_file(path: str, flag: str, text_column: str) -> None:
    """Fail fast on a file that is missing, empty, of an unknown type or bad at its first record."""
    try:
        next(iter(read_documents(path, text_column)), None)
    except InputError as err:
        raise InputError(f"{flag}: {err}") from err


def read_train_documents(data_args: DataArguments, streaming: bool):
    """The raw documents, one column ``text``. A file is read by ``read_documents``, which names the line of a bad
    record (``load_dataset``'s readers do not, and count blank lines as documents)."""
    if data_args.train_file:
        path = Path(data_args.train_file).resolve()
        gen_kwargs = {"path": str(path), "text_column": data_args.text_column}
        if streaming:
            return IterableDataset.from_generator(_documents_of_file, gen_kwargs=gen_kwargs)
        stat = path.stat()  # a changed file is read again, not taken from the cache
        fingerprint = Hasher.hash([str(path), stat.st_size, stat.st_mtime_ns, data_args.text_column])
        try:
            return Dataset.from_generator(
                _documents_of_file, gen_kwargs=gen_kwargs, cache_dir=data_args.cache_dir, fingerprint=fingerprint
            )
        except datasets.exceptions.DatasetGenerationError as err:
            raise (err.__cause__ if isinstance(err.__cause__, InputError) else err) from None
    if not data_args.dataset_name:
        raise InputError("No training data: pass --train_file FILE or --dataset_name NAME.")
    raw = load_dataset_split(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.dataset_split,
        flag="--dataset_name",
        streaming=streaming,
        cache_dir=data_args.cache_dir,
    )
    if raw.features is not None and data_args.text_column not in raw.features:
        raise InputError(
            f"--dataset_name {data_args.dataset_name!r}: no {data_args.text_column!r} column "
            f"(found: {', '.join(raw.features)}). Pass --text_column NAME."
        )
    raw = raw.select_columns([data_args.text_column])
    return raw.rename_column(data_args.text_column, "text") if data_args.text_column != "text" else raw


def _documents_of_file(path: str, text_column: str) -> Iterator[dict]:
    for text in read_documents(path, text_column):
        yield {"text": text}


def count_documents(tokenized: Dataset, n_blocks: int, block_size: int) -> dict:
    """data_stats.json's counts: every document and character read, dropped (by reason) or kept; tokens; windows."""
    table = tokenized.data
    chars = {name: pc.sum(table.column(f"n_chars_{name}")).as_py() or 0 for name in ("in", "out", "removed")}
    reasons = {row["values"]: row["counts"] for row in pc.value_counts(table.column("drop_reason")).to_pylist()}
    tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    return {
        "documents_in": len(tokenized),
        "documents_out": reasons.get("", 0),
        "documents_dropped": {reason: reasons.get(reason, 0) for reason in DROP_REASONS},
        "characters_in": chars["in"],
        "characters_out": chars["out"],
        "characters_removed_by_filter": chars["removed"],
        "characters_in_dropped_documents": chars["in"] - chars["out"] - chars["removed"],
        "tokens": tokens,
        "blocks": n_blocks,
        "tokens_in_blocks": n_blocks * block_size,
        "tokens_dropped_at_batch_tails": tokens - n_blocks * block_size,
    }


def prepare_dataset(raw: Dataset | IterableDataset, tokenizer, start_id: int, data_args: DataArguments, seed=0):
    """Filter, tokenize and pack into windows: (windows, counts); a corpus that leaves nothing to train on is
    refused. A stream is prepared lazily while it trains, shuffled in a buffer, and not counted (counts None)."""
    streaming = isinstance(raw, IterableDataset)
    workers = {} if streaming else {"num_proc": data_args.preprocessing_num_workers}
    tokenized = raw.map(
        filter_and_tokenize,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "start_id": start_id, "text_column": "text",
                   "script_filter": data_args.script_filter, "filter_mode": data_args.filter_mode},
        remove_columns=["text"],
        **workers,
    )  # fmt: skip
    kept = tokenized.filter(
        lambda reasons: [not r for r in reasons], batched=True, input_columns=["drop_reason"], **workers
    )
    blocks = kept.select_columns(["input_ids"]).map(
        pack_documents,
        batched=True,
        batch_size=2000,
        fn_kwargs={"block_size": data_args.block_size},
        remove_columns=["input_ids"],
        features=BLOCK_FEATURES,
        **workers,
    )
    if streaming and data_args.shuffle_buffer_size > 1:
        blocks = blocks.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    if streaming:
        return blocks, None
    stats = count_documents(tokenized, len(blocks), data_args.block_size)
    source = data_args.train_file or data_args.dataset_name
    if stats["documents_out"] == 0:
        raise InputError(
            f"{source}: every document was filtered away ({stats['documents_in']} read, dropped: "
            f"{stats['documents_dropped']}). The Latin filter keeps only Latin-script text: check the file "
            "and --text_column, or use --filter_mode chars / --script_filter none."
        )
    if stats["blocks"] == 0:
        raise InputError(
            f"{source}: {stats['tokens']} tokens after filtering, fewer than one window of "
            f"--block_size {data_args.block_size}. Give more text or a smaller --block_size."
        )
    return blocks, stats


# Model


def build_config(model_args: ModelArguments, tokenizer, block_size: int):
    """Load the architecture, apply the overrides, size the vocabulary, check the block size."""
    name = model_args.config_name
    looks_like_path = name.endswith(".json") or name.startswith((".", "/")) or os.path.exists(name)
    available = ", ".join(sorted(str(p.relative_to(REPO_DIR)) for p in (REPO_DIR / "configs").glob("*.json")))
    if looks_like_path and not os.path.exists(name):
        raise InputError(f"--config_name {name}: no such config file. Available: {available}, or a Hub id.")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise InputError(
            f"--config_name {name!r}: not a config file and not a reachable Hub model id "
            f"({err.__class__.__name__}). Use one of {available}, or a Hub id such as Qwen/Qwen2.5-0.5B."
        ) from err
    text = ",".join(item.strip() for item in (model_args.config_overrides or "").split(",") if item.strip())
    if text:
        try:
            config.update_from_string(text)
        except (ValueError, TypeError) as err:
            raise InputError(
                f"--config_overrides {text!r}: {err} (the {config.model_type} config of {name}). Write "
                "key=value pairs of its int, float, bool or string fields, e.g. 'num_hidden_layers=4'."
            ) from err
        # Fields derived at construction (layer_types from num_hidden_layers) follow the overridden ones.
        config = type(config)(**{k: v for k, v in config.to_dict().items() if k != "layer_types"})
    overrides = {key: getattr(config, key) for key in (item.partition("=")[0] for item in text.split(",") if item)}
    if "vocab_size" not in overrides:
        config.vocab_size = len(tokenizer)
    elif config.vocab_size < len(tokenizer):
        raise InputError(
            f"--config_overrides vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} "
            "tokens). Use at least the tokenizer's length, or leave vocab_size out."
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and block_size > max_positions:
        raise InputError(
            f"--block_size {block_size} is above the model's max_position_embeddings ({max_positions}, from {name}). "
            f"Use --block_size <= {max_positions}, or raise it with --config_overrides max_position_embeddings=N."
        )
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.eos_token_id  # documents open with EOS; there is no separate BOS
    config.pad_token_id = tokenizer.pad_token_id
    config.use_cache = False  # with a KV cache the per-document mask is silently not built
    return config, overrides  # as applied, typed


#: Documents of the isolation check, by window: two windows of 16 tokens, [A B] and [C D E], so
#: that a kernel leaking inside a row or across the rows of a micro-batch (B > 1) shows it.
CHECK_WINDOWS = ((9, 7), (5, 6, 5))


def isolation_check_windows(start_id: int, vocab_size: int) -> list[list[list[list[int]]]]:
    """Random documents in the windows of ``CHECK_WINDOWS``, each ``[start] + tokens``, as
    ``train_common.check_document_isolation`` takes them (a document of one segment)."""
    generator = torch.Generator().manual_seed(0)
    return [
        [[[start_id, *torch.randint(2, vocab_size, (length - 1,), generator=generator).tolist()]] for length in window]
        for window in CHECK_WINDOWS
    ]


def check_isolation(model, collator: PackedBlockCollator, start_id: int, training_args) -> dict:
    """Document isolation, checked on the training device, kernel, precision and layout; a leak is refused."""
    attn = model.config._attn_implementation
    if not collator.document_attention:
        return {"enabled": False, "attn_implementation": attn}
    model.to(training_args.device)
    windows = isolation_check_windows(start_id, model.config.vocab_size)
    isolation = check_document_isolation(model, collator, windows, autocast_dtype=autocast_dtype(training_args))
    failure = isolation_failure(isolation)
    if failure is not None:
        raise InputError(
            f"Document attention is on, but with --attn_implementation {attn} ({isolation['layout']} layout) on "
            f"{training_args.device} {failure}: attention crosses documents. Nothing was trained; use "
            "--attn_implementation sdpa or eager."
        )
    logger.info("Document isolation checked: %s", json.dumps(isolation))
    return {"enabled": True, **isolation}


def build_model(config, attn_implementation: str, device):
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except (ImportError, ValueError) as err:  # e.g. flash_attention_2 without the flash-attn package
        raise InputError(f"--attn_implementation {attn_implementation} cannot run on {device}: {err}") from err
    guard_flash_attention_inputs(model)  # no batch of several rows without sequence boundaries reaches flash
    logger.info(
        "Model %s: %.2fM parameters, vocab %d", config.model_type, model.num_parameters() / 1e6, config.vocab_size
    )
    return model


def model_card(setting: dict, training_args) -> RunCard:
    """The model card: the setting of the run, and the steps and tokens seen when it is written."""
    rows = {
        "data": setting["source"],
        "script filter": f"{setting['script_filter']} ({setting['filter_mode']})",
        "tokenizer": setting["tokenizer"],
        "config": setting["config_name"],
        "config overrides": setting["config_overrides"] or "none",
        "parameters": setting["parameters"],
        "block size": setting["block_size"],
        "document attention": setting["document_attention"]["enabled"],
        "tokens per step": setting["tokens_per_step"],
        "launch": f"{setting['distributed_type']}, {setting['world_size']} process(es)",
        "learning rate": training_args.learning_rate,
        "seed": setting["seed"],
    }
    if "documents_in" in setting:  # counted (not a stream)
        rows["documents (in / out)"] = f"{setting['documents_in']} / {setting['documents_out']}"
        rows["characters removed by the filter"] = setting["characters_removed_by_filter"]
    tokens_per_step = setting["tokens_per_step"]
    return RunCard(
        "Transparent Latin-only pretraining",
        "A Qwen2.5-architecture model pretrained from random initialisation on Latin-only text, as step 1 of the "
        "study of cross-lingual transfer of cultural knowledge: its training data is fully known and contains no "
        "character of the target languages.",
        rows,
        ["study-pretrain", "qwen2"],
        progress=lambda steps: {"optimizer steps": steps, "tokens seen": steps * tokens_per_step},
    )


# Main


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parse_training_flags(parser, argv)
    if not output_dir_given(argv):  # where build_pairs.py and run_cpt.py look for the base model by default
        training_args.output_dir = str(DEFAULT_BASE_MODEL_DIR)
    if data_args.streaming and training_args.max_steps <= 0:
        raise InputError("--streaming needs --max_steps N: a stream has no length to derive the number of steps from.")
    if data_args.block_size < 2:
        raise InputError(f"--block_size {data_args.block_size} is too small; use e.g. 128 or 512.")
    return model_args, data_args, training_args


def make_collator(model_args: ModelArguments, data_args: DataArguments, training_args) -> PackedBlockCollator:
    flattened = model_args.document_attention and (
        model_args.batch_layout == "flattened" or uses_flattened_layout(model_args.attn_implementation)
    )
    if data_args.streaming and flattened and training_args.accelerator_config.dispatch_batches is None:
        # accelerate dispatches a stream's batches from rank 0 by slicing every tensor along its first
        # dimension, which would cut the one flattened row and its cu_seq_lens; each process reads the
        # stream itself instead (and keeps its share of the windows).
        training_args.accelerator_config.dispatch_batches = False
    return PackedBlockCollator(model_args.document_attention, model_args.attn_implementation, flattened)


def run_setting(model_args, data_args, trainer: Trainer, tokenizer_source, overrides, isolation) -> dict:
    """What the run is (data_stats.json and the model card); tokens per step count every process."""
    dataset = f"{data_args.dataset_name} ({data_args.dataset_config_name}, {data_args.dataset_split})"
    training_args = trainer.args
    return {
        "source": data_args.train_file or dataset,
        "text_column": data_args.text_column,
        "streaming": data_args.streaming,
        "script_filter": data_args.script_filter,
        "filter_mode": data_args.filter_mode,
        "tokenizer": tokenizer_source,
        "config_name": model_args.config_name,
        "config_overrides": overrides,
        "parameters": trainer.model.num_parameters(),
        "block_size": data_args.block_size,
        "document_attention": isolation,
        "world_size": training_args.world_size,
        # What the launch gave: accelerate trains data-parallel (MULTI_CPU) when FSDP is asked without a GPU.
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "tokens_per_step": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
        * data_args.block_size,
        "seed": training_args.seed,
    }


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Run the pretraining; returns data_stats.json's content. ``callbacks`` go to the Trainer
    (bench/bench_pretrain_train.py times the steps with one)."""
    # 1. Arguments, and every refusal that needs no data: nothing is read or written before them.
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    logger.info(
        "Process %d of %d, device %s, bf16 %s", training_args.process_index, training_args.world_size,
        training_args.device, training_args.bf16,
    )  # fmt: skip
    collator = make_collator(model_args, data_args, training_args)
    output_dir = Path(training_args.output_dir)
    resume = resume_checkpoint(training_args.resume_from_checkpoint, output_dir)  # never an earlier run's, silently
    if data_args.train_file:  # before a tokenizer is trained on other files
        check_document_file(data_args.train_file, "--train_file", data_args.text_column)

    # 2. Tokenizer and architecture, checked before the data is read.
    set_seed(training_args.seed)
    tokenizer, tokenizer_source = load_tokenizer(model_args, data_args, training_args, resume)
    start_id = document_start_id(tokenizer)
    config, overrides = build_config(model_args, tokenizer, data_args.block_size)

    # 3. Data: read, filter to the Latin script, tokenize, pack into windows (a stream: lazily, while training);
    # the main process first, so that the others read its cache (as run_clm).
    with training_args.main_process_first(desc="filter, tokenize and pack"):
        raw = read_train_documents(data_args, data_args.streaming)
        train_dataset, counts = prepare_dataset(raw, tokenizer, start_id, data_args, seed=training_args.seed)

    # 4. The model, from random initialisation; document isolation checked on it before training.
    model = build_model(config, model_args.attn_implementation, training_args.device)
    isolation = check_isolation(model, collator, start_id, training_args)

    # 5. The Trainer; the setting and the counts, recorded in data_stats.json and in the model card.
    trainer = CardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    setting = run_setting(model_args, data_args, trainer, tokenizer_source, overrides, isolation)
    data_stats = {**setting, **(counts or {})}
    if training_args.process_index == 0:
        write_json_atomic(output_dir / "data_stats.json", data_stats)
        logger.info("Data: %s", json.dumps(counts))
    trainer.model_card = model_card(data_stats, training_args)
    trainer.create_model_card()

    # 6. Train; then the model, the metrics and the card (pushed with the model).
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # model + tokenizer into output_dir
    metrics = {**train_result.metrics, "train_tokens_seen": trainer.state.global_step * setting["tokens_per_step"]}
    finish_training(trainer, metrics, commit_message=f"Pretraining: {trainer.state.global_step} steps")
    return data_stats


if __name__ == "__main__":
    exit_on_input_error(main)
