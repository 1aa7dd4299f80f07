"""run_study.py --sweep end to end (slow): a micro sweep shares one world and pretraining and writes the sweep report."""

import json
import sys

import pytest
from conftest import run_script

import study_report

pytestmark = pytest.mark.slow


def test_a_micro_sweep_end_to_end_shares_one_world_and_pretraining_and_writes_the_sweep_report(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "run_study.py", "--preset", "micro", "--variants", "native", "--output_dir", str(out),
               "--set", "pretrain.max_steps=40", "--sweep", "cpt.max_steps=20,40"]  # fmt: skip
    proc = run_script(command, timeout=900)
    assert "Study finished" in proc.stdout and (out / "sweep_report.md").is_file()
    record = json.loads((out / "sweep_report.json").read_text())
    assert record["status"]["complete"] and set(record["cells"]) == {"cpt.max_steps=20", "cpt.max_steps=40"}
    steps = json.loads((out / "plan.json").read_text())["steps"]
    for kind in ("world", "pretrain"):  # one of each, run once, for both cells
        (step,) = [s for s in steps if s["kind"] == kind]
        assert (out / "logs" / f"{step['id']}.log").is_file()
        assert all(step["id"] in {s.id for s in cell.steps} for cell in study_report.read_plan(out).cells.values())
    for name, cell in record["cells"].items():
        assert (out / name / "report.md").is_file()
        transfer = json.loads((out / name / "transfer" / "mn-native" / "transfer.json").read_text())
        directions = transfer["languages"][0]["directions"]
        shown = {(g["direction"], g["measure"]): g for g in cell["gaps"]}
        for d in directions:
            assert shown[(d["direction"], "all questions")]["mean_gap_ci"] == d["mean_gap_ci"]
        assert cell["own_steps_s"] > 0 and cell["shared_steps_s"] > 0
        # the dose: data epochs from the runs' packing audits, times the world's pair mentions
        audits = [json.loads(p.read_text()) for p in (out / name / "cpt").glob("*/packing_audit.json")]
        assert cell["data_epochs"] == pytest.approx(sum(a["plan"]["data_epochs"] for a in audits) / len(audits))
        assert (
            cell["mentions_seen"] == pytest.approx(cell["pair_mentions"] * cell["data_epochs"])
            and cell["pair_mentions"]
        )
        assert {c["setting"] for c in cell["checks"]} == {"bridges", "no_bridges"}
    report = (out / "sweep_report.md").read_text()
    assert "![" in report and (out / "figures" / "dose_response.png").read_bytes()[:4] == b"\x89PNG"
    assert study_report.main([str(out)]) == 0  # the sweep's reports again, from the files its steps wrote
    assert study_report.main([str(out / "cpt.max_steps=20")]) == 0
