#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8", "regex", "tqdm"]
# ///
"""The report of a study: report.md, report.html and report.json from the files its steps wrote.

Every number comes from a file a step wrote (paths given per section, all collected in report.json), and
every sentence of conclusion is written from those numbers, never stronger than their intervals allow.
Sections: the run (machine, step times), the synthetic world and model, questions (answer positions, ties,
both tie rules), transfer (with minus without bridges; per tier, knowledge or skill, mismatched bridges), the
manipulation checks, anchors vs control, the bridge diagnostic, cultural density (measured vs planted, the gap
against occurrences), packing audits, and what the scale can show.

``run_study.py`` writes the report after its last step (and alone with ``--report_only``); this module
also rewrites it from a finished study folder on its own, reading the plan record run_study wrote there::

    python study_report.py study_runs/cpu

Needs cloze.py, study_common.py and run_transfer.py (its statistics and figure saver) beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import re
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from cloze import question_lang_from_stem, question_stem, read_predictions
from study_common import exit_on_input_error, write_json_atomic, write_text_atomic
from study_config import SETTINGS, VARIANT_TITLES

if TYPE_CHECKING:  # the report reads any object with these fields (run_study's, or one read back from plan.json)
    from run_study import Plan, Run

REPO_DIR = Path(__file__).resolve().parent
# What the report and run_study.py both name (run_study imports them from here, so that this module needs no
# part of it): the settings and name variants, the time format and stamp, and the steps' recorded seconds.


def fmt_time(seconds: float) -> str:
    """H:MM:SS from an hour on, else M:SS."""
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_step_seconds(out: Path) -> dict[str, float]:
    """Seconds each finished step took, from its done-marker (``OUTPUT_DIR/.done/<step>.json``; a sweep's step ids
    have a folder: ``<cell>/<step>``, ``shared/<folder>``)."""
    timings = {}
    for marker in (out / ".done").rglob("*.json") if (out / ".done").is_dir() else []:
        try:
            step_id = marker.relative_to(out / ".done").with_suffix("").as_posix()
            timings[step_id] = json.loads(marker.read_text(encoding="utf-8")).get("seconds", 0.0)
        except json.JSONDecodeError:
            continue
    return timings


# The runner's records of a step, which say whether it finished: run_study.py runs by them, the report states them.


def done_marker(out: Path, step_id: str) -> Path:
    return out / ".done" / f"{step_id}.json"


def started_record(out: Path, step) -> Path:
    return out / ".started" / f"{step.id}.json"


def read_record(path: Path) -> dict | None:
    """A JSON record the runner wrote, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished_run(out: Path, step_id: str) -> dict | None:
    """What identifies the finished run of a step: its done-marker's run id, finish stamp and command.

    A step records this for each of its dependencies when it starts and when it finishes, so a new run
    upstream (another run id) is seen downstream even when the downstream command is unchanged."""
    marker = read_record(done_marker(out, step_id))
    return None if marker is None else {key: marker.get(key) for key in ("run_id", "finished", "command")}


def upstream_runs(out: Path, step) -> dict:
    return {dep: finished_run(out, dep) for dep in step.deps}


def upstream_changed(recorded: dict | None, current: dict) -> list[str]:
    """Dependencies whose finished run is not the one recorded (all of them when nothing was recorded)."""
    recorded = recorded or {}
    return [dep for dep, run in current.items() if recorded.get(dep) != run]


def why_not_done(out: Path, step) -> str | None:
    """None when the step is done: its done-marker holds the current command and the finished runs of its
    upstream steps, and its outputs exist. Otherwise why it must run."""
    marker = read_record(done_marker(out, step.id))
    if marker is None:
        if done_marker(out, step.id).exists():
            return "its done-marker is unreadable"
        return "it did not finish" if started_record(out, step).exists() else "no record of an earlier run"
    if marker.get("command") != step.command:
        return "its command changed"
    if step.deps and "upstream" not in marker:
        return "its done-marker does not say which upstream runs it used (an older run_study.py wrote it)"
    changed = upstream_changed(marker.get("upstream"), upstream_runs(out, step))
    if changed:
        return f"upstream step {', '.join(changed)} finished a new run since {step.id} ran"
    missing = [p for p in step.outputs if not Path(p).exists()]
    return f"outputs missing: {', '.join(missing)}" if missing else None


def unfinished_steps(plan: Plan) -> dict[str, str]:
    """The steps of a plan without a finished run, each with why (see why_not_done)."""
    state = Path(plan.state_dir or plan.out)
    return {step.id: why for step in plan.steps if (why := why_not_done(state, step)) is not None}


def configuration_text(config: dict) -> str:
    """How a study was configured, in one line: its file, --set, the flags that shape its plan, a sweep's values."""
    if not config:
        return "(not recorded)"
    parts = [f"preset {config['preset']} ({config['file']})", *(f"--set {text}" for text in config["set"])]
    for flag, value in config["flags"].items():
        parts.append(
            f"--{flag}"
            + ("" if value is True else " " + " ".join(map(str, value if isinstance(value, list) else [value])))
        )
    if config.get("sweep"):
        parts += [f"--sweep {key}={','.join(map(json.dumps, values))}" for key, values in config["sweep"].items()]
    if "cell" in config:
        parts.append("this cell: " + ", ".join(f"{key}={json.dumps(value)}" for key, value in config["cell"].items()))
    return ", ".join(parts)


class ReportDoc:
    """A report as blocks, rendered to Markdown and to standalone HTML (no extra dependency)."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", headers, [[str(c) for c in row] for row in rows]))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        lines: list[str] = []
        for block in self.blocks:
            if block[0] == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "ul":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif block[0] == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
                lines.append("")
            elif block[0] == "img":
                lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
            "img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}"
            "figcaption{font-style:italic;font-size:0.9em}</style></head><body>",
        ]
        for block in self.blocks:
            if block[0] == "h":
                parts.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                parts.append(f"<p>{_inline_html(block[1])}</p>")
            elif block[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
            elif block[0] == "table":
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
                body = "".join(
                    "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2]
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif block[0] == "img":
                parts.append(
                    f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                    f"<figcaption>{_inline_html(block[2])}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """The few inline Markdown forms the report uses: `code`, **bold**, [text](link)."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _read_json(path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _direction_words(direction: str, lang: str) -> str:
    return (
        f"English → {lang} ({lang} questions)"
        if direction.startswith("en->")
        else f"{lang} → English (English questions)"
    )


def _direction(stem: str, lang: str) -> str:
    """The transfer direction a question file measures: target-language questions English -> target, English
    questions target -> English."""
    return f"en->{lang}" if question_lang_from_stem(stem) == lang else f"{lang}->en"


def _gap_sentence(what: str, gap: float, ci, n_seeds: int) -> str:
    """A conclusion written from a gap and its interval, never stronger than the interval allows (none when the
    gap lies outside its own interval: run_transfer.verdict's 'undetermined')."""
    from run_transfer import verdict

    over = "seeds and questions" if n_seeds > 1 else "questions only (one run pair: overstates certainty)"
    if verdict(tuple(ci), gap) == "undetermined":
        return (
            f"{what}: {gap:+.3f} lies outside its own 95% CI {_ci(ci)} (over {over}): undetermined (too few bootstrap "
            "resamples to place it), no conclusion."
        )
    if ci[0] > 0:
        return f"{what}: {gap:+.3f}, 95% CI {_ci(ci)} (over {over}) excludes 0: evidence of a positive effect."
    if ci[1] < 0:
        return f"{what}: {gap:+.3f}, 95% CI {_ci(ci)} (over {over}) lies below 0: a negative effect."
    return f"{what}: {gap:+.3f}, 95% CI {_ci(ci)} (over {over}) includes 0: no evidence of an effect at this scale."


def _load_cubes(runs: list[Run], stems: list[str]) -> tuple[list[int], dict[str, dict[str, object]]]:
    """Per run name and questions stem: a bool array (steps x questions) on the steps all runs share."""
    per_run = {}
    for run in runs:
        _, by_stem = read_predictions(run.eval_dir)
        per_run[run.name] = by_stem
    common = sorted(set.intersection(*(set(per_run[r.name][stems[0]]) for r in runs)))
    cubes = {r.name: {s: np.stack([per_run[r.name][s][t] for t in common]) for s in stems} for r in runs}
    return common, cubes


def _tier_indices(truth: dict, lang: str) -> dict[str, list[int]]:
    tiers: dict[str, list[int]] = {}
    for record in truth["questions"][lang]:
        tiers.setdefault(record["tier"], []).append(record["index"])
    return tiers


def write_report(plan: Plan) -> dict:
    """Write report.md, report.html and report.json into the plan's output folder. Returns their paths, the number
    of steps and the steps that did not finish (id -> why): a report of an unfinished study says so first."""
    out = Path(plan.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    doc = ReportDoc()
    preset = plan.preset
    unfinished = unfinished_steps(plan)
    record: dict = {
        "preset": preset.name,
        "generated": utc_now(),
        "configuration": {**plan.config, "values": _values(preset)},
        "status": _status(plan, unfinished),
        "sections": {},
    }
    timings = read_step_seconds(Path(plan.state_dir or out))
    doc.h(1, f"Cross-lingual culture transfer study: preset `{preset.name}`")
    doc.p(
        f"Configuration: {configuration_text(plan.config)}. Every effective value is in `plan.json` and `report.json`."
    )
    _unfinished_banner(doc, plan, unfinished)
    doc.p(
        f"Generated {record['generated']}. {preset.description} Every number below is read from a file a step wrote "
        "(paths given per section; all of them are collected in `report.json`), and every sentence of conclusion is "
        "written from those numbers."
    )
    _report_machine(doc, record, plan, timings)
    world = plan.dirs.get("world")
    truth = _read_json(Path(world) / "truth.json") if preset.synthetic and world else None
    if truth:
        _report_world(doc, record, plan, truth)
    _report_questions(doc, record, plan)
    _report_transfer(doc, record, plan, truth, figures)
    _report_manipulation_checks(doc, record, plan)
    if truth and {"native", "anchors"} <= {g["variant"] for g in plan.groups.values()}:
        _report_anchors(doc, record, plan, truth, figures)
    _report_diagnostic(doc, record, plan, figures)
    _report_density(doc, record, plan, truth)
    _report_packing(doc, record, plan)
    _report_scale(doc, record, plan)
    doc.h(2, "Reproduce")
    doc.p(
        "Every command of this study is in `commands.sh` (dependency order); each step's full output is in "
        "`logs/<step>.log`. Rerunning `python run_study.py` with the same configuration skips finished steps."
    )
    md, page = out / "report.md", out / "report.html"
    write_text_atomic(md, doc.markdown())
    write_text_atomic(page, doc.html(f"Study report ({preset.name})"))
    write_json_atomic(out / "report.json", record)
    return {"md": md, "html": page, "json": out / "report.json", "steps": len(plan.steps), "unfinished": unfinished}


def write_reports(plan: Plan) -> dict:
    """The report of a study; of a sweep, each cell's report, then the sweep's (write_sweep_report)."""
    if not plan.cells:
        return write_report(plan)
    for cell in plan.cells.values():
        write_report(cell)
    return write_sweep_report(plan)


def _values(preset) -> dict:
    """Every value of a configuration (a study_config.Preset, or its record read back from plan.json)."""
    return dataclasses.asdict(preset) if dataclasses.is_dataclass(preset) else dict(vars(preset))


def _status(plan: Plan, unfinished: dict[str, str]) -> dict:
    return {
        "complete": not unfinished,
        "steps": len(plan.steps),
        "finished": len(plan.steps) - len(unfinished),
        "unfinished": [{"step": step_id, "why": why} for step_id, why in unfinished.items()],
    }


def _unfinished_banner(doc: ReportDoc, plan: Plan, unfinished: dict[str, str]) -> None:
    if unfinished:
        doc.p(
            f"**UNFINISHED: {len(unfinished)} of {len(plan.steps)} steps of this study have no finished run.** What "
            "follows shows only what the finished steps wrote: a section or number that is missing is missing because "
            "its step did not finish, and no conclusion covers it. Run the study's command again to finish it. The "
            "steps that did not finish:"
        )
        doc.bullets([f"`{step_id}`: {why}" for step_id, why in unfinished.items()])


def _report_machine(doc: ReportDoc, record: dict, plan: Plan, timings: dict) -> None:
    import platform

    steps_total = sum(timings.get(s.id, 0.0) for s in plan.steps)
    device = "CPU"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the report must not fail on a device query
        pass
    run = _read_json(Path(plan.state_dir or plan.out) / "timings.json") or {}
    samples = run.get("load_average_samples") or []
    load = {"mean": sum(samples) / len(samples), "min": min(samples), "max": max(samples)} if samples else None
    record["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "steps_wall_s": run.get("wall_s_this_invocation"),
        "jobs": run.get("jobs"),
        "load_average": load,
        "step_seconds_total": steps_total,
        "step_seconds": {s.id: timings.get(s.id) for s in plan.steps},
    }
    by_kind: dict[str, list[float]] = {}
    for s in plan.steps:
        if s.id in timings:
            by_kind.setdefault(s.kind, []).append(timings[s.id])
    rows = [[k, len(v), _f(sum(v), ".0f"), _f(max(v), ".0f")] for k, v in by_kind.items()]
    doc.h(2, "Run")
    text = f"Machine: {os.cpu_count()} CPU cores, device {device}, {platform.platform()}. "
    if run.get("wall_s_this_invocation") is not None:
        text += (
            f"The last invocation that ran steps took {fmt_time(run['wall_s_this_invocation'])} (wall), "
            f"{run.get('jobs')} steps at a time; the steps took {fmt_time(steps_total)} in all. "
        )
    if load:
        text += (
            f"1-minute load average while it ran: mean {load['mean']:.1f} (min {load['min']:.1f}, max "
            f"{load['max']:.1f}), the study's own {run.get('jobs')} jobs included: above {run.get('jobs')} means "
            "other work shared the machine and the times above are longer than on a quiet one."
        )
    doc.p(text)
    doc.table(["step kind", "steps", "seconds (sum)", "seconds (longest)"], rows)


def _report_world(doc: ReportDoc, record: dict, plan: Plan, truth: dict) -> None:
    base = Path(plan.dirs["base"])
    world = _read_json(Path(plan.dirs["world"]) / "world.json") or {}
    base_stats = _read_json(base / "data_stats.json") or {}
    base_config = _read_json(base / "config.json") or {}
    doc.h(2, "The synthetic world and the model")
    args = world.get("arguments", {})
    doc.p(
        "A generated world with planted ground truth (`synthetic_world.py`): each target language has one synthetic "
        "culture whose places have one fact per relation (favourite dish, great festival, ...). Facts of the "
        "**high** tier are frequent in the English pretraining corpus and in the target corpus; facts of the **low** "
        f"tier are frequent in the target corpus and {args.get('low_resource_ratio', '?')}x rarer in English (the "
        "paper's Table 1 ratio for Tibetan culture is ~60x)."
        + _absent_and_en_only_text(truth)
        + " Each question's four options are the answers of four facts with identical planted counts, so a model "
        "that knows nothing scores 0.25 whatever the frequencies."
    )
    rows = []
    for lang, tiers in truth["densities"].items():
        for tier, d in tiers.items():
            if tier == "all":
                continue
            rows.append(
                [lang, tier, d["facts"], d["en_statements"], d["tgt_statements"], _f(d["en_density"], ".2e"),
                 _f(d["tgt_density"], ".2e"), "∞" if d["tgt_over_en"] is None else _f(d["tgt_over_en"], ".1f")]
            )  # fmt: skip
    doc.table(
        ["language", "tier", "facts", "English statements", "target statements", "English density",
         "target density", "target / English"],
        rows,
    )  # fmt: skip
    params = _parameter_count(base)
    record["sections"]["world"] = {
        "densities": truth["densities"],
        "base_params": params,
        "base_data_stats": base_stats,
    }
    tokens = base_stats.get("tokens") or base_stats.get("tokens_out")
    pre, cpt = plan.preset.pretrain, plan.preset.cpt
    seeds = sorted({r.seed for r in plan.runs})
    size = f"{params / 1e6:.2f}M parameters" if params else "size unknown"
    corpus = f"{world.get('en_corpus', {}).get('documents', '?')} documents"
    if isinstance(tokens, int):
        corpus += f", {tokens:,} tokens"
    doc.p(
        f"Base model: Qwen2 architecture, hidden {base_config.get('hidden_size', '?')}, "
        f"{base_config.get('num_hidden_layers', '?')} layers, vocabulary {base_config.get('vocab_size', '?')} ({size}), "
        f"pretrained on the English corpus ({corpus}) for {pre.get('max_steps')} steps of "
        f"{pre.get('per_device_train_batch_size')} x {pre.get('block_size')} tokens. Continual pretraining: "
        f"{cpt.get('max_steps')} steps of {cpt.get('per_device_train_batch_size')} x {cpt.get('block_size')} tokens "
        f"per run, a checkpoint every {cpt.get('save_steps')} steps, seeds {', '.join(map(str, seeds))}, English "
        f"replay {plan.preset.build.get('replay_ratio', 0):.0%} of the CPT tokens (sampled from the pretraining corpus)."
    )


def _absent_and_en_only_text(truth: dict) -> str:
    """The tiers that leave a fact out of one corpus, as sentences, where the world has them."""
    present = {tier for tiers in truth["densities"].values() for tier in tiers}
    words = {
        "absent": "Facts of the **absent** tier are stated in the target corpus as often as high facts and never in "
        "English.",
        "en_only": "Facts of the **en_only** tier are stated in English as often as high facts and never in the "
        "target corpus (the mirror of absent).",
    }
    text = "".join(" " + words[tier] for tier in words if tier in present)
    if text:
        text += (
            " Their entities are named in pairs and target filler like every other (only the fact is missing from "
            "one corpus), so high vs absent (target questions) and high vs en_only (English questions) separate "
            "knowledge carried across from bridges' help with the language (see the transfer section)."
        )
    return text


def _parameter_count(model_dir: Path) -> int | None:
    """Parameters stored in a model's safetensors files (read from their headers; tied weights count once)."""
    total, found = 0, False
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
                found = True
    return total if found else None


def _copy_figure(source: Path, figures: Path, name: str) -> str | None:
    if not source.is_file():
        return None
    shutil.copyfile(source, figures / name)
    return f"figures/{name}"


def _base_accuracy(group: dict) -> dict[str, float]:
    accuracy = _read_json(Path(group["base_eval"]) / "accuracy.json")
    if not accuracy or not accuracy.get("checkpoints"):
        return {}
    return {stem: v["accuracy"] for stem, v in accuracy["checkpoints"][-1]["accuracy"].items()}


#: Ties above this share of a file's items are flagged (run_eval.py warns at the same rate).
TIE_FLAG_RATE = 0.05
TIE_RULES_TEXT = (
    "Two tie rules: **first** (the paper's: an exact tie for the best score goes to the first tied option, right or "
    "wrong) and **fractional** (the tie broken uniformly at random: 1/k credit for a k-way tie that includes the "
    "answer)."
)


def _final_accuracy(eval_dir: str) -> tuple[dict, dict] | None:
    """(accuracy.json, its last checkpoint's per-file accuracy) of a probing output, or None."""
    accuracy = _read_json(Path(eval_dir) / "accuracy.json")
    if not accuracy or not accuracy.get("checkpoints"):
        return None
    return accuracy, accuracy["checkpoints"][-1]


def _report_questions(doc: ReportDoc, record: dict, plan: Plan) -> None:
    """Per question file: where the answers sit, what always answering option 0 scores, and per model the tie rate
    and the accuracy under both tie rules at the final checkpoint (run_eval.py's accuracy.json)."""
    doc.h(2, "Questions: answer positions, ties and the two tie rules")
    doc.p(
        "Each option is scored by its loss and the lowest wins. "
        + TIE_RULES_TEXT
        + " Where the answers sit matters for the first rule: every exact tie goes to option 0, so a file whose "
        "answer is often option 0 rewards ties. Numbers from `accuracy.json` of each probing step (`run_eval.py`), "
        "at the final checkpoint; CPT settings are the mean over seeds."
    )
    section = record["sections"].setdefault("questions", {})
    for key, group in plan.groups.items():
        models = [("base model", "base", [group["base_eval"]])]
        for setting in group.get("settings", SETTINGS):
            runs = [
                r
                for r in plan.runs
                if r.lang == group["lang"] and r.variant == group["variant"] and r.setting == setting
            ]
            models.append((f"CPT {setting.replace('_', ' ')}", setting, [r.eval_dir for r in runs]))
        finals = {name: [f for f in map(_final_accuracy, dirs) if f] for _, name, dirs in models}
        described = next((a["questions"] for found in finals.values() for a, _ in found), None)
        if not described:
            doc.p(f"{key}: no probing output found.")
            continue
        doc.h(3, key if plan.preset.synthetic else group["lang"])
        stems = [Path(q).stem for q in group["questions"] if Path(q).stem in described]
        file_rows, files = [], {}
        for stem in stems:
            info = described[stem]
            bias = info.get("position_bias") or {}
            shares = bias.get("answer_position_share", {})
            files[stem] = {"items": info.get("items"), "chance_accuracy": info.get("chance_accuracy"), **bias}
            file_rows.append(
                [stem, info.get("items"), ", ".join(f"{k}: {v:.2f}" for k, v in shares.items()),
                 _f(bias.get("always_first_accuracy")), _f(info.get("chance_accuracy"))]
            )  # fmt: skip
        doc.table(
            ["questions", "items", "share of answers at option position", "always option 0: acc.", "chance acc."],
            file_rows,
        )
        rows, entries, flagged = [], [], []
        for label, name, _ in models:
            found = finals[name]
            for stem in stems:
                per_seed = [entry["accuracy"][stem] for _, entry in found if stem in entry["accuracy"]]
                if not per_seed or any("accuracy_fractional" not in a for a in per_seed):
                    continue  # probed by a version without tie accounting

                def mean(field_name: str, per_seed: list = per_seed) -> float:
                    return sum(a[field_name] for a in per_seed) / len(per_seed)

                steps = sorted({entry["step"] for _, entry in found})
                entry = {
                    "model": name, "questions": stem, "seeds": len(per_seed), "final_steps": steps,
                    "ties": [a["ties"] for a in per_seed], "tie_rate": mean("tie_rate"),
                    "accuracy_first": mean("accuracy"), "accuracy_fractional": mean("accuracy_fractional"),
                    "ties_advantage": mean("ties_advantage"),
                }  # fmt: skip
                entries.append(entry)
                rows.append(
                    [label, stem, len(per_seed), ", ".join(map(str, steps)), _f(entry["tie_rate"]),
                     _f(entry["accuracy_first"]), _f(entry["accuracy_fractional"]), f"{entry['ties_advantage']:+.3f}"]
                )  # fmt: skip
                if entry["tie_rate"] > TIE_FLAG_RATE:
                    flagged.append(
                        f"{label}, {stem}: {entry['tie_rate']:.1%} of items tie for the best score (above "
                        f"{TIE_FLAG_RATE:.0%}): accuracy {entry['accuracy_first']:.3f} under the first rule, "
                        f"{entry['accuracy_fractional']:.3f} with ties broken at random; always option 0 scores "
                        f"{_f(files[stem].get('always_first_accuracy'))}."
                    )
        if rows:
            doc.table(
                ["model", "questions", "seeds", "final step", "tie rate", "acc. (first rule)",
                 "acc. (fractional rule)", "first − fractional"],
                rows,
            )  # fmt: skip
        doc.bullets(
            flagged or [f"Ties stay at or below {TIE_FLAG_RATE:.0%} of the items for every model and file here."]
            if rows
            else []
        )
        section[key] = {"files": files, "final": entries, "tie_flags": flagged}


def _report_transfer(doc: ReportDoc, record: dict, plan: Plan, truth: dict | None, figures: Path) -> None:
    """Per run group trained in both settings: run_transfer.py's figures, its with-minus-without gap per direction
    under its tie rule (and both rules where they differ) and, in a synthetic world, the gap per tier of facts."""
    doc.h(2, "Transfer: with minus without bridges (the paper's measurement)")
    doc.p(
        "Both settings train on exactly the same documents; with bridges each parallel pair shares one context "
        "window, without bridges its halves never do. The gap (accuracy with − without bridges) on target-language "
        "questions measures English → target transfer, on English questions target → English transfer. Intervals "
        "are 95% bootstrap intervals over questions and seed pairs (`run_transfer.py`). "
        + TIE_RULES_TEXT
        + " Each table says which rule it uses; the base accuracies use the first rule."
    )
    section = record["sections"].setdefault("transfer", {})
    for key, group in plan.groups.items():
        lang, variant = group["lang"], group["variant"]
        result = _read_json(Path(group["transfer"]) / "transfer.json")
        title = f"{lang}, {VARIANT_TITLES.get(variant, variant)}" if plan.preset.synthetic else lang
        if len(group.get("settings", SETTINGS)) < 2:
            doc.p(
                f"{title}: trained only {' and '.join(s.replace('_', ' ') for s in group['settings'])} (it serves "
                "the anchors-vs-control comparison below), so there is no with-minus-without analysis for it."
            )
            continue
        doc.h(3, title)
        if not result:
            doc.p(f"No transfer analysis found at `{group['transfer']}/transfer.json` (the step did not run).")
            continue
        prefix = f"{lang}-{variant}"
        for name in ("transfer_curves", "transfer_summary"):
            rel = _copy_figure(Path(group["transfer"]) / f"{name}.png", figures, f"{prefix}-{name}.png")
            if rel:
                caption = (
                    f"{title}: accuracy during CPT with (blue) and without (orange) bridges, Figure-3 style"
                    if name == "transfer_curves"
                    else f"{title}: mean gap over the curve per direction, Figure-1 style"
                )
                doc.img(rel, caption)
        rows, sentences, entries = _transfer_directions(result, _base_accuracy(group))
        doc.table(
            ["direction", "base acc.", "final step", "acc. with", "acc. without", "final gap [95% CI]",
             "mean gap over curve [95% CI]", "per-seed mean gaps", "McNemar p (final, per seed)", "verdict"],
            rows,
        )  # fmt: skip
        doc.bullets(sentences)
        _note_undetermined(doc, [e["verdict"] for e in entries])
        _report_tie_rules(doc, entries, lang, result.get("tie_policy", "first"))
        group_record = {"transfer_json": str(Path(group["transfer"]) / "transfer.json"), "directions": entries}
        directions = [(language["lang"], d) for language in result["languages"] for d in language["directions"]]
        # The gap per tier: transfer.json's (its analysis was given the item tiers), else computed here from truth.json
        tiers = {(language, d["direction"]): d["tiers"] for language, d in directions if d.get("tiers")}
        source, rule = "transfer.json", result.get("tie_policy", "first")
        runs = [r for r in plan.runs if r.lang == lang and r.variant == variant]
        if not tiers and truth and runs and all((Path(r.eval_dir) / "accuracy.json").is_file() for r in runs):
            tiers, source, rule = _computed_tiers(runs, group, truth), "report (per-tier analysis)", "first"
        if tiers:
            group_record.update(_report_knowledge(doc, directions, tiers, source, rule))
        if any(d.get("mismatched_minus_none") for _, d in directions):
            group_record["mismatched"] = _report_mismatched(doc, directions)
        section[key] = group_record


def _transfer_directions(result: dict, base: dict[str, float]) -> tuple[list[list], list[str], list[dict]]:
    """Per direction of a transfer.json: its table row, its sentence of conclusion and its report.json entry."""
    rows, sentences, entries = [], [], []
    for language in result["languages"]:
        for d in language["directions"]:
            per_seed = ", ".join(f"{s['mean_gap']:+.3f}" for s in d["per_seed"])
            p_values = ", ".join(f"{m['p_value']:.3g}" for m in d["mcnemar_final"])
            rows.append(
                [
                    _direction_words(d["direction"], language["lang"]),
                    _f(base.get(d["questions"])),
                    language["steps"][-1],
                    _f(d["accuracy_with"][-1]),
                    _f(d["accuracy_without"][-1]),
                    f"{d['final_gap']:+.3f} {_ci(d['final_gap_ci'])}",
                    f"{d['mean_gap']:+.3f} {_ci(d['mean_gap_ci'])}",
                    per_seed,
                    p_values,
                    _verdict_cell(d["verdict"]),
                ]
            )
            sentences.append(
                _gap_sentence(
                    f"{_direction_words(d['direction'], language['lang'])}, mean gap over the curve",
                    d["mean_gap"],
                    d["mean_gap_ci"],
                    d["n_seed_pairs"],
                )
            )
            spread = [s["mean_gap"] for s in d["per_seed"]]
            entries.append(
                {
                    "direction": d["direction"],
                    "questions": d["questions"],
                    "base_accuracy": base.get(d["questions"]),
                    "final_step": language["steps"][-1],
                    "accuracy_with_final": d["accuracy_with"][-1],
                    "accuracy_without_final": d["accuracy_without"][-1],
                    "final_gap": d["final_gap"],
                    "final_gap_ci": d["final_gap_ci"],
                    "mean_gap": d["mean_gap"],
                    "mean_gap_ci": d["mean_gap_ci"],
                    "per_seed_mean_gaps": spread,
                    "mcnemar_p_final": [m["p_value"] for m in d["mcnemar_final"]],
                    "verdict": d["verdict"],
                    "tie_policy": result.get("tie_policy", "first"),
                    # both tie rules, as run_transfer.py computed them (absent: outputs of older versions)
                    "tie_policies": d.get("tie_policies"),
                    "tie_policies_differ": d.get("tie_policies_differ"),
                }
            )
            if len(spread) > 1:
                sentences[-1] += f" Per-seed mean gaps range from {min(spread):+.3f} to {max(spread):+.3f}."
    return rows, sentences, entries


def _computed_tiers(runs: list[Run], group: dict, truth: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """The gap per tier of facts where transfer.json has none (its analysis was not given the item tiers): per
    (language, direction), run_transfer.analyse_direction on the questions of each tier of truth.json."""
    from run_transfer import analyse_direction

    lang = group["lang"]
    stems = [Path(q).stem for q in reversed(group["questions"])]  # target-language questions first
    _, cubes = _load_cubes(runs, stems)
    seeds = sorted({r.seed for r in runs})
    found = {}
    for stem in stems:
        found[(lang, _direction(stem, lang))] = {
            tier: analyse_direction(
                _stack(cubes, runs, "bridges", seeds, stem, indices),
                _stack(cubes, runs, "no_bridges", seeds, stem, indices),
                1000,
                0,
                0.95,
            )
            for tier, indices in sorted(_tier_indices(truth, lang).items())
        }
    return found


#: The tiers of facts (synthetic_world.TIERS) in the order tables show them, in a figure title's few words.
TIER_SHORT = {
    "high": "frequent in English",
    "low": "rare in English",
    "absent": "never in English",
    "en_only": "never in the target corpus",
}
TIER_ORDER = tuple(TIER_SHORT)


def _tier_rank(tier: str) -> tuple[int, str]:
    return (TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER), tier)


def _verdict_cell(verdict: str) -> str:
    """A verdict as tables show it: 'undetermined' in bold (UNDETERMINED_TEXT says why under the table)."""
    return f"**{verdict}**" if verdict == "undetermined" else verdict


UNDETERMINED_TEXT = (
    "**undetermined**: the estimate lies outside its own 95% interval (too few bootstrap resamples to place it), so "
    "no conclusion rests on it; rerun the analysis with a larger `--n_bootstrap`."
)


def _note_undetermined(doc: ReportDoc, verdicts: list[str]) -> None:
    if "undetermined" in verdicts:
        doc.p(UNDETERMINED_TEXT)


def _source_and_destination(direction: str, lang: str) -> tuple[str, str]:
    """The corpus a direction's knowledge comes from and the language it is asked in."""
    return ("English", lang) if direction.startswith("en->") else (lang, "English")


def _report_knowledge(
    doc: ReportDoc, directions: list[tuple[str, dict]], tiers: dict, source: str, tie_rule: str
) -> dict:
    """Per direction, the "Knowledge or skill?" table: the gap per tier of facts and, where transfer.json has it
    (run_transfer.KNOWLEDGE_CONTRASTS), knowledge transfer (the difference-in-differences) and skill (the gap on
    the tier the source never states), each with its interval and verdict, and a sentence from those numbers."""
    knowledge_found = any(d.get("knowledge_transfer") for _, d in directions)
    doc.h(4, "Knowledge or skill? The gap per tier of facts" if knowledge_found else "The gap per tier of facts")
    doc.p(
        "The same gap (with − without bridges, mean over the CPT curve) on the questions of each tier of facts "
        f"(from {'`transfer.json`' if source == 'transfer.json' else 'the probing outputs, per tier of truth.json'}; "
        f"tie rule **{tie_rule}**)."
        + (
            " A direction's **knowledge transfer** is the gap on facts its source corpus states often minus the gap "
            "on facts the source never states (a difference-in-differences): both tiers are stated equally often in "
            "the destination corpus, so what bridges do for learning the destination language cancels and what "
            "remains is knowledge carried from the source. That help with the language, a **skill**, is the gap "
            "on the never-stated tier. Intervals: 95% bootstrap over questions (within each tier) and seed pairs."
            if knowledge_found
            else ""
        )
    )
    entries, knowledge, sentences, verdicts = [], [], [], []
    for lang, d in directions:
        by_tier = tiers.get((lang, d["direction"]))
        if not by_tier:
            continue
        k = d.get("knowledge_transfer")
        role = (
            {k["often_tier"]: " (the source states it often)", k["never_tier"]: " (the source never states it: skill)"}
            if k
            else {}
        )
        rows = []
        for tier, stats in sorted(by_tier.items(), key=lambda item: _tier_rank(item[0])):
            rows.append(
                [f"tier {tier}{role.get(tier, '')}", stats["n_questions"], _f(float(np.mean(stats["accuracy_with"]))),
                 _f(float(np.mean(stats["accuracy_without"]))), f"{stats['mean_gap']:+.3f} {_ci(stats['mean_gap_ci'])}",
                 f"{stats['final_gap']:+.3f} {_ci(stats['final_gap_ci'])}", _verdict_cell(stats["verdict"])]
            )  # fmt: skip
            entries.append(
                {"direction": d["direction"], "tier": tier, "questions": stats["n_questions"],
                 "mean_gap": stats["mean_gap"], "mean_gap_ci": stats["mean_gap_ci"], "final_gap": stats["final_gap"],
                 "final_gap_ci": stats["final_gap_ci"], "verdict": stats["verdict"], "from": source}
            )  # fmt: skip
            verdicts.append(stats["verdict"])
        if k:
            rows.append(
                [f"**knowledge**: gap {k['often_tier']} − gap {k['never_tier']}", "–", "–", "–",
                 f"{k['mean_did']:+.3f} {_ci(k['mean_did_ci'])}", f"{k['final_did']:+.3f} {_ci(k['final_did_ci'])}",
                 _verdict_cell(k["verdict"])]
            )  # fmt: skip
            sentence = _knowledge_sentence(d["direction"], lang, k)
            sentences.append(sentence)
            verdicts += [k["verdict"], k["skill_verdict"]]
            knowledge.append({"direction": d["direction"], **{f: k[f] for f in KNOWLEDGE_FIELDS}, "sentence": sentence})
        doc.p(f"**{_direction_words(d['direction'], lang)}**:")
        doc.table(
            ["measure", "questions", "mean acc. with", "mean acc. without", "mean gap [95% CI]", "final gap [95% CI]",
             "verdict"],
            rows,
        )  # fmt: skip
    doc.bullets(sentences)
    _note_undetermined(doc, verdicts)
    return {"tiers": entries, "knowledge": knowledge}


#: What the report keeps of a direction's knowledge_transfer (run_transfer.py's fields).
KNOWLEDGE_FIELDS = ("often_tier", "never_tier", "mean_did", "mean_did_ci", "final_did", "final_did_ci", "verdict",
                    "skill_mean_gap", "skill_mean_gap_ci", "skill_verdict", "meaning")  # fmt: skip


def _knowledge_sentence(direction: str, lang: str, k: dict) -> str:
    """Knowledge or skill, in one sentence from the difference-in-differences and the never-stated tier's gap, never
    stronger than their intervals."""
    source, destination = _source_and_destination(direction, lang)
    head = _direction_words(direction, lang)
    did = f"{k['mean_did']:+.3f} {_ci(k['mean_did_ci'])}"
    skill = (
        f"{k['skill_mean_gap']:+.3f} {_ci(k['skill_mean_gap_ci'])} on facts {source} never states ({k['never_tier']})"
    )
    difference = f"difference-in-differences ({k['often_tier']} − {k['never_tier']}) {did}"
    verdicts = (k["verdict"], k["skill_verdict"])
    if "undetermined" in verdicts:
        which = " and ".join(w for w, v in zip(("the difference", "the skill gap"), verdicts) if v == "undetermined")
        return (
            f"{head}: undetermined: {which} lies outside its own interval (too few bootstrap resamples), so neither "
            f"knowledge nor skill is read from it: {difference}; gap {skill}."
        )
    if k["verdict"] == "transfer":
        beside = {
            "transfer": f"bridges also helped learning {destination} (skill): {skill}",
            "no evidence": f"no evidence of a skill part: {skill}",
            "reverse": f"bridges slowed learning {destination} on the rest: {skill}",
        }[k["skill_verdict"]]
        return (
            f"{head}: knowledge crossed from {source}: the gap on facts {source} states often exceeds the gap on "
            f"facts it never states, {difference} excludes 0; {beside}."
        )
    if k["verdict"] == "reverse":
        return (
            f"{head}: no knowledge crossing: the gap is smaller on facts {source} states often than on facts it never "
            f"states, {difference} lies below 0; gap {skill}."
        )
    if k["skill_verdict"] == "transfer":
        return (
            f"{head}: the gap is skill, not knowledge: {skill}, {difference} includes 0 (no evidence of knowledge "
            f"from {source}; the interval allows up to {k['mean_did_ci'][1]:+.3f})."
        )
    if k["skill_verdict"] == "reverse":
        return (
            f"{head}: bridges slowed learning {destination}: {skill}; no evidence of knowledge from {source}: "
            f"{difference} includes 0."
        )
    return f"{head}: neither knowledge nor skill shown: {difference} and gap {skill} both include 0."


def _report_mismatched(doc: ReportDoc, directions: list[tuple[str, dict]]) -> list[dict]:
    """Bridges − mismatched bridges (does the right partner matter?) and mismatched bridges − none (does mere
    bilingual co-location help?) per direction, from transfer.json, with a sentence from the numbers."""
    doc.h(4, "Mismatched bridges")
    doc.p(
        "Mismatched bridges put each pair's first half in one window with *another* pair's second half: the same "
        "documents, tokens and amount of bilingual co-location as bridges, only the partners are wrong. Bridges − "
        "mismatched is what the right partner (the translation) adds; mismatched − none is what bilingual "
        "co-location alone adds. Mean over the CPT curve, 95% bootstrap intervals over questions and seed pairs."
    )
    rows, entries, sentences, verdicts = [], [], [], []
    for lang, d in directions:
        above, below = d.get("bridges_minus_mismatched"), d.get("mismatched_minus_none")
        if not above or not below:
            continue
        sentence = _mismatched_sentence(d["direction"], lang, above, below)
        rows.append(
            [_direction_words(d["direction"], lang), f"{above['mean_gap']:+.3f} {_ci(above['mean_gap_ci'])}",
             _verdict_cell(above["verdict"]), f"{below['mean_gap']:+.3f} {_ci(below['mean_gap_ci'])}",
             _verdict_cell(below["verdict"])]
        )  # fmt: skip
        sentences.append(sentence)
        verdicts += [above["verdict"], below["verdict"]]
        entries.append(
            {"direction": d["direction"], "sentence": sentence,
             **{name: {f: stats[f] for f in ("mean_gap", "mean_gap_ci", "final_gap", "final_gap_ci", "verdict")}
                for name, stats in (("bridges_minus_mismatched", above), ("mismatched_minus_none", below))}}
        )  # fmt: skip
    doc.table(["direction", "bridges − mismatched [95% CI]", "verdict", "mismatched − none [95% CI]", "verdict"], rows)
    doc.bullets(sentences)
    _note_undetermined(doc, verdicts)
    return entries


def _mismatched_sentence(direction: str, lang: str, above: dict, below: dict) -> str:
    a = f"bridges − mismatched {above['mean_gap']:+.3f} {_ci(above['mean_gap_ci'])}"
    b = f"mismatched − none {below['mean_gap']:+.3f} {_ci(below['mean_gap_ci'])}"
    partner = {
        "transfer": f"the right partner matters ({a} excludes 0)",
        "no evidence": f"no evidence that the right partner matters ({a} includes 0)",
        "reverse": f"mismatched bridges beat true ones ({a} lies below 0): the translation did not help",
        "undetermined": f"whether the right partner matters is undetermined ({a}: the estimate lies outside its "
        "interval)",
    }[above["verdict"]]
    colocation = {
        "transfer": f"mere bilingual co-location helps ({b} excludes 0)",
        "no evidence": f"no evidence that bilingual co-location without the translation helps ({b} includes 0)",
        "reverse": f"bilingual co-location without the translation hurts ({b} lies below 0)",
        "undetermined": f"whether co-location alone helps is undetermined ({b}: the estimate lies outside its "
        "interval)",
    }[below["verdict"]]
    return f"{_direction_words(direction, lang)}: {partner}; {colocation}."


def _report_tie_rules(doc: ReportDoc, entries: list[dict], lang: str, tie_policy: str) -> None:
    """Which tie rule the transfer table uses, and the analysis under both rules where they differ."""
    known = [e for e in entries if e.get("tie_policies")]
    if not known:
        doc.p(
            f"Tie rule of the table above: **{tie_policy}**. This transfer analysis records no second tie rule (it was "
            "written by an earlier version of the transfer analysis); rerun its step for both."
        )
        return
    differ = [e for e in known if e["tie_policies_differ"]]
    whose = " (the paper's)" if tie_policy == "first" else " (the paper's is first)"
    if not differ:
        doc.p(
            f"Tie rule of the table above: **{tie_policy}**{whose}. The two tie rules give the same "
            "curves, gaps and verdicts here: no exact tie for the best score changes a number of this analysis."
        )
        return
    doc.p(
        f"Tie rule of the table above: **{tie_policy}**{whose}. Ties change this analysis; under both "
        "rules (the McNemar test always counts first-rule correctness):"
    )
    rows = []
    for e in differ:
        for policy, p in e["tie_policies"].items():
            rows.append(
                [_direction_words(e["direction"], lang), policy, _f(p["accuracy_with"][-1]),
                 _f(p["accuracy_without"][-1]), f"{p['final_gap']:+.3f}", f"{p['mean_gap']:+.3f} {_ci(p['mean_gap_ci'])}",
                 _verdict_cell(p["verdict"])]
            )  # fmt: skip
    doc.table(
        ["direction", "tie rule", "acc. with (final)", "acc. without (final)", "final gap", "mean gap [95% CI]",
         "verdict"],
        rows,
    )  # fmt: skip
    _note_undetermined(doc, [p["verdict"] for e in differ for p in e["tie_policies"].values()])


def _stack(cubes: dict, runs: list[Run], setting: str, seeds: list[int], stem: str, indices: list[int]):
    """seeds x steps x questions (the given question indices) for one setting, seeds in order."""
    by_seed = {r.seed: r for r in runs if r.setting == setting}
    return np.stack([cubes[by_seed[s].name][stem][:, indices] for s in seeds])


#: Confidence of the manipulation checks' intervals (exact binomial over the items of a check).
CHECK_CONFIDENCE = 0.95
#: The manipulation checks (run_eval.py's manipulation_checks.json), in the order the report shows them.
CHECKS = ("name alignment", "embedding match", "English retention", "target learning")


def _binomial_ci(accuracy: float, n: int) -> list[float]:
    """Exact (Clopper-Pearson) interval of an accuracy over n items; a mean over seeds is taken as one proportion of
    the same n items (seeds probe the same items, so they do not add items)."""
    from scipy.stats import binomtest

    ci = binomtest(round(accuracy * n), n).proportion_ci(CHECK_CONFIDENCE, method="exact")
    return [float(ci.low), float(ci.high)]


def _final_checks(eval_dir: str, lang: str) -> tuple[int, dict] | None:
    """(step, {(check, what): (accuracy, items, chance)}) at the last checkpoint of a probing output's
    manipulation_checks.json (the final checkpoint of a run; the base model for base_eval), or None. The items per
    tier come from its item_tiers record, a question file's chance accuracy from the accuracy.json beside it."""
    data = _read_json(Path(eval_dir) / "manipulation_checks.json")
    if not data or not data.get("checkpoints"):
        return None
    final = data["checkpoints"][-1]
    items = (data.get("item_tiers") or {}).get("items_per_tier") or {}
    questions = (_read_json(Path(eval_dir) / "accuracy.json") or {}).get("questions") or {}
    values = {}
    for check, name in (("name alignment", "name_alignment"), ("embedding match", "embedding_match")):
        for direction, entry in (final.get(name) or {}).items():
            values[(check, direction)] = (entry["accuracy"], entry["n"], entry["chance"])
    wanted = {"en": ("English retention", ("high", "en_only")), lang: ("target learning", ("absent",))}
    for stem, by_tier in (final.get("tier_accuracy") or {}).items():
        check, tiers = wanted.get(question_lang_from_stem(stem), (None, ()))
        for tier in (t for t in tiers if t in by_tier and items.get(t)):
            chance = (questions.get(stem) or {}).get("chance_accuracy")
            values[(check, f"{stem}, {tier} facts")] = (by_tier[tier], items[tier], chance)
    return final["step"], values


def _relation_to_chance(ci: list[float], chance: float | None) -> str:
    if chance is None:
        return "–"
    return "at chance" if ci[0] <= chance <= ci[1] else "above chance" if ci[0] > chance else "below chance"


def _report_manipulation_checks(doc: ReportDoc, record: dict, plan: Plan) -> None:
    """Per run group, from manipulation_checks.json of the base model's probing and of each run's: the four checks
    (name alignment, embedding match, English retention, target learning) at the base model and at the final
    checkpoint per CPT setting (mean over seeds, exact binomial interval), whether each is at chance, and what that
    means for reading the gap."""
    section, found = {}, False
    for key, group in plan.groups.items():
        lang = group["lang"]
        models = [("base model", "base", [group["base_eval"]])] + [
            (f"CPT {setting.replace('_', ' ')} (final)", setting,
             [r.eval_dir for r in plan.runs if f"{r.lang}/{r.variant}" == key and r.setting == setting])
            for setting in group.get("settings", SETTINGS)
        ]  # fmt: skip
        finals = {name: [f for f in (_final_checks(d, lang) for d in dirs) if f] for _, name, dirs in models}
        if not any(finals.values()):
            continue
        if not found:
            doc.h(2, "Manipulation checks: what the gap can be read as")
            doc.p(
                "From `manipulation_checks.json` of each probing step (`run_eval.py --name_alignment --item_tiers`), "
                "at the base model and at the final checkpoint of each CPT setting (mean over seeds): **name "
                "alignment** (a 4-way choice of an entity's name in one language after a held-out sentence naming "
                "it in the other, laid out as a bridged pair), **embedding match** (an entity's two names nearest "
                "neighbours in the input embeddings; chance 1/entities), **English retention** (English questions "
                "on facts English states: high and en_only) and **target learning** (target questions on facts only "
                f"the target corpus states: absent). Intervals: exact binomial {CHECK_CONFIDENCE:.0%} over the items "
                "of a check (they cover item sampling, not seed-to-seed variation: per-seed values are shown). A "
                "check is **at chance** when its interval covers chance."
            )
            found = True
        doc.h(3, key if plan.preset.synthetic else lang)
        rows, entries, results = [], [], {}
        labels = {name: label for label, name, _ in models}
        for name, found_here in finals.items():
            for check_what in dict.fromkeys(cw for _, values in found_here for cw in values):
                per_seed = [values[check_what] for _, values in found_here if check_what in values]
                accuracy, n, chance = float(np.mean([v[0] for v in per_seed])), per_seed[0][1], per_seed[0][2]
                ci = _binomial_ci(accuracy, n)
                entry = {"check": check_what[0], "what": check_what[1], "model": name, "seeds": len(per_seed),
                         "steps": sorted({step for step, values in found_here if check_what in values}),
                         "accuracy": accuracy, "per_seed": [v[0] for v in per_seed], "n": n, "chance": chance,
                         "ci": ci, "relation": _relation_to_chance(ci, chance)}  # fmt: skip
                entries.append(entry)
                results.setdefault(check_what, {})[name] = entry
        for check_what in sorted(results, key=lambda cw: CHECKS.index(cw[0])):  # stable: as the files order them
            for name, e in results[check_what].items():
                rows.append(
                    [e["check"], e["what"], labels[name], e["seeds"], ", ".join(map(str, e["steps"])),
                     f"{e['accuracy']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]", e["n"],
                     ", ".join(f"{a:.3f}" for a in e["per_seed"]), _f(e["chance"]),
                     f"**{e['relation']}**" if e["relation"] == "at chance" else e["relation"]]
                )  # fmt: skip
        doc.table(
            ["check", "direction / questions", "model", "seeds", "step", f"accuracy [{CHECK_CONFIDENCE:.0%} CI]",
             "items", "per seed", "chance", "vs chance"],
            rows,
        )  # fmt: skip
        sentences = [
            sentence
            for check_what in sorted(results, key=lambda cw: CHECKS.index(cw[0]))
            if (sentence := _check_sentence(*check_what, results[check_what], labels, lang))
        ]
        doc.bullets(sentences)
        files = [str(Path(d) / "manipulation_checks.json") for _, _, dirs in models for d in dirs]
        section[key] = {"files": [f for f in files if Path(f).is_file()], "confidence": CHECK_CONFIDENCE,
                        "checks": entries, "sentences": sentences}  # fmt: skip
    if section:
        record["sections"]["manipulation_checks"] = section


#: What a name check at chance after CPT means, and what it means for the gap when it is at chance with bridges.
ALIGNMENT_AT_CHANCE = {
    "name alignment": (
        "names are not aligned outside the bridge",
        "a with-minus-without gap cannot be knowledge crossing through aligned names.",
    ),
    "embedding match": (
        "an entity's two names are not nearest neighbours in the input embeddings",
        "whatever links the names does not live in the embedding table (name alignment probes the whole model).",
    ),
}


def _check_sentence(check: str, what: str, results: dict, labels: dict, lang: str) -> str | None:
    """What one check says in plain words, from its intervals: whether it is at chance, and what that means for
    reading the gap. None without a chance level or without a CPT run to judge."""
    base, cpt = results.get("base"), [name for name in results if name != "base"]
    chance = next(iter(results.values()))["chance"]
    if chance is None or not cpt:
        return None

    def shown(names: list[str]) -> str:
        return (
            "; ".join(
                f"{labels[n]} {results[n]['accuracy']:.3f} [{results[n]['ci'][0]:.3f}, {results[n]['ci'][1]:.3f}] "
                f"{results[n]['relation']}"
                for n in names
            )
            + f" (chance {chance:.3f})"
        )

    at = [name for name in cpt if results[name]["relation"] == "at chance"]
    head = f"{check.capitalize()} ({what})"
    if check in ALIGNMENT_AT_CHANCE:
        meaning, with_bridges = ALIGNMENT_AT_CHANCE[check]
        if not at:
            return f"{head} after CPT: {shown(cpt)}."
        aligned = results.get("bridges", {}).get("relation") == "above chance"
        return (
            f"**{head} is at chance** after CPT: {shown(at)}: {meaning}"
            + (f"; with bridges too, so {with_bridges}" if "bridges" in at else ".")
            + (
                f" With bridges it is above chance ({shown(['bridges'])}): bridges aligned the names."
                if aligned
                else ""
            )
        )
    if check == "English retention" and base and base["relation"] == "at chance":
        return (
            f"**{head}: the base model is at chance**: {shown(['base'])}: it does not know these English facts, so "
            "there is no English knowledge to carry, and a gap on them cannot be knowledge from English."
        )
    if check == "target learning" and base and base["relation"] == "above chance":
        return (
            f"**{head}: the base model is above chance** on facts it never saw: {shown(['base'])}: the questions "
            "give their answers away (check their options)."
        )
    before = f"base model {base['accuracy']:.3f}; " if base else ""
    if at:
        learned = [name for name in cpt if results[name]["relation"] == "above chance"]
        if check == "English retention":
            what_it_means = (
                "CPT erased these English facts there: a gap at the end of CPT cannot rest on English knowledge those "
                "runs still hold."
            )
        elif learned:
            what_it_means = (
                f"CPT did not teach these runs the facts only the {lang} corpus states, and taught them to "
                f"{shown(learned)}: the gap on them (the skill measure) compares a model that learned {lang} facts "
                "with one that did not."
            )
        else:
            what_it_means = (
                f"CPT did not teach the facts only the {lang} corpus states: at this scale the model did not learn "
                f"{lang} facts, so the gap on them (the skill measure) compares models that know none of them."
            )
        return f"**{head} is at chance** after CPT: {before}{shown(at)}: {what_it_means}"
    if any(results[name]["relation"] != "above chance" for name in cpt):
        return f"{head} after CPT: {before}{shown(cpt)}."
    if check == "English retention":
        lower = [name for name in cpt if base and results[name]["ci"][1] < base["accuracy"]]
        if lower:
            return (
                f"{head}: lower after CPT than in the base model: {before}{shown(lower)}: part of the English knowledge "
                "was forgotten, none of it down to chance."
            )
        return f"{head}: kept: {before}{shown(cpt)}."
    return f"{head}: CPT taught the facts only the {lang} corpus states: {before}{shown(cpt)}."


def _report_anchors(doc: ReportDoc, record: dict, plan: Plan, truth: dict, figures: Path) -> None:
    from run_transfer import analyse_direction

    doc.h(2, "Anchors vs control: shared entity names and the frequency asymmetry")
    doc.p(
        "The same study run twice on worlds that differ only in how the target language writes names: in its own "
        "script (control: nothing is shared with English but what parallel pairs teach) or with the very same "
        "Latin names as English (anchors). Difference = accuracy with anchors − accuracy in the control, mean over "
        "the CPT curve, per tier of facts; 95% bootstrap intervals over questions and seed pairs "
        "(`run_transfer.analyse_direction`); where both variants ran both CPT settings, pooled over them and per "
        "setting, else in the one setting both ran."
    )
    section = record["sections"].setdefault("anchors", {})
    for lang in sorted({g["lang"] for g in plan.groups.values()}):
        native = [r for r in plan.runs if r.lang == lang and r.variant == "native"]
        anchors = [r for r in plan.runs if r.lang == lang and r.variant == "anchors"]
        if (
            not native
            or not anchors
            or not all((Path(r.eval_dir) / "accuracy.json").is_file() for r in native + anchors)
        ):
            doc.p(f"{lang}: probing results of both variants are missing; nothing to compare.")
            continue
        stems = [question_stem(lang, lang), question_stem(lang, "en")]
        steps_n, cubes_n = _load_cubes(native, stems)
        steps_a, cubes_a = _load_cubes(anchors, stems)
        steps = sorted(set(steps_n) & set(steps_a))
        pick_n = [steps_n.index(s) for s in steps]
        pick_a = [steps_a.index(s) for s in steps]
        tiers = _tier_indices(truth, lang)
        seeds = sorted({r.seed for r in native} & {r.seed for r in anchors})
        rows, entries, curves = [], [], {}
        shared = [
            name
            for name in SETTINGS
            if any(r.setting == name for r in native) and any(r.setting == name for r in anchors)
        ]
        for stem in stems:
            question_lang, direction = question_lang_from_stem(stem), _direction(stem, lang)
            for tier, indices in sorted(tiers.items()):
                primary = "pooled" if len(shared) > 1 else shared[0]
                for setting in [primary] + (shared if len(shared) > 1 else []):
                    settings = shared if setting == "pooled" else [setting]
                    a = np.concatenate([_stack(cubes_a, anchors, s, seeds, stem, indices)[:, pick_a] for s in settings])
                    n = np.concatenate([_stack(cubes_n, native, s, seeds, stem, indices)[:, pick_n] for s in settings])
                    stats = analyse_direction(a, n, 1000, 0, 0.95)
                    acc_a, acc_n = float(np.mean(stats["accuracy_with"])), float(np.mean(stats["accuracy_without"]))
                    if setting == primary:
                        curves[(question_lang, tier)] = (stats["accuracy_with"], stats["accuracy_without"])
                    rows.append(
                        [_direction_words(direction, lang), tier, setting.replace("_", " "), len(indices), a.shape[0],
                         _f(acc_a), _f(acc_n), f"{stats['mean_gap']:+.3f} {_ci(stats['mean_gap_ci'])}",
                         _verdict_cell(stats["verdict"])]
                    )  # fmt: skip
                    entries.append(
                        {"direction": direction, "tier": tier, "setting": setting, "questions": len(indices),
                         "run_pairs": int(a.shape[0]), "accuracy_anchors": acc_a, "accuracy_control": acc_n,
                         "difference": stats["mean_gap"], "difference_ci": stats["mean_gap_ci"],
                         "final_difference": stats["final_gap"], "final_difference_ci": stats["final_gap_ci"],
                         "verdict": stats["verdict"]}
                    )  # fmt: skip
        doc.h(3, f"{lang}: anchors − control")
        rel = _plot_anchors(lang, steps, curves, plan, truth, figures)
        if rel:
            which = " and ".join(x.replace("_", " ") for x in shared)
            doc.img(rel, f"{lang}: accuracy during CPT with shared Latin names (anchors) and native-script names "
                         f"(control), mean over seeds ({which}); step 0 is the base model")  # fmt: skip
        doc.table(
            ["direction", "tier", "CPT setting", "questions", "run pairs", "mean acc. anchors", "mean acc. control",
             "difference [95% CI]", "verdict"],
            rows,
        )  # fmt: skip
        _note_undetermined(doc, [e["verdict"] for e in entries])
        primary = "pooled" if len(shared) > 1 else shared[0]
        pooled = {(e["direction"], e["tier"]): e for e in entries if e["setting"] == primary}
        conclusions = _anchor_conclusions(lang, pooled)
        asymmetry = next((c for c in conclusions if "asymmetry" in c), "")
        doc.bullets(conclusions)
        section[lang] = {"steps": steps, "comparisons": entries, "conclusions": conclusions, "asymmetry": asymmetry}


def _anchor_conclusions(lang: str, pooled: dict) -> list[str]:
    """Sentences about the asymmetry, each only as strong as its intervals."""
    sentences = []
    high, low = pooled.get((f"en->{lang}", "high")), pooled.get((f"en->{lang}", "low"))
    for entry, what in ((high, "facts frequent in English"), (low, "facts rare in English")):
        if entry:
            sentences.append(
                _gap_sentence(
                    f"English → {lang} ({lang} questions), {what}: anchors − control",
                    entry["difference"],
                    entry["difference_ci"],
                    entry["run_pairs"],
                )
            )
    if high and low:
        if high["difference_ci"][0] > 0 and high["difference_ci"][0] > low["difference_ci"][1]:
            sentences.append(
                f"Frequency asymmetry (English → {lang}): shared names carried facts frequent in English into {lang} "
                f"({high['difference']:+.3f}) more than facts rare in English ({low['difference']:+.3f}); the "
                "intervals do not overlap."
            )
        else:
            sentences.append(
                f"No evidence here of a frequency asymmetry English → {lang}: the high-tier interval "
                f"{_ci(high['difference_ci'])} does not lie above 0 and above the low-tier interval {_ci(low['difference_ci'])}."
            )
    reverse = pooled.get((f"{lang}->en", "low"))
    if reverse:
        sentences.append(
            _gap_sentence(
                f"{lang} → English (English questions), facts rare in English and frequent in {lang}: anchors − control",
                reverse["difference"],
                reverse["difference_ci"],
                reverse["run_pairs"],
            )
        )
    return sentences


def _plot_anchors(lang, steps, curves, plan, truth, figures) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from run_transfer import save_figure

    base = {}
    for variant in ("anchors", "native"):
        group = plan.groups.get(f"{lang}/{variant}")
        if group and (Path(group["base_eval"]) / "accuracy.json").is_file():
            _, by_stem = read_predictions(group["base_eval"])
            base[variant] = {stem: next(iter(v.values())) for stem, v in by_stem.items() if v}
    tiers = _tier_indices(truth, lang)
    fig, axes = plt.subplots(2, len(tiers), figsize=(5 * len(tiers), 6.4), squeeze=False, sharey=True)
    for r, question_lang in enumerate((lang, "en")):
        stem = question_stem(lang, question_lang)
        for c, tier in enumerate(sorted(tiers)):
            ax = axes[r, c]
            anchors_curve, control_curve = curves[(question_lang, tier)]
            for variant, values, color in (("anchors", anchors_curve, "#2ca02c"), ("native", control_curve, "#7f7f7f")):
                xs, ys = list(steps), list(values)
                if variant in base and stem in base[variant]:
                    xs, ys = [0, *xs], [float(np.mean(base[variant][stem][tiers[tier]])), *ys]
                label = "anchors (shared Latin names)" if variant == "anchors" else "control (native-script names)"
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
            ax.axhline(0.25, color="black", linewidth=0.6, linestyle=":")
            direction = f"English → {lang}" if question_lang == lang else f"{lang} → English"
            ax.set_title(
                f"{question_lang} questions ({direction}), {tier} tier: {TIER_SHORT.get(tier, tier)}", fontsize=9
            )
            ax.set_xlabel("CPT step")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("cloze accuracy")
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{lang}: shared names vs native names (dotted: chance)", fontsize=10)
    fig.tight_layout()
    name = f"{lang}-anchors_vs_control.png"
    save_figure(fig, figures / name, dpi=110)
    plt.close(fig)
    return f"figures/{name}"


def _report_diagnostic(doc: ReportDoc, record: dict, plan: Plan, figures: Path) -> None:
    doc.h(2, "Bridge diagnostic: does the model use the English side in context?")
    doc.p(
        "On held-out parallel pairs (never trained on), the mean token loss of the target side alone, after its own "
        "English side, and after another pair's English side (`run_eval.py --diagnostic_pairs`), at the final "
        "checkpoint, mean over seeds. If the model learned to read a bridge, the loss after its own English side "
        "falls below the loss alone and the mismatched English side does not help."
    )
    section = record["sections"].setdefault("diagnostic", {})
    rows, sentences = [], []
    curves = {}
    for key, group in plan.groups.items():
        for setting in SETTINGS:
            runs = [
                r
                for r in plan.runs
                if r.lang == group["lang"] and r.variant == group["variant"] and r.setting == setting
            ]
            results = [_read_json(Path(r.eval_dir) / "bridge_diagnostic.json") for r in runs]
            results = [x for x in results if x and x.get("checkpoints")]
            if not results:
                continue
            finals = [_diagnostic_losses(x["checkpoints"][-1]) for x in results]
            # the side a pair shows first (English unless the runs used --pair_order tgt_first/random)
            context = {"en": "English side"}.get(results[0].get("context_side", "en"), "other side")
            mean = {
                k: sum(f[k] for f in finals) / len(finals)
                for k in ("alone", "after_own_context", "after_mismatched_context")
            }
            own_gain = [f["after_own_context"] - f["alone"] for f in finals]
            entry = {
                "setting": setting,
                "seeds": len(finals),
                "final_step": finals[0]["step"],
                **mean,
                "own_minus_alone_per_seed": own_gain,
                "mismatched_minus_alone": mean["after_mismatched_context"] - mean["alone"],
            }
            section.setdefault(key, []).append(entry)
            curves[(key, setting)] = results
            rows.append(
                [key, setting.replace("_", " "), len(finals), finals[0]["step"], _f(mean["alone"]),
                 _f(mean["after_own_context"]), _f(mean["after_mismatched_context"]),
                 ", ".join(f"{g:+.3f}" for g in own_gain)]
            )  # fmt: skip
            if setting == "bridges":
                uses = all(g < -0.05 for g in own_gain) and mean["after_mismatched_context"] > mean["after_own_context"]
                verb = (
                    f"the model learned to use the {context} in context"
                    if uses
                    else f"no consistent sign that the model uses the {context} in context"
                )
                sentences.append(
                    f"{key}, with bridges: target loss {mean['alone']:.3f} alone, {mean['after_own_context']:.3f} after "
                    f"its own {context} (per seed {', '.join(f'{g:+.3f}' for g in own_gain)}), "
                    f"{mean['after_mismatched_context']:.3f} after a mismatched one: {verb}."
                )
    if not rows:
        doc.p("No bridge diagnostic outputs found.")
        return
    doc.table(
        ["run group", "CPT setting", "seeds", "step", "loss alone", "after own English", "after mismatched English",
         "own − alone (per seed)"],
        rows,
    )  # fmt: skip
    doc.bullets(sentences)
    rel = _plot_diagnostic(curves, figures)
    if rel:
        doc.img(rel, "Bridge diagnostic during CPT (mean over seeds): target-side loss in three contexts")


def _diagnostic_losses(entry: dict) -> dict:
    """The three losses of a bridge_diagnostic.json checkpoint (outputs made before the pair order was followed
    name the context English)."""
    return {
        **entry,
        "after_own_context": entry.get("after_own_context", entry.get("after_own_english")),
        "after_mismatched_context": entry.get("after_mismatched_context", entry.get("after_mismatched_english")),
    }


def _plot_diagnostic(curves: dict, figures: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from run_transfer import save_figure

    keys = sorted({k for k, _ in curves}, key=lambda k: (k.split("/")[1] != "native", k))  # the control first
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    for c, key in enumerate(keys):
        ax = axes[0, c]
        for setting, style in (("bridges", "-"), ("no_bridges", "--")):
            results = curves.get((key, setting))
            if not results:
                continue
            steps = [e["step"] for e in results[0]["checkpoints"]]
            for measure, color in (
                ("alone", "#7f7f7f"),
                ("after_own_context", "#1f77b4"),
                ("after_mismatched_context", "#d62728"),
            ):
                values = np.mean(
                    [[_diagnostic_losses(e)[measure] for e in x["checkpoints"][: len(steps)]] for x in results], axis=0
                )
                ax.plot(steps, values, style, color=color, marker="o", markersize=2.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("CPT step")
        ax.set_ylabel("target-side loss (nats/token)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=color, label=label)
        for color, label in (("#7f7f7f", "alone"), ("#1f77b4", "after its own English side"),
                             ("#d62728", "after a mismatched English side"))
    ] + [Line2D([], [], color="black", linestyle=style, label=label)
         for style, label in (("-", "trained with bridges"), ("--", "trained without bridges"))]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    name = "bridge_diagnostic.png"
    save_figure(fig, figures / name, dpi=110)
    plt.close(fig)
    return f"figures/{name}"


def _report_density(doc: ReportDoc, record: dict, plan: Plan, truth: dict | None) -> None:
    doc.h(2, "Cultural density: measured vs planted")
    doc.p(
        "`run_density.py` retrieves the top-k BM25 documents of each question (filled with its answer) from a corpus "
        "and counts those its lexical judge says state the fact; density = occurrences / documents (the paper's "
        "Table 1)."
        + (
            " The synthetic world knows the true count of every fact in every corpus (`world/truth.json`)."
            if truth
            else ""
        )
    )
    section = record["sections"].setdefault("density", {})
    for key, group in plan.groups.items():
        result = _read_json(Path(group["density"]) / "density.json")
        lang = group["lang"]
        if not result and len(group.get("settings", SETTINGS)) < 2:
            continue  # no density step for a group that serves only the anchors comparison
        if not result:
            doc.p(f"{key}: no density output at `{group['density']}/density.json`.")
            continue
        doc.h(3, f"{key}")
        measured: dict[tuple[str, str], dict[int, int]] = {}
        for entry in result["questions"]:
            measured.setdefault((entry["questions"], entry["corpus"]), {})[entry["index"]] = entry["occurrences"]
        rows, entries = [], []
        for row in result["table"]:
            question_lang = question_lang_from_stem(row["questions"])
            planted_key = question_lang if truth else None
            corpus_lang = row["corpus"]
            comparable = truth and question_lang == corpus_lang
            planted = [r["counts"][planted_key] for r in truth["questions"][lang]] if comparable else None
            got = measured.get((row["questions"], row["corpus"]), {})
            entry = {"questions": row["questions"], "corpus": row["corpus"], "documents": row["documents"],
                     "occurrences": row["occurrences"], "density": row["density"]}  # fmt: skip
            cells = [
                row["questions"],
                row["corpus"],
                f"{row['documents']:,}",
                row["occurrences"],
                _f(row["density"], ".3e"),
            ]
            if planted is not None:
                exact = sum(1 for i, c in enumerate(planted) if got.get(i) == min(c, result["setting"]["top_k"]))
                error = sum(abs(got.get(i, 0) - c) for i, c in enumerate(planted)) / len(planted)
                planted_total = sum(planted)
                entry.update(planted_occurrences=planted_total, planted_density=planted_total / row["documents"],
                             questions_exact=exact, questions_planted=len(planted), mean_abs_error=error)  # fmt: skip
                cells += [
                    planted_total,
                    _f(planted_total / row["documents"], ".3e"),
                    f"{exact}/{len(planted)}",
                    _f(error, ".2f"),
                ]
            else:
                cells += ["–", "–", "–", "–"]
            rows.append(cells)
            entries.append(entry)
        doc.table(
            ["questions", "corpus", "documents", "measured occurrences", "measured density", "planted occurrences",
             "planted density", "questions exact", "mean |error| per question"],
            rows,
        )  # fmt: skip
        if truth:
            tier_rows = []
            tiers = _tier_indices(truth, lang)
            for tier, indices in sorted(tiers.items()):
                cells = [tier, len(indices)]
                for question_lang in ("en", lang):
                    stem = question_stem(lang, question_lang)
                    got = measured.get((stem, question_lang), {})
                    docs = next((r["documents"] for r in result["table"] if r["corpus"] == question_lang), None)
                    planted = sum(truth["questions"][lang][i]["counts"][question_lang] for i in indices)
                    found = sum(got.get(i, 0) for i in indices)
                    cells += [f"{found} / {planted}", _f(found / docs, ".2e") if docs else "–"]
                tier_rows.append(cells)
            doc.p("Per tier (Table-1 style), measured / planted occurrences and measured density:")
            doc.table(
                [
                    "tier",
                    "questions",
                    "English corpus: occ.",
                    "English density",
                    f"{lang} corpus: occ.",
                    f"{lang} density",
                ],
                tier_rows,
            )
        analysis = result.get("instance_analysis")
        slopes = []
        if analysis and analysis.get("results"):
            doc.p(
                "Instance-level analysis (`run_density.py`, first seed, final checkpoint): mean occurrences in the "
                "source corpus of items that transferred (right with bridges, wrong without) vs all items, and the "
                "least-squares slope of the per-item gap (right with bridges − right without: +1, 0, −1) on log(1 + "
                "source-corpus occurrences), with a 95% bootstrap interval over items (`gap_vs_log_occurrences`): the "
                "knowledge-or-skill question on measured density, where a world has no tiers."
            )
            rows = []
            for r in analysis["results"]:
                fit = r["gap_vs_log_occurrences"]
                slopes.append(_slope_entry(r))
                rows.append(
                    [r["questions"], r["source_corpus"], r["items"], r["transferred"],
                     _f(r["mean_occurrences_transferred"], ".2f"), _f(r["mean_occurrences_all"], ".2f"),
                     f"{fit['slope']:+.3f} {_ci(fit['slope_ci'])}" if fit["slope"] is not None else "–",
                     fit["n_items"], _verdict_cell(slopes[-1]["verdict"]) if slopes[-1]["verdict"] else "–"]
                )  # fmt: skip
            doc.table(
                ["questions", "source corpus", "items", "transferred", "mean occ. transferred", "mean occ. all",
                 "gap slope on log(1 + occ.) [95% CI]", "items in fit", "interval vs 0"],
                rows,
            )  # fmt: skip
            doc.bullets([e["sentence"] for e in slopes])
            _note_undetermined(doc, [e["verdict"] for e in slopes])
        section[key] = {"density_json": str(Path(group["density"]) / "density.json"), "rows": entries,
                        "instance_analysis": (analysis or {}).get("results"), "gap_slopes": slopes}  # fmt: skip


def _slope_entry(result: dict) -> dict:
    """The gap-vs-occurrences slope of one analysed question file (density.json's gap_vs_log_occurrences) with its
    verdict (run_transfer.verdict's rule on its interval) and a sentence from the numbers."""
    from run_transfer import verdict

    fit, where = result["gap_vs_log_occurrences"], f"{result['questions']} (source corpus {result['source_corpus']})"
    entry = {"questions": result["questions"], "source_corpus": result["source_corpus"], "slope": fit["slope"],
             "slope_ci": fit["slope_ci"], "n_items": fit["n_items"], "meaning": fit["meaning"], "verdict": None}  # fmt: skip
    if fit["slope"] is None:
        return {**entry, "sentence": f"{where}: no slope: {fit.get('reason', 'not computed')}."}
    entry["verdict"], reading = {
        "transfer": ("above 0", "facts the source corpus states more often gained more from bridges"),
        "reverse": ("below 0", "facts the source corpus states more often gained less from bridges"),
        "no evidence": ("includes 0", "no evidence that the gap grows with how often the source states a fact"),
        "undetermined": ("undetermined", "the slope lies outside its own interval (too few resamples): no conclusion"),
    }[verdict(tuple(fit["slope_ci"]), fit["slope"])]
    sentence = (
        f"{where}: slope {fit['slope']:+.3f} {_ci(fit['slope_ci'])} over {fit['n_items']} items, interval "
        f"{entry['verdict']}: {reading}. "
        f"The slope is the {fit['meaning']}."
    )
    return {**entry, "sentence": sentence}


def _report_packing(doc: ReportDoc, record: dict, plan: Plan) -> None:
    doc.h(2, "Packing audits: the two settings differ only in co-location")
    doc.p(
        "Each CPT run writes `packing_audit.json` before training (`run_cpt.py`). With bridges every pair must be "
        "co-located (100%), without bridges none (0%), and both settings of a seed must pack the same multiset of "
        "tokens and see the same documents (equal hashes across the two actual runs)."
    )
    rows, entries = [], []
    hashes: dict[tuple, dict[str, tuple]] = {}
    for run in plan.runs:
        audit = _read_json(Path(run.dir) / "packing_audit.json")
        if not audit:
            continue
        pairs, digests = audit.get("pairs", {}), audit.get("hashes", {})
        digest = (digests.get("tokens_multiset_sha256"), digests.get("documents_seen_sha256"))
        hashes.setdefault((run.lang, run.variant, run.seed), {})[run.setting] = digest
        share = pairs.get("co_located_percent")
        rows.append(
            [run.name, pairs.get("total"), pairs.get("co_located"), pairs.get("split"), _f(share, ".0f"),
             str(digest[0])[:12], str(digest[1])[:12], _f(audit.get("real_token_fraction"), ".3f"),
             audit.get("windows"), audit.get("guarantees_hold"), "; ".join(audit.get("unchecked") or []) or "none"]
        )  # fmt: skip
        entries.append(
            {"run": run.name, "setting": run.setting, "pairs_total": pairs.get("total"),
             "pairs_co_located": pairs.get("co_located"), "pairs_split": pairs.get("split"),
             "co_located_percent": share, "tokens_multiset_sha256": digest[0], "documents_seen_sha256": digest[1],
             "real_token_fraction": audit.get("real_token_fraction"), "windows": audit.get("windows"),
             "guarantees_hold": audit.get("guarantees_hold"), "unchecked": audit.get("unchecked") or []}
        )  # fmt: skip
    if not rows:
        doc.p("No packing audits found.")
        return
    doc.table(
        ["run", "pairs", "co-located", "split", "co-located %", "token multiset hash", "documents-seen hash",
         "real-token fraction", "windows", "audit: guarantees hold", "unchecked guarantees"],
        rows,
    )  # fmt: skip
    colocation_ok = all(e["co_located_percent"] == (100.0 if e["setting"] == "bridges" else 0.0) for e in entries)
    pairs_of_runs = [v for v in hashes.values() if len(v) >= 2]  # the settings of a seed
    equal_hashes = bool(pairs_of_runs) and all(
        len(set(v.values())) == 1 and None not in next(iter(v.values())) for v in pairs_of_runs
    )
    unchecked = [e for e in entries if e["unchecked"]]
    guarantees_hold = all(e["guarantees_hold"] is True for e in entries)
    doc.bullets(
        [
            "Co-location: " + ("every with-bridges run 100%, every without-bridges run 0%." if colocation_ok else
                               "**NOT as required** (see the table): the comparison is not valid."),
            "Same tokens and documents in both settings: " + (
                "equal hashes for every seed pair of actual runs." if equal_hashes
                else "**hashes differ or are missing** for some seed pair."),
            "Every run's audit: " + ("all guarantees checked and holding." if guarantees_hold else
                                     "**guarantees not all shown to hold** (`guarantees_hold` false or absent)."),
        ]
        + [
            f"**{e['run']}: unchecked**, so not shown to hold: {'; '.join(e['unchecked'])}."
            for e in unchecked
        ]
    )  # fmt: skip
    record["sections"]["packing"] = {"runs": entries, "colocation_ok": colocation_ok, "equal_hashes": equal_hashes,
                                     "guarantees_hold": guarantees_hold,
                                     "unchecked": {e["run"]: e["unchecked"] for e in unchecked}}  # fmt: skip


def _report_scale(doc: ReportDoc, record: dict, plan: Plan) -> None:
    doc.h(2, "What this scale can and cannot show")
    sections = record["sections"]
    items = []
    if plan.preset.synthetic:
        verdicts = [d["verdict"] for g in sections.get("transfer", {}).values() for d in g.get("directions", [])]
        if "undetermined" in verdicts:
            items.append(
                "Some with-minus-without verdicts are undetermined (the estimate outside its own interval): rerun the "
                "transfer analysis with a larger `--n_bootstrap` before reading them."
            )
        if verdicts and all(v == "no evidence" for v in verdicts):
            items.append(
                "No with-minus-without gap excludes 0 here. This is not evidence against the paper: a model of this "
                "size on a synthetic language is far below the scale where the paper measured transfer through "
                "bridges; it only shows that at this scale bridges do not turn into measurable transfer."
            )
        elif verdicts:
            shown = sorted({v for v in verdicts})
            items.append(
                f"Verdicts of the with-minus-without gaps here: {', '.join(shown)} (see the transfer tables for which "
                "direction). A synthetic world and a small model make this a demonstration of the method, not a "
                "replication of the paper's numbers."
            )
        diag = sections.get("diagnostic", {})
        learned = [
            e for entries in diag.values() for e in entries if e["setting"] == "bridges" and e["own_minus_alone_per_seed"]
            and all(g < -0.05 for g in e["own_minus_alone_per_seed"])
        ]  # fmt: skip
        if learned:
            items.append(
                "What it can show: the bridge diagnostic shows the model reading the English side of a pair in "
                "context, so whether knowledge then transfers is a separate question that accuracy gaps answer."
            )
        anchors = sections.get("anchors", {})
        for entry in anchors.values():
            items.append("What it can show with shared names: " + entry["asymmetry"])
        packing = sections.get("packing")
        if packing:
            items.append(
                "The guarantees of the comparison on this run: "
                + ("co-location 100/0 and " if packing["colocation_ok"] else "co-location NOT 100/0 and ")
                + ("equal document multisets" if packing["equal_hashes"] else "document multisets NOT equal")
                + (
                    "; every audit checked all its guarantees."
                    if packing["guarantees_hold"]
                    else f"; NOT every guarantee was checked (unchecked in {', '.join(packing['unchecked']) or '?'})."
                )
            )
        items.append(
            "What it cannot show: how large the effects are in real languages and real models; with "
            f"{len({r.seed for r in plan.runs})} seeds the intervals are wide, and facts are memorised at a step "
            "that moves from seed to seed, which swings single-run gaps; use `--preset gpu-small` or `--preset paper` "
            "for larger scales."
        )
    else:
        items.append("Paper scale: read the tables above against the paper's Figure 3 and Table 1.")
    doc.bullets(items)
    record["sections"]["scale"] = items


# --------------------------------------------------------------------------------------
# A sweep: the cells side by side
# --------------------------------------------------------------------------------------


def write_sweep_report(plan: Plan) -> dict:
    """sweep_report.md/.html/.json and figures/dose_response.png of a sweep, from its cells' outputs and reports
    (written first): per cell its values, status and wall time; per cell, run group and direction the mean gap
    with its CI on all questions, per tier of facts, and the knowledge contrast and bridges minus mismatched
    bridges where transfer.json has them; the manipulation checks per cell; and the gaps against each swept
    factor. Returns what write_report returns."""
    out = Path(plan.out)
    factors, timings, unfinished = plan.config["sweep"], read_step_seconds(out), unfinished_steps(plan)
    doc, figures = ReportDoc(), out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    record = {"generated": utc_now(), "configuration": plan.config, "factors": factors,
              "status": _status(plan, unfinished), "cells": {}}  # fmt: skip
    doc.h(1, f"Sweep of the `{plan.preset.name}` study over {', '.join(factors)}")
    doc.p(
        f"Configuration: {configuration_text(plan.config)}. Generated {record['generated']}. {len(plan.cells)} cells, "
        "one study each, in `<cell>/` with its own report; a step whose command is the same in several cells ran "
        "once (`shared/`). Gaps are with minus without bridges, mean over the CPT curve, with 95% bootstrap "
        "intervals over questions and seed pairs (`run_transfer.py`)."
    )
    _unfinished_banner(doc, plan, unfinished)
    users = Counter(s.id for cell in plan.cells.values() for s in cell.steps)
    shared = {step_id for step_id, n in users.items() if n > 1}  # run once for several cells
    rows, gaps, checks = [], [], []
    for name, cell in plan.cells.items():
        own = [timings.get(s.id) for s in cell.steps if s.id not in shared]
        used = [timings.get(s.id) for s in cell.steps if s.id in shared]
        cell_unfinished = [s.id for s in cell.steps if s.id in unfinished]
        entry = {"values": cell.config["cell"], "report": str(Path(cell.out) / "report.md"),
                 "own_steps_s": sum(t or 0 for t in own), "shared_steps_s": sum(t or 0 for t in used),
                 "shared_steps": [s.id for s in cell.steps if s.id in shared], "unfinished": cell_unfinished,
                 "gaps": _cell_gaps(cell), "checks": _cell_checks(cell)}  # fmt: skip
        record["cells"][name] = entry
        rows.append([f"[{name}]({name}/report.md)", *(_shown_value(v) for v in entry["values"].values()),
                     fmt_time(entry["own_steps_s"]), fmt_time(entry["shared_steps_s"]),
                     "finished" if not cell_unfinished else f"**{len(cell_unfinished)} steps unfinished**"])  # fmt: skip
        gaps += [[name, *g.values()] for g in entry["gaps"]]
        checks += [[name, *c.values()] for c in entry["checks"]]
    record["sweep_steps_s"] = sum(timings.get(s.id) or 0 for s in plan.steps)
    doc.h(2, "Cells")
    doc.table(["cell", *factors, "its own steps took", "shared steps it used took", "status"], rows)
    doc.p(
        f"A cell's time is the sum of its steps' seconds. Steps shared by several cells ({len(shared)}: "
        f"{', '.join(sorted(shared)) or 'none'}) ran once for all of them: they are counted once in the sweep's "
        f"{fmt_time(record['sweep_steps_s'])} of steps, and not in any cell's own time."
    )
    doc.h(2, "Gaps per cell")
    doc.table(["cell", "group", "direction", "measure", "mean gap [95% CI]", "verdict", "from"], [
        [r[0], r[1], r[2], r[3], f"{r[4]:+.3f} {_ci(r[5])}", r[6], r[7]] for r in gaps])  # fmt: skip
    figure = _plot_dose_response(record, factors, figures)
    if figure:
        doc.img(figure, "Mean gap [95% CI] per direction and measure against each swept factor (other factors as "
                        "separate lines)")  # fmt: skip
    doc.h(2, "Manipulation checks per cell")
    doc.p(
        "Per cell and run group: the share of parallel pairs co-located in one window per setting (must be 100% with "
        "bridges, 0% otherwise), whether every packing audit holds its guarantees, and, where probing measured it "
        "(`manipulation_checks.json`), the manipulation checks at the final checkpoint, mean over seeds: name "
        "alignment (chance 0.25), embedding match (chance 1/entities), English retention, target learning (chance "
        "0.25; each cell's report has their intervals)."
    )
    doc.table(
        ["cell", "group", "setting", "runs", "co-located %", "audits hold", "manipulation checks (final)"], checks
    )
    md, page, data = out / "sweep_report.md", out / "sweep_report.html", out / "sweep_report.json"
    write_text_atomic(md, doc.markdown())
    write_text_atomic(page, doc.html(f"Sweep report ({plan.preset.name})"))
    write_json_atomic(data, record)
    return {"md": md, "html": page, "json": data, "steps": len(plan.steps), "unfinished": unfinished}


def _shown_value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _cell_gaps(cell: Plan) -> list[dict]:
    """A cell's gaps per run group and direction: all questions, per tier, the knowledge contrast and bridges minus
    mismatched bridges (from transfer.json; per tier from the cell's report when transfer.json has no tiers)."""
    report = (_read_json(Path(cell.out) / "report.json") or {}).get("sections", {}).get("transfer", {})
    found = []
    for key, group in cell.groups.items():
        result = _read_json(Path(group["transfer"]) / "transfer.json")
        for d in (d for language in (result or {}).get("languages", []) for d in language["directions"]):
            measures = [("all questions", d, "transfer.json")]
            tiers = d.get("tiers") or {
                t["tier"]: t for t in report.get(key, {}).get("tiers", []) if t["direction"] == d["direction"]
            }
            source = "transfer.json" if d.get("tiers") else "report (per-tier analysis)"
            measures += [(f"tier {tier}", stats, source) for tier, stats in tiers.items()]
            if d.get("bridges_minus_mismatched"):
                measures.append(("bridges − mismatched", d["bridges_minus_mismatched"], "transfer.json"))
            k = d.get("knowledge_transfer")
            if k:
                k = {"mean_gap": k["mean_did"], "mean_gap_ci": k["mean_did_ci"], "verdict": k["verdict"]}
                measures.append((f"knowledge ({d['knowledge_transfer']['often_tier']} − "
                                 f"{d['knowledge_transfer']['never_tier']})", k, "transfer.json"))  # fmt: skip
            found += [{"group": key, "direction": d["direction"], "measure": measure, "mean_gap": stats["mean_gap"],
                       "mean_gap_ci": stats["mean_gap_ci"], "verdict": stats["verdict"], "from": source}
                      for measure, stats, source in measures]  # fmt: skip
    return found


def _cell_checks(cell: Plan) -> list[dict]:
    """Per run group and setting of a cell: co-location and audit guarantees (packing_audit.json) and the final
    manipulation checks at the final checkpoint, mean over its runs (manipulation_checks.json, where probing wrote
    it; ``_final_checks``)."""
    found = []
    for key, group in cell.groups.items():
        for setting in group["settings"]:
            runs = [r for r in cell.runs if f"{r.lang}/{r.variant}" == key and r.setting == setting]
            audits = [a for a in (_read_json(Path(r.dir) / "packing_audit.json") for r in runs) if a]
            shares = [a["pairs"]["co_located_percent"] for a in audits]
            checks: dict[tuple[str, str], list[float]] = {}
            for r in runs:
                final = _final_checks(r.eval_dir, r.lang)
                for (check, what), (accuracy, _, _) in (final[1] if final else {}).items():
                    checks.setdefault((check, what), []).append(accuracy)
            found.append({"group": key, "setting": setting, "runs": f"{len(audits)}/{len(runs)} audited",
                          "co_located_percent": _f(float(np.mean(shares)), ".1f") if shares else "-",
                          "audits_hold": all(a.get("guarantees_hold") is True for a in audits) if audits else "-",
                          "manipulation_checks": "; ".join(f"{check} {what} {np.mean(v):.3f}"
                                                          for (check, what), v in checks.items()) or "-"})  # fmt: skip
    return found


def _plot_dose_response(record: dict, factors: dict, figures: Path) -> str | None:
    """Per direction (rows) and swept factor (columns): the mean gap with its CI per value of the factor, one line
    per run group, measure and combination of the other factors' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from run_transfer import save_figure

    points = [(cell["values"], g) for cell in record["cells"].values() for g in cell["gaps"]]
    directions = sorted({g["direction"] for _, g in points})
    if not directions:
        return None
    fig, axes = plt.subplots(len(directions), len(factors), figsize=(5.5 * len(factors), 3.6 * len(directions)),
                             squeeze=False)  # fmt: skip
    for col, factor in enumerate(factors):
        ticks = [_shown_value(v) for v in factors[factor]]
        for row, direction in enumerate(directions):
            ax, lines = axes[row, col], {}
            for values, g in points:
                if g["direction"] == direction:
                    others = ", ".join(f"{k}={_shown_value(v)}" for k, v in values.items() if k != factor)
                    label = f"{g['group']} {g['measure']}" + (f" ({others})" if others else "")
                    lines.setdefault(label, []).append((ticks.index(_shown_value(values[factor])), g))
            for i, (label, line) in enumerate(lines.items()):
                line.sort(key=lambda p: p[0])
                x = [p[0] + 0.05 * (i - (len(lines) - 1) / 2) for p in line]  # side by side, not on top
                y = np.array([p[1]["mean_gap"] for p in line])
                ci = np.array([p[1]["mean_gap_ci"] for p in line])
                (drawn,) = ax.plot(x, y, marker="o", label=label)
                ax.vlines(x, ci[:, 0], ci[:, 1], color=drawn.get_color())  # the interval as computed, whatever y
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(ticks)), ticks)
            ax.set_xlabel(factor)
            ax.set_ylabel(f"{direction}: mean gap")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, figures / "dose_response.png", dpi=110)
    plt.close(fig)
    return "figures/dose_response.png"


# --------------------------------------------------------------------------------------
# On its own: the report of a finished study folder
# --------------------------------------------------------------------------------------


def read_plan(out: Path) -> SimpleNamespace:
    """The plan of the study (or sweep) in ``out``, read back from the ``plan.json`` run_study.py wrote there: the
    fields the report reads (preset, out, steps, runs, groups, dirs, config, state_dir, cells), its paths as the study
    ran them (relative to the repository root, where the steps run)."""
    path = out / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not the output folder of a run_study.py run")
    record = json.loads(path.read_text(encoding="utf-8"))
    recorded_out = record.get("out", str(out))
    if (REPO_DIR / recorded_out).resolve() != (REPO_DIR / out).resolve():
        raise ValueError(f"{path} is the plan of a study in {recorded_out}, and its paths point there, not to {out}")
    if "configuration" not in record:
        raise ValueError(f"{path} was written by an older run_study.py: run the study's command again to record it")
    return _plan_from_record(record)


def _plan_from_record(record: dict) -> SimpleNamespace:
    return SimpleNamespace(
        preset=SimpleNamespace(**record["preset"]),
        out=record["out"],
        steps=[SimpleNamespace(**step) for step in record["steps"]],
        runs=[SimpleNamespace(**run) for run in record["runs"]],
        groups=record["groups"],
        dirs=record["dirs"],
        config=record["configuration"],
        state_dir=record["state_dir"],
        cells={name: _plan_from_record(cell) for name, cell in record.get("cells", {}).items()},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", help="The output folder of a run_study.py run (it holds plan.json).")
    args = parser.parse_args(argv)
    # 1. The plan, read back from the study folder; paths in it are relative to the repository root.
    out = Path(args.study_dir).resolve()
    os.chdir(REPO_DIR)
    plan = read_plan(out.relative_to(REPO_DIR) if out.is_relative_to(REPO_DIR) else out)
    # 2. The report (a sweep's: each cell's and the sweep's), from the files the steps wrote.
    paths = write_reports(plan)
    if paths["unfinished"]:
        print(f"The study is NOT finished: {len(paths['unfinished'])} of {paths['steps']} steps did not finish.")
    print(f"Report: {paths['md']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    exit_on_input_error(main)
