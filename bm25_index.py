"""A BM25 index over a corpus too large for memory: built in shards, searched with a deterministic top-k.

``build_index`` streams a corpus (``FileCorpus``, ``DatasetCorpus``) once, tokenising each document by script
(``retrieval_tokens``) and storing its text; each shard is scored with the whole corpus's statistics, so memory
follows the shard and a search of ``ShardedBM25`` returns what one bm25s index of the whole corpus would
(docs/density.md#the-index). ``open_index`` reuses an index while its fingerprint matches.

Example: four documents in shards of two. Documents 0 and 2 tie (same length, same matched words): the lower id
ranks first. The shards are scored with the statistics of all four, so the scores are one bm25s index's::

    >>> import tempfile
    >>> temporary = tempfile.TemporaryDirectory()
    >>> folder = Path(temporary.name)
    >>> texts = ["Chuseok falls in autumn.", "Seollal is in winter.", "Chuseok: autumn harvest.", "Chuseok in autumn!"]
    >>> _ = (folder / "corpus.txt").write_text("\\n".join(texts) + "\\n", encoding="utf-8")
    >>> corpus = FileCorpus("demo", [folder / "corpus.txt"], text_column="text")
    >>> retrieval_tokens(texts[0])
    ['chuseok', 'falls', 'autumn']
    >>> build_index(corpus, folder / "index", shard_size=2, fingerprint={})
    >>> index = ShardedBM25(folder / "index")
    >>> index.num_docs, index.shard_starts
    (4, [0, 2])
    >>> ((ids, scores),) = index.search([retrieval_tokens("Chuseok in autumn")], k=3, show_progress=False)
    >>> ids.tolist(), [round(float(s), 3) for s in scores]
    ([3, 0, 2], [0.314, 0.262, 0.262])
    >>> whole = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
    >>> whole.index([retrieval_tokens(text) for text in texts], show_progress=False)
    >>> bool(np.allclose(scores, whole.get_scores(retrieval_tokens("Chuseok in autumn"))[ids]))
    True
    >>> index.texts(ids[:1])
    {3: 'Chuseok in autumn!'}
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import bm25s
import numpy as np
import regex
import scipy.sparse
from tqdm.auto import tqdm

from study_common import InputError, check_document_suffix, load_dataset_split, read_documents, write_json_atomic

logger = logging.getLogger(__name__)


# Tokenisation by script

#: Bump when retrieval_tokens changes: it is part of every index fingerprint.
TOKENIZER_VERSION = "density-tokens-2"

# Maximal runs of letters of one script, or of digits, named by kind; "other" is any letter run of a script the
# study does not name (e.g. Cyrillic), tokenised like Latin. Tibetan tsheg and shad are punctuation, so a Tibetan
# run is one syllable; spaces (U+202F becomes one under NFKC) end Mongolian words and Hangul eojeol. regex VERSION1
# gives the [..&&..] and [..--..] set operations.
_RUNS = regex.compile(
    r"(?P<latin>\p{sc=Latin}[\p{sc=Latin}\p{M}]*)"
    r"|(?P<digit>\p{Nd}+)"
    r"|(?P<hangul>[\p{sc=Hangul}&&[\p{L}\p{M}]]+)"
    r"|(?P<han>[\p{sc=Han}&&\p{L}]+)"
    r"|(?P<tibetan>[\p{sc=Tibetan}&&[\p{L}\p{M}]]+)"
    r"|(?P<mongolian>[\p{sc=Mongolian}&&[\p{L}\p{M}]]+)"
    r"|(?P<other>[[\p{L}\p{M}]--[\p{sc=Latin}\p{sc=Hangul}\p{sc=Han}\p{sc=Tibetan}\p{sc=Mongolian}]]+)",
    regex.VERSION1,
)
# ASCII text (most of an English corpus) takes a plain `re` path that gives the same runs.
_ASCII_RUNS = re.compile(r"[a-z]+|[0-9]+")
SCRIPT_OF_KIND = {"latin": "Latin", "hangul": "Hangul", "han": "Han", "tibetan": "Tibetan", "mongolian": "Mongolian"}

# Format characters that change a glyph's shape, not the word: Mongolian free variation selectors and vowel
# separator (U+180B-U+180F), zero-width (non-)joiners.
_SHAPING_ONLY = dict.fromkeys(map(ord, "\u180b\u180c\u180d\u180e\u180f\u200c\u200d"))

#: English stopwords: neither indexed nor key terms. Negations (not, no, never) are kept.
ENGLISH_STOPWORDS = frozenset(
    """a an the of in on at to for from by with and or but nor is are was were be been being am it its this that
    these those as which who whom whose what when where why how do does did has have had their they them there
    he she his her him i you we our your my me us can will would shall should may might must also than then such
    into about over after before very s so if""".split()
)


def script_runs(text: str) -> list[tuple[str, str]]:
    """(kind, run) per run of ``text``, NFKC-normalised, shaping characters removed, lower-cased, digits as ASCII
    (Tibetan ༥༠, Mongolian ᠕᠐ and full-width ５０ are all 50)."""
    if text.isascii():
        return [("digit" if run[0] <= "9" else "latin", run) for run in _ASCII_RUNS.findall(text.lower())]
    text = unicodedata.normalize("NFKC", text).translate(_SHAPING_ONLY).lower()
    runs = []
    for match in _RUNS.finditer(text):
        run = match[0]
        if match.lastgroup == "digit" and not run.isascii():
            run = "".join(str(unicodedata.digit(c)) for c in run)
        runs.append((match.lastgroup, run))
    return runs


def retrieval_tokens(text: str, kind_units: Counter | None = None) -> list[str]:
    """BM25 tokens of ``text`` (docs/density.md#what-is-counted), which may mix scripts; adds the word units of each
    run kind to ``kind_units``. A Hangul eojeol also gives its syllables and, from three syllables on, its syllable
    bigrams (추석을 and 추석에 share 추석; every syllable of an answer is a token, so 4개 finds 4개의)."""
    if text.isascii():  # the result of the loop below, faster
        runs = _ASCII_RUNS.findall(text.lower())
        if kind_units is not None:
            digits = sum(run[0] <= "9" for run in runs)
            kind_units["digit"] += digits
            kind_units["latin"] += len(runs) - digits
        return [run for run in runs if run not in ENGLISH_STOPWORDS]
    tokens: list[str] = []
    for kind, run in script_runs(text):
        if kind_units is not None:
            kind_units[kind] += len(run) if kind in ("han", "hangul") else 1
        if kind == "han":
            tokens += [*run, *(run[i : i + 2] for i in range(len(run) - 1))]
        elif kind == "hangul":
            tokens.append(run)
            if len(run) > 1:
                tokens.extend(run)
            if len(run) > 2:
                tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
        elif kind not in ("latin", "other") or run not in ENGLISH_STOPWORDS:
            tokens.append(run)
    return tokens


# Corpora: the documents of files or of a dataset, streamed once while the index is built


class FileCorpus:
    """Corpus files, read as study_common.read_documents reads them, documents numbered in file order."""

    def __init__(self, label: str, paths: list[Path], text_column: str):
        for path in paths:
            if not path.is_file():
                raise InputError(f"{path}: no such corpus file. Check --corpus_files.")
            check_document_suffix(path)
        self.label, self.paths, self.text_column = label, paths, text_column

    def fingerprint(self) -> dict:
        """What identifies the corpus: its index is reused while this is unchanged, and the report names it."""
        files = [
            {"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in self.paths
        ]
        return {"kind": "files", "files": files, "text_column": self.text_column}

    def iter_documents(self, skipped: Counter) -> Iterator[str]:
        for path in self.paths:
            yield from read_documents(path, self.text_column, column_flag="--corpus_text_column")


class DatasetCorpus:
    """A datasets corpus (save_to_disk folder, Hub name or data-file folder, optionally streamed); rows without a
    string text are skipped and counted."""

    def __init__(self, name: str, config: str | None, split: str, text_column: str, streaming: bool, label: str,
                 data_files: list[str] | None = None):  # fmt: skip
        self.name, self.config, self.split, self.text_column = name, config, split, text_column
        self.streaming, self.label, self.data_files = streaming, label, data_files

    @cached_property
    def dataset(self):
        dataset = load_dataset_split(self.name, self.config, self.split, flag="--corpus_dataset",
                                     streaming=self.streaming, data_files=self.data_files)  # fmt: skip
        if dataset.column_names is not None and self.text_column not in dataset.column_names:
            found = ", ".join(dataset.column_names)
            raise InputError(
                f"{self.name}: no column {self.text_column!r} (found: {found}). Pass --corpus_text_column."
            )
        return dataset

    def fingerprint(self) -> dict:
        entry = {"kind": "dataset", "name": self.name, "config": self.config, "split": self.split,
                 "data_files": self.data_files, "text_column": self.text_column}  # fmt: skip
        if not self.streaming:
            entry["dataset_fingerprint"] = self.dataset._fingerprint
        return entry

    def iter_documents(self, skipped: Counter) -> Iterator[str]:
        for record in self.dataset:
            if isinstance(text := record.get(self.text_column), str):
                yield text
            else:
                skipped[f"no text in column {self.text_column!r}"] += 1


# The sharded BM25 index


class ShardedBM25:
    """bm25s score matrices of consecutive shards of documents, computed with corpus-wide statistics so that a
    search returns what one index of the whole corpus would (docs/density.md#the-index)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        self.vocab: dict[str, int] = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        # Document d's text is bytes text_offsets[d] to text_offsets[d + 1] of texts.bin.
        self.text_offsets = np.load(directory / "text_offsets.npy", mmap_mode="r")
        self.document_frequencies = np.load(directory / "document_frequencies.npy", mmap_mode="r")
        self.shard_starts = self.meta["shard_starts"]
        self.num_docs = self.meta["documents"]

    def idf(self, token: str) -> float:
        """The BM25 idf of ``token`` in this corpus (a token the corpus lacks gets the highest idf)."""
        token_id = self.vocab.get(token)
        return float(lucene_idf(0 if token_id is None else self.document_frequencies[token_id], self.num_docs))

    def texts(self, doc_ids) -> dict[int, str]:
        """The text of each document id, as it was indexed."""
        texts = {}
        with (self.directory / "texts.bin").open("rb") as handle:
            for doc_id in sorted(map(int, doc_ids)):
                start, end = self.text_offsets[doc_id : doc_id + 2]
                handle.seek(start)
                texts[doc_id] = handle.read(end - start).decode("utf-8", "surrogatepass")
        return texts

    def search(self, queries: list[list[str]], k: int, required: list[list[list[str]]] | None = None,
               show_progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """Top-k (document ids, scores) per query, best first. ``required[q]`` lists token groups: only documents
        holding every token of some group are ranked (an empty group, or none, requires nothing)."""
        # A token repeated in the query counts each time, as in bm25s, rank_bm25 and Lucene.
        query_ids = [np.array([self.vocab[t] for t in q if t in self.vocab], dtype=np.int32) for q in queries]
        best = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
        bar = tqdm(total=len(self.shard_starts) * len(queries), desc="BM25 search", disable=not show_progress)
        for number, start in enumerate(self.shard_starts):
            shard = bm25s.BM25.load(self.directory / f"shard_{number:05d}", mmap=True, load_vocab=False)
            for q, ids in enumerate(query_ids):
                bar.update()
                if ids.size == 0:
                    continue
                scores = shard.get_scores_from_ids(ids)
                allowed = self._holding_any_group(shard.scores, required[q]) if required is not None else None
                if allowed is None:
                    local_ids, local_scores = top_k_deterministic(scores, k)
                else:
                    positions, local_scores = top_k_deterministic(scores[allowed], k)
                    local_ids = allowed[positions]
                merged_ids = np.concatenate([best[q][0], local_ids + start])
                merged_scores = np.concatenate([best[q][1], local_scores])
                order = np.lexsort((merged_ids, -merged_scores))[:k]
                best[q] = (merged_ids[order], merged_scores[order])
        bar.close()
        return best

    def _holding_any_group(self, matrix: dict, groups: list[list[str]]) -> np.ndarray | None:
        """Sorted ids of the documents of a shard's score matrix holding every token of some group; None when some
        group (or the lack of any) requires nothing."""
        if not groups or not all(groups):
            return None
        indptr, indices = matrix["indptr"], matrix["indices"]
        found = np.empty(0, dtype=np.int64)
        for group in groups:
            if any(token not in self.vocab for token in group):
                continue  # no document holds it
            ids = [self.vocab[token] for token in group]
            postings = sorted((np.asarray(indices[indptr[t] : indptr[t + 1]]) for t in ids), key=len)
            documents = postings[0]
            for posting in postings[1:]:
                documents = np.intersect1d(documents, posting, assume_unique=True)
            found = np.union1d(found, documents)
        return found.astype(np.int64)


def top_k_deterministic(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k highest positive scores, ties broken by the lower index."""
    candidates = np.flatnonzero(scores > 0)
    if candidates.size > k:  # sort only the candidates at or above the k-th score (every tie at the boundary)
        kth = np.partition(scores[candidates], candidates.size - k)[candidates.size - k]
        candidates = candidates[scores[candidates] >= kth]
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    return candidates[order].astype(np.int64), scores[candidates[order]].astype(np.float32)


#: A shard also closes once it holds this many tokens, so that the memory used to build one (~50 bytes per token
#: at its peak) stays bounded whatever the length of the documents.
SHARD_MAX_TOKENS = 1 << 24


@dataclass
class _Postings:
    """What the streaming pass keeps in memory; each shard's term-frequency matrix went to disk."""

    vocab: dict[str, int] = field(default_factory=dict)
    document_frequencies: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lengths: array = field(default_factory=lambda: array("i"))  # tokens per document
    text_offsets: array = field(default_factory=lambda: array("q", [0]))  # where each text ends in texts.bin
    shard_starts: list[int] = field(default_factory=list)
    kind_units: Counter = field(default_factory=Counter)  # word units per run kind: the script shares
    skipped: Counter = field(default_factory=Counter)


def _stream_postings(corpus, building: Path, shard_size: int, max_documents: int | None) -> _Postings:
    """Tokenise every document once, numbering tokens as they come, and append its text to texts.bin; a shard
    closes at ``shard_size`` documents or SHARD_MAX_TOKENS tokens and leaves its term frequencies in ``building``."""
    found = _Postings()
    vocab = found.vocab
    shard_tokens, shard_lengths = array("i"), array("i")
    documents = itertools.islice(corpus.iter_documents(found.skipped), max_documents)  # None: every document
    with (building / "texts.bin").open("wb") as texts:
        for text in tqdm(documents, desc=f"Indexing {corpus.label}", unit="doc"):
            ids = [vocab.setdefault(token, len(vocab)) for token in retrieval_tokens(text, found.kind_units)]
            shard_tokens.extend(ids)
            shard_lengths.append(len(ids))
            found.lengths.append(len(ids))
            # surrogatepass: a lone surrogate (valid in JSON) is stored and read back as it was
            found.text_offsets.append(found.text_offsets[-1] + texts.write(text.encode("utf-8", "surrogatepass")))
            if len(shard_lengths) == shard_size or len(shard_tokens) >= SHARD_MAX_TOKENS:
                _save_term_frequencies(building, found, shard_tokens, shard_lengths)
    if shard_lengths:
        _save_term_frequencies(building, found, shard_tokens, shard_lengths)
    return found


def _save_term_frequencies(building: Path, found: _Postings, shard_tokens: array, shard_lengths: array) -> None:
    """Save the shard's document x token counts (a sparse matrix), add its document frequencies, and empty it."""
    number = len(found.shard_starts)
    found.shard_starts.append(len(found.lengths) - len(shard_lengths))
    docs = np.repeat(np.arange(len(shard_lengths)), np.array(shard_lengths))
    tokens = np.array(shard_tokens)  # a copy: the buffer is emptied below
    # Compressed sparse columns, one per token: a repeated (document, token) entry is summed into its count.
    shape = (len(shard_lengths), len(found.vocab))
    tf = scipy.sparse.csc_array((np.ones(len(tokens), np.float32), (docs, tokens)), shape)
    df = found.document_frequencies
    found.document_frequencies = np.pad(df, (0, shape[1] - df.size)) + np.diff(tf.indptr)
    scipy.sparse.save_npz(building / f"tf_{number:05d}.npz", tf)
    del shard_tokens[:], shard_lengths[:]


#: BM25 as bm25s's method="lucene" with its default parameters (part of every index fingerprint).
BM25_K1, BM25_B = 1.5, 0.75


def lucene_idf(df, num_docs: int):
    return np.log1p((num_docs - df + 0.5) / (df + 0.5))


def _write_shard_scores(building: Path, found: _Postings, df: np.ndarray, avg_length: float):
    """Each shard's BM25 scores, idf(t) tf / (tf + k1 (1 - b + b |d| / avg)) with the corpus-wide ``df`` and
    ``avg_length``, saved in bm25s's own format (compressed sparse columns, one per token)."""
    num_docs, lengths = len(found.lengths), np.frombuffer(found.lengths, dtype=np.int32)
    for number, start in enumerate(tqdm(found.shard_starts, desc="Scoring shards", unit="shard")):
        tf_path = building / f"tf_{number:05d}.npz"
        tf = scipy.sparse.load_npz(tf_path)
        tf.resize((tf.shape[0], df.size))  # tokens first seen in later shards
        token_of_entry = np.repeat(np.arange(df.size), np.diff(tf.indptr))
        doc_lengths = lengths[start + tf.indices]
        norm = BM25_K1 * (1 - BM25_B + BM25_B * doc_lengths / avg_length)
        scores = lucene_idf(df[token_of_entry], num_docs) * tf.data / (tf.data + norm)
        shard = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
        shard.scores = {"data": scores.astype(np.float32), "indices": tf.indices.astype(np.int32),
                        "indptr": tf.indptr.astype(np.int64), "num_docs": tf.shape[0]}  # fmt: skip
        shard.vocab_dict, shard.nonoccurrence_array = {}, None  # the vocabulary is shared by all shards: vocab.json
        shard.save(building / f"shard_{number:05d}", show_progress=False)
        tf_path.unlink()


def build_index(corpus, directory: Path, shard_size: int, fingerprint: dict, max_documents: int | None = None):
    """Stream ``corpus`` once and write a ShardedBM25 index to ``directory`` (replaced atomically: meta.json last)."""
    building = directory.parent / f".{directory.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        found = _stream_postings(corpus, building, shard_size, max_documents)
        if not found.lengths:
            reasons = ", ".join(f"{n} {why}" for why, n in found.skipped.items()) or "no records"
            raise InputError(f"Corpus {corpus.label!r} has no documents ({reasons}). Check it and its text column.")
        vocab = found.vocab
        vocab[""] = len(vocab)  # the empty token bm25s reserves for queries with no known token
        df = np.pad(found.document_frequencies, (0, 1))
        lengths = np.frombuffer(found.lengths, dtype=np.int32)
        avg_length = float(lengths.mean()) if lengths.sum() else 1.0
        _write_shard_scores(building, found, df, avg_length)
        (building / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        np.save(building / "text_offsets.npy", np.frombuffer(found.text_offsets, dtype=np.int64))
        np.save(building / "document_frequencies.npy", df)
        units = sum(n for kind, n in found.kind_units.items() if kind != "digit") or 1
        meta = {
            "fingerprint": fingerprint,
            "documents": len(lengths),
            "skipped": dict(found.skipped),
            "vocabulary": len(vocab),
            "average_tokens": avg_length,
            "shard_starts": found.shard_starts,
            "script_unit_fractions": {s: found.kind_units[kind] / units for kind, s in SCRIPT_OF_KIND.items()},
        }
        write_json_atomic(building / "meta.json", meta)  # written last: an index without it is incomplete
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(building, directory)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


#: Bump when the files of an index change: part of every fingerprint, so an older index is rebuilt, not misread.
INDEX_FORMAT = 2


def open_index(corpus, index_root: Path, shard_size: int, max_documents: int | None) -> tuple[ShardedBM25, bool]:
    """The corpus's index, reused when its fingerprint matches, else (re)built. Returns (index, reused)."""
    fingerprint = {"corpus": corpus.fingerprint(), "tokenizer": TOKENIZER_VERSION,
                   "bm25": {"method": "lucene", "k1": BM25_K1, "b": BM25_B}, "shard_size": shard_size,
                   "shard_max_tokens": SHARD_MAX_TOKENS, "max_documents": max_documents,
                   "index_format": INDEX_FORMAT}  # fmt: skip
    directory = index_root / corpus.label
    try:
        old = json.loads((directory / "meta.json").read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError):
        old = None  # no index there yet, or an incomplete one
    if old == fingerprint:
        logger.info("Reusing the index of corpus %r at %s (fingerprint matches).", corpus.label, directory)
        return ShardedBM25(directory), True
    changed = ", ".join(key for key in fingerprint if (old or {}).get(key) != fingerprint[key])
    logger.info("Building the index of corpus %r at %s (changed: %s).", corpus.label, directory, changed)
    if max_documents is not None:
        logger.warning("Corpus %r: indexing only its first %d documents.", corpus.label, max_documents)
    build_index(corpus, directory, shard_size, fingerprint, max_documents)
    return ShardedBM25(directory), False
