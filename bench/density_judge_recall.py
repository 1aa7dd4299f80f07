#!/usr/bin/env python
"""Recall and false positives of run_density.py's lexical judge against a synthetic world's planted truth.

A world from synthetic_world.py states every fact an exact number of times, each statement its own
document, with three paraphrase templates per relation that share only the subject and the answer;
a document names two entities only when it states their fact. So, per question, the documents that
state its fact are known from the files alone (those naming both its subject and its answer), and
the documents that hold the answer without stating the fact are the target corpora's filler
documents that name the answer entity (``--mono_mentions`` per entity; the English corpus has none).

For each judge threshold (``--judge_min_key_fraction``), run_density.py measures every culture's
English questions on the English corpus and its target questions on its target corpus (the real
script, in-process, one index per corpus shared by the thresholds), and this prints, per corpus
language:

* statements planted, statements retrieved in the top-k (retrieval recall), statements judged yes
  (the judge's recall);
* answer-only documents retrieved and how many of them the judge accepted (false positives); the
  occurrences run_density.py counts are the statements judged yes plus these;
* the misses: not retrieved, or retrieved and judged no, split by whether the statement is worded
  with the question's own template or with another paraphrase template.

    python bench/density_judge_recall.py                       # 4 cultures, the generator's defaults
    python bench/density_judge_recall.py --world_dir OUT/world --langs mn --thresholds 0.25   # run_study.py's world
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import time

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import run_density as rd  # noqa: E402
from cloze import question_file_name, question_stem  # noqa: E402
from study_common import read_documents  # noqa: E402
from synthetic_world import RELATIONS, Language, WorldArguments, generate_world, render_fact  # noqa: E402


def statement_documents(documents: list[str], fact: dict, key: str) -> list[int]:
    """Ids of the documents naming both the fact's subject and object (written as ``key``: en or native)."""
    subject, obj = fact["subject"][key], fact["object"][key]
    return [i for i, d in enumerate(documents) if subject in d and obj in d]


def template_of(document: str, fact: dict, language: Language | None, variant: str) -> int:
    """Which of the relation's templates states the fact in ``document``."""
    templates = RELATIONS[fact["relation"]]
    found = [t for t in range(len(templates)) if render_fact(fact, t, language, variant) in document]
    if len(found) != 1:
        raise AssertionError(f"fact {fact['id']}: {len(found)} templates match a statement document")
    return found[0]


def measure(args, world: Path, truth: dict, index_dir: Path, out: Path, threshold: float) -> dict:
    """run_density.py on every culture's two question files; its report."""
    questions, corpora = [], [f"en={world / 'en_corpus.jsonl'}"]
    for lang in args.langs:
        folder = world / lang / args.variant
        questions += [str(folder / question_file_name(lang, "en")), str(folder / question_file_name(lang, lang))]
        corpora.append(f"{lang}={folder / 'mono.jsonl'}")
    return rd.main(
        ["--questions", *questions, "--corpus_files", *corpora, "--top_k", str(args.top_k),
         "--judge_min_key_fraction", repr(threshold), "--index_dir", str(index_dir),
         "--output_dir", str(out / f"min_key_fraction_{threshold}"), "--log_level", "warning"]
    )  # fmt: skip


def tally(report: dict, args, world: Path, truth: dict) -> dict[str, Counter]:
    """Per corpus language ("English", "target"): the counts described in the module docstring."""
    documents = {"en": list(read_documents(world / "en_corpus.jsonl"))}
    for lang in args.langs:
        documents[lang] = list(read_documents(world / lang / args.variant / "mono.jsonl"))
    facts = {f["id"]: f for lang in args.langs for f in truth["cultures"][lang]["facts"]}
    languages = {lang: Language(lang, truth["seed"]) for lang in args.langs}
    counts = {"English": Counter(), "target": Counter()}
    measured = {(e["questions"], e["corpus"], e["index"]): e for e in report["questions"]}
    for lang in args.langs:
        for question_lang in ("en", lang):
            stem = question_stem(lang, question_lang)
            side = "English" if question_lang == "en" else "target"
            key = "en" if question_lang == "en" or args.variant == "anchors" else "native"
            language = None if question_lang == "en" else languages[lang]
            corpus = documents[question_lang]
            for record in truth["questions"][lang]:
                entry = measured.get((stem, question_lang if question_lang == "en" else lang, record["index"]))
                if entry is None:
                    raise RuntimeError(f"{stem} item {record['index']} was not measured (skipped pair?)")
                fact = facts[record["fact"]]
                statements = set(statement_documents(corpus, fact, key))
                retrieved = set(entry["retrieved"])
                judged = {d for d, yes in zip(entry["retrieved"], entry["contains"]) if yes}
                c = counts[side]
                c["questions"] += 1
                c["questions exact"] += judged == statements
                c["statements"] += len(statements)
                c["statements retrieved"] += len(statements & retrieved)
                c["statements judged yes"] += len(statements & judged)
                c["answer-only retrieved"] += len(retrieved - statements)
                c["answer-only judged yes (false positives)"] += len(judged - statements)
                c["missed: not retrieved"] += len(statements - retrieved)
                for d in statements:
                    own = template_of(corpus[d], fact, language, args.variant) == fact["question_template"]
                    wording = "the question's template" if own else "another template"
                    c[f"statements worded with {wording}"] += 1
                    if d in retrieved and d not in judged:
                        c[f"missed: retrieved, judged no, worded with {wording}"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", help="an existing world (default: generate one in a temporary folder)")
    parser.add_argument("--langs", nargs="+", default=["bo", "ko", "zh", "mn"], help="cultures (generated world)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated world")
    parser.add_argument("--variant", default="native", choices=["native", "anchors"], help="how names are written")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.25, 0.2])
    parser.add_argument("--top_k", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="density_judge_recall_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        if args.world_dir:
            world = Path(args.world_dir)
        else:
            world = work / "world"
            generate_world(WorldArguments(output_dir=str(world), langs=args.langs, seed=args.seed,
                                          name_variants=[args.variant]))  # fmt: skip
        truth = json.loads((world / "truth.json").read_text(encoding="utf-8"))
        total_documents = sum(1 for _ in read_documents(world / "en_corpus.jsonl")) + sum(
            sum(1 for _ in read_documents(world / lang / args.variant / "mono.jsonl")) for lang in args.langs
        )
        print(
            f"World {world if args.world_dir else f'(generated, seed {args.seed})'}: cultures {' '.join(args.langs)}, "
            f"{args.variant} names, {total_documents:,} documents (English corpus + {len(args.langs)} target corpora); "
            f"run_density.py --top_k {args.top_k}, lexical judge, idf weighting"
        )
        results = {}
        for threshold in args.thresholds:
            report = measure(args, world, truth, work / "index", work / "out", threshold)
            results[threshold] = tally(report, args, world, truth)
        seconds = time.perf_counter() - start

    print("\n| --judge_min_key_fraction | corpus | statements | retrieved (top-k) | judged yes | recall "
          "| answer-only retrieved | false positives | occurrences counted | questions exact |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threshold, by_side in results.items():
        for side, c in list(by_side.items()) + [("both", sum(by_side.values(), Counter()))]:
            recall = c["statements judged yes"] / c["statements"] if c["statements"] else float("nan")
            print(
                f"| {threshold} | {side} | {c['statements']:,} | {c['statements retrieved']:,} | "
                f"{c['statements judged yes']:,} | {recall:.1%} | {c['answer-only retrieved']:,} | "
                f"{c['answer-only judged yes (false positives)']:,} | "
                f"{c['statements judged yes'] + c['answer-only judged yes (false positives)']:,} | "
                f"{c['questions exact']}/{c['questions']} |"
            )
    print("\nMisses by cause (statements not judged yes):")
    for threshold, by_side in results.items():
        for side, c in by_side.items():
            other, own = "another template", "the question's template"
            print(
                f"  {threshold} {side}: not retrieved {c['missed: not retrieved']}; retrieved and judged no: "
                f"{c[f'missed: retrieved, judged no, worded with {other}']} of "
                f"{c[f'statements worded with {other}']:,} worded with {other}, "
                f"{c[f'missed: retrieved, judged no, worded with {own}']} of "
                f"{c[f'statements worded with {own}']:,} worded with {own}"
            )
    print(f"\n{seconds:.0f} s")


if __name__ == "__main__":
    main()
