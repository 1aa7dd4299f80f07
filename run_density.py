#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["bm25s>=0.2", "numpy>=2.0", "scipy>=1.11", "regex", "tqdm", "transformers>=5.0", "datasets>=4.0", "torch==2.13.0"]
# ///
"""Cultural density of a corpus and the instance-level analysis of the frequency hypothesis (docs/density.md).

Each question, filled with its answer, retrieves its ``--top_k`` BM25 documents from each corpus (bm25_index.py's
sharded bm25s index); a judge (``LexicalJudge``, or a causal LM with ``--judge_model``) decides which state its
fact. Writes OUT/density.json, OUT/density.md (the paper's Table 1) and OUT/index/LABEL/ (docs/density.md#outputs).

    python run_density.py --questions bo-culture-cloze_en.json --corpus_files enwiki=wiki.jsonl --output_dir out
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bm25s
import numpy as np
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from bm25_index import (
    ENGLISH_STOPWORDS,
    SCRIPT_OF_KIND,
    TOKENIZER_VERSION,
    DatasetCorpus,
    FileCorpus,
    ShardedBM25,
    open_index,
    retrieval_tokens,
    script_runs,
)
from cloze import BLANK, fill_blanks, load_question_sets, parallel_base, read_predictions
from study_common import (
    LANGUAGE_SCRIPTS,
    InputError,
    document_start_id,
    exit_on_input_error,
    setup_logging,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("run_density")


@dataclass
class DensityArguments:
    """run_density.py's flags; docs/density.md gives the reasons for each choice."""

    questions: list[str] = field(metadata={"help": "Cloze question files, folders or datasets, named NAME_LANG."})
    output_dir: str = field(metadata={"help": "Where density.json, density.md and (by default) the indexes go."})
    corpus_files: list[str] | None = field(
        default=None,
        metadata={"help": "One corpus per entry: PATH or LABEL=PATH[,PATH...] (label: the first file's stem)."},
    )
    corpus_dataset: str | None = field(
        default=None, metadata={"help": "A corpus as a dataset: a save_to_disk folder, a Hub name or a data folder."}
    )
    corpus_dataset_config: str | None = field(default=None, metadata={"help": "Config name of --corpus_dataset."})
    corpus_split: str = field(default="train", metadata={"help": "Split of --corpus_dataset."})
    max_documents: int | None = field(default=None, metadata={"help": "Index only the first N documents of a corpus."})
    corpus_data_files: list[str] | None = field(default=None, metadata={"help": "Files of --corpus_dataset to read."})
    corpus_streaming: bool = field(default=False, metadata={"help": "Stream --corpus_dataset."})
    corpus_label: str | None = field(default=None, metadata={"help": "Label of --corpus_dataset (default: its name)."})
    corpus_text_column: str = field(default="text", metadata={"help": "Text column of corpus files and datasets."})
    top_k: int = field(default=50, metadata={"help": "Documents retrieved per question and corpus (the paper: 50)."})
    index_dir: str | None = field(default=None, metadata={"help": "Where the indexes live (default OUTPUT_DIR/index)."})
    shard_size: int = field(default=200_000, metadata={"help": "Documents per index shard: bounds indexing memory."})
    min_script_fraction: float = field(
        default=0.01, metadata={"help": "Measure questions on a corpus holding at least this share of their script."}
    )
    require_answer: bool = field(
        default=True, metadata={"help": "Rank only documents holding every token of an answer."}
    )
    judge_window: int = field(
        default=0, metadata={"help": "Lexical judge: key terms count within this many units of the answer (0: auto)."}
    )
    judge_min_key_fraction: float = field(
        default=0.25, metadata={"help": "Lexical judge: share of key-term weight needed near the answer, in [0, 1]."}
    )
    judge_min_key_terms: int = field(default=1, metadata={"help": "Lexical judge: and at least this many key terms."})
    judge_model: str | None = field(default=None, metadata={"help": "Judge with this causal LM (path or Hub name)."})
    judge_batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass of --judge_model."})
    judge_excerpt_chars: int = field(
        default=2000, metadata={"help": "Characters of a document shown to --judge_model, centred on the answer."}
    )
    judge_max_tokens: int = field(default=1024, metadata={"help": "Longest --judge_model prompt (excerpt shortened)."})
    judge_margin: float = field(
        default=0.0, metadata={"help": "--judge_model says yes when log P(' Yes') - log P(' No') exceeds this."}
    )
    predictions_with: str | None = field(
        default=None, metadata={"help": "Instance-level analysis: run_eval.py output of the model WITH bridges."}
    )
    predictions_without: str | None = field(
        default=None, metadata={"help": "Instance-level analysis: run_eval.py output of the model WITHOUT bridges."}
    )
    predictions_step: int | None = field(default=None, metadata={"help": "Checkpoint step to analyse (default: last)."})
    source_corpus: list[str] | None = field(
        default=None,
        metadata={"help": "Source corpus: LABEL or LANG=LABEL entries (default: where a parallel file was measured)."},
    )
    log_level: str = field(default="info", metadata={"help": "Logging level: debug, info, warning."})

    def __post_init__(self):
        if not self.corpus_files and not self.corpus_dataset:
            raise InputError("Give a corpus: --corpus_files PATH (or LABEL=PATH) and/or --corpus_dataset NAME.")
        counts = (self.top_k, self.shard_size, self.judge_batch_size, self.max_documents)
        if min(n for n in counts if n is not None) < 1:
            raise InputError("--top_k, --shard_size, --judge_batch_size and --max_documents must be positive.")
        if not 0 <= self.judge_min_key_fraction <= 1:
            raise InputError("--judge_min_key_fraction must lie in [0, 1].")
        if bool(self.predictions_with) != bool(self.predictions_without):
            raise InputError("Give both --predictions_with and --predictions_without (or neither).")


# Questions, prepared for retrieval (bm25_index's tokens) and for the lexical judge (units and key terms)

#: Not key terms of the lexical judge (still indexed, where their low idf discounts them): Tibetan case particles
#: and copulas, Mongolian case suffixes written as separate words (shaping characters removed).
JUDGE_STOPWORDS = ENGLISH_STOPWORDS | frozenset(
    "གི ཀྱི གྱི འི ཡི གིས ཀྱིས གྱིས འིས ཡིས ལ ར རུ སུ ཏུ དུ ན ནས ལས དང ནི ཡང ཡིན ཡོད རེད འདུག སོགས".split()
    + "ᠤᠨ ᠦᠨ ᠶᠢᠨ ᠢᠨ ᠤ ᠦ ᠳᠤ ᠲᠤ ᠳᠦ ᠲᠦ ᠢ ᠶᠢ ᠪᠠ ᠡᠴᠡ ᠠᠴᠠ ᠢᠶᠠᠷ ᠪᠡᠷ ᠪᠠᠷ ᠲᠠᠢ ᠲᠡᠢ ᠪᠣᠯ ᠪᠠᠶᠢᠨᠠ".split()
)


@dataclass
class TextAnalysis:
    """A text as the lexical judge sees it (docs/density.md#the-lexical-judge): ``units`` in reading order, and
    ``key_tokens[p]`` the key-term tokens starting at unit p (a Hangul syllable's bigram with the next one)."""

    units: list[str]
    key_tokens: list[tuple[str, ...]]


def analyse_text(text: str) -> TextAnalysis:
    units: list[str] = []
    key_tokens: list[tuple[str, ...]] = []
    for kind, run in script_runs(text):
        if kind == "han":
            units.extend(run)
            key_tokens += [(run[i], run[i : i + 2]) for i in range(len(run) - 1)] + [(run[-1],)]
        elif kind == "hangul":
            units.extend(run)
            if len(run) == 1:
                key_tokens.append((run,))
            else:
                key_tokens += [(run[i : i + 2],) for i in range(len(run) - 1)] + [()]
        else:
            units.append(run)
            key_tokens.append(() if run in JUDGE_STOPWORDS else (run,))
    return TextAnalysis(units, key_tokens)


@dataclass
class Question:
    index: int
    question: str
    answers: list[str]
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
    has_blank = BLANK.search(question)
    # Filled as a text stating the fact writes it: a Tibetan answer stays its own syllables.
    filled = fill_blanks(question, answers[0], tibetan_tsheg=True) if has_blank else f"{question} {answers[0]}"
    query = retrieval_tokens(filled)
    for other in answers[1:]:
        query.extend(retrieval_tokens(other))
    context = analyse_text(BLANK.sub(" ", question))
    answer_analyses = [analyse_text(answer) for answer in answers]
    answer_keys = {token for analysis in answer_analyses for tokens in analysis.key_tokens for token in tokens}
    # A key term that is part of the answer would be satisfied by the answer itself.
    key_terms = frozenset(token for tokens in context.key_tokens for token in tokens if token not in answer_keys)
    answer_units = [tuple(analysis.units) for analysis in answer_analyses if analysis.units]
    # Every unit of an answer is an index token, except English stopwords, which are not indexed.
    answer_tokens = [sorted(set(units) - ENGLISH_STOPWORDS) for units in answer_units]
    return Question(index, question, answers, filled, query, key_terms, answer_units, answer_tokens, len(context.units))


def dominant_script(texts: list[str]) -> str:
    """The script (of the study's five) with the most letters in ``texts``; Latin when none."""
    counts = Counter()
    for text in texts:
        for kind, run in script_runs(text):
            if kind in SCRIPT_OF_KIND:
                counts[SCRIPT_OF_KIND[kind]] += len(run)
    return counts.most_common(1)[0][0] if counts else "Latin"


def read_question_sets(sources: list[str]) -> list[QuestionFacts]:
    """Every --questions source, read as facts (``require_options=False``) and prepared item by item. A set's
    language is its name's (``_bo``) when the study knows its script, else the script of most of its filled sentences
    decides. Stems name the sets in every output, so they must differ."""
    question_sets = []
    for qs in load_question_sets(sources, require_options=False):
        questions = [prepare_question(i, item["question"], item["answers"]) for i, item in enumerate(qs.items)]
        lang, script = qs.lang, LANGUAGE_SCRIPTS.get(qs.lang)
        if script is None:
            script = dominant_script([q.filled for q in questions])
            lang = next((k for k, v in LANGUAGE_SCRIPTS.items() if v == script), "")
        question_sets.append(QuestionFacts(qs.stem, lang, script, questions))
    if repeated := _repeated([qs.stem for qs in question_sets]):
        raise InputError(f"Question files share a stem ({repeated}); stems name question sets.")
    return question_sets


def _repeated(names: list[str]) -> list[str]:
    return [name for name, n in Counter(names).items() if n > 1]


# Corpora and retrieval: each corpus's index, and every question set in its script retrieved and judged on it


def read_corpora(args: DensityArguments) -> list:
    """The --corpus_files corpora, then --corpus_dataset; their labels name them, so they must differ."""
    corpora = []
    for entry in args.corpus_files or []:
        label, sep, paths = entry.partition("=")
        if not sep or "/" in label or os.sep in label or Path(entry).is_file():
            label, paths = "", entry
        path_list = [Path(p) for p in paths.split(",") if p]
        corpora.append(FileCorpus(label or path_list[0].stem, path_list, args.corpus_text_column))
    if args.corpus_dataset:
        label = args.corpus_label or Path(args.corpus_dataset.rstrip("/")).name
        corpora.append(
            DatasetCorpus(args.corpus_dataset, args.corpus_dataset_config, args.corpus_split, args.corpus_text_column,
                          args.corpus_streaming, label, args.corpus_data_files)
        )  # fmt: skip
    if repeated := _repeated([c.label for c in corpora]):
        raise InputError(f"Two corpora share a label ({repeated}); use LABEL=PATH.")
    if repeated := _repeated([str(path.resolve()) for c in corpora if isinstance(c, FileCorpus) for path in c.paths]):
        raise InputError(
            f"--corpus_files names a file more than once ({', '.join(repeated)}); its documents would count twice."
        )
    return corpora


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
    index, reused = open_index(corpus, index_root, args.shard_size, args.max_documents)
    meta = index.meta
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
        entries = measure(qs, corpus.label, index, args, *judges)
        found.questions.extend(entries)
        counts = found.occurrences[(corpus.label, qs.stem)] = [e["occurrences"] for e in entries]
        row = {
            "corpus": corpus.label,
            "questions": qs.stem,
            "lang": qs.lang,
            "items": len(entries),
            "occurrences": int(sum(counts)),
            "density": sum(counts) / meta["documents"],
            "mean_occurrences": float(np.mean(counts)),
            "documents": meta["documents"],
        }
        found.table.append(row)
    occurrences = sum(row["occurrences"] for row in found.table if row["corpus"] == corpus.label)
    found.corpora.append(
        {
            "label": corpus.label,
            "source": meta["fingerprint"]["corpus"],
            "documents": meta["documents"],
            "skipped": meta["skipped"],
            "index": {"dir": str(index.directory), "reused": reused, "shards": len(meta["shard_starts"])},
            "script_unit_fractions": meta["script_unit_fractions"],
            "occurrences": occurrences,
            "density": occurrences / meta["documents"],
        }
    )


#: Questions whose retrieved documents are read back and judged together: bounds the texts held in memory.
QUESTION_BATCH = 256


def measure(qs: QuestionFacts, label: str, index: ShardedBM25, args: DensityArguments, lexical, lm_judge) -> list:
    """Retrieve and judge every question of ``qs`` on corpus ``label``: one density.json entry per question."""
    required = [q.answer_tokens for q in qs.questions] if args.require_answer else None
    results = index.search([q.query_tokens for q in qs.questions], args.top_k, required)
    entries = []
    for begin in tqdm(range(0, len(qs.questions), QUESTION_BATCH), desc=f"Judging {qs.stem} on {label}"):
        chunk = list(zip(qs.questions[begin : begin + QUESTION_BATCH], results[begin : begin + QUESTION_BATCH]))
        texts = index.texts({int(d) for _, (ids, _) in chunk for d in ids})
        analyses = {d: analyse_text(text) for d, text in texts.items()}
        if lm_judge is not None:
            prompts = [lm_judge.prompt_ids(q, texts[int(d)]) for q, (ids, _) in chunk for d in ids]
            margins = iter(lm_judge.margins(prompts).tolist())
        for question, (ids, scores) in chunk:
            weights = {term: index.idf(term) for term in question.key_terms}
            verdicts = [lexical.judge(question, analyses[int(d)], weights) for d in ids]
            entry = {
                "questions": qs.stem,
                "lang": qs.lang,
                "corpus": label,
                "index": question.index,
                "answer": question.answers,
                "retrieved": [int(d) for d in ids],
                "bm25": [round(float(s), 4) for s in scores],
                "answer_found": [v.answer_found for v in verdicts],
                "key_terms_matched": [v.key_terms_matched for v in verdicts],
                "key_weight_matched": [round(v.key_weight_matched, 4) for v in verdicts],
                "key_terms": sorted(question.key_terms),
                "lexical": [v.contains for v in verdicts],
            }
            if lm_judge is not None:
                entry["lm_margin"] = [next(margins) for _ in ids]  # unrounded: contains is exactly > --judge_margin
            entry["contains"] = [m > args.judge_margin for m in entry["lm_margin"]] if lm_judge else entry["lexical"]
            entries.append({**entry, "occurrences": int(sum(entry["contains"]))})
    return entries


# Judges


@dataclass
class Judgement:
    contains: bool
    answer_found: bool
    key_terms_matched: int  # key terms near the best answer match (-1: no answer match)
    key_weight_matched: float  # their share of the question's key-term weight (-1.0: no answer match)


@dataclass(frozen=True)
class LexicalJudge:
    """Does a document state a question's fact? Deterministic and lexical; its rule and what it cannot see:
    docs/density.md#the-lexical-judge. A key term weighs ``weights[term]`` (its idf in the corpus; 1 without)."""

    window: int = 0
    min_key_fraction: float = 0.25
    min_key_terms: int = 1

    def judge(self, question: Question, document: TextAnalysis, weights: dict[str, float] | None = None) -> Judgement:
        units, keys = document.units, document.key_tokens
        window = self.window or question.length_units
        weight = weights.__getitem__ if weights is not None else (lambda term: 1.0)
        total = sum(weight(term) for term in question.key_terms)
        needed_terms = min(len(question.key_terms), self.min_key_terms)
        best_terms, best_share, found = -1, -1.0, False
        for answer in question.answer_units:
            for start in (p for p, unit in enumerate(units) if unit == answer[0]):
                end = start + len(answer)
                if tuple(units[start:end]) != answer:
                    continue
                found = True
                around = range(max(0, start - window), min(len(units), end + window))
                near = {token for p in around if not start <= p < end for token in keys[p]}
                matched = question.key_terms & near
                share = sum(weight(term) for term in matched) / total if total else 1.0
                if (share, len(matched)) > (best_share, best_terms):
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


class LanguageModelJudge:
    """Judge with any causal LM: yes iff log P(" Yes" | prompt) - log P(" No" | prompt) > --judge_margin, each summed
    over its tokens; each prompt (JUDGE_PROMPT) starts with the model's document-start token."""

    def __init__(self, model_name_or_path: str, batch_size: int, excerpt_chars: int, max_tokens: int):
        from transformers import AutoTokenizer

        from run_eval import load_model, resolve_device

        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = load_model(model_name_or_path, "auto", resolve_device("auto"), attn_implementation=None)
        self.batch_size, self.excerpt_chars = batch_size, excerpt_chars
        self.start_id = document_start_id(self.tokenizer)
        self.pad_id = self.start_id if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        self.max_tokens = min(max_tokens, getattr(self.model.config, "max_position_embeddings", None) or max_tokens)
        self.yes_ids, self.no_ids = self._ids(" Yes"), self._ids(" No")
        if self.yes_ids == self.no_ids:
            raise InputError(f"{model_name_or_path}: ' Yes' and ' No' tokenize identically; this model cannot judge.")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: Question, text: str) -> list[int]:
        """[start] + JUDGE_PROMPT's ids. The document is cut to --judge_excerpt_chars characters centred on the first
        answer it holds, then (around its centre) to the tokens that fit max_tokens."""
        if len(text) > self.excerpt_chars:
            positions = [p for p in (text.lower().find(a.lower()) for a in question.answers) if p >= 0]
            start = max(0, min(min(positions, default=0) - self.excerpt_chars // 2, len(text) - self.excerpt_chars))
            text = text[start : start + self.excerpt_chars]
        head, tail = JUDGE_PROMPT.split("{document}")
        tail = tail.format(question=question.question.strip(), answer=" / ".join(question.answers),
                           statement=question.filled.strip())  # fmt: skip
        head, doc, tail = self._ids(head), self._ids(text), self._ids(tail)
        room = self.max_tokens - 1 - len(head) - len(tail) - max(len(self.yes_ids), len(self.no_ids))
        if room < 0:
            raise InputError(
                f"--judge_max_tokens {self.max_tokens} is too small for the prompt of question {question.index}."
            )
        cut = max(0, len(doc) - room) // 2
        return [self.start_id] + head + doc[cut : cut + room] + tail

    def margins(self, prompts: list[list[int]]) -> np.ndarray:
        """log P(" Yes") - log P(" No") after each prompt, scored by run_eval.token_logprobs as cloze options are: a
        prompt and its two continuations run as one prefix tree, each as if run alone."""
        from run_eval import token_logprobs

        sequences = [prompt + ids for prompt in prompts for ids in (self.yes_ids, self.no_ids)]
        logprobs = token_logprobs(self.model, sequences, [[i, i + 1] for i in range(0, len(sequences), 2)],
                                  batch_size=2 * self.batch_size, pad_id=self.pad_id)  # fmt: skip
        yes = [lp[-len(self.yes_ids) :].sum() for lp in logprobs[0::2]]
        return np.array(yes) - np.array([lp[-len(self.no_ids) :].sum() for lp in logprobs[1::2]])


# Instance-level analysis


def predictions_at(given: str, step: int | None, setting: str) -> tuple[Path, dict, dict[str, int], dict[str, str]]:
    """A run_eval.py output (its folder or predictions.jsonl) read at ``step`` (default: the run's last checkpoint):
    its predictions.jsonl, and per questions stem the first-wins correctness of each item, the step and the question
    language. The run's cpt_setting must be ``setting``, as run_transfer.py checks: swapped flags are refused."""
    given = Path(given)
    path = given if given.is_file() else given / "predictions.jsonl"
    if path.name != "predictions.jsonl" or not path.is_file() or not (path.parent / "accuracy.json").is_file():
        raise InputError(
            f"{given}: expected run_eval.py's output folder (predictions.jsonl and accuracy.json, the checkpoints that "
            "count) or its predictions.jsonl. Run run_eval.py first."
        )
    accuracy, correct = read_predictions(path.parent)
    was = (accuracy.get("cpt_setting") or {}).get("setting")
    if was is not None and was != setting:
        flag = "--predictions_with" if setting == "bridges" else "--predictions_without"
        raise InputError(f"{path} was given as {flag} but its cpt_setting says {was}. Swap or fix the flags.")
    if not any(correct.values()):
        raise InputError(f"{path}: no predictions in the file.")
    items, steps = {}, {}
    for stem, by_step in correct.items():
        steps[stem] = max(by_step) if step is None else step
        if steps[stem] not in by_step:
            raise InputError(f"{path}: no predictions at step {step} for {stem} (steps: {sorted(by_step)}).")
        items[stem] = by_step[steps[stem]]
    return path, items, steps, {stem: q["lang"] for stem, q in accuracy["questions"].items()}


#: Resamples and seed of the bootstrap interval of ``gap_slope``.
SLOPE_BOOTSTRAP, SLOPE_SEED = 2000, 0


def gap_slope(gap: np.ndarray, occurrences: np.ndarray) -> dict:
    """Least-squares slope of the per-item gap (with bridges right minus without: +1, 0, -1) on log(1 + occurrences
    in the source corpus), with a 95% percentile bootstrap interval over items. Resamples whose items all have the
    same occurrences have no slope and drop out (scipy.stats.bootstrap would return no interval at all, as it does
    when most items never occur in the source)."""
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
    low, high = np.nanpercentile(slopes(x[rows], gap[rows]), [2.5, 97.5])
    return {**entry, "slope": float(slopes(x, gap)), "slope_ci": [float(low), float(high)]}


def _source_of(stem: str, lang: str, sources: dict[str, str], occurrences: dict) -> tuple[str, str] | str:
    """(source corpus, measured question file) of a predictions stem, or the reason there is none: the --source_corpus
    of its language (the same file measured there, else its single parallel file), or else the one corpus its
    parallel file in another language was measured on."""
    prefix = parallel_base(stem)
    if not sources:
        twins = [(c, s) for c, s in occurrences if s != stem and parallel_base(s) == prefix]
        if len(twins) == 1:
            return twins[0]
        found = ", ".join(f"{s} on {c}" for c, s in twins) or "none"
        return f"the source corpus is ambiguous: parallel files measured: {found}; give --source_corpus"
    source = sources.get(lang, sources.get("*"))
    if source is None:
        return f"no --source_corpus for language {lang!r}"
    if (source, stem) in occurrences:
        return source, stem
    parallel = [s for c, s in occurrences if c == source and parallel_base(s) == prefix]
    if len(parallel) != 1:
        return f"no (single) parallel question file measured on corpus {source!r}"
    return source, parallel[0]


def instance_analysis(with_given: str, without_given: str, step: int | None, source_corpus: list[str],
                      occurrences: dict[tuple[str, str], list[int]]) -> dict:  # fmt: skip
    """Per question file, the mean source-corpus occurrences of the items that transferred (right with bridges,
    wrong without, at the chosen step) vs all items, and the gap slope. ``occurrences[(corpus, stem)]`` holds the
    occurrences per item of each measured pair; ``source_corpus`` is --source_corpus (LABEL or LANG=LABEL)."""
    sources = {}
    for entry in source_corpus:
        lang, sep, label = entry.partition("=")
        sources[lang if sep else "*"] = label if sep else entry
    with_path, with_correct, with_steps, langs = predictions_at(with_given, step, "bridges")
    without_path, without_correct, without_steps, _ = predictions_at(without_given, step, "no_bridges")
    results, skipped = [], []
    for stem in sorted(set(with_steps) & set(without_steps)):
        lang = langs.get(stem, "")
        source = _source_of(stem, lang, sources, occurrences)
        if isinstance(source, str):
            logger.warning("Instance-level analysis: %s not analysed (%s).", stem, source)
            skipped.append({"questions": stem, "reason": source})
            continue
        counts = np.asarray(occurrences[source])
        items = min(len(with_correct[stem]), len(without_correct[stem]))
        if items > len(counts):
            raise InputError(
                f"Predictions for {stem} reach item {items - 1} but {source[1]} has {len(counts)} questions; the "
                "files are not parallel."
            )
        right_with, right_without = with_correct[stem][:items], without_correct[stem][:items]
        gained = right_with & ~right_without
        transferred, others = np.flatnonzero(gained), np.flatnonzero(~gained)
        results.append(
            {
                "questions": stem,
                "lang": lang,
                "source_corpus": source[0],
                "occurrences_from": source[1],
                "step_with": with_steps[stem],
                "step_without": without_steps[stem],
                "items": items,
                "transferred": len(transferred),
                "transferred_indices": transferred.tolist(),
                "mean_occurrences_transferred": float(counts[transferred].mean()) if transferred.size else None,
                "mean_occurrences_all": float(counts[:items].mean()),
                "mean_occurrences_not_transferred": float(counts[others].mean()) if others.size else None,
                "gap_vs_log_occurrences": gap_slope(right_with.astype(float) - right_without, counts[:items]),
            }
        )
    return {"with": str(with_path), "without": str(without_path), "results": results, "skipped": skipped}


# Report and main


def _markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table whose first two columns are names and the others numbers (right-aligned)."""
    rule = ["---"] * 2 + ["---:"] * (len(header) - 2)
    return [f"| {' | '.join(map(str, cells))} |" for cells in (header, rule, *rows)]


def markdown_report(table: list[dict], analysis: dict | None, skipped_pairs: list[dict], top_k: int, judge: str) -> str:
    lines = ["# Cultural density", "", f"Occurrences: top-{top_k} BM25 documents per question judged to contain its "
             f"fact ({judge} judge). Density = occurrences / documents.", ""]  # fmt: skip
    lines += _markdown_table(
        ["corpus", "questions", "documents", "items", "occurrences", "density"],
        [[r["corpus"], r["questions"], f"{r['documents']:,}", r["items"], f"{r['occurrences']:,}",
          f"{r['density']:.2e}"] for r in table],
    )  # fmt: skip
    lines += [f"\nNot measured: {p['questions']} on {p['corpus']} ({p['reason']})." for p in skipped_pairs]
    if analysis:
        lines += ["", "## Instance-level analysis", "", "Transferred = right with bridges and wrong without.", ""]
        rows = []
        for r in analysis["results"]:
            fit = r["gap_vs_log_occurrences"]
            low, high = fit["slope_ci"] or (None, None)
            means = [r[f"mean_occurrences_{k}"] for k in ("transferred", "all", "not_transferred")]
            slope = f"{fit['slope']:+.3f} [{low:+.3f}, {high:+.3f}]" if low is not None else "–"
            rows.append([r["questions"], f"{r['source_corpus']} ({r['occurrences_from']})", r["items"],
                         r["transferred"], *("–" if m is None else f"{m:.2f}" for m in means), slope])  # fmt: skip
        header = ["questions", "source corpus", "items", "transferred", "mean occ. transferred", "mean occ. all",
                  "mean occ. others", "gap slope on log(1 + occ.) [95% CI]"]  # fmt: skip
        lines += _markdown_table(header, rows)
        lines += [f"\nNot analysed: {s['questions']} ({s['reason']})." for s in analysis["skipped"]]
    return "\n".join(lines) + "\n"


def write_report(args: DensityArguments, found: Measurements, analysis: dict | None) -> dict:
    """density.md, then density.json (last: its presence means the run finished); returns the report."""
    judge = f"language-model ({args.judge_model})" if args.judge_model else "lexical"
    setting = {
        **asdict(args),
        "tokenizer": TOKENIZER_VERSION,
        "judge": judge,
        "bm25_library": f"bm25s {bm25s.__version__}",
    }
    report = {"setting": setting, "corpus": found.corpora[0], "corpora": found.corpora, "table": found.table,
              "skipped_pairs": found.skipped_pairs, "questions": found.questions}  # fmt: skip
    if analysis is not None:
        report["instance_analysis"] = analysis
    output_dir = Path(args.output_dir)
    markdown = markdown_report(found.table, analysis, found.skipped_pairs, args.top_k, judge)
    write_text_atomic(output_dir / "density.md", markdown)
    write_json_atomic(output_dir / "density.json", report)
    logger.info("Wrote %s and %s\n%s", output_dir / "density.json", output_dir / "density.md", markdown)
    return report


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DensityArguments).parse_args_into_dataclasses(args=argv)
    setup_logging(level=args.log_level.upper())

    # 1. Inputs: the question sets (each question prepared: query, key terms, answer units), the corpora and the
    #    judges (the lexical one always: its verdicts are recorded; with --judge_model, the LM that decides).
    question_sets = read_question_sets(args.questions)
    corpora = read_corpora(args)
    lexical = LexicalJudge(args.judge_window, args.judge_min_key_fraction, args.judge_min_key_terms)
    lm_judge = None
    if args.judge_model:
        lm_judge = LanguageModelJudge(args.judge_model, args.judge_batch_size, args.judge_excerpt_chars,
                                      args.judge_max_tokens)  # fmt: skip

    # 2. Each corpus: its BM25 index (reused while its fingerprint matches), then every question set in its script:
    #    top-k retrieval, a verdict per retrieved document, occurrences per question.
    index_root = Path(args.index_dir) if args.index_dir else Path(args.output_dir) / "index"
    found = Measurements()
    for corpus in corpora:
        measure_corpus(corpus, question_sets, index_root, args, (lexical, lm_judge), found)
    if not found.table:  # a report with density 0 and an empty table would read as a finding
        listed = "; ".join(f"{s['questions']} on {s['corpus']}: {s['reason']}" for s in found.skipped_pairs)
        raise InputError(
            f"every question/corpus pair was skipped, nothing was measured ({listed}). Give a corpus in the "
            "questions' script, or lower --min_script_fraction (0 measures every pair)."
        )

    # 3. The instance-level analysis: do transferred items occur more often in the source corpus?
    analysis = None
    if args.predictions_with:
        analysis = instance_analysis(args.predictions_with, args.predictions_without, args.predictions_step,
                                     args.source_corpus or [], found.occurrences)  # fmt: skip

    # 4. The report: density.md (Table 1 of the paper) and density.json.
    return write_report(args, found, analysis)


if __name__ == "__main__":
    exit_on_input_error(main)
