"""The cloze questions of the study and the predictions made on them: one module every script reads them with.

Questions are the paper's format, a JSON list of ``{"question", "options", "answer"}`` (the blank a run of
underscores, the answer a string or a list of strings): ``load_question_sets`` reads and validates them and tags
each set with its language (the name's ``_<lang>`` suffix); ``fill_blanks`` fills the blanks. Predictions are
run_eval.py's ``predictions.jsonl`` + ``accuracy.json``: ``read_predictions`` is their one reader, ``tie_credit``
how a tied item is credited. docs/probing.md describes the format and the released files' quirks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study_common import InputError, is_saved_dataset, named_utf8_errors, read_json_records

logger = logging.getLogger("cloze")

BLANK = re.compile(r"_+")
QUESTION_FILE_LANG = re.compile(r"^(?P<base>.+)_(?P<lang>[A-Za-z]{2,3}(?:-[A-Za-z0-9]+)?)$")
TSHEG = "\u0f0b"
TIE_POLICIES = ("first", "fractional")
#: Where run_eval.py writes its probing output inside a run by default, and where run_transfer.py and the study look.
EVAL_DIR_NAME = "eval"


# Names of question files


def question_stem(lang: str, question_lang: str) -> str:
    """The study's name of the questions about ``lang``'s culture asked in ``question_lang``."""
    return f"{lang}-culture-cloze_{question_lang}"


def question_file_name(lang: str, question_lang: str) -> str:
    return question_stem(lang, question_lang) + ".json"


def question_lang_from_stem(stem: str) -> str | None:
    """The question language a name ends with (``_en``, ``_bo``, ``_zh-Hans`` -> lowercase), else None."""
    match = QUESTION_FILE_LANG.match(stem)
    return match.group("lang").lower() if match else None


def parallel_base(stem: str, lang: str | None = None) -> str:
    """What parallel question files share: the name without its ``_<lang>`` suffix (``ko-culture-cloze_en`` ->
    ``ko-culture-cloze``). With ``lang``, only that suffix is cut (a name that merely looks like one stays)."""
    found = question_lang_from_stem(stem)
    if found is None or (lang is not None and found != lang.lower()):
        return stem
    return QUESTION_FILE_LANG.match(stem).group("base")


# Question sets


@dataclass
class QuestionSet:
    """One question file (or dataset split), validated. Item i keeps index i of the source."""

    stem: str  # e.g. bo-culture-cloze_bo
    lang: str  # "" only when read with require_options=False from a name without a language
    source: str
    items: list[dict]  # {"question", "options", "answers" (texts), "answer" (option indices)}
    quirks: dict[str, list[int]]  # reason -> item indices

    @property
    def base(self) -> str:
        """Name shared by parallel files: the stem without its language suffix."""
        return parallel_base(self.stem, self.lang)

    @property
    def fingerprint(self) -> str:
        payload = [self.lang] + [[it["question"], it["options"], it["answers"]] for it in self.items]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "lang": self.lang,
            "source": self.source,
            "parallel_group": self.base,
            "items": len(self.items),
            # Expected accuracy of guessing uniformly among the options (the floor of the curves).
            "chance_accuracy": sum(len(it["answer"]) / len(it["options"]) for it in self.items) / len(self.items),
            "sha256": self.fingerprint,
            "quirks": self.quirks,
            "position_bias": position_bias(self.items),
        }


def position_bias(items: list[dict]) -> dict:
    """Where the answer sits among the options: an item counts at its first answer option, under "none" when its
    answer is not among them. always_first_accuracy: always predicting option 0, where every exact tie goes."""
    counts = Counter(str(min(item["answer"])) if item["answer"] else "none" for item in items)
    keys = sorted(counts, key=lambda k: float("inf") if k == "none" else int(k))
    return {
        "answer_position_counts": {k: counts[k] for k in keys},
        "answer_position_share": {k: counts[k] / len(items) for k in keys},
        "always_first_accuracy": sum(0 in item["answer"] for item in items) / len(items),
    }


QUIRK_TEXT = {
    "no_blank": "has no blank (no run of underscores): every option gives the same sentence, the first option wins",
    "several_blanks": "has several blanks: each is filled with the option",
    "duplicate_options": "lists the same option twice: the copies tie, the first copy wins",
    "fewer_than_two_distinct_options": "has fewer than 2 distinct options: it cannot discriminate",
    "answer_not_in_options": "has an answer that is not among its options: the item is always scored wrong",
}
#: Quirks that leave nothing to score (a tie of every option, or no right option); a file where they hit most
#: items is refused. Read as facts (no scoring) only an answer outside the given options counts.
UNSCORABLE = {True: ("no_blank", "fewer_than_two_distinct_options", "answer_not_in_options"),
              False: ("answer_not_in_options",)}  # fmt: skip


def validate_items(records, where: str, require_options: bool = True) -> tuple[list[dict], dict[str, list[int]]]:
    """Normalised items and the quirks found (reason -> indices): a malformed item is an error, the paper files'
    quirks are counted and decided later (--strict). ``require_options=False`` reads the questions as facts."""
    if not isinstance(records, list) or not records:
        raise InputError(f"{where}: expected a non-empty JSON list of {{question, options, answer}} items.")
    items, quirks = [], defaultdict(list)
    checked = _checked_scoring_item if require_options else _checked_fact_item
    for index, record in enumerate(records):
        question, options, answers = checked(record, f"{where} item {index}")
        blanks = len(BLANK.findall(question))
        if blanks == 0:
            quirks["no_blank"].append(index)
        elif blanks > 1:
            quirks["several_blanks"].append(index)
        if options and len(set(options)) < 2:
            quirks["fewer_than_two_distinct_options"].append(index)
        elif len(set(options)) < len(options):
            quirks["duplicate_options"].append(index)
        if options and not all(a in options for a in answers):
            quirks["answer_not_in_options"].append(index)
        # Every option equal to an answer counts (duplicate options: either copy is right).
        answer = [k for k, option in enumerate(options) if option in answers]
        items.append({"question": question, "options": list(options), "answers": list(answers), "answer": answer})
    _refuse_mostly_unscorable(items, quirks, where, require_options)
    return items, dict(quirks)


def _refuse_mostly_unscorable(items: list[dict], quirks: dict, where: str, require_options: bool) -> None:
    """A file where most items cannot be scored is not the paper's format (e.g. MMLU-style letter answers):
    read anyway it gives accuracy 0 or chance in every setting, and a gap of 0 that reads as a finding."""
    reasons = [r for r in UNSCORABLE[require_options] if quirks.get(r)]
    unscorable = {i for r in reasons for i in quirks[r]}
    if 2 * len(unscorable) <= len(items):
        return
    outside = quirks.get("answer_not_in_options", [])
    letters = [i for i in outside if all(re.fullmatch(r"[A-Za-z0-9]", a.strip()) for a in items[i]["answers"])]
    hint = "The answers look like option letters or numbers (e.g. 'B'): give each answer as its option's text. "
    first = min(unscorable)
    raise InputError(
        f"{where}: {len(unscorable)} of {len(items)} items cannot be scored ("
        + ", ".join(f"{r}: {len(quirks[r])}" for r in reasons)
        + f"; e.g. item {first} {QUIRK_TEXT[next(r for r in reasons if first in quirks[r])]}). "
        + (hint if 2 * len(letters) > len(outside) else "")
        + "Fix the file: each item needs a blank (a run of underscores) and its answer among its options."
    )


def _checked_scoring_item(record, at: str) -> tuple[str, list[str], list[str]]:
    """An item to score: a non-empty question, non-empty options, an answer string or list of strings."""
    if not isinstance(record, dict) or not {"question", "options", "answer"} <= set(record):
        found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{at}: needs 'question', 'options' and 'answer' (found: {found}).")
    question, options, answer = record["question"], record["options"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{at}: 'question' must be a non-empty string.")
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
        raise InputError(f"{at}: 'options' must be a non-empty list of non-empty strings.")
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{at}: 'answer' must be a string or a non-empty list of strings.")
    return question, options, answers


def _checked_fact_item(record, at: str) -> tuple[str, list[str], list[str]]:
    """An item read as a fact (question filled by its answer): blank answers dropped, options kept if well-formed."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise InputError(f"{at}: expected an object with a 'question' string.")
    answer = record.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{at}: 'answer' must be a string or a list of strings (found {answer!r}).")
    answers = [a for a in answers if a.strip()]
    if not answers:
        raise InputError(f"{at}: the answer is empty.")
    options = record.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        options = []  # only the answers are used
    return record["question"], options, answers


def _dataset_question_sets(dataset, name: str, source: str) -> list[tuple[str, str, list]]:
    """(stem, source, records) per split of a datasets Dataset or DatasetDict."""
    from datasets import DatasetDict

    splits = dataset.items() if isinstance(dataset, DatasetDict) else [(None, dataset)]
    out = []
    for split, ds in splits:
        missing = {"question", "options", "answer"} - set(ds.column_names)
        if missing:
            raise InputError(f"{source} split {split}: missing columns {sorted(missing)} (found {ds.column_names}).")
        stem = split if split and (len(splits) > 1 or question_lang_from_stem(split)) else name
        out.append((stem, f"{source}:{split}" if split else source, ds.to_list()))
    return out


def _raw_question_sources(source: str, revision: str | None) -> list[tuple[str, str, list]]:
    """(stem, source description, records) for a file, a folder, a saved dataset or a Hub dataset id."""
    path = Path(source)
    if is_saved_dataset(path):
        from datasets import load_from_disk

        return _dataset_question_sets(load_from_disk(str(path)), path.name, str(path))
    if path.is_file():
        files = [path]
    else:  # a folder's .json/.jsonl files; none: a Hub dataset id, or a folder laid out as a Hub dataset repository
        files = sorted(f for f in path.glob("*") if f.suffix.lower() in (".json", ".jsonl") and f.is_file())
    if files:
        return [(f.stem, str(f), [record for _, record in read_json_records(f)]) for f in files]
    if not path.is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", source):
        raise InputError(f"{source}: not a file, a folder or a Hub dataset id ('org/name' or 'org/name:split').")
    from datasets import load_dataset

    name, _, split = source.partition(":")
    return _dataset_question_sets(load_dataset(name, split=split or None, revision=revision), Path(name).name, name)


def load_question_sets(
    sources: list[str],
    question_langs: list[str] | None = None,
    strict: bool = False,
    revision: str | None = None,
    require_options: bool = True,
) -> list[QuestionSet]:
    """Load, validate and language-tag every question source; check parallel files; apply --strict. Read as facts
    (``require_options=False``, run_density), a set may lack a language (lang ""), repeat a name or not be parallel."""
    raw = [entry for source in sources for entry in _raw_question_sources(source, revision)]
    sets, seen = [], set()
    for (stem, where, records), lang in zip(raw, _languages(raw, question_langs)):
        if require_options and stem in seen:
            raise InputError(f"{where}: a question set named {stem!r} was already loaded; names must be unique.")
        seen.add(stem)
        if not lang and require_options:
            raise InputError(
                f"{where}: cannot tell the question language from the name {stem!r} (expected '<name>_<lang>', "
                f"e.g. ko-culture-cloze_en). Pass --question_langs {stem}=LANG."
            )
        items, quirks = validate_items(records, where, require_options)
        _refuse_mixed_scripts(items, where, lang)
        sets.append(QuestionSet(stem=stem, lang=lang or "", source=where, items=items, quirks=quirks))
        summary = ", ".join(f"{reason} {indices}" for reason, indices in quirks.items()) or "none"
        logger.info("questions %s (%s, %d items, from %s): quirks: %s", stem, lang, len(items), where, summary)
    by_base = defaultdict(list)
    for qs in sets:
        by_base[qs.base].append(qs)
    for group in by_base.values():  # parallel files (same base, other language) match item by item
        if require_options and len({len(qs.items) for qs in group}) > 1:
            listing = ", ".join(f"{qs.source} ({len(qs.items)} items)" for qs in group)
            raise InputError(
                f"Parallel question files must match item by item, but their lengths differ: {listing}. "
                "Fix the files or give them different base names."
            )
    problems = [
        f"{qs.source} item {i}: {QUIRK_TEXT[reason]}" for qs in sets for reason, ix in qs.quirks.items() for i in ix
    ]
    if strict and problems:
        raise InputError(
            "--strict: the questions have quirks:\n  "
            + "\n  ".join(problems)
            + "\nFix these items, or run without --strict to count them and score them as the authors' script does."
        )
    return sets


def _languages(raw: list[tuple[str, str, list]], question_langs: list[str] | None) -> list[str | None]:
    """The language of each loaded set: --question_langs (STEM=LANG, or one per set in load order), else its name's."""
    overrides = dict(entry.split("=", 1) for entry in question_langs or [] if "=" in entry)
    positional = [entry for entry in question_langs or [] if "=" not in entry]
    if positional and len(positional) != len(raw):
        raise InputError(
            f"--question_langs gives {len(positional)} languages for {len(raw)} question sets "
            f"({', '.join(s for s, _, _ in raw)}); give one per set or use STEM=LANG entries."
        )
    return [overrides.get(stem) or (positional[k] if positional else None) or question_lang_from_stem(stem)
            for k, (stem, _, _) in enumerate(raw)]  # fmt: skip


def _refuse_mixed_scripts(items: list[dict], where: str, lang: str | None) -> None:
    """One set is one language: refuse a set where over 5% of the items hold no letter of the script most items are
    in (English and Tibetan items read as one set would be scored and reported under one language)."""
    # Each item's letters by script: the first word of a letter's Unicode name (LATIN, TIBETAN, CJK, ...).
    scripts = [
        Counter(unicodedata.name(c, "?").split()[0] for c in it["question"] + " ".join(it["answers"]) if c.isalpha())
        for it in items
    ]
    dominant = Counter(s.most_common(1)[0][0] for s in scripts if s)
    if not dominant:
        return
    main = dominant.most_common(1)[0][0]
    foreign = [i for i, s in enumerate(scripts) if s and main not in s]
    if len(foreign) > 0.05 * len(items):
        others = ", ".join(sorted({scripts[i].most_common(1)[0][0] for i in foreign}))
        raise InputError(
            f"{where}: {len(foreign)} of {len(items)} items hold no {main} letter (written in {others}; items "
            f"{_index_list(foreign)}), so this set mixes languages{f' under the one language {lang!r}' if lang else ''}. "
            "Give each language's questions as a file (or split) of its own, named <name>_<lang>."
        )


def read_item_tiers(path: str) -> dict:
    """synthetic_world.py's item_tiers.json, checked: ``tier_of[i]`` is the tier of question item i of the files of
    ``parallel_group`` (every index once, every tier among the declared ``meaning``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        tier_of = {item["index"]: item["tier"] for item in data["items"]}
        group, meaning, n = data["parallel_group"], dict(data["tiers"]), len(data["items"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"--item_tiers {path}: not an item_tiers.json of synthetic_world.py ({type(err).__name__}: {err}); "
            'it needs {"parallel_group", "tiers", "items": [{"index", "tier"}, ...]}.'
        ) from err
    if len(tier_of) != n or set(tier_of) != set(range(n)):
        raise InputError(f"--item_tiers {path}: the item indices are not 0..{n - 1}, each once.")
    unknown = sorted(set(tier_of.values()) - set(meaning))
    if unknown:
        raise InputError(f"--item_tiers {path}: tiers {unknown} not among its 'tiers'.")
    return {"path": path, "parallel_group": group, "meaning": meaning, "tier_of": [tier_of[i] for i in range(n)]}


# Filling the blanks


def _is_tibetan_letter(text: str) -> bool:
    """A Tibetan letter or mark (not a tsheg, digit or punctuation); False for ""."""
    return bool(text) and "\u0f00" <= text <= "\u0fff" and unicodedata.category(text)[0] in "LM"


def fill_blanks(question: str, option: str, *, tibetan_tsheg: bool = False) -> str:
    """The question with every run of underscores replaced by ``option`` (the paper's scoring). With ``tibetan_tsheg``
    a tsheg is added where the blank touches a Tibetan syllable without one (the paper's files write
    ``_____ཁྱབ་ཡོད``), so the option's edge syllable and its neighbour stay two syllables (docs/density.md)."""

    def filled(blank: re.Match) -> str:  # returned as it is: a backslash in an option is text
        before, after = question[blank.start() - 1 : blank.start()], question[blank.end() : blank.end() + 1]
        lead = TSHEG if tibetan_tsheg and _is_tibetan_letter(option[:1]) and _is_tibetan_letter(before) else ""
        trail = TSHEG if tibetan_tsheg and _is_tibetan_letter(option[-1:]) and _is_tibetan_letter(after) else ""
        return lead + option + trail

    return BLANK.sub(filled, question)


# Predictions: the one reader of predictions.jsonl, and the credit of tied items


def tie_credit(scores: list[float], answer: list[int]) -> tuple[int, float]:
    """(k, credit): how many options share the best (lowest) score exactly, and the expected credit of breaking
    that tie uniformly at random (answers among the k tied options / k; with k == 1, first-wins correctness)."""
    best = min(scores)
    tied = [k for k, score in enumerate(scores) if score == best]
    return len(tied), sum(k in answer for k in tied) / len(tied)


def read_predictions(eval_dir: str | Path, tie_policy: str = "first") -> tuple[dict, dict[str, dict[int, np.ndarray]]]:
    """accuracy.json of a run_eval.py output folder, and per questions stem a dict step -> per-item credit:
    first-wins correctness (bool) with ``tie_policy="first"``, the credit of random tie-breaking (float) with
    ``"fractional"``. Only lines of the checkpoints accuracy.json lists count (others are stale); an item missing
    (it would count as wrong) or repeated (it could hide a stale result) at a checkpoint is an error."""
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {', '.join(TIE_POLICIES)}, got {tie_policy!r}.")
    eval_dir, predictions = Path(eval_dir), Path(eval_dir) / "predictions.jsonl"
    with named_utf8_errors(eval_dir / "accuracy.json"):
        accuracy = json.loads((eval_dir / "accuracy.json").read_text(encoding="utf-8"))
    sizes = {stem: q["items"] for stem, q in accuracy["questions"].items()}
    paths = {e["step"]: e["path"] for e in accuracy["checkpoints"]}
    column, kind = ("correct", bool) if tie_policy == "first" else ("credit_fractional", np.float64)
    correct = {stem: {step: np.zeros(size, kind) for step in paths} for stem, size in sizes.items()}
    seen = {stem: {step: np.zeros(size, np.int64) for step in paths} for stem, size in sizes.items()}
    fields = ("questions", "index", "step", "checkpoint", "correct", "credit_fractional")  # run_eval writes more
    for where, row in read_json_records(predictions):  # a line that is not JSON is named by file and line
        missing_fields = [k for k in fields if not isinstance(row, dict) or k not in row]
        if missing_fields:
            raise InputError(f"{where}: a predictions line needs {missing_fields} (the format run_eval.py writes).")
        if paths.get(row["step"]) != row["checkpoint"] or row["questions"] not in sizes:
            continue
        index = row["index"]
        if not 0 <= index < sizes[row["questions"]]:
            raise InputError(f"{where}: item index {index} beyond the question set.")
        seen[row["questions"]][row["step"]][index] += 1
        correct[row["questions"]][row["step"]][index] = row[column]
    problems = []
    for stem, per_step in seen.items():
        for step, counts in per_step.items():
            for what, wrong in (("missing", counts == 0), ("listed twice", counts > 1)):
                if wrong.any():
                    ix = np.flatnonzero(wrong).tolist()
                    problems.append(f"{stem} step {step}: {len(ix)} item(s) {what}: {_index_list(ix)}")
    if problems:
        raise InputError(
            f"{predictions} does not hold every item exactly once for each checkpoint of accuracy.json:\n  "
            + "\n  ".join(problems)
            + "\nRe-run the probing into this folder with --overwrite_output_dir."
        )
    return accuracy, correct


def _index_list(indices: list[int]) -> str:
    """The first 20 indices, and how many more."""
    return ", ".join(map(str, indices[:20])) + (f", ... ({len(indices) - 20} more)" if len(indices) > 20 else "")
