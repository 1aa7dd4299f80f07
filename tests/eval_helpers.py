"""Inputs of the cloze, probing and transfer tests: question files, eval output folders in run_eval's format,
run directories of real tiny models (no training: random weights)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_random_model(tiny_model_dir: Path, output_dir: Path, seed: int, cpt_setting: dict | None = None) -> Path:
    """The tiny model's architecture and tokenizer with fresh random weights drawn from ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, output_dir / name)
    if cpt_setting is not None:
        config_path = output_dir / "config.json"
        config_json = json.loads(config_path.read_text())
        config_json["cpt_setting"] = cpt_setting
        config_path.write_text(json.dumps(config_json, indent=2))
    return output_dir


def make_run_dir(
    tiny_model_dir: Path,
    run_dir: Path,
    checkpoint_steps=(1, 2),
    final_step: int | None = 3,
    cpt_setting: dict | None = None,
    seed: int = 0,
) -> Path:
    """A run directory as run_cpt.py leaves it: checkpoint-N folders, the final model and trainer_state.json."""
    for k, step in enumerate(checkpoint_steps):
        save_random_model(tiny_model_dir, run_dir / f"checkpoint-{step}", seed * 1000 + k, cpt_setting)
    if final_step is not None:
        save_random_model(tiny_model_dir, run_dir, seed * 1000 + 999, cpt_setting)
        (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": final_step}))
    return run_dir


def write_questions(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


def write_eval_output(
    directory: Path,
    correct: dict[str, np.ndarray],
    steps: list[int],
    cpt_setting: dict | None,
    tied: dict[str, np.ndarray] | None = None,
) -> Path:
    """An eval output directory in run_eval's format whose per-item correctness is given (steps x items).
    Items marked in ``tied`` (steps x items) tie exactly between the answer (option 0) and option 1: the
    first-wins rule gets them right, random tie-breaking half right."""
    questions, checkpoints, lines = {}, [], []
    for stem, matrix in correct.items():
        lang = stem.rsplit("_", 1)[1]
        questions[stem] = {
            "lang": lang,
            "source": stem,
            "parallel_group": stem.rsplit("_", 1)[0],
            "items": matrix.shape[1],
            "sha256": f"sha-{stem}",
            "quirks": {},
        }
    for t, step in enumerate(steps):
        path = str(directory / f"checkpoint-{step}")
        accuracy = {}
        for stem, matrix in correct.items():
            ties = tied[stem][t] if tied and stem in tied else np.zeros(matrix.shape[1], bool)
            for index, (ok, tie) in enumerate(zip(matrix[t], ties)):
                scores = [0.0, 0.0] if tie else [0.0, 1.0] if ok else [1.0, 0.0]
                row = {
                    "questions": stem,
                    "lang": questions[stem]["lang"],
                    "index": index,
                    "step": step,
                    "checkpoint": path,
                    "scores": scores,
                    "prediction": min(range(len(scores)), key=lambda k: (scores[k], k)),  # run_eval.predict
                    "answer": [0],
                    "correct": bool(ok or tie),
                    "tied_best": 2 if tie else 1,
                    "credit_fractional": 0.5 if tie else float(ok),
                }
                lines.append(json.dumps(row))
            accuracy[stem] = {
                "lang": questions[stem]["lang"],
                "correct": int((matrix[t] | ties).sum()),
                "total": matrix.shape[1],
                "accuracy": float((matrix[t] | ties).mean()),
            }
        checkpoints.append({"step": step, "path": path, "accuracy": accuracy})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    header = {
        "model_name_or_path": str(directory),
        "cpt_setting": cpt_setting,
        "scoring": "mean_token_loss",
        "dtype": "float32",
        "loss_dtype": "float32",
        "questions": questions,
    }
    (directory / "accuracy.json").write_text(json.dumps({"checkpoints": checkpoints, **header}))
    return directory


#: What a run_cpt.py run records besides lang, setting and seed (the runs of a study share all of it).
RECORDED = {
    "base_model_weights_sha256": "w" * 64,
    "base_model_config_sha256": "c" * 64,
    "dataset_sha256": "d" * 64,
    "steps": 30,
    "windows_per_step": 4,
    "block_size": 64,
    "pair_order": "en_first",
    "pair_separator": "",
}


def write_run(directory, setting="bridges", seed=0, correct=None, lang="ko", checkpoints=(10, 20, 30), **changes):
    """An eval output folder of a run_cpt.py run (recording every compared field) probed by run_eval.py;
    ``changes`` replaces recorded fields (cpt_setting or probing header)."""
    rng = np.random.default_rng(seed)
    correct = correct or {
        f"c_{lang}": rng.random((len(checkpoints), 20)) < 0.5,
        "c_en": rng.random((len(checkpoints), 20)) < 0.5,
    }
    cpt_setting = {"lang": lang, "setting": setting, "bridges": setting == "bridges", "seed": seed, **RECORDED}
    cpt_setting["documents_seen_sha256"] = f"documents-of-seed-{seed}"
    header = {}
    for key, value in changes.items():  # the probing fields (run_transfer.PROBING_FIELDS) are the header's
        (header if key in ("scoring", "dtype", "loss_dtype") else cpt_setting)[key] = value
    eval_dir = write_eval_output(directory, correct, list(checkpoints), cpt_setting)
    accuracy = json.loads((eval_dir / "accuracy.json").read_text())
    (eval_dir / "accuracy.json").write_text(json.dumps(accuracy | header))
    return eval_dir


def write_name_alignment(path: Path, n_entities: int = 48, lang: str = "ko", seed: int = 0) -> Path:
    """A name_alignment.json as synthetic_world.py writes it: Latin English names, Hangul target
    names, one held-out item per entity and direction with 3 distractors of other entities. The answer is always
    option 0, so a scorer that ties every option (first-wins) would score 1.0, not chance."""
    rng = random.Random(seed)
    latin = ["ba", "do", "ki", "lu", "me", "na", "po", "ri", "sa", "tu", "ve", "zo"]
    hangul = ["가", "나", "다", "라", "마", "바", "사", "아", "자", "하", "고", "노", "도", "로"]
    en_names, tgt_names = set(), set()
    while len(en_names) < n_entities:
        en_names.add("".join(rng.choice(latin) for _ in range(3)).capitalize())
    while len(tgt_names) < n_entities:
        tgt_names.add("".join(rng.choice(hangul) for _ in range(3)))
    entities = [
        {"id": f"place-{i}", "en": en, "target": tgt}
        for i, (en, tgt) in enumerate(zip(sorted(en_names), sorted(tgt_names)))
    ]
    items = []
    for i, entity in enumerate(entities):
        others = rng.sample([e for k, e in enumerate(entities) if k != i], 3)
        en_sentence, tgt_sentence = "People walk to the old market of {} at dawn.", "사람들은 새벽에 {} 시장에 간다."
        for direction, context, frame, side in (
            (f"en->{lang}", en_sentence.format(entity["en"]), tgt_sentence.format("____"), "target"),
            (f"{lang}->en", tgt_sentence.format(entity["target"]), en_sentence.format("____"), "en"),
        ):
            options = [entity[side]] + [e[side] for e in others]
            items.append(
                {"direction": direction, "entity": entity["id"], "context": context, "frame": frame,
                 "options": options, "answer": entity[side]}
            )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"lang": lang, "variant": "native", "entities": entities, "items": items}, ensure_ascii=False),
        encoding="utf-8",
    )
    return path


def write_item_tiers(path: Path, parallel_group: str, tiers: list[str]) -> Path:
    """An item_tiers.json as synthetic_world.py writes it: item i of the group is in tiers[i]."""
    meaning = {"high": "often in both", "low": "rarer in English", "absent": "never in English", "en_only": "en only"}
    items = [{"index": i, "tier": tier, "counts": {"en": 1, "x": 1}} for i, tier in enumerate(tiers)]
    path.write_text(json.dumps({"parallel_group": parallel_group, "tiers": meaning, "items": items}))
    return path
