"""What the scripts of the study must agree on, once (docs/training.md): the scripts of each language and
the Latin filter of step 1, the document-start token, reading document files with errors that name the file and
line, atomic writes and cards, the default locations, the layout of a parallel pair, logging and ``InputError``.
What only the two training scripts share is in train_common.py. This module needs no torch."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import regex

#: The Unicode script (Script / Script_Extensions name) of each language of the study.
LANGUAGE_SCRIPTS = {"en": "Latin", "ko": "Hangul", "zh": "Han", "bo": "Tibetan", "mn": "Mongolian"}


def script_for_language(lang: str, script: str | None = None) -> str:
    """The script name for ``lang``; ``script`` overrides it (needed for languages not listed)."""
    if script:
        try:
            regex.compile(rf"\p{{scx={script}}}")
        except regex.error as err:
            raise InputError(f"Unknown Unicode script {script!r} ({err}); use a name such as Cyrillic.") from err
        return script
    if lang not in LANGUAGE_SCRIPTS:
        known = ", ".join(sorted(LANGUAGE_SCRIPTS))
        raise InputError(f"No script is known for language {lang!r} (known: {known}); pass --script NAME.")
    return LANGUAGE_SCRIPTS[lang]


# The Latin filter keeps a character whose Script_Extensions contains Latin or is exactly Common (U+3002
# IDEOGRAPHIC FULL STOP is Script=Common but Script_Extensions={Han, ...}, so it goes), and a combining mark iff the
# last non-mark before it is a kept letter (e + U+0301 stays, Hangul + mark goes). As one substitution (about 30x
# faster than the rule's loop, which tests/test_study_common.py checks it against on every code point): remove
# every non-mark outside Latin/Common with the marks after it, and every run of marks not after a letter. A text
# with nothing to remove (most English texts) is returned after one search, faster than the substitution.
_LETTER = regex.compile(r"\p{L}")
_REMOVED_BY_LATIN_FILTER = regex.compile(r"[^\p{scx=Latin}\p{scx=Zyyy}\p{M}]\p{M}*|(?<![\p{L}\p{M}])\p{M}+")
_NOT_LATIN_OR_COMMON_OR_MARK = regex.compile(r"[^\p{scx=Latin}\p{scx=Zyyy}]|\p{M}")
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
    letters = len(_LETTER.findall(text))
    in_script = len(regex.findall(rf"(?V1)[\p{{L}}&&\p{{scx={script}}}]", text))
    return in_script / letters if letters else 0.0


def document_start_id(tokenizer) -> int:
    """The token that opens every training document and every probe sentence (the paper's evaluation prepends
    the end-of-text id); between two packed documents it is also the separator."""
    token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token_id is None:
        raise InputError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has neither an EOS nor a BOS token; "
            "the study opens every document with one. Set one, e.g. tokenizer.eos_token = '<|endoftext|>'."
        )
    return int(token_id)


# Reading documents: errors name the file and the line (or item) and say what to do


def read_json_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for each record of a .jsonl file or a .json list."""
    path = Path(path)
    with named_utf8_errors(path), path.open(encoding="utf-8-sig") as handle:
        if path.suffix.lower() == ".jsonl":
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(
                        f"{path}:{line_number}: not valid JSON ({err.msg}). Fix or remove the line."
                    ) from err
                yield f"{path}:{line_number}", record
            return
        try:
            records = json.load(handle)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from err
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of records.")
    for index, record in enumerate(records):
        yield f"{path} item {index}", record


@contextlib.contextmanager
def named_utf8_errors(path: str | os.PathLike):
    """Turn a UnicodeDecodeError while reading ``path`` into ``FILE:LINE: not UTF-8 (...)`` at its first bad line
    (found by decoding line by line: a newline byte never occurs inside a UTF-8 sequence)."""
    try:
        yield
    except UnicodeDecodeError as err:
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    byte = bad.object[bad.start : bad.start + 1].hex()
                    raise InputError(
                        f"{path}:{line_number}: not UTF-8 (byte 0x{byte}: {bad.reason}). Re-encode it as UTF-8."
                    ) from err
        raise  # every line decodes: the file changed while it was read


DOCUMENT_FILE_TYPES = {
    ".txt": "one document per non-empty line",
    ".json": "a list of records",
    ".jsonl": "one record per line",
    ".csv": "with a header row",
    ".tsv": "with a header row",
}


def check_document_suffix(path: str | os.PathLike) -> str:
    """The lower-cased suffix of ``path``; an InputError listing the accepted ones when it is not one of them."""
    suffix = Path(path).suffix.lower()
    if suffix not in DOCUMENT_FILE_TYPES:
        accepted = "; ".join(f"{s} ({how})" for s, how in DOCUMENT_FILE_TYPES.items())
        raise InputError(
            f"{path}: unknown file type {suffix or '(no suffix)'!r}; accepted: {accepted}. Rename or convert the file."
        )
    return suffix


def read_documents(
    path: str | os.PathLike, text_column: str = "text", *, column_flag: str | None = "--text_column"
) -> Iterator[str]:
    """The documents of a ``DOCUMENT_FILE_TYPES`` file (any other is refused: a guess would read a header as text):
    ``text_column`` of its records (or a record that is a string) or rows, a missing one named with the caller's
    ``column_flag`` (None: asked for by name)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file. Check the path given on the command line.")
    suffix = check_document_suffix(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty. Give a file with at least one document.")
    if suffix in (".csv", ".tsv"):
        for _, (text,) in read_delimited(path, [(text_column, column_flag)]):
            yield text
    elif suffix == ".txt":
        with named_utf8_errors(path), path.open(encoding="utf-8-sig") as handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())
    else:
        for where, record in read_json_records(path):
            if isinstance(record, dict) and text_column in record:
                record = record[text_column]
            elif not isinstance(record, str):
                columns = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                hint = _column_hint(text_column, column_flag)
                raise InputError(f"{where}: no {text_column!r} column (found: {columns}). {hint}")
            if not isinstance(record, str):
                raise InputError(f"{where}: column {text_column!r} holds {type(record).__name__}, not text.")
            yield record


def _column_hint(column: str, column_flag: str | None) -> str:
    return f"Pass {column_flag} NAME." if column_flag else f"The file needs a column named {column!r}."


def read_delimited(path: str | os.PathLike, columns: list[tuple[str, str | None]]) -> Iterator[tuple[str, list[str]]]:
    """``("FILE:LINE", [values of columns])`` for every non-blank row of a .csv/.tsv file with a header row.
    ``columns``: (column, the caller's flag for it or None)."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with named_utf8_errors(path), path.open(encoding="utf-8-sig", newline="") as handle:
        # strict: an unclosed quote is an error, not the rest of the file swallowed into one document.
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise InputError(f"{path}:1: no header row. The first line must name the columns.")
            for column, flag in columns:
                if column not in header:
                    raise InputError(
                        f"{path}:1: no column {column!r} in the header (found: {', '.join(header)}). "
                        + _column_hint(column, flag)
                    )
            at = [header.index(column) for column, _ in columns]
            for row in reader:
                if not any(field.strip() for field in row):
                    continue
                if len(row) != len(header):
                    raise InputError(
                        f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}. "
                        "Quote fields that contain the delimiter."
                    )
                yield f"{path}:{reader.line_num}", [row[i] for i in at]
        except csv.Error as err:
            kind = path.suffix.lower()[1:].upper()
            raise InputError(f"{path}:{reader.line_num}: not valid {kind} ({err}). Fix the quoting.") from err


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (for ``load_from_disk``; anything else is ``load_dataset``'s)."""
    return any((Path(path) / marker).is_file() for marker in ("state.json", "dataset_dict.json"))


def load_dataset_split(name: str, config: str | None, split: str, *, flag: str, streaming: bool = False, **kwargs):
    """One split of a Hub dataset, a local data folder or a ``save_to_disk`` folder (``kwargs``: ``data_files``,
    ``cache_dir``); one that cannot be loaded is an InputError naming ``flag``."""
    import datasets

    if is_saved_dataset(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InputError(f"{flag} {name!r}: no split {split!r}; its splits: {', '.join(loaded)}.")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming, **kwargs)
    except (FileNotFoundError, ValueError) as err:  # DatasetNotFoundError is a FileNotFoundError
        raise InputError(f"{flag} {name!r} (config {config!r}, split {split!r}) could not be loaded: {err}") from err


# Writing outputs: all or nothing


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_card(
    output_dir: str | os.PathLike, title: str, summary: str, setting: dict, tags: list[str], *, dataset: bool = False
) -> Path:
    """Write the model (or ``dataset``) card README.md of a run: its tags as Hub metadata, and ``setting`` as a
    table, so that whoever downloads a released checkpoint or dataset sees how it was made."""
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

    card_class, data_class = (DatasetCard, DatasetCardData) if dataset else (ModelCard, ModelCardData)
    rows = "\n".join(f"| {key} | {_card_value(value)} |" for key, value in setting.items())
    card = card_class(
        f"---\n{data_class(tags=tags).to_yaml()}\n---\n\n# {title}\n\n{summary}\n\n"
        "Made with the cross-lingual culture transfer toolkit (arXiv 2506.01675).\n\n"
        f"## Setting\n\n| key | value |\n|---|---|\n{rows}\n"
    )
    path = Path(output_dir) / "README.md"
    write_text_atomic(path, str(card))
    return path


def _card_value(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False)
    return str(value).replace("|", "\\|").replace("\n", " ")


# Default locations: each step writes where the next one reads (relative to the working directory;
# runs/pretrain -> build_pairs.py -> runs/data-<lang> -> run_cpt.py -> runs/cpt-<lang>-<setting>-seed<seed>)

RUNS_DIR = Path("runs")
DEFAULT_BASE_MODEL_DIR = RUNS_DIR / "pretrain"


def default_cpt_data_dir(lang: str) -> Path:
    """Where build_pairs.py writes, and run_cpt.py reads, the CPT dataset of ``lang``."""
    return RUNS_DIR / f"data-{lang}"


def default_cpt_run_name(lang: str, setting: str, seed: int) -> str:
    """A CPT run's name, default folder under ``runs/`` and card title (``setting``: bridges, no_bridges, ...)."""
    return f"cpt-{lang}-{setting.replace('_', '-')}-seed{seed}"


#: The files that hold a model's weights; a model is identified by their content (``weights_sha256``).
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def weights_sha256(file_digests: dict[str, str]) -> str:
    """A model's identity from its weight files' digests (name -> sha256): the SHA-256 of ``"<name>\t<sha256>\n"``
    in name order, the same number for a base model in run_cpt's record and in run_eval's."""
    listing = "".join(f"{name}\t{file_digests[name]}\n" for name in sorted(file_digests))
    return hashlib.sha256(listing.encode()).hexdigest()


def local_weight_digests(folder: Path) -> dict[str, str]:
    """File name -> sha256 of every weight file in ``folder``, streamed (python 3.10 has no hashlib.file_digest)."""
    digests = {}
    for path in (found for pattern in WEIGHT_FILES for found in Path(folder).glob(pattern)):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        digests[path.name] = digest.hexdigest()
    return digests


def output_dir_given(argv: list[str] | None) -> bool:
    """Whether the command line (or its single JSON arguments file) sets ``output_dir`` (TrainingArguments
    would turn a missing one into 'trainer_output', where two runs collide)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0].endswith(".json"):
        with named_utf8_errors(args[0]):
            return "output_dir" in json.loads(Path(args[0]).read_text(encoding="utf-8"))
    return any(a in ("--output_dir", "--output-dir") or a.startswith(("--output_dir=", "--output-dir=")) for a in args)


# A parallel pair in a context window (build_pairs.py, run_cpt.py, run_eval.py)

PAIR_ORDERS = ("en_first", "tgt_first", "random")


def pair_first_side(pair_id: int, order: str, seed: int) -> str:
    """ "en" or "tgt": which side of pair ``pair_id`` comes first (a seeded coin per pair for ``random``)."""
    if order in ("en_first", "tgt_first"):
        return order.removesuffix("_first")
    if order != "random":
        raise InputError(f"pair_order must be one of {', '.join(PAIR_ORDERS)}, got {order!r}.")
    return "en" if hashlib.sha256(f"pair-order/{seed}/{pair_id}".encode()).digest()[0] % 2 == 0 else "tgt"


def pair_segments(first: list[int], second: list[int], start_id: int, separator_ids: list[int]) -> list[list[int]]:
    """The two segments of a parallel pair, ``[start] + first + separator`` and ``[start] + second``: one document
    with bridges, two without; the same tokens either way."""
    return [[start_id, *first, *separator_ids], [start_id, *second]]


def pair_token_count(first_tokens: int, second_tokens: int) -> int:
    """Tokens of ``pair_segments`` without a separator: the text tokens and one start token per side."""
    return first_tokens + second_tokens + 2


# Conventions of every script: logging and bad input


def setup_logging(training_args=None, level: str | int = logging.INFO) -> None:
    """One log format for every script, on stdout. With ``training_args``, the Trainer's per-process levels (main
    process INFO or --log_level, the others --log_level_replica) for transformers' and datasets' loggers too."""
    if training_args is not None:
        level = training_args.get_process_log_level()
        if training_args.should_log and level > logging.INFO and training_args.log_level == "passive":
            level = logging.INFO
    # Our one handler is replaced on a second call (a test calling main twice); others' (pytest's caplog) stay.
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "study_log", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.study_log = True
    root.addHandler(handler)
    root.setLevel(level)
    if training_args is not None:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity(level)
        datasets.utils.logging.set_verbosity(level)


class InputError(ValueError):
    """What the user gave is wrong (a file, line, item, column, flag or size); the message names it and what to do."""


def exit_on_input_error(main: Callable[[], object]) -> None:
    """Run a script's ``main()``: an ``InputError`` prints ``<script>: error: <message>`` and exits 2, as argparse
    does for a bad flag; anything else is a bug and shows its traceback. An int ``main`` returns is the exit status."""
    try:
        result = main()
    except InputError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
