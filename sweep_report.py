"""The report of a ``run_study.py --sweep`` study: its cells side by side, what it shows in docs/study.md (Sweeps).
study_report.write_reports writes each cell's report, then this one."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from run_transfer import gap_text
from study_common import write_json_atomic
from study_report import (
    _f,
    _figure,
    _final_checks,
    _group_runs,
    _read_json,
    _save,
    _status,
    _unfinished_banner,
    configuration_text,
    image,
    table,
    write_pages,
)
from study_runner import fmt_time, read_step_seconds, unfinished_steps, utc_now

if TYPE_CHECKING:
    from run_study import Plan


def write_sweep_report(plan: Plan) -> dict:
    """sweep_report.md/.html/.json and figures/dose_response.png of a sweep, from its cells' outputs. Returns what
    study_report.write_report returns."""
    out, factors, unfinished = Path(plan.out), plan.config["sweep"], unfinished_steps(plan)
    timings, figures = read_step_seconds(out), out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    users = Counter(s.id for cell in plan.cells.values() for s in cell.steps)
    shared = {step_id for step_id, n in users.items() if n > 1}  # ran once for several cells
    cells = {name: _cell_entry(cell, timings, shared, unfinished) for name, cell in plan.cells.items()}
    record = {"generated": utc_now(), "configuration": plan.config, "factors": factors,
              "status": _status(plan, unfinished), "cells": cells,
              "sweep_steps_s": sum(timings.get(s.id) or 0 for s in plan.steps)}  # fmt: skip
    header = ["cell", *factors, "data epochs", "mentions seen", "its own steps took", "shared steps it used took",
              "status"]  # fmt: skip
    gaps = [[name, g["group"], g["direction"], g["measure"], gap_text(g), g["verdict"]]
            for name, cell in cells.items() for g in cell["gaps"]]  # fmt: skip
    doc = [
        f"# Sweep of the `{plan.preset.name}` study over {', '.join(factors)}",
        f"Configuration: {configuration_text(plan.config)}. Generated {record['generated']}. {len(cells)} cells, one "
        "study each, in `<cell>/` with its own report; a step whose command is the same in several cells ran once "
        "(`shared/`). Gaps are with minus without bridges, mean over the CPT curve, with 95% bootstrap intervals over "
        "questions and seed pairs (`run_transfer.py`).",
        *_unfinished_banner(plan, unfinished),
        "## Cells",
        table(header, [_cell_row(name, entry) for name, entry in cells.items()]),
        "Data epochs: how many times CPT read its dataset, mean over the cell's runs (`plan.data_epochs` of each "
        "`packing_audit.json`); mentions seen: the world's bridge mentions per entity (`pair_mentions`) x data "
        "epochs, the dose the model saw (docs/dose-response.md). A cell's time is the sum of its steps' seconds. "
        f"Steps shared by several cells ({len(shared)}: {', '.join(sorted(shared)) or 'none'}) ran once for all of "
        f"them: they are counted once in the sweep's {fmt_time(record['sweep_steps_s'])} of steps, and not in any "
        "cell's own time.",
        "## Gaps per cell",
        table(["cell", "group", "direction", "measure", "mean gap [95% CI]", "verdict"], gaps),
    ]
    figure = _plot_dose_response(cells, factors, figures)
    caption = ("Mean gap [95% CI] per direction against the first swept factor (other factors as separate lines): all "
               "questions, skill, knowledge, bridges − mismatched")  # fmt: skip
    checks = [[name, *c.values()] for name, cell in cells.items() for c in cell["checks"]]
    checks_header = ["cell", "group", "setting", "runs", "co-located %", "audits hold", "manipulation checks (final)"]
    doc += [
        image(figure, caption) if figure else "",
        "## Manipulation checks per cell",
        "Per cell, group and setting: the share of pairs co-located in one window (100% with bridges, 0% otherwise), "
        "whether every packing audit holds, and the manipulation checks at the final checkpoint, mean over seeds "
        "(each cell's report has their chance levels and intervals).",
        table(checks_header, checks),
    ]
    md, data = out / "sweep_report.md", out / "sweep_report.json"
    page = write_pages(md, doc, f"Sweep report ({plan.preset.name})")
    write_json_atomic(data, record)
    return {"md": md, "html": page, "json": data, "steps": len(plan.steps), "unfinished": unfinished}


def _shown_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cell_entry(cell: Plan, timings: dict, shared: set[str], unfinished: dict) -> dict:
    """A cell's record: its values, report, time (its own steps, and the shared ones it used), unfinished steps, the
    dose its runs saw, its gaps and its checks. Reads each run's packing audit once."""
    audits = {r.name: _read_json(Path(r.dir) / "packing_audit.json") or {} for r in cell.runs}
    return {"values": cell.config["cell"], "report": str(Path(cell.out) / "report.md"),
            "own_steps_s": sum(timings.get(s.id) or 0 for s in cell.steps if s.id not in shared),
            "shared_steps_s": sum(timings.get(s.id) or 0 for s in cell.steps if s.id in shared),
            "shared_steps": [s.id for s in cell.steps if s.id in shared],
            "unfinished": [s.id for s in cell.steps if s.id in unfinished],
            **_cell_dose(cell, audits), "gaps": _cell_gaps(cell), "checks": _cell_checks(cell, audits)}  # fmt: skip


def _cell_row(name: str, entry: dict) -> list:
    status = f"**{len(entry['unfinished'])} steps unfinished**" if entry["unfinished"] else "finished"
    seen = "–" if entry["mentions_seen"] is None else f"{entry['mentions_seen']:.0f}"
    return [f"[{name}]({name}/report.md)", *map(_shown_value, entry["values"].values()),
            _f(entry["data_epochs"], ".2f"), seen, fmt_time(entry["own_steps_s"]), fmt_time(entry["shared_steps_s"]),
            status]  # fmt: skip


def _cell_dose(cell: Plan, audits: dict) -> dict:
    """The dose a cell's CPT runs saw: data epochs (mean over their packing audits), the world's pair mentions and
    their product (None where not recorded)."""
    epochs = [a["plan"]["data_epochs"] for a in audits.values() if (a.get("plan") or {}).get("data_epochs") is not None]
    world = (_read_json(Path(cell.dirs["world"]) / "world.json") if cell.dirs.get("world") else None) or {}
    mentions = world.get("arguments", {}).get("pair_mentions")
    data_epochs = float(np.mean(epochs)) if epochs else None
    seen = mentions * data_epochs if mentions is not None and data_epochs is not None else None
    return {"data_epochs": data_epochs, "pair_mentions": mentions, "mentions_seen": seen}


def _cell_gaps(cell: Plan) -> list[dict]:
    """A cell's gaps per group and direction (transfer.json): all questions, per tier, the knowledge contrast and
    bridges − mismatched bridges."""
    found = []
    for key, group in cell.groups.items():
        result = _read_json(Path(group["transfer"]) / "transfer.json") or {}
        for d in (d for language in result.get("languages", []) for d in language["directions"]):
            measures = [("all questions", d), *((f"tier {t}", s) for t, s in (d.get("tiers") or {}).items())]
            if d.get("bridges_minus_mismatched"):
                measures.append(("bridges − mismatched", d["bridges_minus_mismatched"]))
            if k := d.get("knowledge_transfer"):
                did = {"mean_gap": k["mean_did"], "mean_gap_ci": k["mean_did_ci"], "verdict": k["verdict"]}
                measures.append((f"knowledge ({k['often_tier']} − {k['never_tier']})", did))
            never = f"tier {k['never_tier']}" if k else None
            found += [{"group": key, "direction": d["direction"], "measure": measure, "mean_gap": stats["mean_gap"],
                       "mean_gap_ci": stats["mean_gap_ci"], "verdict": stats["verdict"],
                       "plotted": _plotted_as(measure, never)}
                      for measure, stats in measures]  # fmt: skip
    return found


def _cell_checks(cell: Plan, audits: dict) -> list[dict]:
    """Per group and setting of a cell: co-location and audit guarantees (packing_audit.json) and the manipulation
    checks at the final checkpoint, mean over its runs (_final_checks)."""
    found = []
    for key, group in cell.groups.items():
        for setting in group["settings"]:
            runs = _group_runs(cell, key, setting)
            audited = [audits[r.name] for r in runs if audits[r.name]]
            shares = [a["pairs"]["co_located_percent"] for a in audited]
            checks: dict[tuple[str, str], list[float]] = {}
            for run in runs:
                for check_what, (accuracy, _, _) in (_final_checks(run.eval_dir, run.lang) or (0, {}))[1].items():
                    checks.setdefault(check_what, []).append(accuracy)
            found.append({"group": key, "setting": setting, "runs": f"{len(audited)}/{len(runs)} audited",
                          "co_located_percent": _f(float(np.mean(shares)), ".1f") if shares else "-",
                          "audits_hold": all(a.get("guarantees_hold") is True for a in audited) if audited else "-",
                          "manipulation_checks": "; ".join(f"{check} {what} {np.mean(v):.3f}"
                                                          for (check, what), v in checks.items()) or "-"})  # fmt: skip
    return found


#: The dose-response figure's columns: the measures the knowledge/skill reading rests on (the other tiers are in the
#: table). "skill" is the gap on the tier the source corpus never states; "knowledge" the difference-in-differences.
PLOTTED = {"all": "all questions", "skill": "skill (tier never in the source)", "knowledge": "knowledge (DiD)",
           "mismatched": "bridges − mismatched"}  # fmt: skip


def _plotted_as(measure: str, never_tier: str | None) -> str | None:
    if measure == "all questions":
        return "all"
    if measure == never_tier:
        return "skill"
    return {"knowledge": "knowledge", "bridges − mismatched": "mismatched"}.get(measure.split(" (")[0])


def _plot_dose_response(cells: dict, factors: dict, figures: Path) -> str | None:
    """Per direction (rows) and measure (columns, PLOTTED): the mean gap with its CI against the first swept factor,
    one line per group and combination of the other factors' values."""
    points = [(cell["values"], g) for cell in cells.values() for g in cell["gaps"] if g.get("plotted")]
    directions = sorted({g["direction"] for _, g in points})
    if not directions:
        return None
    factor, *others = factors
    many_groups = len({g["group"] for _, g in points}) > 1
    ticks = [_shown_value(v) for v in factors[factor]]
    fig, axes = _figure(len(directions), len(PLOTTED), 4.2, 3.4, sharey="row")
    for (row, direction), (col, (role, title)) in itertools.product(enumerate(directions), enumerate(PLOTTED.items())):
        ax, lines = axes[row, col], {}
        for values, g in (p for p in points if p[1]["direction"] == direction and p[1]["plotted"] == role):
            parts = [g["group"]] * many_groups + [f"{k}={_shown_value(values[k])}" for k in others]
            label = ", ".join(parts) or g["group"]
            lines.setdefault(label, []).append((ticks.index(_shown_value(values[factor])), g))
        for i, (label, line) in enumerate(lines.items()):  # in the sweep's order of cells
            line.sort(key=lambda p: p[0])
            x = [p[0] + 0.06 * (i - (len(lines) - 1) / 2) for p in line]  # side by side, not on top
            ci = np.array([p[1]["mean_gap_ci"] for p in line])
            (drawn,) = ax.plot(x, [p[1]["mean_gap"] for p in line], marker="o", label=label)
            ax.vlines(x, ci[:, 0], ci[:, 1], color=drawn.get_color())
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set(xlabel=factor, title=f"{direction}: {title}", ylabel="mean gap [95% CI]" if col == 0 else None)
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, figures, "dose_response.png")
