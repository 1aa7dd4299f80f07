#!/usr/bin/env python
"""Write a generated English-like corpus for the GPU benchmarks (no download needed on the device).

Words are random Latin syllables with a Zipf-like frequency; a line is a document of 3-30 sentences.

    python bench/english_like_corpus.py OUT.txt MEGABYTES
"""

import random
import sys


def main(path: str, megabytes: float) -> None:
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "st", "er", "an"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1 / (rank + 10) for rank in range(len(words))]
    size = 0
    with open(path, "w", encoding="utf-8") as handle:
        while size < megabytes * 1e6:
            sentences = []
            for _ in range(rng.randint(3, 30)):
                sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 25)))
                sentences.append(sentence.capitalize() + rng.choice([".", ".", ".", "?", "!"]))
            line = " ".join(sentences) + "\n"
            handle.write(line)
            size += len(line)
    print(f"corpus: {size / 1e6:.1f} MB in {path}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
