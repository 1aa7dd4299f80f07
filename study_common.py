"""Small pieces of logic that several scripts of the study share.

Each script (run_pretrain.py, build_pairs.py, run_cpt.py, run_eval.py, run_density.py,
run_study.py) is meant to be read top to bottom on its own; what they must agree on lives
here, once:

* which Unicode script each language is written in, and the Latin-only filter of step 1;
* how a document becomes token ids (the document-start token, shared by training and probing);
* reading plain-text / JSON / JSONL / CSV / TSV documents with errors that name the file and line;
* writing outputs atomically, so that a crash never leaves a file that looks complete;
* model and dataset cards that record the setting a run used;
* the batch layout of packed windows for each attention implementation (``packed_batch``), and the
  guard that keeps a flash kernel from ever seeing several rows without sequence boundaries;
* the document-isolation check that run_pretrain.py and run_cpt.py run on their own model, kernel,
  device and layout before training (``check_document_isolation``);
* one resume convention for the training scripts (``resume_checkpoint``, ``RESUME_HELP``) and one way
  to write, and push, their model cards (``ModelCard``, ``ModelCardMixin``, ``finish_training``);
* the default locations where each step writes and the next one reads (``runs/...``);
* the layout of a parallel pair in a context window (``pair_first_side``, ``pair_segments``);
* the conventions every script follows: one log format (``setup_logging``) and one way a bad input
  ends a run (``InputError`` -> ``script.py: error: ...``, exit status 2: ``exit_on_input_error``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import regex

# --------------------------------------------------------------------------------------
# Languages and scripts
# --------------------------------------------------------------------------------------

#: The Unicode script (as named by the Script / Script_Extensions property) of each language
#: of the study. Any other language is accepted where a script is given explicitly.
LANGUAGE_SCRIPTS = {
    "en": "Latin",
    "ko": "Hangul",
    "zh": "Han",
    "bo": "Tibetan",
    "mn": "Mongolian",
}


def script_for_language(lang: str, script: str | None = None) -> str:
    """The script name for ``lang``; ``script`` overrides it (needed for languages not listed)."""
    if script:
        try:
            regex.compile(rf"\p{{scx={script}}}")
        except regex.error as err:
            raise ValueError(f"Unknown Unicode script {script!r} ({err}); use a name such as Cyrillic.") from err
        return script
    if lang not in LANGUAGE_SCRIPTS:
        known = ", ".join(sorted(LANGUAGE_SCRIPTS))
        raise ValueError(f"No script is known for language {lang!r} (known: {known}); pass --script NAME.")
    return LANGUAGE_SCRIPTS[lang]


# The Latin filter keeps a character when its Script_Extensions property contains Latin
# (letters, accented letters, Latin ligatures) or is exactly Common (ASCII digits and
# punctuation, spaces, general symbols). Script_Extensions rather than Script matters for
# punctuation owned by one script family: U+3002 IDEOGRAPHIC FULL STOP and U+1802 MONGOLIAN
# COMMA have Script=Common but Script_Extensions={Han, Hangul, ...} / {Mongolian, Phags-pa},
# so they are removed. Combining marks (Script=Inherited) are kept only when attached to a
# kept Latin letter (e + U+0301 stays, Hangul or Devanagari + mark goes). Digits of other
# scripts (Tibetan ༣, Mongolian ᠓) carry their script and are removed.
_LATIN_OR_COMMON = regex.compile(r"[\p{scx=Latin}\p{scx=Zyyy}]")
_COMBINING_MARK = regex.compile(r"\p{M}")
_LETTER = regex.compile(r"\p{L}")


# The rule, character by character: a combining mark is kept iff the last non-mark character
# before it is a kept letter; any other character is kept iff it is Latin or Common. As one
# substitution (about 30x faster than a loop in Python, the same result on every code point;
# tests/test_pretrain.py checks it against the loop): remove (a) every non-mark outside
# Latin/Common together with the marks that follow it, and (b) every run of marks whose
# preceding character is not a letter (a kept digit, symbol or space, or the start of the
# text). The scan never starts inside a run of marks that follows a kept letter, because
# the look-behind then sees that letter or a mark. Texts with nothing outside Latin/Common
# and no mark (most English documents) are returned after one search.
_REMOVED_BY_LATIN_FILTER = regex.compile(r"[^\p{scx=Latin}\p{scx=Zyyy}\p{M}]\p{M}*|(?<![\p{L}\p{M}])\p{M}+")
_NOT_LATIN_OR_COMMON_OR_MARK = regex.compile(r"[^\p{scx=Latin}\p{scx=Zyyy}]|\p{M}")
# A letter or decimal digit outside Latin/Common (same Unicode version as the filter above).
_NON_LATIN_LETTER_OR_DIGIT = regex.compile(r"(?V1)[[\p{L}\p{Nd}]--[\p{scx=Latin}\p{scx=Zyyy}]]")


def filter_to_latin(text: str) -> tuple[str, int]:
    """Remove every character not in the Latin script. Returns (kept text, characters removed)."""
    if _NOT_LATIN_OR_COMMON_OR_MARK.search(text) is None:
        return text, 0
    kept = _REMOVED_BY_LATIN_FILTER.sub("", text)
    return kept, len(text) - len(kept)


def has_non_latin_letter(text: str) -> bool:
    """True when ``text`` holds a letter or digit that the Latin filter would remove."""
    return _NON_LATIN_LETTER_OR_DIGIT.search(text) is not None


def script_letter_fraction(text: str, script: str) -> float:
    """Fraction of the letters of ``text`` that belong to ``script`` (0.0 when it has no letters)."""
    letters = _LETTER.findall(text)
    if not letters:
        return 0.0
    in_script = regex.compile(rf"\p{{scx={script}}}")
    return sum(1 for c in letters if in_script.match(c)) / len(letters)


# --------------------------------------------------------------------------------------
# Documents as token ids
# --------------------------------------------------------------------------------------


def document_start_id(tokenizer) -> int:
    """The token that opens every document, in training and in probing alike.

    Every training document is ``[start] + tokens`` and every probe sentence is scored after
    the same ``[start]`` token, exactly as the paper's evaluation prepends the tokenizer's
    end-of-text id. Between two packed documents the start token is also the EOS separator.
    """
    token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token_id is None:
        raise ValueError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has neither an EOS nor a BOS token; "
            "the study opens every document with one. Set one, e.g. tokenizer.eos_token = '<|endoftext|>'."
        )
    return int(token_id)


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the caller adds the start token)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------


def read_json_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)`` for each record of a .jsonl file or a .json list (or ``{"data": [...]}``).

    ``where`` names the file and the line (.jsonl) or item (.json), for error messages.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{line_number}: not valid JSON ({err.msg}). Fix or remove the line."
                    ) from err
                yield f"{path}:{line_number}", record
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from err
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}}).")
    for index, record in enumerate(records):
        yield f"{path} item {index}", record


#: File types read as documents, and how (the error for any other suffix lists them).
DOCUMENT_FILE_TYPES = {
    ".txt": "one document per non-empty line",
    ".json": "a list of records",
    ".jsonl": "one record per line",
    ".csv": "with a header row",
    ".tsv": "with a header row",
}


def check_document_suffix(path: str | os.PathLike) -> str:
    """The lower-cased suffix of ``path``; a ValueError listing the accepted ones when it is not one of them."""
    suffix = Path(path).suffix.lower()
    if suffix not in DOCUMENT_FILE_TYPES:
        accepted = "; ".join(f"{s} ({how})" for s, how in DOCUMENT_FILE_TYPES.items())
        raise ValueError(
            f"{path}: unknown file type {suffix or '(no suffix)'!r}; accepted: {accepted}. Rename or convert the file."
        )
    return suffix


def read_documents(
    path: str | os.PathLike, text_column: str = "text", *, column_flag: str | None = "--text_column"
) -> Iterator[str]:
    """Yield the documents of a .txt (one per non-empty line), .json (list), .jsonl, .csv or .tsv file.

    ``text_column`` names the column of .json/.jsonl records and of the .csv/.tsv header row;
    ``column_flag`` is the caller's command-line flag for it, named when the column is missing (None: the
    caller has no such flag and the message asks for the column by its fixed name).
    Any other suffix is refused (a guess would read a header or a second column as text).
    Errors name the file and the line (or item) and say what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Check the path given on the command line.")
    suffix = check_document_suffix(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty. Give a file with at least one document.")
    if suffix in (".json", ".jsonl"):
        for where, record in read_json_records(path):
            yield text_of(record, text_column, where, column_flag)
    elif suffix in (".csv", ".tsv"):
        yield from _read_delimited_column(path, text_column, "\t" if suffix == ".tsv" else ",", column_flag)
    else:  # plain text: one document per non-empty line
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield line.rstrip("\n")


def _column_hint(column: str, column_flag: str | None) -> str:
    return f"Pass {column_flag} NAME." if column_flag else f"The file needs a column named {column!r}."


def _read_delimited_column(path: Path, column: str, delimiter: str, column_flag: str | None) -> Iterator[str]:
    """The ``column`` field of every row of a .csv/.tsv file with a header row (blank rows skipped)."""
    with path.open(encoding="utf-8", newline="") as handle:
        # strict: an unclosed quote is an error, not the rest of the file swallowed into one document.
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}:1: no header row. The first line must name the columns.")
            if column not in header:
                raise ValueError(
                    f"{path}:1: no column {column!r} in the header (found: {', '.join(header)}). "
                    + _column_hint(column, column_flag)
                )
            at = header.index(column)
            for row in reader:
                if not row or not any(field.strip() for field in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}. "
                        "Quote fields that contain the delimiter."
                    )
                yield row[at]
        except csv.Error as err:
            kind = path.suffix.lower()[1:].upper()
            raise ValueError(f"{path}:{reader.line_num}: not valid {kind} ({err}). Fix the quoting.") from err


def text_of(record, text_column: str, where: str, column_flag: str | None = "--text_column") -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or text_column not in record:
        columns = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: no {text_column!r} column (found: {columns}). {_column_hint(text_column, column_flag)}"
        )
    value = record[text_column]
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {text_column!r} holds {type(value).__name__}, not text.")
    return value


# --------------------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------------------


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_card(output_dir: str | os.PathLike, title: str, summary: str, setting: dict, tags: list[str]) -> Path:
    """Write a model or dataset card (README.md) that records the setting of a run.

    ``setting`` is rendered as a table so that anyone who downloads a released checkpoint or
    dataset can see how it was made (data, filter, tokenizer, bridges, steps, tokens, ...).
    """
    yaml_tags = "\n".join(f"- {tag}" for tag in tags)
    rows = "\n".join(f"| {key} | {_card_value(value)} |" for key, value in setting.items())
    text = (
        f"---\ntags:\n{yaml_tags}\n---\n\n# {title}\n\n{summary}\n\n"
        "Made with the cross-lingual culture transfer toolkit (arXiv 2506.01675).\n\n"
        f"## Setting\n\n| key | value |\n|---|---|\n{rows}\n"
    )
    path = Path(output_dir) / "README.md"
    write_text_atomic(path, text)
    return path


@dataclass
class ModelCard:
    """A run's model card: ``write_card``'s title, summary, setting and tags, and ``progress``, the rows
    that depend on the optimizer steps done when it is written (e.g. tokens seen)."""

    title: str
    summary: str
    setting: dict
    tags: list[str]
    progress: Callable[[int], dict] | None = None


class ModelCardMixin:
    """Mix into a Trainer (``class T(ModelCardMixin, Trainer)``) and set ``model_card``: the card that
    ``create_model_card`` writes into --output_dir is then the study's, on the main process. Trainer's
    ``push_to_hub`` writes it just before it uploads the folder, so the card on the Hub is the same."""

    model_card: ModelCard | None = None

    def create_model_card(self, *args, **kwargs):
        card = self.model_card
        if card is None or not self.is_world_process_zero():
            return
        progress = card.progress(self.state.global_step) if card.progress else {}
        write_card(self.args.output_dir, card.title, card.summary, {**card.setting, **progress}, card.tags)


def finish_training(trainer, metrics: dict, commit_message: str) -> None:
    """The end of a training run (run_pretrain.py, run_cpt.py): the metrics and the trainer state saved,
    then the model card written; under --push_to_hub the folder is pushed with it."""
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message=commit_message)
    else:
        trainer.create_model_card()


def _card_value(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False)
    return str(value).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------
# Distributed training on CPU (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------


def use_cpu_backend_without_gpu() -> bool:
    """Make a multi-process launch on a machine without a GPU train over gloo on the CPU.

    ``accelerate launch --config_file accelerate_configs/cpu.yaml`` starts its processes through
    torch.distributed.run but does not pass ``use_cpu`` on; the Trainer then finds no GPU and
    trains each process alone (world size 1) beside an idle process group. Setting
    ACCELERATE_USE_CPU before the TrainingArguments are built makes it join the gloo group
    (world size = number of processes). Call it first thing in main(). Returns True when set.
    """
    import torch

    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched_distributed and not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return True
    return False


# --------------------------------------------------------------------------------------
# Packed windows as a batch, per attention implementation (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------

#: Attention implementations that build the per-document causal mask from position ids that
#: restart at 0, for a batch of ANY number of rows, when there is no attention_mask and no KV cache
#: (transformers 5.24 masking_utils: ``_preprocess_mask_arguments`` -> ``find_packed_sequence_indices``).
DOCUMENT_MASK_FROM_POSITION_IDS = frozenset({"sdpa", "eager", "flex_attention"})

#: The sequence-boundary kwargs that flash kernels read (transformers 5.24: ``FlashAttentionKwargs``;
#: ``_flash_attention_forward`` takes the varlen path when all four are given, and
#: ``prepare_fa_kwargs_from_position_ids`` computes the same four from position ids). Qwen2 passes
#: them from ``Qwen2ForCausalLM.forward(**kwargs)`` through the model and every decoder layer to
#: ``Qwen2Attention.forward(**kwargs)`` and on to the attention function.
SEQUENCE_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def is_flash_attention(attn_implementation: str) -> bool:
    """True for flash kernels (flash_attention_2/3/4, hub kernels such as kernels-community/flash-attn),
    by the rule transformers itself uses (``utils.generic.is_flash_attention_requested``: "flash" in the name)."""
    return "flash" in attn_implementation


def uses_flattened_layout(attn_implementation: str) -> bool:
    """Whether packed windows go to the model as one flattened row with sequence boundaries.

    Flash kernels infer document boundaries from position ids only for a batch of ONE row
    (``modeling_flash_attention_utils._is_packed_sequence`` is False for batch_size != 1): with B
    rows and no mask they attend across documents. They, and any implementation not known to build
    the mask from position ids, get the flattened layout, which isolates documents for every kernel.
    sdpa/eager/flex_attention keep B rows: on one flattened row their dense mask would be (B*L)^2.
    """
    return attn_implementation not in DOCUMENT_MASK_FROM_POSITION_IDS


def packed_batch(input_ids, position_ids, labels, attn_implementation: str, *, flatten: bool | None = None) -> dict:
    """The model's batch for B packed windows, each isolating its documents.

    ``input_ids``, ``position_ids``, ``labels``: B x L tensors whose position ids restart at 0 at
    every document and at every window start; no attention_mask is ever passed (it would turn the
    per-document mask off). Layouts (``flatten`` None: by ``uses_flattened_layout``):

    * padded: the three B x L tensors as they are (sdpa, eager, flex_attention);
    * flattened: the same tokens as one row of B*L (1 x B*L tensors, the windows one after another;
      a window starts with position 0, so it also starts a sequence), plus ``cu_seq_lens_q/k`` (int32
      offsets of every sequence start and the total, as ``DataCollatorWithFlattening`` makes them)
      and ``max_length_q/k`` (the longest sequence, a Python int so that no kernel syncs to read it).

    Labels are the caller's (e.g. -100 at every document start): in one row, the token that ends a
    window then "predicts" the next window's first token, which is -100, so the loss sees exactly
    the targets of the padded layout. The result passes ``check_flash_batch``.
    """
    if flatten is None:
        flatten = uses_flattened_layout(attn_implementation)
    if not flatten:
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    else:
        import torch

        flat_positions = position_ids.reshape(1, -1)
        starts = (flat_positions[0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, torch.tensor([flat_positions.shape[1]])]).to(torch.int32)
        max_length = int(cu_seq_lens.diff().max())
        batch = {
            "input_ids": input_ids.reshape(1, -1),
            "position_ids": flat_positions,
            "labels": labels.reshape(1, -1),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length,
            "max_length_k": max_length,
        }
    check_flash_batch(batch, attn_implementation)
    return batch


def check_attention_implementation_trains_on(attn_implementation: str, device) -> None:
    """Refuse, before anything is read or written, a kernel that cannot train on a CPU: flex_attention
    has no backward on CPU (torch 2.13) and flash kernels need a GPU (run_pretrain.py, run_cpt.py)."""
    if device.type == "cpu" and (attn_implementation == "flex_attention" or is_flash_attention(attn_implementation)):
        why = "has no backward on CPU" if attn_implementation == "flex_attention" else "needs a GPU"
        raise InputError(
            f"--attn_implementation {attn_implementation} does not train on the CPU (the training device here): it "
            f"{why}. Use --attn_implementation sdpa (the default) or eager, or run on a GPU. Nothing was written."
        )


def autocast_dtype(training_args):
    """The dtype the Trainer computes in under mixed precision (None: float32), for the isolation checks."""
    import torch

    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None


def check_flash_batch(batch: dict, attn_implementation: str) -> None:
    """The guard: a ValueError when a batch of B > 1 rows without sequence boundaries would reach a
    flash kernel, which would then attend across the documents of each row. Shapes only: no device sync."""
    tokens = batch.get("input_ids") if batch.get("input_ids") is not None else batch.get("inputs_embeds")
    rows = 0 if tokens is None else tokens.shape[0]
    missing = [key for key in SEQUENCE_BOUNDARY_KEYS if batch.get(key) is None]
    if is_flash_attention(attn_implementation) and rows > 1 and missing:
        raise ValueError(
            f"A batch of {rows} rows without {', '.join(missing)} would reach the flash kernel "
            f"{attn_implementation!r}, which infers document boundaries from position ids only for one row: "
            "it would attend across documents. Build the batch with study_common.packed_batch."
        )


def guard_flash_attention_inputs(model) -> None:
    """Run ``check_flash_batch`` on every call of ``model`` (a forward pre-hook), so that no batch,
    from whatever collator, reaches its flash kernel with several rows and no sequence boundaries."""

    def guard(module, args, kwargs):
        inputs = {"input_ids": args[0], **kwargs} if args else kwargs  # model(input_ids, ...) or model(**batch)
        check_flash_batch(inputs, module.config._attn_implementation)

    model.register_forward_pre_hook(guard, with_kwargs=True)


# --------------------------------------------------------------------------------------
# Document isolation, checked on the run's own model before training (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------

#: Largest logit difference that counts as rounding, not as attention across documents.
ISOLATION_TOLERANCE = 1e-4


def batch_layout(attn_implementation: str, flatten: bool | None = None) -> str:
    """The name of the layout ``packed_batch`` gives: "flattened" (one row) or "padded" (B rows)."""
    return "flattened" if (uses_flattened_layout(attn_implementation) if flatten is None else flatten) else "padded"


def check_document_isolation(model, collator: Callable[[list[dict]], dict], windows, *, autocast_dtype=None) -> dict:
    """Does attention stay inside each document, with this model's device, kernel and batch layout?

    ``windows``: the B >= 2 windows batched together (a kernel may leak inside a row or across the rows
    of a micro-batch), each a list of documents, each a list of segments (token ids, the first one the
    start token). ``collator``: the run's training collator; it gets each window as ``input_ids``,
    ``position_ids`` (restarting at every document) and ``labels`` and gives the batch of the run's
    layout, which goes to ``model(**batch)`` as the Trainer gives it, on the model's device, under
    autocast to ``autocast_dtype`` when given (the run's bf16/fp16). Document boundaries come from
    ``windows``, not from the position ids under test. For every document:

    * ``max_logit_diff_packed_vs_alone``: the document in the batch vs. the same document alone (one
      window of one document through the same collator); exact in float32, while in 16-bit the other
      matrix shapes round differently, so it is judged in float32 only;
    * ``max_logit_diff_other_documents_changed``: the document vs. itself in a batch whose other
      documents hold other tokens (same lengths, same start tokens). Same shapes, same kernels: any
      difference is information that crossed from another document, at any precision.

    ``holds``: neither difference (where judged) is above ``ISOLATION_TOLERANCE``; ``isolation_failure``
    says why not. A kernel that fails to run raises an InputError naming it and the device.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size

    def features(window) -> dict:
        input_ids, position_ids, labels = [], [], []
        for document in window:
            start = len(input_ids)
            for segment in document:
                tokens = [int(t) for t in segment]
                position_ids += range(len(input_ids) - start, len(input_ids) - start + len(tokens))
                input_ids += tokens
                labels += [-100, *tokens[1:]]
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}

    def other_tokens(segment) -> list[int]:  # the same length and start token, other tokens after it
        return [int(segment[0]), *torch.randint(2, vocab_size, (len(segment) - 1,), generator=generator).tolist()]

    autocast = torch.autocast(model.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    layout = {}

    def flat_logits(batch_windows) -> torch.Tensor:
        """Logits of every row of the batch, one row after another (B x L or 1 x B*L alike)."""
        batch = collator([features(window) for window in batch_windows])
        layout["name"] = "flattened" if batch.get("cu_seq_lens_q") is not None else "padded"
        batch.pop("labels")
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast:
            logits = model(**batch, use_cache=False).logits
        return logits.float().reshape(-1, logits.shape[-1])

    kernel = model.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = flat_logits(windows)
            row_length = packed.shape[0] // len(windows)
            spans = []  # (window, document, first token, end) in the flat token order of the batch
            for w, window in enumerate(windows):
                offset = w * row_length
                for d, document in enumerate(window):
                    length = sum(len(segment) for segment in document)
                    spans.append((w, d, offset, offset + length))
                    offset += length
            alone_diff = other_diff = 0.0
            for w, d, start, end in spans:
                alone = flat_logits([[windows[w][d]]])[: end - start]
                alone_diff = max(alone_diff, float((packed[start:end] - alone).abs().max()))
                changed = [
                    [doc if (i, j) == (w, d) else [other_tokens(s) for s in doc] for j, doc in enumerate(window)]
                    for i, window in enumerate(windows)
                ]
                other_diff = max(other_diff, float((packed[start:end] - flat_logits(changed)[start:end]).abs().max()))
    except Exception as err:  # the first forward on the training device: any failure is the kernel's
        raise InputError(
            f"--attn_implementation {kernel} cannot run on {model.device} ({err.__class__.__name__}: "
            f"{str(err)[:300]}). Use --attn_implementation sdpa, or install the kernel for this device. "
            "Nothing was trained."
        ) from err
    finally:
        model.train(was_training)
    result = {
        "checked": True,
        "attn_implementation": kernel,
        "layout": layout["name"],
        "device": str(model.device),
        "compute_dtype": str(autocast_dtype or next(model.parameters()).dtype).replace("torch.", ""),
        "windows_in_batch": len(windows),
        "documents": len(spans),
        "max_logit_diff_packed_vs_alone": alone_diff,
        "max_logit_diff_other_documents_changed": other_diff,
        "tolerance": ISOLATION_TOLERANCE,
    }
    result["packed_vs_alone_judged"] = result["compute_dtype"] == "float32"
    result["holds"] = isolation_failure(result) is None
    return result


def isolation_failure(result: dict) -> str | None:
    """Why a ``check_document_isolation`` result shows attention across documents, or None."""
    if result["max_logit_diff_other_documents_changed"] > ISOLATION_TOLERANCE:
        return (
            f"a document's logits change by {result['max_logit_diff_other_documents_changed']:.3g} when the other "
            "documents of its micro-batch change"
        )
    if result["compute_dtype"] == "float32" and result["max_logit_diff_packed_vs_alone"] > ISOLATION_TOLERANCE:
        return (
            f"a document packed with others gives other logits than alone (max diff "
            f"{result['max_logit_diff_packed_vs_alone']:.3g})"
        )
    return None


# --------------------------------------------------------------------------------------
# Default locations: each step writes where the next one reads
# --------------------------------------------------------------------------------------
# So the design card's sequence works as typed, from one working directory:
#   python run_pretrain.py --train_file EN ...         -> runs/pretrain
#   python build_pairs.py --lang bo --pairs_files ...   -> runs/data-bo (tokenizer from runs/pretrain)
#   accelerate launch run_cpt.py --lang bo --bridges    -> runs/cpt-bo-bridges-seed42 (base runs/pretrain,
#                                                          data runs/data-bo); --no_bridges beside it
# Every path is relative to the directory the command runs in; an explicit flag always wins.

RUNS_DIR = Path("runs")
DEFAULT_BASE_MODEL_DIR = RUNS_DIR / "pretrain"


def default_cpt_data_dir(lang: str) -> Path:
    """Where build_pairs.py writes, and run_cpt.py reads, the CPT dataset of ``lang``."""
    return RUNS_DIR / f"data-{lang}"


def default_cpt_run_name(lang: str, bridges: bool, seed: int) -> str:
    """The name of a CPT run: its run name, its default output folder under ``runs/`` and its card title."""
    return f"cpt-{lang}-{'bridges' if bridges else 'no-bridges'}-seed{seed}"


def output_dir_given(argv: list[str] | None) -> bool:
    """Whether the command line (or its single JSON arguments file) sets ``output_dir``.

    TrainingArguments turns a missing --output_dir into 'trainer_output', where two runs would collide;
    the scripts put their outputs in their default location instead, and this tells the two apart.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0].endswith(".json"):
        return "output_dir" in json.loads(Path(args[0]).read_text(encoding="utf-8"))
    return any(a in ("--output_dir", "--output-dir") or a.startswith(("--output_dir=", "--output-dir=")) for a in args)


# --------------------------------------------------------------------------------------
# Resuming a training run (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------

#: --resume_from_checkpoint values that mean "the last checkpoint-N in --output_dir".
RESUME_LAST = ("true", "latest", "last")
RESUME_HELP = (
    "Continue a run from a checkpoint: a checkpoint-N folder, or latest (also: true, last) for the last "
    "checkpoint-N in --output_dir. Without it an --output_dir that already holds a checkpoint is refused: "
    "a run never continues on an earlier run's checkpoints without saying so."
)


def document_resume_flag(parser) -> None:
    """Put ``RESUME_HELP`` on the --resume_from_checkpoint of an HfArgumentParser (--help shows it)."""
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = RESUME_HELP


def resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a training run resumes from (None: it starts afresh), by ``RESUME_HELP``'s rule.

    InputError for a folder that does not exist, for ``latest`` without a checkpoint, and for an
    ``output_dir`` that holds a checkpoint when no --resume_from_checkpoint is given."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume_from_checkpoint is None:
        if last is not None:
            raise InputError(
                f"{output_dir} already holds {last}. Pass --resume_from_checkpoint {last} to continue that run, "
                "or give a new --output_dir."
            )
        return None
    if str(resume_from_checkpoint).lower() in RESUME_LAST:
        if last is None:
            raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint-N in {output_dir}.")
        return last
    if not Path(resume_from_checkpoint).is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder.")
    return str(resume_from_checkpoint)


# --------------------------------------------------------------------------------------
# A parallel pair in a context window (build_pairs.py, run_cpt.py, run_eval.py)
# --------------------------------------------------------------------------------------

PAIR_ORDERS = ("en_first", "tgt_first", "random")


def pair_first_side(pair_id: int, order: str, seed: int) -> str:
    """ "en" or "tgt": which side of pair ``pair_id`` comes first (a seeded coin per pair for ``random``)."""
    if order == "en_first":
        return "en"
    if order == "tgt_first":
        return "tgt"
    if order != "random":
        raise ValueError(f"pair_order must be one of {', '.join(PAIR_ORDERS)}, got {order!r}.")
    return "en" if hashlib.sha256(f"pair-order/{seed}/{pair_id}".encode()).digest()[0] % 2 == 0 else "tgt"


def pair_segments(first: list[int], second: list[int], start_id: int, separator_ids: list[int]) -> list[list[int]]:
    """The two segments of a parallel pair: ``[start] + first + separator`` and ``[start] + second``.

    With bridges the two are one document (adjacent in one window, positions continuing); without
    bridges they are two documents. Either way these are the tokens, so both settings train on the
    same multiset."""
    return [[start_id, *first, *separator_ids], [start_id, *second]]


def pair_token_count(first_tokens: int, second_tokens: int, separator_tokens: int = 0) -> int:
    """Tokens of ``pair_segments``: the text tokens, the separator and one start token per side."""
    return first_tokens + separator_tokens + second_tokens + 2


# --------------------------------------------------------------------------------------
# Conventions of every script: logging and bad input
# --------------------------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(training_args=None, level: str | int = logging.INFO) -> None:
    """One log format for every script, on stdout.

    With ``training_args`` (a TrainingArguments) the levels follow the Trainer's per-process rule, as in
    transformers' examples: the main process logs at INFO (or --log_level), the others at WARNING (or
    --log_level_replica); transformers' and datasets' loggers follow."""
    if training_args is not None:
        level = training_args.get_process_log_level()
        if training_args.should_log and level > logging.INFO and training_args.log_level == "passive":
            level = logging.INFO
    # One stdout handler of our own, replaced on a second call (a test calling main twice); handlers
    # that others put on the root logger (pytest's caplog) stay.
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "study_log", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.study_log = True
    root.addHandler(handler)
    root.setLevel(level)
    if training_args is not None:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity(level)
        datasets.utils.logging.set_verbosity(level)


class InputError(ValueError):
    """What the user gave is wrong (a file, line, item, column, flag or size); the message names it and
    says what to do. Scripts may also raise ValueError or FileNotFoundError for the same purpose."""


def exit_on_input_error(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` from ``__main__``: a bad input (``InputError``, ``ValueError``,
    ``FileNotFoundError``) is printed as ``<script>: error: <message>`` and exits with status 2, as
    argparse does for a bad flag, instead of a traceback. An int that ``main`` returns is the exit status."""
    prog = Path(sys.argv[0]).name
    try:
        result = main()
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
