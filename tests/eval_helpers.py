"""Run directories of real tiny models for the probing and transfer tests (no training: random weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
