#!/usr/bin/env python
"""Benchmark: BM25 index + query throughput of bm25s (what run_density.py uses) vs rank_bm25.

On the same generated corpus (Zipf-distributed vocabulary, English-like documents) and the same
queries (12 words drawn from a random document, like a filled cloze sentence), for each size:

* rank_bm25 (BM25Okapi, pure Python): index, then get_scores + top-k per query;
* bm25s (BM25 method "lucene", numpy backend): index, then retrieve top-k;
  both on the same pre-tokenised documents (tokenisation is timed once, separately);
* bm25_index.py's sharded bm25s index (run_density.py's): stream the .jsonl file, tokenise, build
  shards, search (the whole pipeline, tokenisation included), against tokenisation + rank_bm25.

Sizes in --sizes run all three; --large_sizes run the bm25s paths only (rank_bm25 would take
too long). Each --rss_runs entry DOCUMENTS[:SHARD_SIZE] then runs run_density.py end to end
(index, search, judge) on a generated corpus of that many documents, with that --shard_size, in
a child process and reports its peak RSS, next to bm25s's in-memory index of the same file (read,
tokenise, index, retrieve the same questions' queries) in another child process.

The defaults are the rows of the first table in docs/benchmarks.md (section "Density retrieval") and the
first three of the second (its last three: --rss_runs 100000:200000 300000:200000 100000:25000), and the
summary prints them in those tables' columns:

    python bench/bench_density.py                                  # the tables of docs/benchmarks.md
    python bench/bench_density.py --sizes 3000 --large_sizes --rss_runs       # quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import time: before bm25s and bm25_index

import bm25s
import numpy as np
from rank_bm25 import BM25Okapi

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import bm25_index  # noqa: E402


def make_vocabulary(rng: random.Random, size: int = 50_000) -> tuple[list[str], list[float]]:
    words = sorted(
        {"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(size)}
    )
    rng.shuffle(words)
    return words, list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))


def generate_documents(n: int, words: list[str], cumulative: list[float], seed: int, mean_words: int):
    rng = random.Random(seed)
    for _ in range(n):
        yield (
            " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(mean_words // 2, mean_words * 3 // 2)))
            + "."
        )


def make_queries(documents: list[str], n: int, rng: random.Random) -> list[str]:
    queries = []
    for _ in range(n):
        words = rng.choice(documents).rstrip(".").split()
        queries.append(" ".join(rng.sample(words, min(12, len(words)))))
    return queries


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def rank_bm25_run(tokens, query_tokens, k):
    index, index_s = timed(BM25Okapi, tokens)

    def query_all():
        return [np.argsort(-index.get_scores(q), kind="stable")[:k] for q in query_tokens]

    results, query_s = timed(query_all)
    return results, index_s, query_s


def bm25s_run(tokens, query_tokens, k):
    model = bm25s.BM25(method="lucene")
    _, index_s = timed(model.index, tokens, show_progress=False)
    (ids, _), query_s = timed(model.retrieve, query_tokens, k=k, show_progress=False)
    return ids, index_s, query_s


def sharded_run(corpus_file: Path, index_dir: Path, query_tokens, k, shard_size):
    corpus = bm25_index.FileCorpus("bench", [corpus_file], "text")
    _, index_s = timed(bm25_index.build_index, corpus, index_dir, shard_size, {})
    index = bm25_index.ShardedBM25(index_dir)
    results, query_s = timed(index.search, query_tokens, k, show_progress=False)
    return [ids for ids, _ in results], index_s, query_s


def overlap(a, b, k=10) -> float:
    return float(np.mean([len(set(list(x)[:k]) & set(list(y)[:k])) / max(1, min(k, len(x))) for x, y in zip(a, b)]))


def parse_rss_runs(args) -> list[tuple[int, int]]:
    runs = []
    for entry in args.rss_runs or []:
        documents, _, shard = entry.partition(":")
        runs.append((int(documents), int(shard) if shard else args.shard_size))
    return runs


#: The bm25s side of an --rss_runs entry: the whole corpus tokenised and indexed in memory, then the same queries.
BM25S_CHILD = """
import json, sys
from collections import Counter
from pathlib import Path
import bm25s
from bm25_index import FileCorpus, retrieval_tokens
import run_density as rd
corpus, questions, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = [retrieval_tokens(text) for text in FileCorpus("c", [Path(corpus)], "text").iter_documents(Counter())]
model = bm25s.BM25(method="lucene")
model.index(tokens, show_progress=False)
del tokens
queries = [rd.prepare_question(i, q["question"], [q["answer"]]).query_tokens for i, q in enumerate(json.load(open(questions)))]
model.retrieve(queries, k=k, show_progress=False)
"""


#: Runs its arguments as a child and prints that child's peak RSS (KiB). Linux starts a child's peak RSS at its
#: parent's RSS at fork time, so measuring from this small launcher, not from the benchmark (which holds the
#: in-process indexes by then), keeps the benchmark's own memory out of the figure.
RSS_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(usage.ru_maxrss)
sys.exit(1 if status else 0)
"""


def child_peak_rss(command: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of ``command`` run as a child process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RSS_LAUNCHER, *command], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=dict(os.environ, TQDM_DISABLE="1"))  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.split()[-1]) / 1024, seconds  # Linux reports KiB


def peak_rss_of_run_density(work: Path, n: int, shard_size: int, words, cumulative, args) -> dict:
    """run_density.py on an n-document corpus, and bm25s's in-memory index of it, each in a child process: their
    peak RSS (MiB) and times."""
    corpus_file = work / f"rss_{n}.jsonl"
    with corpus_file.open("w", encoding="utf-8") as handle:
        for text in generate_documents(n, words, cumulative, args.seed + 7, args.mean_words):
            handle.write(json.dumps({"text": text}) + "\n")
    rng = random.Random(args.seed)
    sample = list(
        generate_documents(2000, words, cumulative, args.seed + 7, args.mean_words)
    )  # the corpus's first docs
    questions = []
    for query in make_queries(sample, args.queries, rng):
        parts = query.split()
        answer = parts.pop(len(parts) // 2)
        questions.append(
            {"question": " ".join(parts[:6] + ["____"] + parts[6:]), "options": [answer], "answer": answer}
        )
    questions_file = work / "rss_questions_en.json"
    questions_file.write_text(json.dumps(questions), encoding="utf-8")
    command = [sys.executable, str(REPO_ROOT / "run_density.py"), "--questions", str(questions_file),
               "--corpus_files", str(corpus_file), "--top_k", str(args.top_k), "--output_dir", str(work / f"rss_out_{n}"),
               "--shard_size", str(shard_size), "--log_level", "warning"]  # fmt: skip
    peak, seconds = child_peak_rss(command)
    report = json.loads((work / f"rss_out_{n}" / "density.json").read_text())
    bm25s_peak, bm25s_seconds = child_peak_rss(
        [sys.executable, "-c", BM25S_CHILD, str(corpus_file), str(questions_file), str(args.top_k)]
    )
    corpus_file.unlink()
    return {
        "documents": report["corpus"]["documents"],
        "shard_size": shard_size,
        "shards": report["corpus"]["index"]["shards"],
        "peak_rss_mib": peak,
        "seconds": seconds,
        "bm25s_peak_rss_mib": bm25s_peak,
        "bm25s_seconds": bm25s_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[3_000, 10_000], help="sizes run with rank_bm25 too")
    parser.add_argument("--large_sizes", type=int, nargs="*", default=[100_000, 300_000], help="bm25s-only sizes")
    parser.add_argument("--queries", type=int, default=500, help="queries per size")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--mean_words", type=int, default=40, help="mean words per document")
    parser.add_argument("--shard_size", type=int, default=200_000, help="run_density.py --shard_size")
    parser.add_argument("--rss_runs", nargs="*", default=["250000:200000", "1000000:200000", "250000:50000"],
                        help="peak-RSS runs of run_density.py as DOCUMENTS[:SHARD_SIZE] (SHARD_SIZE defaults to "
                             "--shard_size; the flag with no value: none)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    words, cumulative = make_vocabulary(rng)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_density_") as tmp:
        work = Path(tmp)
        for n in sorted(set(args.sizes) | set(args.large_sizes)):
            with_rank = n in args.sizes
            documents = list(generate_documents(n, words, cumulative, args.seed + n, args.mean_words))
            queries = make_queries(documents, args.queries, random.Random(args.seed + 1))
            corpus_file = work / f"corpus_{n}.jsonl"
            corpus_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
            tokens, tokenise_s = timed(lambda docs=documents: [bm25_index.retrieval_tokens(d) for d in docs])
            query_tokens = [bm25_index.retrieval_tokens(q) for q in queries]
            row = {"documents": n, "queries": len(queries), "tokenise_s": tokenise_s}
            s_ids, row["bm25s_index_s"], row["bm25s_query_s"] = bm25s_run(tokens, query_tokens, args.top_k)
            del tokens
            sh_ids, row["sharded_index_s"], row["sharded_query_s"] = sharded_run(
                corpus_file, work / f"index_{n}", query_tokens, args.top_k, args.shard_size
            )
            row["overlap@10 sharded/bm25s"] = overlap(sh_ids, s_ids)
            if with_rank:
                tokens = [bm25_index.retrieval_tokens(d) for d in documents]
                r_ids, row["rank_index_s"], row["rank_query_s"] = rank_bm25_run(tokens, query_tokens, args.top_k)
                row["overlap@10 bm25s/rank_bm25"] = overlap(s_ids, r_ids)
                del tokens
            rows.append(row)
            print_row(row)
        rss = [peak_rss_of_run_density(work, n, shard, words, cumulative, args) for n, shard in parse_rss_runs(args)]
    print_summary(rows, rss, args)


def print_row(row: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def print_summary(rows: list[dict], rss: list[dict], args) -> None:
    """The two tables of docs/benchmarks.md, in their columns (seconds; each ratio from one run)."""
    q = args.queries
    print(f"\nIndex + {q} queries (top-{args.top_k}); documents of ~{args.mean_words} words")
    print(f"| documents (~{args.mean_words} words) | rank_bm25: index + {q} queries | bm25s: index + {q} queries "
          f"| rank_bm25 / bm25s | `run_density.py` index: read + tokenise + index + {q} queries |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        bm25s_total = row["bm25s_index_s"] + row["bm25s_query_s"]
        sharded_total = row["sharded_index_s"] + row["sharded_query_s"]
        if "rank_index_s" in row:
            rank_total = row["rank_index_s"] + row["rank_query_s"]
            rank_cell = f"{rank_total:.1f} s ({row['rank_index_s']:.1f} + {row['rank_query_s']:.1f})"
            ratio = f"**{rank_total / bm25s_total:.0f}×**"
        else:
            rank_cell = ratio = "–"
        print(
            f"| {row['documents']:,} | {rank_cell} | "
            f"{bm25s_total:.2f} s ({row['bm25s_index_s']:.2f} + {row['bm25s_query_s']:.2f}) | {ratio} | "
            f"{sharded_total:.1f} s |"
        )
    for row in rows:
        agree = {k: round(v, 3) for k, v in row.items() if k.startswith("overlap")}
        print(f"top-10 agreement at {row['documents']:,} documents: {agree}")
    if rss:
        print(f"\nrun_density.py end to end ({q} questions, top-{args.top_k}) and bm25s's in-memory index of the same "
              "file (read, tokenise, index, retrieve), peak RSS of each child process:")  # fmt: skip
        print("| documents | `--shard_size` | shards | peak RSS | wall time | bm25s in memory: peak RSS | wall time |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rss:
            print(
                f"| {r['documents']:,} | {r['shard_size']:,} | {r['shards']} | {r['peak_rss_mib']:,.0f} MiB | "
                f"{r['seconds']:.0f} s | {r['bm25s_peak_rss_mib']:,.0f} MiB "
                f"({r['bm25s_peak_rss_mib'] / r['peak_rss_mib']:.1f}×) | {r['bm25s_seconds']:.0f} s |"
            )


if __name__ == "__main__":
    main()
