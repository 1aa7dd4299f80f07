"""sweep_report.py: the cells of a sweep side by side (the dose per cell, the gaps per cell, the packing audits and
manipulation checks per cell, the dose-response figure), from planted cell outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import run_study
import sweep_report
from run_study import StudyArguments, build_sweep
from study_config import sweep_factors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_the_sweep_report_shows_each_cells_gaps_knowledge_contrast_and_manipulation_checks(tmp_path):
    args = StudyArguments(preset="micro", sweep=["cpt.max_steps=20,40"], variants=["native"])
    factors = sweep_factors(args.sweep, [])
    plan = build_sweep(args, tmp_path / "sweep", factors)
    plan.config = run_study.configuration(args, ["--variants", "native", "--sweep", "cpt.max_steps=20,40"], factors)
    for n, cell in enumerate(plan.cells.values()):
        cell.config = {**plan.config, **cell.config}
        gap = {"mean_gap": 0.1 * n, "mean_gap_ci": [0.1 * n - 0.05, 0.1 * n + 0.05], "verdict": "v"}
        direction = {
            "direction": "en->mn", **gap,
            "tiers": {"high": {**gap, "mean_gap": 0.2 + n}, "absent": {**gap, "mean_gap": 0.05}},
            "knowledge_transfer": {"often_tier": "high", "never_tier": "absent", "mean_did": 0.15 + n,
                                   "mean_did_ci": [0.1, 0.2 + n], "verdict": "knowledge"},
            "bridges_minus_mismatched": {**gap, "mean_gap": 0.07},
        }  # fmt: skip
        _write_json(
            Path(cell.groups["mn/native"]["transfer"]) / "transfer.json", {"languages": [{"directions": [direction]}]}
        )
        _write_json(Path(cell.dirs["world"]) / "world.json", {"arguments": {"pair_mentions": 3}})
        for run in cell.runs:
            audit = {
                "pairs": {"co_located_percent": 100.0 if run.setting == "bridges" else 0.0},
                "guarantees_hold": True,
                "plan": {"data_epochs": (1 + n) * (1.3 + 0.1 * run.seed)},  # seeds 0, 1: mean 1.35 x (1 + n)
            }
            _write_json(Path(run.dir) / "packing_audit.json", audit)
            checks = {
                "step": 2,
                "name_alignment": {"en->mn": {"accuracy": 0.5 + 0.25 * run.seed, "n": 8, "chance": 0.25}},
                "tier_accuracy": {"mn-culture-cloze_mn": {"absent": 0.25 * run.seed}},
            }
            _write_json(
                Path(run.eval_dir) / "manipulation_checks.json",
                {"checkpoints": [{"step": 1}, checks], "item_tiers": {"items_per_tier": {"absent": 4}}},
            )
    written = sweep_report.write_sweep_report(plan)  # (the cells' own reports need real transfer.json)
    assert written["md"] == tmp_path / "sweep" / "sweep_report.md" and len(written["unfinished"]) == len(plan.steps)
    report = written["md"].read_text()
    record = json.loads(written["json"].read_text())
    assert "**UNFINISHED:" in report and record["status"]["complete"] is False
    # the dose per cell: data epochs (mean over the runs' packing audits) and pair mentions x data epochs
    assert record["cells"]["cpt.max_steps=40"]["data_epochs"] == pytest.approx(2.7)
    assert record["cells"]["cpt.max_steps=40"]["mentions_seen"] == pytest.approx(8.1)
    assert "| [cpt.max_steps=20](cpt.max_steps=20/report.md) | 20 | 1.35 | 4 |" in report
    gaps = {(name, g["measure"]): g for name, cell in record["cells"].items() for g in cell["gaps"]}
    assert gaps[("cpt.max_steps=40", "knowledge (high − absent)")]["mean_gap"] == 1.15
    assert gaps[("cpt.max_steps=40", "knowledge (high − absent)")]["mean_gap_ci"] == [0.1, 1.2]
    assert gaps[("cpt.max_steps=20", "tier high")]["mean_gap"] == 0.2
    assert gaps[("cpt.max_steps=20", "bridges − mismatched")]["mean_gap"] == 0.07
    assert "| cpt.max_steps=40 | mn/native | en->mn | knowledge (high − absent) | +1.150 [+0.100, +1.200] |" in report
    checks = {(name, c["setting"]): c for name, cell in record["cells"].items() for c in cell["checks"]}
    assert checks[("cpt.max_steps=20", "bridges")]["co_located_percent"] == "100.0"
    assert checks[("cpt.max_steps=20", "no_bridges")]["co_located_percent"] == "0.0"
    assert checks[("cpt.max_steps=20", "bridges")]["manipulation_checks"] == (
        "name alignment en->mn 0.625; target learning mn-culture-cloze_mn, absent facts 0.125"
    )  # the final checkpoint's, mean of seeds 0 and 1
    assert (tmp_path / "sweep" / "figures" / "dose_response.png").read_bytes()[:4] == b"\x89PNG"
