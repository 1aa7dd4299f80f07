#!/usr/bin/env python
"""What the Latin script filter costs in run_pretrain's data pipeline.

Generates a mixed-script corpus (default ~100 MB of UTF-8: English-like documents, with accented
Latin, typographic punctuation and a Zipf-distributed vocabulary of real and generated words,
30% of them with Korean/Chinese/Tibetan/Mongolian spans, 5% entirely in those scripts),
trains the study tokenizer on a sample, then runs run_pretrain.filter_and_tokenize (the very
function of the pipeline) over the corpus twice, chunk by chunk in alternating order:
``--script_filter none`` (tokenize alone, the baseline) and ``latin``/``chars`` (filter + tokenize).
Prints throughput of each in MB of input per second, the ratio, and the filter's own time as
a share of tokenizing (the filtered text is shorter, so filter+tokenize can beat tokenize alone
on a corpus with much foreign text; the filter's own share is the cost that does not depend
on that). Goal: the filter costs <= 10%.

    python bench/bench_pretrain_filter.py                 # ~100 MB, a few minutes
    python bench/bench_pretrain_filter.py --size_mb 10    # quick
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_pretrain import filter_and_tokenize, train_tokenizer  # noqa: E402
from study_common import filter_to_latin  # noqa: E402

ENGLISH = (
    "the of and to in is was for on that with as by at from his her their city river king war people music "
    "school language culture festival food family history village harvest autumn winter bridge mountain "
    "café naïve Zürich São Paulo Málaga Kraków – “quoted” ‘single’ 1984 2023 45.6% £12 €30"
).split()
FOREIGN = [
    "한국 사람들은 가을에 추석을 지내며 송편을 먹는다",
    "汉族的传统节日包括春节和中秋节，人们吃月饼。",
    "བོད་རིགས་ཀྱིས་ལོ་གསར་ལ་ཁ་ཟས་སྣ་ཚོགས་བཟོ་གི་ཡོད།",
    "ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ ᠨᠠᠭᠠᠳᠤᠮ ᠤ ᠪᠠᠶᠠᠷ ᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ᠎ᠡ᠃",
]


def make_lexicon(rng: random.Random, size: int = 30000) -> tuple[list[str], list[float]]:
    """English-like words (real ones first, then syllable compounds) with Zipf-like weights."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "st", "er", "an", "ing"]
    words = ENGLISH + ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(size)]
    return words, [1 / (rank + 10) for rank in range(len(words))]


def generate_chunk(rng: random.Random, megabytes: float, lexicon) -> list[str]:
    """Documents totalling about ``megabytes`` of UTF-8."""
    documents, size = [], 0
    while size < megabytes * 1e6:
        if rng.random() < 0.05:
            text = " ".join(rng.choice(FOREIGN) for _ in range(rng.randint(2, 20)))
        else:
            words = rng.choices(*lexicon, k=rng.randint(30, 400))
            if rng.random() < 0.3:
                for _ in range(rng.randint(1, 3)):
                    words.insert(rng.randrange(len(words)), f"({rng.choice(FOREIGN)[: rng.randint(3, 12)]})")
            text = " ".join(words).capitalize() + "."
        documents.append(text)
        size += len(text.encode("utf-8"))
    return documents


def run(tokenizer, documents: list[str], script_filter: str, batch_size: int = 1000) -> float:
    start = time.perf_counter()
    for i in range(0, len(documents), batch_size):
        filter_and_tokenize({"text": documents[i : i + batch_size]}, tokenizer, 0, "text", script_filter, "chars")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=float, default=100, help="Corpus size in MB of UTF-8 (default 100).")
    parser.add_argument("--chunk_mb", type=float, default=5, help="Generated and timed in chunks of this size.")
    parser.add_argument("--vocab_size", type=int, default=8000, help="Vocabulary of the trained tokenizer.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    lexicon = make_lexicon(rng)
    tokenizer = train_tokenizer(generate_chunk(rng, 2, lexicon), args.vocab_size, show_progress=False)
    times = {"none": 0.0, "latin": 0.0, "filter_alone": 0.0}
    total_bytes, chunk = 0, 0
    while total_bytes < args.size_mb * 1e6:
        documents = generate_chunk(rng, min(args.chunk_mb, args.size_mb - total_bytes / 1e6), lexicon)
        total_bytes += sum(len(d.encode("utf-8")) for d in documents)
        order = ["none", "latin"] if chunk % 2 == 0 else ["latin", "none"]  # alternate against drift
        for script_filter in order:
            times[script_filter] += run(tokenizer, documents, script_filter)
        start = time.perf_counter()
        for document in documents:
            filter_to_latin(document)
        times["filter_alone"] += time.perf_counter() - start
        chunk += 1
        print(
            f"  {total_bytes / 1e6:6.1f} MB  tokenize {times['none']:6.1f} s  filter+tokenize {times['latin']:6.1f} s"
        )

    megabytes = total_bytes / 1e6
    ratio = times["none"] / times["latin"]
    print(f"corpus: {megabytes:.1f} MB mixed-script text, tokenizer vocab {len(tokenizer)}")
    print(f"tokenize alone (baseline): {megabytes / times['none']:.2f} MB/s")
    print(f"filter + tokenize:         {megabytes / times['latin']:.2f} MB/s")
    print(f"filter alone:              {megabytes / times['filter_alone']:.2f} MB/s")
    print(f"ratio filter+tokenize / tokenize throughput: {ratio:.3f}  (goal >= {1 / 1.10:.3f}, i.e. cost <= 10%)")
    print(f"filter's own time as a share of tokenizing: {100 * times['filter_alone'] / times['none']:.1f}%")


if __name__ == "__main__":
    main()
