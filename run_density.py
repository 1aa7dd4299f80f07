#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["bm25s>=0.2", "numpy>=2.0", "regex", "tqdm", "transformers>=5.0", "datasets>=4.0", "torch==2.13.0"]
# ///
"""Cultural density of a corpus and the instance-level analysis of the frequency hypothesis.

The paper explains why cultural knowledge crosses languages mostly one way by how often that
knowledge occurs in each language's corpus ("cultural density", its Table 1) and by an
instance-level analysis (items that transferred occur more often in the source corpus). This
script makes the same measurement on any corpus:

1. Every question of every ``--questions`` file becomes a query: the cloze sentence with the
   blank filled by the answer. BM25 (the ``bm25s`` library) retrieves its ``--top_k``
   documents from each corpus, among the documents that hold every token of the answer.
   Tokens come from ``retrieval_tokens``, which cuts text into runs of one script and
   tokenises each run the way that script needs (Latin words, Hangul eojeol + syllables +
   syllable bigrams, Han character uni- and bigrams, Tibetan syllables, traditional Mongolian
   words).
2. A judge decides whether each retrieved document contains the question's knowledge: by
   default the deterministic ``LexicalJudge`` (the answer occurs and key terms carrying enough
   of the question's idf weight occur near it); with ``--judge_model`` a causal LM compares the
   log-probabilities of " Yes" and " No" after a prompt (``LanguageModelJudge``), as the paper
   did with a large LM.
3. ``occurrences`` of a question = number of its top-k documents judged to contain it, so it is
   capped at ``--top_k``. ``density`` = total occurrences / documents in the corpus.

Outputs (``--output_dir OUT``):
    OUT/density.json   "questions": one entry per (question, corpus) with "index",
                       "occurrences", the retrieved document ids and a judgement per document;
                       "corpus": {"documents", "occurrences", "density", ...} (the first
                       corpus), "corpora": all of them, "table": one row per (corpus, question
                       file), "instance_analysis" when predictions are given (per question file: the
                       items that transferred, and "gap_vs_log_occurrences": the slope of the per-item
                       gap on log(1 + source-corpus occurrences) with a bootstrap interval).
    OUT/density.md     Table 1 of the paper for these corpora (and the instance-level table).
    OUT/index/LABEL/   the BM25 index of each corpus, reused while its fingerprint matches.

Indexes stay bounded in memory on corpora of millions of documents: documents are streamed,
the index is built in shards of ``--shard_size`` documents with corpus-wide statistics (so a
sharded search returns exactly what one big index would), only the byte offset of each
document is kept, and the texts of the retrieved documents are read back by offset.

Example::

    python run_density.py --questions bo-culture-cloze_en.json --corpus_files enwiki=wiki.jsonl \\
        --top_k 50 --output_dir density_out

Needs study_common.py and cloze.py beside it (datasets only for --corpus_dataset, torch only for --judge_model).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bm25s
import numpy as np
import regex
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from cloze import (
    BLANK,
    QuestionSet,
    fill_blanks,
    load_question_sets,
    parallel_base,
    read_predictions,
)
from study_common import (
    LANGUAGE_SCRIPTS,
    InputError,
    check_document_suffix,
    exit_on_input_error,
    is_saved_dataset,
    not_utf8,
    read_documents,
    setup_logging,
    text_of,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("run_density")

#: Corpus file types with one document per line: read back by byte offset.
_LINE_FILES = (".txt", ".jsonl")


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


@dataclass
class DensityArguments:
    questions: list[str] = field(
        metadata={
            "help": "Questions in the paper's cloze format (JSON list of {question, options, answer}; the blank is "
            "a run of underscores; options are not needed here): files, folders of them, saved or Hub datasets, "
            "read by cloze.load_question_sets. The file stem (e.g. bo-culture-cloze_en) names the question set, "
            "as in run_eval.py's predictions.jsonl; a stem ending in _LANG sets the language."
        }
    )
    output_dir: str = field(metadata={"help": "Where density.json, density.md and (by default) the indexes go."})
    corpus_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Corpora as files: each entry is one corpus, written PATH or LABEL=PATH[,PATH...] "
            "(several files make one corpus). .jsonl / .txt (one document per non-empty line) stream with "
            "bounded memory; .json (a list) and .csv / .tsv (a header row naming --corpus_text_column) are "
            "read whole. The label defaults to the first file's stem."
        },
    )
    corpus_dataset: str | None = field(
        default=None,
        metadata={
            "help": "A corpus as a datasets dataset: a directory written by save_to_disk, a Hub name (e.g. "
            "wikimedia/wikipedia with --corpus_dataset_config 20231101.en --corpus_streaming), or a local "
            "folder of data files (.jsonl, .parquet, ...) that load_dataset reads."
        },
    )
    corpus_dataset_config: str | None = field(default=None, metadata={"help": "Config name of --corpus_dataset."})
    corpus_split: str = field(default="train", metadata={"help": "Split of --corpus_dataset."})
    max_documents: int | None = field(
        default=None,
        metadata={
            "help": "Index only the first N documents of each corpus (a smoke run's budget; the density is then a "
            "share of those N, recorded in density.json and in the index fingerprint). Default: every document."
        },
    )
    corpus_data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Files of --corpus_dataset to read (e.g. one language's file of MC^2); default: all."},
    )
    corpus_streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --corpus_dataset from the Hub instead of downloading it. A streamed corpus has no "
            "random access: the texts of retrieved documents are collected in one more pass over it."
        },
    )
    corpus_label: str | None = field(
        default=None, metadata={"help": "Label of --corpus_dataset in the outputs (default: its name)."}
    )
    corpus_text_column: str = field(
        default="text", metadata={"help": "Text column of .json/.jsonl corpus files and of --corpus_dataset."}
    )
    top_k: int = field(
        default=50,
        metadata={
            "help": "Documents retrieved per question and corpus (the paper: 50). Occurrences of a question "
            "are counted among these, so they can never exceed top_k."
        },
    )
    index_dir: str | None = field(
        default=None,
        metadata={"help": "Where the BM25 indexes live (default OUTPUT_DIR/index); share it between runs."},
    )
    shard_size: int = field(
        default=200_000,
        metadata={
            "help": "Documents per index shard (a shard also closes at 16.7M tokens): memory while indexing grows "
            "with the shard, not with the corpus."
        },
    )
    fingerprint: str = field(
        default="stat",
        metadata={
            "help": "How an index recognises its corpus: 'stat' (path, size and modification time of each "
            "file; instant) or 'content' (SHA-256 of the files; reads them once more)."
        },
    )
    bm25_k1: float = field(default=1.5, metadata={"help": "BM25 k1 (term-frequency saturation)."})
    bm25_b: float = field(default=0.75, metadata={"help": "BM25 b (document-length normalisation)."})
    min_script_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Measure a question file on a corpus only when at least this fraction of the corpus's "
            "word units is in the questions' script (English questions on the English corpus, Tibetan on the "
            "Tibetan one, both on a bilingual one). 0 measures every pair. Skipped pairs are reported."
        },
    )
    require_answer: bool = field(
        default=True,
        metadata={
            "help": "Rank only documents that hold every token of an answer (of one of the accepted answers): "
            "a document without them can never be judged to state the fact lexically, so they would only "
            "take top-k places. Set --require_answer false to let --judge_model see documents that "
            "paraphrase the answer."
        },
    )
    judge_window: int = field(
        default=0,
        metadata={
            "help": "Lexical judge: key terms count when they lie within this many units (words; Han and "
            "Hangul characters; Tibetan syllables) before or after the answer. 0: the length of the question "
            "itself, so a statement of the fact in any word order fits."
        },
    )
    judge_min_key_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Lexical judge: share of the question's key-term weight (see --judge_weighting) that the key "
            "terms found near the answer must carry."
        },
    )
    judge_weighting: str = field(
        default="idf",
        metadata={
            "help": "Lexical judge: weight of a key term, 'idf' (its BM25 idf in the corpus: rare terms such as "
            "names count most) or 'uniform' (each key term counts 1, so the share is a fraction of terms)."
        },
    )
    judge_min_key_terms: int = field(
        default=1,
        metadata={
            "help": "Lexical judge: and at least this many of them (capped at the number of key terms the "
            "question has)."
        },
    )
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": "Judge with this causal LM (path or Hub name) instead of the lexical judge: yes/no "
            "log-probabilities after the prompt given in docs/density.md. The lexical verdicts are still recorded."
        },
    )
    judge_batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass of --judge_model."})
    judge_excerpt_chars: int = field(
        default=2000,
        metadata={"help": "Characters of each document shown to --judge_model, centred on the first answer match."},
    )
    judge_max_tokens: int = field(
        default=1024,
        metadata={"help": "Longest prompt given to --judge_model; the document excerpt is shortened to fit."},
    )
    judge_margin: float = field(
        default=0.0,
        metadata={"help": "--judge_model says yes when log P(' Yes') - log P(' No') exceeds this margin."},
    )
    judge_device: str = field(default="auto", metadata={"help": "Device of --judge_model: auto, cpu, cuda, ..."})
    judge_dtype: str = field(
        default="auto", metadata={"help": "torch dtype of --judge_model: auto, float32, bfloat16, float16."}
    )
    question_batch_size: int = field(
        default=256,
        metadata={"help": "Questions judged together; their retrieved documents are read from disk together."},
    )
    predictions_with: str | None = field(
        default=None,
        metadata={
            "help": "Instance-level analysis: run_eval.py output of the model trained WITH bridges (its folder, "
            "or its predictions.jsonl; the accuracy.json beside it says which checkpoints count)."
        },
    )
    predictions_without: str | None = field(
        default=None, metadata={"help": "Instance-level analysis: the same for the model trained WITHOUT bridges."}
    )
    predictions_step: int | None = field(
        default=None,
        metadata={"help": "Checkpoint step of the predictions to use (default: the last step of each run)."},
    )
    source_corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "Instance-level analysis: the corpus the knowledge transfers FROM, as LABEL (for every "
            "question language) or LANG=LABEL entries, e.g. 'bo=enwiki en=bo_corpus' (Tibetan questions "
            "transfer from English Wikipedia, English questions from the Tibetan corpus). Occurrences come "
            "from the same question file on that corpus, or else from its parallel file (same stem before "
            "the final _LANG, items parallel by position). Default: the corpus on which the question file's "
            "parallel file in the other language was measured (it must be unique)."
        },
    )
    log_level: str = field(default="info", metadata={"help": "Logging level: debug, info, warning."})


# --------------------------------------------------------------------------------------
# Tokenisation by script
# --------------------------------------------------------------------------------------

#: Bump when retrieval_tokens changes: it is part of every index fingerprint.
TOKENIZER_VERSION = "density-tokens-2"

# Run kinds. "other" is any letter run of a script the study does not name (e.g. Cyrillic):
# treated like Latin words.
_LATIN, _DIGIT, _HANGUL, _HAN, _TIBETAN, _MONGOLIAN, _OTHER = range(7)
KIND_NAMES = ("latin", "digit", "hangul", "han", "tibetan", "mongolian", "other")
_SCRIPT_OF_KIND = {_LATIN: "Latin", _HANGUL: "Hangul", _HAN: "Han", _TIBETAN: "Tibetan", _MONGOLIAN: "Mongolian"}

# One pass over the text finds maximal runs of letters of one script, or of digits. Tibetan
# tsheg (U+0F0B, U+0F0C) and shad (U+0F0D-U+0F12) are punctuation, so each Tibetan run is one
# syllable; spaces (U+202F NARROW NO-BREAK SPACE becomes a space under NFKC) end Mongolian
# words and Hangul eojeol. Han and Hangul runs are cut into characters later. The alternatives
# are script-disjoint, so a run's first character tells which one matched. regex VERSION1 is
# needed for the [..&&..] and [..--..] set operations.
_RUNS = regex.compile(
    r"\p{sc=Latin}[\p{sc=Latin}\p{M}]*"
    r"|\p{Nd}+"
    r"|[\p{sc=Hangul}&&[\p{L}\p{M}]]+"
    r"|[\p{sc=Han}&&\p{L}]+"
    r"|[\p{sc=Tibetan}&&[\p{L}\p{M}]]+"
    r"|[\p{sc=Mongolian}&&[\p{L}\p{M}]]+"
    r"|[[\p{L}\p{M}]--[\p{sc=Latin}\p{sc=Hangul}\p{sc=Han}\p{sc=Tibetan}\p{sc=Mongolian}]]+",
    regex.VERSION1,
)
# ASCII text (most of an English corpus) takes a plain `re` path that gives the same runs.
_ASCII_RUNS = re.compile(r"[a-z]+|[0-9]+")
_KIND_TESTS = [(_DIGIT, regex.compile(r"\p{Nd}"))] + [
    (kind, regex.compile(rf"\p{{sc={script}}}")) for kind, script in _SCRIPT_OF_KIND.items()
]
_CHAR_KIND: dict[str, int] = {}


def _kind_of(char: str) -> int:
    kind = _CHAR_KIND.get(char)
    if kind is None:
        kind = next((k for k, test in _KIND_TESTS if test.match(char)), _OTHER)
        _CHAR_KIND[char] = kind
    return kind


# Format characters that change a glyph's shape, not the word: Mongolian free variation
# selectors U+180B-U+180D and U+180F, the Mongolian vowel separator U+180E (a word with or
# without it is the same word), zero-width (non-)joiners.
_SHAPING_ONLY = dict.fromkeys(map(ord, "\u180b\u180c\u180d\u180e\u180f\u200c\u200d"))

#: A small English stopword list: these words neither enter the BM25 index nor count as key
#: terms. Negations (not, no, never) are deliberately kept.
ENGLISH_STOPWORDS = frozenset(
    """a an the of in on at to for from by with and or but nor is are was were be been being am it its this that
    these those as which who whom whose what when where why how do does did has have had their they them there
    he she his her him i you we our your my me us can will would shall should may might must also than then such
    into about over after before very s so if""".split()
)
#: Function words that do not count as key terms of the lexical judge (they stay in the BM25
#: index, where their low IDF already discounts them): Tibetan case particles and copulas,
#: Mongolian case suffixes written as separate words (shaping characters removed).
JUDGE_STOPWORDS = ENGLISH_STOPWORDS | frozenset(
    "གི ཀྱི གྱི འི ཡི གིས ཀྱིས གྱིས འིས ཡིས ལ ར རུ སུ ཏུ དུ ན ནས ལས དང ནི ཡང ཡིན ཡོད རེད འདུག སོགས".split()
    + "ᠤᠨ ᠦᠨ ᠶᠢᠨ ᠢᠨ ᠤ ᠦ ᠳᠤ ᠲᠤ ᠳᠦ ᠲᠦ ᠢ ᠶᠢ ᠪᠠ ᠡᠴᠡ ᠠᠴᠠ ᠢᠶᠠᠷ ᠪᠡᠷ ᠪᠠᠷ ᠲᠠᠢ ᠲᠡᠢ ᠪᠣᠯ ᠪᠠᠶᠢᠨᠠ".split()
)


def _ascii_digits(run: str) -> str:
    # Tibetan ༥༠, Mongolian ᠕᠐ and full-width ５０ all mean 50.
    return run if run.isascii() else "".join(str(unicodedata.digit(c)) for c in run)


def _runs(text: str) -> list[tuple[int, str]]:
    """(kind, run) for each maximal run of letters of one script, or of digits, in ``text``.

    Text is NFKC-normalised, shaping-only characters are removed and letters are lower-cased
    (which only changes cased scripts: Latin, Cyrillic, Greek...); digits become ASCII.
    """
    if text.isascii():
        return [(_DIGIT if run[0] <= "9" else _LATIN, run) for run in _ASCII_RUNS.findall(text.lower())]
    text = unicodedata.normalize("NFKC", text).translate(_SHAPING_ONLY).lower()
    runs = []
    for run in _RUNS.findall(text):
        kind = _CHAR_KIND.get(run[0])
        if kind is None:
            kind = _kind_of(run[0])
        runs.append((kind, _ascii_digits(run) if kind == _DIGIT else run))
    return runs


def retrieval_tokens(text: str) -> list[str]:
    """BM25 tokens of ``text``, which may mix scripts (each run of one script is cut its own way).

    * Latin (and scripts not listed below): lower-cased words, English stopwords removed.
    * Digits of any script: one token of ASCII digits.
    * Hangul: each eojeol (space-separated word, particles attached), its syllables, and for
      eojeol of three or more syllables its syllable bigrams, so that 추석을 and 추석에 share the
      token 추석, and the answer 4개 finds 4개의 (every syllable of an answer is a token).
    * Han: every character and every character bigram of a run (no word segmenter is needed,
      and bigrams carry most of the precision of words).
    * Tibetan: syllables (the text between tsheg and shad marks).
    * Traditional Mongolian: words split at spaces and U+202F, free variation selectors and the
      vowel separator removed.
    """
    return _tokens_and_kind_units(text, [0] * len(KIND_NAMES))


def _tokens_and_kind_units(text: str, kind_units: list[int]) -> list[str]:
    """``retrieval_tokens``, also adding the units of each run kind to ``kind_units`` (the script shares)."""
    if text.isascii():  # fast path, same result as the loop below
        runs = _ASCII_RUNS.findall(text.lower())
        digits = sum(1 for run in runs if run[0] <= "9")
        kind_units[_DIGIT] += digits
        kind_units[_LATIN] += len(runs) - digits
        return [run for run in runs if run not in ENGLISH_STOPWORDS]
    tokens: list[str] = []
    for kind, run in _runs(text):
        if kind == _HAN:
            kind_units[kind] += len(run)
            tokens.extend(run)
            tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
        elif kind == _HANGUL:
            kind_units[kind] += len(run)
            tokens.append(run)
            if len(run) > 1:
                tokens.extend(run)
            if len(run) > 2:
                tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
        elif kind in (_LATIN, _OTHER):
            kind_units[kind] += 1
            if run not in ENGLISH_STOPWORDS:
                tokens.append(run)
        else:
            kind_units[kind] += 1
            tokens.append(run)
    return tokens


@dataclass
class TextAnalysis:
    """A text as the lexical judge sees it.

    ``units`` is the text in reading order: words (Latin, other scripts, Mongolian), digit runs,
    Tibetan syllables, single Han characters and single Hangul syllables (so that an answer
    matches inside a Korean word that carries a particle). ``key_tokens[p]`` holds the key-term
    tokens that start at unit p: the word or syllable itself (unless a judge stopword); for Han
    the character and the bigram of units p and p+1 of the same run (the bigrams of unsegmented
    text include many that straddle two words, so the characters are kept too: frequent ones
    weigh almost nothing under idf weighting); for Hangul the bigram (a run of one syllable
    gives the syllable; eojeol are short, so bigrams carry the stem without the particle).
    """

    units: list[str]
    key_tokens: list[tuple[str, ...]]


def analyse_text(text: str) -> TextAnalysis:
    units: list[str] = []
    key_tokens: list[tuple[str, ...]] = []
    for kind, run in _runs(text):
        if kind == _HAN:
            units.extend(run)
            key_tokens.extend((run[i], run[i : i + 2]) for i in range(len(run) - 1))
            key_tokens.append((run[-1],))
        elif kind == _HANGUL:
            units.extend(run)
            if len(run) == 1:
                key_tokens.append((run,))
            else:
                key_tokens.extend((run[i : i + 2],) for i in range(len(run) - 1))
                key_tokens.append(())
        else:
            units.append(run)
            key_tokens.append(() if run in JUDGE_STOPWORDS else (run,))
    return TextAnalysis(units, key_tokens)


def dominant_script(texts: list[str]) -> str:
    """The script (of the study's five) with the most letters in ``texts``; Latin when none."""
    counts = Counter()
    for text in texts:
        for kind, run in _runs(text):
            if kind in _SCRIPT_OF_KIND:
                counts[_SCRIPT_OF_KIND[kind]] += len(run)
    return counts.most_common(1)[0][0] if counts else "Latin"


# --------------------------------------------------------------------------------------
# Questions: read and filled by cloze.py, prepared here for retrieval and judging
# --------------------------------------------------------------------------------------


@dataclass
class Question:
    index: int
    question: str
    answers: list[str]
    has_blank: bool
    filled: str  # the cloze sentence with every blank replaced by the (first) answer
    query_tokens: list[str]
    key_terms: frozenset[str]
    answer_units: list[tuple[str, ...]]  # one unit sequence per accepted answer (empty ones dropped)
    answer_tokens: list[list[str]]  # per answer, the index tokens any document containing it must hold
    length_units: int  # units of the question without its blank: the default judge window


@dataclass
class QuestionFacts:
    """One question set read as facts: its stem names it in every output, its script picks the corpora."""

    stem: str
    lang: str
    script: str
    questions: list[Question]


def prepare_question(index: int, question: str, answers: list[str]) -> Question:
    """Query, key terms and answer units of one cloze item."""
    has_blank = bool(BLANK.search(question))
    first = answers[0]
    # Filled as a text stating the fact writes it: a Tibetan answer stays its own syllables.
    filled = fill_blanks(question, first, tibetan_tsheg=True)[0] if has_blank else f"{question} {first}"
    query = retrieval_tokens(filled)
    for other in answers[1:]:
        query.extend(retrieval_tokens(other))
    context = analyse_text(BLANK.sub(" ", question))
    answer_analyses = [analyse_text(answer) for answer in answers]
    answer_keys = {token for analysis in answer_analyses for tokens in analysis.key_tokens for token in tokens}
    # A key term that is part of the answer would be satisfied by the answer itself.
    key_terms = frozenset(token for tokens in context.key_tokens for token in tokens if token not in answer_keys)
    answer_units = [tuple(analysis.units) for analysis in answer_analyses if analysis.units]
    # Every unit of an answer is an index token (Latin and other words, digit runs, Han and Hangul
    # characters, Tibetan syllables, Mongolian words), except English stopwords, which are not indexed.
    answer_tokens = [sorted(set(units) - ENGLISH_STOPWORDS) for units in answer_units]
    return Question(
        index=index,
        question=question,
        answers=answers,
        has_blank=has_blank,
        filled=filled,
        query_tokens=query,
        key_terms=key_terms,
        answer_units=answer_units,
        answer_tokens=answer_tokens,
        length_units=len(context.units),
    )


def question_facts(question_set: QuestionSet) -> QuestionFacts:
    """A set loaded by ``cloze.load_question_sets(..., require_options=False)``, prepared item by item.

    Its language is the one its name ends with (``_bo``) when the study knows that language's script;
    otherwise the script most of its filled sentences are written in decides, and the language is the
    study's language of that script ("" when none)."""
    questions = [prepare_question(i, item["question"], item["answers"]) for i, item in enumerate(question_set.items)]
    if question_set.lang in LANGUAGE_SCRIPTS:
        lang, script = question_set.lang, LANGUAGE_SCRIPTS[question_set.lang]
    else:
        script = dominant_script([q.filled for q in questions])
        lang = next((k for k, v in LANGUAGE_SCRIPTS.items() if v == script), "")
    return QuestionFacts(stem=question_set.stem, lang=lang, script=script, questions=questions)


# --------------------------------------------------------------------------------------
# Corpora: streaming documents, and reading chosen ones back
# --------------------------------------------------------------------------------------


class FileCorpus:
    """A corpus made of one or more .jsonl / .txt / .json / .csv / .tsv files, read like study_common.read_documents.

    Documents are numbered in file order. Each one's location is (file number, byte offset of
    its line) for .jsonl and .txt, so a retrieved document is read back with one seek; .json,
    .csv and .tsv files (a record may span lines) are read whole again to read back (use .jsonl
    for big corpora).
    """

    def __init__(self, label: str, paths: list[Path], text_column: str):
        self.label, self.paths, self.text_column = label, paths, text_column
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such corpus file. Check --corpus_files.")
            check_document_suffix(path)
        self.random_access = all(p.suffix.lower() in _LINE_FILES for p in paths)

    def describe(self) -> dict:
        return {"kind": "files", "paths": [str(p) for p in self.paths], "text_column": self.text_column}

    def fingerprint(self, mode: str) -> dict:
        files = []
        for path in self.paths:
            stat = path.stat()
            entry = {"path": str(path.resolve()), "size": stat.st_size}
            if mode == "content":
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                entry["sha256"] = digest.hexdigest()
            else:
                entry["mtime_ns"] = stat.st_mtime_ns
            files.append(entry)
        return {"files": files, "text_column": self.text_column}

    def iter_documents(self, skipped: Counter) -> Iterator[tuple[str, int, int]]:
        """(text, file number, offset) of every document; offset = byte offset (or item of a .json list)."""
        for file_number, path in enumerate(self.paths):
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: the file is empty. Give a file with at least one document.")
            suffix = path.suffix.lower()
            if suffix not in _LINE_FILES:
                for item, text in enumerate(self._read_whole(path)):
                    yield text, file_number, item
                continue
            with path.open("rb") as handle:
                offset = 0
                for line_number, raw in enumerate(handle, start=1):
                    line_offset, offset = offset, offset + len(raw)
                    text = self._parse_line(raw, f"{path}:{line_number}", suffix)
                    if text is not None:
                        yield text, file_number, line_offset

    def _parse_line(self, raw: bytes, where: str, suffix: str) -> str | None:
        try:
            line = raw.decode("utf-8-sig")  # a byte-order mark is not text (only the first line has one)
        except UnicodeDecodeError as err:
            raise not_utf8(where, err) from err
        if not line.strip():
            return None  # blank lines are not documents, as in study_common.read_documents
        if suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}). Fix or remove the line.") from err
            return text_of(record, self.text_column, where, "--corpus_text_column")
        return line.rstrip("\n").rstrip("\r")

    def _read_whole(self, path: Path) -> Iterator[str]:
        return read_documents(path, self.text_column, column_flag="--corpus_text_column")

    def fetch(self, locations: dict[int, tuple[int, int]]) -> dict[int, str]:
        """Texts of the documents ``{doc_id: (file number, offset)}``."""
        texts: dict[int, str] = {}
        by_file: dict[int, list[tuple[int, int]]] = {}
        for doc_id, (file_number, offset) in locations.items():
            by_file.setdefault(file_number, []).append((offset, doc_id))
        for file_number, wanted in by_file.items():
            path = self.paths[file_number]
            suffix = path.suffix.lower()
            wanted.sort()
            if suffix not in _LINE_FILES:
                items = list(self._read_whole(path))
                texts.update({doc_id: items[offset] for offset, doc_id in wanted})
                continue
            with path.open("rb") as handle:
                for offset, doc_id in wanted:
                    handle.seek(offset)
                    where = f"{path} (byte {offset}; changed since it was indexed?)"
                    texts[doc_id] = self._parse_line(handle.readline(), where, suffix) or ""
        return texts


class DatasetCorpus:
    """A corpus as a datasets dataset (save_to_disk directory or Hub name, optionally streamed).

    A document's location is its row number. Rows whose text is missing or not a string are
    skipped and counted. Without streaming, retrieved rows are read back by row number (Arrow
    memory-maps the data); a streamed corpus is read once more to collect them.
    """

    def __init__(
        self,
        name: str,
        config: str | None,
        split: str,
        text_column: str,
        streaming: bool,
        label: str,
        data_files: list[str] | None = None,
    ):
        self.name, self.config, self.split, self.text_column = name, config, split, text_column
        self.data_files = data_files
        self.streaming, self.label = streaming, label
        self.random_access = not streaming
        self._dataset = None

    def _load(self):
        if self._dataset is None:
            import datasets

            if is_saved_dataset(self.name):
                dataset = datasets.load_from_disk(self.name)
                if isinstance(dataset, datasets.DatasetDict):
                    if self.split not in dataset:
                        raise ValueError(
                            f"{self.name}: no split {self.split!r} (has {list(dataset)}); set --corpus_split."
                        )
                    dataset = dataset[self.split]
            else:
                dataset = datasets.load_dataset(
                    self.name, self.config, split=self.split, streaming=self.streaming, data_files=self.data_files
                )
            columns = dataset.column_names
            if columns is not None and self.text_column not in columns:
                raise ValueError(
                    f"{self.name}: no column {self.text_column!r} (found: {', '.join(columns)}). "
                    "Pass --corpus_text_column NAME."
                )
            self._dataset = dataset
        return self._dataset

    def describe(self) -> dict:
        return {"kind": "dataset", "name": self.name, "config": self.config, "split": self.split,
                "data_files": self.data_files}  # fmt: skip

    def fingerprint(self, mode: str) -> dict:
        entry = {"name": self.name, "config": self.config, "split": self.split, "text_column": self.text_column}
        if self.data_files:
            entry["data_files"] = list(self.data_files)
        if not self.streaming:
            entry["dataset_fingerprint"] = self._load()._fingerprint
        return entry

    def iter_documents(self, skipped: Counter) -> Iterator[tuple[str, int, int]]:
        for row, record in enumerate(self._load()):
            text = record.get(self.text_column)
            if isinstance(text, str):
                yield text, 0, row
            else:
                skipped[f"no text in column {self.text_column!r}"] += 1

    def fetch(self, locations: dict[int, tuple[int, int]]) -> dict[int, str]:
        by_row = {offset: doc_id for doc_id, (_, offset) in locations.items()}
        if self.streaming:
            texts, last = {}, max(by_row)
            for row, record in enumerate(self._load()):
                if row in by_row:
                    texts[by_row[row]] = record[self.text_column]
                if row >= last:
                    break
            return texts
        rows = sorted(by_row)
        column = self._load().select(rows)[self.text_column]
        return {by_row[row]: text for row, text in zip(rows, column)}


def parse_corpus_files(entries: list[str], text_column: str) -> list[FileCorpus]:
    corpora = []
    for entry in entries:
        label, sep, paths = entry.partition("=")
        if not sep or "/" in label or os.sep in label or Path(entry).is_file():
            label, paths = "", entry
        path_list = [Path(p) for p in paths.split(",") if p]
        corpora.append(FileCorpus(label or path_list[0].stem, path_list, text_column))
    return corpora


# --------------------------------------------------------------------------------------
# The sharded BM25 index
# --------------------------------------------------------------------------------------


class ShardedBM25:
    """A bm25s index split into shards of documents, with corpus-wide BM25 statistics.

    bm25s indexes a corpus held in memory at once. To index millions of documents in bounded
    memory, documents are streamed and tokenised once; each shard's (document, token, count)
    triples go to disk, while only the vocabulary, the document frequencies, the document
    lengths and each document's location stay in memory. Each shard's score matrix is then
    built with the CORPUS-WIDE idf and average length, exactly as ``bm25s.BM25(method="lucene")``
    builds it (a test pins the equality), and saved in bm25s's own format; queries score each
    shard with bm25s (memory-mapped) and keep the best ``k``. Because every shard uses the same
    statistics, a sharded search returns what a single index of the corpus would.

    A search may also require tokens: then only documents holding every required token of at
    least one group (one group per accepted answer) are ranked, found by intersecting the
    shards' posting lists. Ties are broken by document id, and documents that share no token
    with the query (score 0) are never returned, so results are deterministic.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        self.vocab: dict[str, int] = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        self.file_numbers = np.load(directory / "file_numbers.npy", mmap_mode="r")
        self.offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        self.shard_starts = self.meta["shard_starts"]
        self.num_docs = self.meta["documents"]
        self.document_frequencies = np.load(directory / "document_frequencies.npy", mmap_mode="r")

    def idf(self, token: str) -> float:
        """The BM25 idf of ``token`` in this corpus (a token the corpus lacks gets the highest idf)."""
        token_id = self.vocab.get(token)
        df = 0 if token_id is None else int(self.document_frequencies[token_id])
        return float(np.log1p((self.num_docs - df + 0.5) / (df + 0.5)))

    def _shard(self, number: int) -> bm25s.BM25:
        return bm25s.BM25.load(self.directory / f"shard_{number:05d}", mmap=True, load_vocab=False)

    def location(self, doc_id: int) -> tuple[int, int]:
        return int(self.file_numbers[doc_id]), int(self.offsets[doc_id])

    def search(
        self,
        queries: list[list[str]],
        k: int,
        required: list[list[list[str]]] | None = None,
        show_progress: bool = True,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (document ids, scores) per query, best first; fewer when fewer documents match.

        ``required[q]``, when given, lists token groups: only documents that hold every token of
        at least one group are ranked (an empty group, or no groups, requires nothing).
        """
        # A token repeated in the query counts each time, as in bm25s, rank_bm25 and Lucene.
        query_ids = [np.array([self.vocab[t] for t in q if t in self.vocab], dtype=np.int32) for q in queries]
        groups = [None] * len(queries)
        if required is not None:
            groups = [self._token_id_groups(r) for r in required]
        best = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
        bar = tqdm(total=len(self.shard_starts) * len(queries), desc="BM25 search", disable=not show_progress)
        for number, start in enumerate(self.shard_starts):
            shard = self._shard(number)
            for q, ids in enumerate(query_ids):
                bar.update()
                if ids.size == 0:
                    continue
                scores = shard.get_scores_from_ids(ids)
                if groups[q] is None:
                    local_ids, local_scores = top_k_deterministic(scores, k)
                else:
                    allowed = _documents_with_any_group(shard.scores, groups[q])
                    positions, local_scores = top_k_deterministic(scores[allowed], k)
                    local_ids = allowed[positions]
                merged_ids = np.concatenate([best[q][0], local_ids + start])
                merged_scores = np.concatenate([best[q][1], local_scores])
                order = np.lexsort((merged_ids, -merged_scores))[:k]
                best[q] = (merged_ids[order], merged_scores[order])
            del shard
        bar.close()
        return best

    def _token_id_groups(self, groups: list[list[str]]) -> list[list[int]] | None:
        """Token ids of each required group; None when some group requires nothing (no filter).

        A group with a token the corpus lacks can match no document: it becomes [-1].
        """
        if not groups or any(not group for group in groups):
            return None
        return [[self.vocab.get(token, -1) for token in group] for group in groups]


def _documents_with_any_group(matrix: dict, groups: list[list[int]]) -> np.ndarray:
    """Sorted ids of the documents of a bm25s score matrix holding all tokens of some group."""
    indptr, indices = matrix["indptr"], matrix["indices"]
    found = np.empty(0, dtype=np.int64)
    for group in groups:
        if -1 in group:
            continue
        postings = sorted((np.asarray(indices[indptr[t] : indptr[t + 1]]) for t in group), key=len)
        documents = postings[0]
        for posting in postings[1:]:
            documents = np.intersect1d(documents, posting, assume_unique=True)
        found = np.union1d(found, documents)
    return found.astype(np.int64)


def top_k_deterministic(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k highest positive scores, ties broken by the lower index."""
    candidates = np.flatnonzero(scores > 0)
    if candidates.size > k:
        candidate_scores = scores[candidates]
        kth = np.partition(candidate_scores, candidates.size - k)[candidates.size - k]
        candidates = candidates[candidate_scores >= kth]  # keeps every tie at the boundary
    candidate_scores = scores[candidates]
    order = np.lexsort((candidates, -candidate_scores))[:k]
    return candidates[order].astype(np.int64), candidate_scores[order].astype(np.float32)


def lucene_bm25_scores(tf, doc_lengths, df, num_docs, avg_length, k1, b):
    """BM25 as bm25s's method="lucene": idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b |d| / avg))."""
    idf = np.log1p((num_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * doc_lengths / avg_length))


#: A shard also closes once it holds this many tokens, so that the memory used to build one
#: (~50 bytes per token at its peak) stays bounded whatever the length of the documents.
SHARD_MAX_TOKENS = 1 << 24


@dataclass
class _Postings:
    """What the streaming pass over a corpus keeps in memory; each shard's (document, token, count)
    triples went to ``pairs_NNNNN.npy`` files beside it."""

    vocab: dict[str, int] = field(default_factory=dict)
    document_frequencies: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16, dtype=np.int64))
    lengths: array = field(default_factory=lambda: array("i"))  # tokens per document
    file_numbers: array = field(default_factory=lambda: array("i"))  # the document's location: file ...
    offsets: array = field(default_factory=lambda: array("q"))  # ... and byte offset (or item / row)
    shard_starts: list[int] = field(default_factory=list)
    kind_units: list[int] = field(default_factory=lambda: [0] * len(KIND_NAMES))
    skipped: Counter = field(default_factory=Counter)
    documents_without_tokens: int = 0


def _stream_postings(corpus, building: Path, shard_size: int, max_documents: int | None) -> _Postings:
    """Tokenise every document once, numbering tokens as they come; a shard closes at ``shard_size``
    documents or SHARD_MAX_TOKENS tokens and leaves its triples on disk."""
    found = _Postings()
    # Local names in the loop below: it runs once per document of a corpus of millions.
    vocab, lengths, file_numbers, offsets, kind_units = (
        found.vocab, found.lengths, found.file_numbers, found.offsets, found.kind_units
    )  # fmt: skip
    shard_tokens, shard_lengths = array("i"), array("i")
    no_token_docs = 0

    def flush_shard() -> None:
        number = len(found.shard_starts)
        found.shard_starts.append(len(lengths) - len(shard_lengths))
        tokens = np.frombuffer(shard_tokens, dtype=np.int32).astype(np.int64)
        docs = np.repeat(np.arange(len(shard_lengths), dtype=np.int64), np.frombuffer(shard_lengths, np.int32))
        pairs, tf = np.unique((docs << 32) | tokens, return_counts=True)
        pair_tokens = (pairs & 0xFFFFFFFF).astype(np.int32)
        df = found.document_frequencies
        if len(vocab) > df.size:
            df = np.concatenate([df, np.zeros(max(len(vocab), 2 * df.size) - df.size, np.int64)])
        found.document_frequencies = df + np.bincount(pair_tokens, minlength=df.size)
        np.save(building / f"pairs_{number:05d}.npy", np.stack([pairs >> 32, pair_tokens, tf]).astype(np.int32))
        del shard_tokens[:], shard_lengths[:]

    vocab_get = vocab.get
    progress = tqdm(desc=f"Indexing {corpus.label}", unit="doc")
    documents = corpus.iter_documents(found.skipped)
    if max_documents is not None:  # the first N documents only (a smoke run's budget)
        documents = itertools.islice(documents, max_documents)
    for text, file_number, offset in documents:
        tokens = _tokens_and_kind_units(text, kind_units)
        ids = list(map(vocab_get, tokens))
        if None in ids:  # new tokens (rare once the vocabulary has warmed up)
            for position, token_id in enumerate(ids):
                if token_id is None:
                    token = tokens[position]
                    token_id = vocab_get(token)  # it may have been added earlier in this document
                    ids[position] = vocab[token] = len(vocab) if token_id is None else token_id
        shard_tokens.extend(ids)
        shard_lengths.append(len(ids))
        lengths.append(len(ids))
        file_numbers.append(file_number)
        offsets.append(offset)
        no_token_docs += not ids
        if len(shard_lengths) == shard_size or len(shard_tokens) >= SHARD_MAX_TOKENS:
            flush_shard()
        progress.update()
    progress.close()
    if len(shard_lengths):
        flush_shard()
    found.documents_without_tokens = no_token_docs
    return found


def _write_shard_scores(building: Path, found: _Postings, df: np.ndarray, avg_length: float, k1: float, b: float):
    """Each shard's BM25 score matrix from its triples, with the corpus-wide ``df`` and ``avg_length``, saved
    in bm25s's own format (the triples file is then removed)."""
    num_docs, vocab_size = len(found.lengths), df.size
    all_lengths = np.frombuffer(found.lengths, dtype=np.int32)
    starts = found.shard_starts
    for number, start in enumerate(tqdm(starts, desc="Scoring shards", unit="shard")):
        pairs_path = building / f"pairs_{number:05d}.npy"
        docs, tokens, tf = np.load(pairs_path).astype(np.int64)
        end = starts[number + 1] if number + 1 < len(starts) else num_docs
        scores = lucene_bm25_scores(
            tf.astype(np.float32), all_lengths[start + docs], df[tokens], num_docs, avg_length, k1, b
        ).astype(np.float32)
        # Compressed sparse columns (one column per token), rows sorted within a column: bm25s's layout.
        order = np.lexsort((docs, tokens))
        indptr = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(np.bincount(tokens, minlength=vocab_size), out=indptr[1:])
        shard = bm25s.BM25(k1=k1, b=b, method="lucene")
        shard.scores = {
            "data": scores[order],
            "indices": docs[order].astype(np.int32),
            "indptr": indptr,
            "num_docs": end - start,
        }
        shard.vocab_dict = {}  # the vocabulary is shared by all shards: vocab.json
        shard.nonoccurrence_array = None
        shard.save(building / f"shard_{number:05d}", show_progress=False)
        pairs_path.unlink()


def build_index(
    corpus, directory: Path, shard_size: int, k1: float, b: float, fingerprint: dict, max_documents: int | None = None
) -> None:
    """Stream ``corpus`` once and write a ShardedBM25 index to ``directory`` (replaced atomically)."""
    building = directory.parent / f".{directory.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        found = _stream_postings(corpus, building, shard_size, max_documents)
        num_docs = len(found.lengths)
        if num_docs == 0:
            reasons = ", ".join(f"{n} {why}" for why, n in found.skipped.items()) or "no records"
            raise ValueError(
                f"Corpus {corpus.label!r} has no documents ({reasons}). Check the corpus and its text column."
            )
        vocab_size = len(found.vocab) + 1  # + the empty token bm25s reserves for queries with no known token
        df = found.document_frequencies
        df = (
            df[:vocab_size] if df.size >= vocab_size else np.concatenate([df, np.zeros(vocab_size - df.size, np.int64)])
        )
        all_lengths = np.frombuffer(found.lengths, dtype=np.int32)
        avg_length = float(all_lengths.mean()) if all_lengths.sum() else 1.0
        _write_shard_scores(building, found, df, avg_length, k1, b)

        vocab = found.vocab
        vocab[""] = len(vocab)
        (building / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        np.save(building / "file_numbers.npy", np.frombuffer(found.file_numbers, dtype=np.int32))
        np.save(building / "offsets.npy", np.frombuffer(found.offsets, dtype=np.int64))
        np.save(building / "document_frequencies.npy", df)
        kind_units = found.kind_units
        total_units = sum(n for kind, n in enumerate(kind_units) if kind != _DIGIT) or 1
        meta = {
            "fingerprint": fingerprint,
            "corpus": corpus.describe(),
            "documents": num_docs,
            "documents_without_tokens": found.documents_without_tokens,
            "skipped": dict(found.skipped),
            "vocabulary": len(vocab),
            "average_tokens": avg_length,
            "shard_starts": found.shard_starts,
            "script_unit_fractions": {
                _SCRIPT_OF_KIND[kind]: kind_units[kind] / total_units for kind in _SCRIPT_OF_KIND
            },
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json_atomic(building / "meta.json", meta)  # written last: an index without it is incomplete
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(building, directory)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def open_index(corpus, index_root: Path, args: DensityArguments) -> tuple[ShardedBM25, bool]:
    """The corpus's index, reused when its fingerprint matches, else (re)built. Returns (index, reused)."""
    fingerprint = {
        "corpus": corpus.fingerprint(args.fingerprint),
        "tokenizer": TOKENIZER_VERSION,
        "bm25": {"method": "lucene", "k1": args.bm25_k1, "b": args.bm25_b},
        "shard_size": args.shard_size,
        "shard_max_tokens": SHARD_MAX_TOKENS,
        "max_documents": args.max_documents,
    }
    directory = index_root / corpus.label
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint")
        except json.JSONDecodeError:
            old = None
        if old == fingerprint:
            logger.info("Reusing the index of corpus %r at %s (fingerprint matches).", corpus.label, directory)
            return ShardedBM25(directory), True
        changed = sorted(key for key in fingerprint if (old or {}).get(key) != fingerprint[key])
        logger.info(
            "Rebuilding the index of corpus %r at %s (changed: %s).", corpus.label, directory, ", ".join(changed)
        )
    else:
        logger.info("Building the index of corpus %r at %s (no index there yet).", corpus.label, directory)
    if args.max_documents is not None:
        logger.warning(
            "Corpus %r: indexing only its first %d documents (--max_documents).", corpus.label, args.max_documents
        )
    build_index(corpus, directory, args.shard_size, args.bm25_k1, args.bm25_b, fingerprint, args.max_documents)
    return ShardedBM25(directory), False


# --------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------


@dataclass
class Judgement:
    contains: bool
    answer_found: bool
    key_terms_matched: int  # key terms near the best answer match (-1: no answer match)
    key_weight_matched: float  # their share of the question's key-term weight (-1.0: no answer match)


@dataclass(frozen=True)
class LexicalJudge:
    """Does a document state a question's fact? Deterministic and lexical.

    Yes iff some answer's units occur contiguously in the document (see ``analyse_text``: Han
    and Hangul by character, so 4개 matches 4개의) and, within ``window`` units before or after
    that occurrence, the question's key terms found carry at least ``min_key_fraction`` of the
    question's key-term weight, and number at least ``min_key_terms`` (capped at the number of
    key terms). Key terms: words of the question minus stopwords and minus the answer's own
    terms; Han characters and bigrams; Hangul bigrams; Tibetan syllables and Mongolian words
    minus case particles (``JUDGE_STOPWORDS``). A term's weight is
    its BM25 idf in the corpus (``weights``; 1 each when not given), so a matched subject name
    counts for more than a matched common word and a paraphrase that keeps the subject and the
    answer but rewords the relation still counts. ``window`` 0 means the question's own length.
    A question without key terms is judged on the answer alone.

    Failure modes (what it cannot see):
    * paraphrase and synonyms: a fact stated without the answer string ("the harvest festival"
      for "Chuseok") or with few of the question's terms is not counted (undercount);
    * inflection in Latin and Mongolian ("celebrates" vs "celebrated") and Tibetan particles
      fused into a syllable miss a key term;
    * answers that are common words or numbers ("4", "rice", "South") match everywhere; the
      key-term condition then carries the whole decision;
    * Han answers have no word boundaries: 泰山 also matches inside 泰山区;
    * negation and contradiction: "Chuseok is NOT in spring" matches like the fact;
    * a document about a neighbouring fact that shares the answer and the rare key terms (the
      same subject, another relation) counts (overcount);
    * co-occurrence is checked inside a window, not a sentence, so a long list of facts can
      combine an answer and key terms from different sentences.
    """

    window: int = 0
    min_key_fraction: float = 0.25
    min_key_terms: int = 1

    def judge(self, question: Question, document: TextAnalysis, weights: dict[str, float] | None = None) -> Judgement:
        units, keys = document.units, document.key_tokens
        window = self.window or question.length_units
        weight = (lambda term: weights[term]) if weights is not None else (lambda term: 1.0)  # noqa: E731
        total = sum(weight(term) for term in question.key_terms)
        needed_terms = min(len(question.key_terms), self.min_key_terms)
        best_terms, best_share, found = -1, -1.0, False
        for answer in question.answer_units:
            size = len(answer)
            first = answer[0]
            for start in (p for p, unit in enumerate(units) if unit == first):
                if tuple(units[start : start + size]) != answer:
                    continue
                found = True
                end = start + size
                near = {
                    token
                    for p in range(max(0, start - window), min(len(units), end + window))
                    if p < start or p >= end
                    for token in keys[p]
                }
                matched = question.key_terms & near
                share = sum(weight(term) for term in matched) / total if total else 1.0
                if share > best_share or (share == best_share and len(matched) > best_terms):
                    best_terms, best_share = len(matched), share
                if len(matched) >= needed_terms and share >= self.min_key_fraction - 1e-9:
                    return Judgement(True, True, len(matched), share)
        return Judgement(False, found, best_terms, best_share)


JUDGE_PROMPT = (
    "Document: {document}\n\n"
    "Question: {question}\n"
    "Proposed answer: {answer}\n"
    'Does the document state that "{statement}"? Answer:'
)
JUDGE_YES, JUDGE_NO = " Yes", " No"


def judge_prompt_parts(question: Question, excerpt: str) -> tuple[str, str, str]:
    """The judge prompt as (text before the document, document excerpt, text after it)."""
    head, tail = JUDGE_PROMPT.split("{document}")
    statement = question.filled.strip()
    tail = tail.format(question=question.question.strip(), answer=" / ".join(question.answers), statement=statement)
    return head, excerpt, tail


def document_excerpt(text: str, question: Question, max_chars: int) -> str:
    """At most ``max_chars`` characters of ``text``, centred on the first occurrence of an answer."""
    if len(text) <= max_chars:
        return text
    lowered = text.lower()
    positions = [lowered.find(a.lower()) for a in question.answers]
    positions = [p for p in positions if p >= 0]
    centre = min(positions) if positions else 0
    start = max(0, min(centre - max_chars // 2, len(text) - max_chars))
    return text[start : start + max_chars]


class LanguageModelJudge:
    """Judge with any causal LM: yes iff log P(" Yes" | prompt) - log P(" No" | prompt) > margin.

    Prompts follow JUDGE_PROMPT (also in docs/density.md). Each prompt is scored twice in one batch
    (followed by " Yes" and by " No"; continuations may span several tokens: their log-probs are
    summed). Sequences start with the model's document-start token (study_common), are padded
    with an attention mask, and the forward pass uses use_cache=False.
    """

    def __init__(self, model_name_or_path: str, batch_size: int, excerpt_chars: int, max_tokens: int,
                 margin: float, device: str = "auto", dtype: str = "auto"):  # fmt: skip
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from study_common import document_start_id

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype).to(device).eval()
        self.device, self.batch_size, self.excerpt_chars, self.margin = device, batch_size, excerpt_chars, margin
        self.start_id = document_start_id(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.start_id
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, limit)
        self.yes_ids = self._ids(JUDGE_YES)
        self.no_ids = self._ids(JUDGE_NO)
        if self.yes_ids == self.no_ids:
            raise ValueError(f"{model_name_or_path}: ' Yes' and ' No' tokenize identically; this model cannot judge.")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: Question, document_text: str) -> list[int]:
        """[start] + prompt ids; the document excerpt is cut (around its centre) to fit max_tokens."""
        head, excerpt, tail = judge_prompt_parts(
            question, document_excerpt(document_text, question, self.excerpt_chars)
        )
        head_ids, doc_ids, tail_ids = self._ids(head), self._ids(excerpt), self._ids(tail)
        room = self.max_tokens - 1 - len(head_ids) - len(tail_ids) - max(len(self.yes_ids), len(self.no_ids))
        if room < 0:
            raise ValueError(
                f"--judge_max_tokens {self.max_tokens} is too small for the prompt of question {question.index}."
            )
        if len(doc_ids) > room:
            cut = (len(doc_ids) - room) // 2
            doc_ids = doc_ids[cut : cut + room]
        return [self.start_id] + head_ids + doc_ids + tail_ids

    def margins(self, prompts: list[list[int]], show_progress: bool = False) -> np.ndarray:
        """log P(" Yes") - log P(" No") after each prompt (given as ids from ``prompt_ids``).

        Rows are padded on the LEFT (attention mask 0, position ids restarting at the first real
        token), so every continuation ends at the last position and only the logits of the last
        few positions are computed (``logits_to_keep``), not one vocabulary-wide row per token.
        """
        torch = self.torch
        keep = max(len(self.yes_ids), len(self.no_ids)) + 1
        out = np.zeros(len(prompts), dtype=np.float64)
        for begin in tqdm(range(0, len(prompts), self.batch_size), desc="LM judge", disable=not show_progress):
            chunk = prompts[begin : begin + self.batch_size]
            sequences = [(p + c, len(c)) for p in chunk for c in (self.yes_ids, self.no_ids)]
            width = max(len(ids) for ids, _ in sequences)
            input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(sequences), width), dtype=torch.long)
            for row, (ids, _) in enumerate(sequences):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = (
                    self.model(
                        input_ids=input_ids.to(self.device),
                        attention_mask=attention.to(self.device),
                        position_ids=position_ids.to(self.device),
                        use_cache=False,
                        logits_to_keep=keep,
                    )
                    .logits[:, -keep:]
                    .float()
                )
            log_probs = torch.log_softmax(logits, dim=-1)
            totals = []
            for row, (ids, size) in enumerate(sequences):
                # Kept position j predicts the token at kept position j + 1; the continuation fills the last `size`.
                positions = torch.arange(keep - size - 1, keep - 1, device=log_probs.device)
                targets = torch.tensor(ids[-size:], device=log_probs.device)
                totals.append(log_probs[row, positions, targets].sum().item())
            for i in range(len(chunk)):
                out[begin + i] = totals[2 * i] - totals[2 * i + 1]
        return out


# --------------------------------------------------------------------------------------
# Instance-level analysis
# --------------------------------------------------------------------------------------


def find_predictions(path: str) -> Path:
    """The predictions.jsonl of a run_eval.py output: given as the file, or the folder holding it (or the one
    folder below it that does). The accuracy.json beside it must be there: it lists the checkpoints that count."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (expected run_eval.py output).")
    found = [path] if path.is_file() else [path / "predictions.jsonl"]
    if not found[0].is_file():
        found = sorted(path.rglob("predictions.jsonl"))
    if not found:
        raise FileNotFoundError(f"{path}: no predictions.jsonl in it or below it. Run run_eval.py first.")
    if len(found) > 1:
        raise ValueError(f"{path}: several predictions.jsonl below it ({', '.join(map(str, found))}); give the file.")
    if found[0].name != "predictions.jsonl" or not (found[0].parent / "accuracy.json").is_file():
        raise FileNotFoundError(
            f"{found[0]}: expected run_eval.py's predictions.jsonl with its accuracy.json beside it (the "
            "checkpoints that count). Give run_eval.py's output folder."
        )
    return found[0]


def predictions_at(
    path: Path, step: int | None, setting: str
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, str]]:
    """Per questions stem: the first-wins correctness of each item at ``step`` (default: the run's last
    checkpoint), the step, and the question language; read by ``cloze.read_predictions``. ``setting`` is the
    CPT setting the run was given as ("bridges" or "no_bridges"); the run's recorded cpt_setting must agree
    (as run_transfer.py checks), so that swapped flags do not turn the analysis upside down."""
    accuracy, correct = read_predictions(path.parent)
    recorded = accuracy.get("cpt_setting") or {}
    was = recorded.get("setting") or {True: "bridges", False: "no_bridges"}.get(recorded.get("bridges"))
    if was is not None and was != setting:
        flag = "--predictions_with" if setting == "bridges" else "--predictions_without"
        raise InputError(f"{path} was given as {flag} but its cpt_setting says {was}. Swap or fix the flags.")
    if not any(correct.values()):
        raise ValueError(f"{path}: no predictions in the file.")
    items, steps = {}, {}
    for stem, by_step in correct.items():
        chosen = max(by_step) if step is None else step
        if chosen not in by_step:
            raise ValueError(f"{path}: no predictions at step {chosen} for {stem} (steps: {sorted(by_step)}).")
        items[stem], steps[stem] = by_step[chosen], chosen
    return items, steps, {stem: q["lang"] for stem, q in accuracy["questions"].items()}


def parse_source_corpus(entries: list[str]) -> dict[str, str]:
    """{lang or '*': corpus label} from LABEL or LANG=LABEL entries."""
    mapping = {}
    for entry in entries:
        lang, sep, label = entry.partition("=")
        mapping[lang if sep else "*"] = label if sep else entry
    return mapping


#: Resamples and seed of the bootstrap interval of ``gap_slope``.
SLOPE_BOOTSTRAP, SLOPE_SEED = 2000, 0


def gap_slope(gap: np.ndarray, occurrences: np.ndarray) -> dict:
    """Least-squares slope of the per-item gap (with bridges right minus without: +1, 0, -1) on
    log(1 + occurrences in the source corpus), with a 95% percentile bootstrap interval over items: the
    frequency hypothesis measured on real data (does the gap grow with how often the source states a fact?)."""
    x, gap = np.log1p(np.asarray(occurrences, float)), np.asarray(gap, float)
    entry = {"slope": None, "slope_ci": None, "n_items": len(gap), "n_bootstrap": SLOPE_BOOTSTRAP,
             "seed": SLOPE_SEED, "meaning": "change of the per-item gap (with minus without bridges) per unit of "
             "log(1 + source-corpus occurrences); > 0: facts the source states more often gain more from bridges"}  # fmt: skip
    if len(gap) < 3 or np.ptp(x) == 0:
        return {**entry, "reason": "fewer than 3 items or every item has the same occurrences: no slope"}

    def slopes(xs: np.ndarray, gs: np.ndarray) -> np.ndarray:  # one least-squares slope per row
        dx = xs - xs.mean(-1, keepdims=True)
        var = (dx * dx).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(var > 0, (dx * (gs - gs.mean(-1, keepdims=True))).sum(-1) / var, np.nan)

    rows = np.random.default_rng(SLOPE_SEED).integers(0, len(gap), size=(SLOPE_BOOTSTRAP, len(gap)))
    low, high = np.nanpercentile(slopes(x[rows], gap[rows]), [2.5, 97.5])  # resamples of one x value drop out
    return {**entry, "slope": float(slopes(x, gap)), "slope_ci": [float(low), float(high)]}


def _mean_at(counts: list[int], items: list[int]) -> float | None:
    return float(np.mean([counts[i] for i in items])) if items else None


def instance_analysis(
    with_path: Path,
    without_path: Path,
    step: int | None,
    sources: dict[str, str],
    occurrences: dict[tuple[str, str], list[int]],
) -> dict:
    """Mean occurrences in the source corpus of items that transferred vs all items, per question file.

    An item transferred when the model trained with bridges answers it right and the model trained
    without bridges answers it wrong (at the chosen step). ``occurrences[(corpus, stem)]`` holds the
    occurrences per item of each measured (corpus, question file). ``sources`` maps a question
    language (or "*") to its source corpus; when empty, the source of a question file is the corpus
    its parallel file in another language was measured on (Tibetan questions: their English twins
    on the English corpus), which must be unique.
    """
    with_correct, with_steps, langs = predictions_at(with_path, step, "bridges")
    without_correct, without_steps, _ = predictions_at(without_path, step, "no_bridges")
    results, skipped = [], []
    for stem in sorted(set(with_steps) & set(without_steps)):
        indices = list(range(min(len(with_correct[stem]), len(without_correct[stem]))))
        lang = langs.get(stem, "")
        prefix = parallel_base(stem)
        if sources:
            source = sources.get(lang, sources.get("*"))
            if source is None:
                skipped.append({"questions": stem, "reason": f"no --source_corpus for language {lang!r}"})
                continue
            measured_stem = stem
            if (source, stem) not in occurrences:
                parallel = [s for c, s in occurrences if c == source and parallel_base(s) == prefix]
                if len(parallel) != 1:
                    reason = f"no (single) parallel question file measured on corpus {source!r}"
                    skipped.append({"questions": stem, "reason": reason})
                    continue
                measured_stem = parallel[0]
        else:
            twins = [(c, s) for c, s in occurrences if s != stem and parallel_base(s) == prefix]
            if len(twins) != 1:
                found = ", ".join(f"{s} on {c}" for c, s in twins) or "none"
                reason = f"the source corpus is ambiguous: parallel files measured: {found}; give --source_corpus"
                skipped.append({"questions": stem, "reason": reason})
                continue
            source, measured_stem = twins[0]
        counts = occurrences[(source, measured_stem)]
        if indices and indices[-1] >= len(counts):
            raise ValueError(
                f"Predictions for {stem} reach item {indices[-1]} but {measured_stem} has {len(counts)} questions; "
                "the files are not parallel."
            )
        transferred = [i for i in indices if with_correct[stem][i] and not without_correct[stem][i]]
        results.append(
            {
                "questions": stem,
                "lang": lang,
                "source_corpus": source,
                "occurrences_from": measured_stem,
                "step_with": with_steps[stem],
                "step_without": without_steps[stem],
                "items": len(indices),
                "transferred": len(transferred),
                "transferred_indices": transferred,
                "mean_occurrences_transferred": _mean_at(counts, transferred),
                "mean_occurrences_all": _mean_at(counts, indices),
                "mean_occurrences_not_transferred": _mean_at(counts, sorted(set(indices) - set(transferred))),
                "gap_vs_log_occurrences": gap_slope(
                    with_correct[stem][indices].astype(float) - without_correct[stem][indices],
                    np.asarray(counts)[indices],
                ),
            }
        )
    return {"with": str(with_path), "without": str(without_path), "results": results, "skipped": skipped}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_report(table: list[dict], analysis: dict | None, skipped_pairs: list[dict], top_k: int, judge: str) -> str:
    lines = [
        "# Cultural density",
        "",
        f"Occurrences: top-{top_k} BM25 documents per question judged to contain its fact ({judge} judge), "
        "so each question counts at most top-k. Density = occurrences / documents.",
        "",
        "| corpus | questions | documents | items | occurrences | density |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in table:
        lines.append(
            f"| {row['corpus']} | {row['questions']} | {row['documents']:,} | {row['items']} | "
            f"{row['occurrences']:,} | {row['density']:.2e} |"
        )
    for pair in skipped_pairs:
        lines.append(f"\nNot measured: {pair['questions']} on {pair['corpus']} ({pair['reason']}).")
    if analysis:
        lines += [
            "",
            "## Instance-level analysis",
            "",
            "Transferred = right with bridges and wrong without. Mean occurrences in the source corpus.",
            "",
            "Gap slope: least-squares slope of the per-item gap (right with bridges minus right without) on "
            "log(1 + occurrences), with a 95% bootstrap interval over items.",
            "",
            "| questions | source corpus | items | transferred | mean occ. transferred | mean occ. all | mean occ. others "
            "| gap slope [95% CI] |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in analysis["results"]:
            fit = r["gap_vs_log_occurrences"]
            slope = (
                f"{fit['slope']:+.3f} [{fit['slope_ci'][0]:+.3f}, {fit['slope_ci'][1]:+.3f}]"
                if fit["slope_ci"]
                else "–"
            )
            lines.append(
                f"| {r['questions']} | {r['source_corpus']} ({r['occurrences_from']}) | {r['items']} | "
                f"{r['transferred']} | {_fmt(r['mean_occurrences_transferred'], '.2f')} | "
                f"{_fmt(r['mean_occurrences_all'], '.2f')} | {_fmt(r['mean_occurrences_not_transferred'], '.2f')} "
                f"| {slope} |"
            )
        for s in analysis["skipped"]:
            lines.append(f"\nNot analysed: {s['questions']} ({s['reason']}).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def validate(args: DensityArguments) -> None:
    if not args.corpus_files and not args.corpus_dataset:
        raise ValueError("Give a corpus: --corpus_files PATH (or LABEL=PATH) and/or --corpus_dataset NAME.")
    if args.top_k < 1 or args.shard_size < 1 or args.question_batch_size < 1 or args.judge_batch_size < 1:
        raise ValueError("--top_k, --shard_size, --question_batch_size and --judge_batch_size must be positive.")
    if args.fingerprint not in ("stat", "content"):
        raise ValueError(f"--fingerprint must be 'stat' or 'content', not {args.fingerprint!r}.")
    if args.judge_weighting not in ("idf", "uniform"):
        raise ValueError(f"--judge_weighting must be 'idf' or 'uniform', not {args.judge_weighting!r}.")
    if not 0 <= args.judge_min_key_fraction <= 1:
        raise ValueError("--judge_min_key_fraction must lie in [0, 1].")
    if bool(args.predictions_with) != bool(args.predictions_without):
        raise ValueError("Give both --predictions_with and --predictions_without (or neither).")
    if args.max_documents is not None and args.max_documents < 1:
        raise ValueError(f"--max_documents must be at least 1, got {args.max_documents}.")


def _repeated(names: list[str]) -> list[str]:
    return [name for name, n in Counter(names).items() if n > 1]


def read_question_sets(sources: list[str]) -> list[QuestionFacts]:
    """Every --questions source, prepared; their stems name them in every output, so they must differ."""
    question_sets = [question_facts(qs) for qs in load_question_sets(sources, require_options=False)]
    if repeated := _repeated([qs.stem for qs in question_sets]):
        raise ValueError(f"Question files share a stem ({repeated}); stems name question sets.")
    return question_sets


def read_corpora(args: DensityArguments) -> list:
    """The --corpus_files corpora, then --corpus_dataset; their labels name them, so they must differ."""
    corpora = parse_corpus_files(args.corpus_files or [], args.corpus_text_column)
    if args.corpus_dataset:
        label = args.corpus_label or Path(args.corpus_dataset.rstrip("/")).name
        corpora.append(
            DatasetCorpus(args.corpus_dataset, args.corpus_dataset_config, args.corpus_split, args.corpus_text_column,
                          args.corpus_streaming, label, args.corpus_data_files)
        )  # fmt: skip
    if repeated := _repeated([c.label for c in corpora]):
        raise ValueError(f"Two corpora share a label ({repeated}); use LABEL=PATH.")
    if repeated := _repeated([str(path.resolve()) for c in corpora if isinstance(c, FileCorpus) for path in c.paths]):
        raise InputError(
            f"--corpus_files names a file more than once ({', '.join(repeated)}); its documents would count twice."
        )
    return corpora


def make_judges(args: DensityArguments) -> tuple[LexicalJudge, LanguageModelJudge | None]:
    """The lexical judge (always: its verdicts are recorded) and, with --judge_model, the LM judge that decides."""
    lexical = LexicalJudge(args.judge_window, args.judge_min_key_fraction, args.judge_min_key_terms)
    if not args.judge_model:
        return lexical, None
    return lexical, LanguageModelJudge(
        args.judge_model, args.judge_batch_size, args.judge_excerpt_chars, args.judge_max_tokens,
        args.judge_margin, args.judge_device, args.judge_dtype,
    )  # fmt: skip


@dataclass
class Measurements:
    """What density.json reports, filled corpus by corpus (``measure_corpus``)."""

    corpora: list[dict] = field(default_factory=list)  # one entry per corpus
    table: list[dict] = field(default_factory=list)  # one row per measured (corpus, question set)
    questions: list[dict] = field(default_factory=list)  # one entry per measured (question, corpus)
    skipped_pairs: list[dict] = field(default_factory=list)  # (question set, corpus) not in one script
    occurrences: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (label, stem): per item


def measure_corpus(corpus, question_sets, index_root: Path, args: DensityArguments, judges, found: Measurements):
    """Open (or build) the index of ``corpus`` and measure on it every question set written in its script."""
    index, reused = open_index(corpus, index_root, args)
    meta = index.meta
    corpus_entry = {
        "label": corpus.label,
        "source": corpus.describe(),
        "documents": meta["documents"],
        "documents_without_tokens": meta["documents_without_tokens"],
        "skipped": meta["skipped"],
        "index": {"dir": str(index.directory), "reused": reused, "shards": len(meta["shard_starts"])},
        "script_unit_fractions": meta["script_unit_fractions"],
        "by_questions": [],
    }
    if meta["skipped"]:
        logger.warning("Corpus %r: skipped records: %s", corpus.label, meta["skipped"])
    for qs in question_sets:
        # English questions on a Tibetan corpus would measure nothing but the lack of a script.
        share = meta["script_unit_fractions"].get(qs.script, 0.0)
        if share < args.min_script_fraction:
            reason = f"{share:.2%} of the corpus is in {qs.script} script (< --min_script_fraction {args.min_script_fraction})"
            logger.info("Not measuring %s on %s: %s.", qs.stem, corpus.label, reason)
            found.skipped_pairs.append({"questions": qs.stem, "corpus": corpus.label, "reason": reason})
            continue
        entries = measure(qs, corpus, index, args, *judges)
        found.questions.extend(entries)
        counts = [e["occurrences"] for e in entries]
        found.occurrences[(corpus.label, qs.stem)] = counts
        row = {
            "corpus": corpus.label,
            "questions": qs.stem,
            "lang": qs.lang,
            "documents": meta["documents"],
            "items": len(entries),
            "occurrences": int(sum(counts)),
            "density": sum(counts) / meta["documents"],
            "mean_occurrences": float(np.mean(counts)),
            "questions_with_occurrences": int(sum(1 for c in counts if c)),
            "questions_without_blank": sum(1 for q in qs.questions if not q.has_blank),
            "questions_without_key_terms": sum(1 for q in qs.questions if not q.key_terms),
        }
        found.table.append(row)
        corpus_entry["by_questions"].append({k: v for k, v in row.items() if k not in ("corpus", "documents")})
    corpus_entry["occurrences"] = int(sum(r["occurrences"] for r in corpus_entry["by_questions"]))
    corpus_entry["density"] = corpus_entry["occurrences"] / meta["documents"]
    found.corpora.append(corpus_entry)


def measure(qs: QuestionFacts, corpus, index: ShardedBM25, args: DensityArguments, lexical: LexicalJudge, lm_judge):
    """Retrieve and judge every question of ``qs`` on ``corpus``: one density.json entry per question."""
    required = [q.answer_tokens for q in qs.questions] if args.require_answer else None
    results = index.search([q.query_tokens for q in qs.questions], args.top_k, required)
    # Random-access corpora are read back one question batch at a time (bounded memory); the
    # others (a .json list, a streamed dataset) in a single extra pass.
    batch = args.question_batch_size if corpus.random_access else len(qs.questions)
    entries = []
    for begin in tqdm(range(0, len(qs.questions), batch), desc=f"Judging {qs.stem} on {corpus.label}"):
        chunk = list(zip(qs.questions[begin : begin + batch], results[begin : begin + batch]))
        wanted = {int(d) for _, (ids, _) in chunk for d in ids}
        texts = corpus.fetch({d: index.location(d) for d in wanted}) if wanted else {}
        analyses = {d: analyse_text(text) for d, text in texts.items()}
        margins = None
        if lm_judge is not None:
            prompts = [lm_judge.prompt_ids(q, texts[int(d)]) for q, (ids, _) in chunk for d in ids]
            margins = iter(lm_judge.margins(prompts).tolist())
        for question, (ids, scores) in chunk:
            weights = None
            if args.judge_weighting == "idf":
                weights = {term: index.idf(term) for term in question.key_terms}
            verdicts = [lexical.judge(question, analyses[int(d)], weights) for d in ids]
            entry = {
                "questions": qs.stem,
                "lang": qs.lang,
                "corpus": corpus.label,
                "index": question.index,
                "occurrences": 0,
                "answer": question.answers,
                "retrieved": [int(d) for d in ids],
                "bm25": [round(float(s), 4) for s in scores],
                "answer_found": [v.answer_found for v in verdicts],
                "key_terms_matched": [v.key_terms_matched for v in verdicts],
                "key_weight_matched": [round(v.key_weight_matched, 4) for v in verdicts],
                "key_terms": sorted(question.key_terms),
                "lexical": [v.contains for v in verdicts],
            }
            if margins is not None:
                raw = [next(margins) for _ in ids]
                entry["lm_margin"] = raw  # unrounded: contains is exactly lm_margin > --judge_margin
                entry["contains"] = [m > args.judge_margin for m in raw]
            else:
                entry["contains"] = entry["lexical"]
            entry["occurrences"] = int(sum(entry["contains"]))
            entries.append(entry)
    return entries


def refuse_if_nothing_measured(found: Measurements) -> None:
    """A report with density 0.0 and an empty table would read as a finding: an error instead."""
    if not found.table:
        listed = "; ".join(f"{s['questions']} on {s['corpus']}: {s['reason']}" for s in found.skipped_pairs)
        raise ValueError(
            f"every question/corpus pair was skipped, nothing was measured ({listed}). Give a corpus in the "
            "questions' script, or lower --min_script_fraction (0 measures every pair)."
        )


def analyse_instances(args: DensityArguments, found: Measurements) -> dict | None:
    """The instance-level analysis of --predictions_with/--predictions_without (None without them)."""
    if not args.predictions_with:
        return None
    analysis = instance_analysis(
        find_predictions(args.predictions_with),
        find_predictions(args.predictions_without),
        args.predictions_step,
        parse_source_corpus(args.source_corpus or []),
        found.occurrences,
    )
    for s in analysis["skipped"]:
        logger.warning("Instance-level analysis: %s not analysed (%s).", s["questions"], s["reason"])
    return analysis


def write_report(args: DensityArguments, found: Measurements, analysis: dict | None) -> dict:
    """density.md, then density.json (last: its presence means the run finished); returns the report."""
    judge_name = f"language-model ({args.judge_model})" if args.judge_model else "lexical"
    setting = asdict(args)
    setting.update({"tokenizer": TOKENIZER_VERSION, "judge": judge_name, "bm25_library": f"bm25s {bm25s.__version__}"})
    report = {
        "setting": setting,
        "corpus": found.corpora[0],
        "corpora": found.corpora,
        "table": found.table,
        "skipped_pairs": found.skipped_pairs,
        "questions": found.questions,
    }
    if analysis is not None:
        report["instance_analysis"] = analysis
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_report(found.table, analysis, found.skipped_pairs, args.top_k, judge_name)
    write_text_atomic(output_dir / "density.md", markdown)
    write_json_atomic(output_dir / "density.json", report)
    logger.info("Wrote %s and %s\n%s", output_dir / "density.json", output_dir / "density.md", markdown)
    return report


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DensityArguments).parse_args_into_dataclasses(args=argv)
    setup_logging(level=args.log_level.upper())
    validate(args)

    # 1. Inputs: the question sets (each question prepared: query, key terms, answer units) and the corpora.
    question_sets = read_question_sets(args.questions)
    corpora = read_corpora(args)
    judges = make_judges(args)

    # 2. Each corpus: its BM25 index (reused while its fingerprint matches), then every question set in
    #    its script: top-k retrieval, a verdict per retrieved document, occurrences per question.
    index_root = Path(args.index_dir) if args.index_dir else Path(args.output_dir) / "index"
    found = Measurements()
    for corpus in corpora:
        measure_corpus(corpus, question_sets, index_root, args, judges, found)
    refuse_if_nothing_measured(found)

    # 3. The instance-level analysis: do transferred items occur more often in the source corpus?
    analysis = analyse_instances(args, found)

    # 4. The report: density.md (Table 1 of the paper) and density.json.
    return write_report(args, found, analysis)


if __name__ == "__main__":
    exit_on_input_error(main)
