"""Inputs of the cloze, probing and transfer tests: question files, eval output folders in run_eval's format,
run directories of real tiny models (no training: random weights)."""

from __future__ import annotations

import json
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
        "questions": questions,
    }
    (directory / "accuracy.json").write_text(json.dumps({"checkpoints": checkpoints, **header}))
    return directory
