"""run_transfer.py end to end (slow): eight run folders of random-weight tiny models probed by run_eval.py and
compared as run folders, the known verdict, the numbers by hand from predictions.jsonl, and the same analysis from
the eval output folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cloze_samples import write_sample_questions
from eval_helpers import make_run_dir

import run_eval
import run_transfer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_transfer_of_eight_probed_random_weight_run_folders_gives_the_known_ko_verdict(tmp_path, tiny_model_dir):
    """Eight run folders (ko and zh, with and without bridges, two seeds) of tiny models with random weights (no
    training), each probed by run_eval.py into RUN/eval, then compared given as run folders. The ko runs of a seed
    share their weights in both settings, so every ko gap is exactly 0 and the verdict is known: no evidence; the zh
    runs all differ."""
    en, ko, zh = write_sample_questions(tmp_path / "questions", langs=("en", "ko", "zh"))
    questions = {"ko": [str(en), str(ko)], "zh": [str(en), str(zh)]}
    runs = {True: [], False: []}  # bridges -> run folders
    for lang in ("ko", "zh"):
        for bridges in (True, False):
            for seed in (0, 1):
                setting = {
                    "lang": lang,
                    "setting": "bridges" if bridges else "no_bridges",
                    "bridges": bridges,
                    "seed": seed,
                }
                name = f"{lang}-{'with' if bridges else 'without'}-s{seed}"
                weights = 1 + seed if lang == "ko" else 10 + 2 * seed + bridges
                runs[bridges].append(make_run_dir(tiny_model_dir, tmp_path / name, (2, 4), 6, setting, seed=weights))
    out = tmp_path / "transfer"
    for run in runs[True] + runs[False]:  # run_eval.py's default output folder of a run folder: RUN/eval
        run_eval.main(["--model_name_or_path", str(run), "--questions", *questions[run.name[:2]]])
    run_transfer.main(["--with_bridges", *map(str, runs[True]), "--without_bridges", *map(str, runs[False]),
                       "--output_dir", str(out), "--n_bootstrap", "300"])  # fmt: skip

    result = json.loads((out / "transfer.json").read_text())
    assert [language["lang"] for language in result["languages"]] == ["ko", "zh"]
    for language in result["languages"]:
        assert language["steps"] == [2, 4, 6]
        assert [d["direction"] for d in language["directions"]] == [
            f"en->{language['lang']}",
            f"{language['lang']}->en",
        ]
        for d in language["directions"]:
            assert d["n_seed_pairs"] == 2 and len(d["per_seed"]) == 2
            assert len(d["gap"]) == len(d["gap_ci"]) == 3
            assert d["gap_ci"][-1][0] <= d["final_gap"] <= d["gap_ci"][-1][1]
    for d in result["languages"][0]["directions"]:  # ko: the same weights in both settings
        assert d["gap"] == [0.0] * 3 and d["mean_gap_ci"] == [0.0, 0.0] and d["verdict"] == "no evidence"
        assert [m["p_value"] for m in d["mcnemar_final"]] == [1.0, 1.0]

    def correct(run_name: str, stem: str, step: int) -> np.ndarray:
        rows = [
            json.loads(line) for line in (tmp_path / run_name / "eval" / "predictions.jsonl").read_text().splitlines()
        ]
        chosen = sorted((r for r in rows if r["step"] == step and r["questions"] == stem), key=lambda r: r["index"])
        assert [r["index"] for r in chosen] == list(range(6))
        return np.array([r["correct"] for r in chosen])

    # zh, by hand from predictions.jsonl: the McNemar p-value of the first seed pair at the final step, the
    # mean gap over steps and seeds, and the verdict the rule gives for the interval reported.
    from scipy.stats import binomtest

    en_to_zh = result["languages"][1]["directions"][0]
    w, o = correct("zh-with-s0", "sample-culture_zh", 6), correct("zh-without-s0", "sample-culture_zh", 6)
    b, c = int(np.sum(w & ~o)), int(np.sum(~w & o))
    expected = binomtest(b, b + c).pvalue if b + c else 1.0
    assert en_to_zh["mcnemar_final"][0]["p_value"] == pytest.approx(expected)
    assert en_to_zh["per_seed"][0]["final_gap"] == pytest.approx((w.sum() - o.sum()) / 6)
    gaps = [
        correct(f"zh-with-s{seed}", "sample-culture_zh", step).mean()
        - correct(f"zh-without-s{seed}", "sample-culture_zh", step).mean()
        for seed in (0, 1)
        for step in (2, 4, 6)
    ]
    assert en_to_zh["mean_gap"] == pytest.approx(np.mean(gaps))
    low, high = en_to_zh["mean_gap_ci"]
    assert en_to_zh["verdict"] == ("transfer" if low > 0 else "reverse" if high < 0 else "no evidence")

    markdown = (out / "transfer.md").read_text()
    assert "| English → ko (ko questions) |" in markdown and "| zh → English (English questions) |" in markdown
    assert "overstates significance" not in markdown  # two seed pairs: the intervals cover seeds
    for png in ("transfer_curves.png", "transfer_summary.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # The same analysis of ko alone from the eval output folders.
    again = tmp_path / "again"
    ko = {b: [str(tmp_path / f"ko-{b}-s{s}" / "eval") for s in (0, 1)] for b in ("with", "without")}
    run_transfer.main(["--with_bridges", *ko["with"], "--without_bridges", *ko["without"], "--output_dir", str(again),
                       "--n_bootstrap", "300"])  # fmt: skip
    assert json.loads((again / "transfer.json").read_text())["languages"][0] == result["languages"][0] | {
        "with_bridges": ko["with"],
        "without_bridges": ko["without"],
    }
